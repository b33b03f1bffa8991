//! Instructions our KVM cannot emulate, completed by the VMM itself.
//!
//! On PVM hosts a protected-mode `iret` with 32- or 16-bit operand size ends in an emulation failure
//! (PLATFORM.md), and so do some ring-0 instructions a Linux boot meets: `popcnt`, `clac`/`stac`,
//! `cmpxchg16b`, `fnclex`, `fwait` and `int3`. We complete them here from the guest's own registers, memory, stack and descriptor tables,
//! the same way in record and replay, so the result is deterministic and nothing new is logged. Anything
//! we cannot complete is reported with its bytes.

use crate::paging::{PagingError, PagingMode};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use memory::GuestMemory;
use thiserror::Error;

/// Why an instruction could not be completed by the VMM.
#[derive(Debug, Error)]
pub enum EmulateError {
    /// The instruction is not one we complete.
    #[error("KVM could not emulate the instruction at rip {rip:#x} (bytes {bytes}) and neither can retrovisor")]
    Unsupported {
        /// Guest RIP.
        rip: u64,
        /// The instruction bytes, hex.
        bytes: String,
    },
    /// The instruction is one we complete, but in a form we do not (task return, virtual-8086, ...).
    #[error("cannot complete `iret` at rip {rip:#x}: {why}")]
    IretUnsupported {
        /// Guest RIP.
        rip: u64,
        /// What made it unsupported.
        why: &'static str,
    },
    /// The stack or a descriptor could not be read.
    #[error("cannot complete `iret` at rip {rip:#x}: {source}")]
    Memory {
        /// Guest RIP.
        rip: u64,
        /// The failed access.
        source: PagingError,
    },
    /// The memory operand of an instruction we complete could not be read (the guest would take a page
    /// fault, which the VMM does not deliver).
    #[error("cannot complete `{mnemonic}` at rip {rip:#x}: its memory operand: {source}")]
    Operand {
        /// Guest RIP.
        rip: u64,
        /// The instruction.
        mnemonic: String,
        /// The failed access.
        source: PagingError,
    },
}

/// What completing an instruction left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Nothing: the registers hold the instruction's result and RIP is past it.
    Done,
    /// RIP is past the instruction, and this exception (vector) must now be delivered to the guest, as
    /// `int3` raises #BP with the address of the next instruction on the stack.
    Exception(u8),
    /// The instruction faults: RIP stays on it, and this exception (vector, one without an error code)
    /// must be delivered, as `fwait` raises #MF while an unmasked x87 exception is pending.
    Fault(u8),
}

/// RFLAGS.AC, which `clac` and `stac` clear and set.
const RFLAGS_AC: u64 = 1 << 18;
/// The arithmetic flags (CF, PF, AF, ZF, SF, OF).
const RFLAGS_ARITH: u64 = 0x8d5;
/// RFLAGS.ZF.
const RFLAGS_ZF: u64 = 1 << 6;
/// The #BP vector.
pub const VECTOR_BP: u8 = 3;
/// The #NM vector (device not available).
pub const VECTOR_NM: u8 = 7;
/// The #MF vector (x87 floating-point error).
pub const VECTOR_MF: u8 = 16;
/// CR0.MP and CR0.TS: with both set, `fwait` raises #NM.
const CR0_MP_TS: u64 = (1 << 1) | (1 << 3);
/// x87 status word: the exception flags (IE, DE, ZE, OE, UE, PE), the stack fault flag, the error
/// summary and busy bits, which `fnclex` clears.
const FSW_CLEARED_BY_FNCLEX: u16 = 0x80ff;
/// x87 status word: error summary, set while an unmasked exception is pending.
const FSW_ES: u16 = 1 << 7;

/// Completes one of the ring-0 instructions PVM cannot emulate that act on registers and memory alone:
/// `popcnt`, `clac`, `stac`, `cmpxchg8b`/`cmpxchg16b` (the guest has one vCPU, so the lock is moot),
/// and `int3` (whose exception the caller delivers). None for any other.
pub fn complete_simple(
    insn: &Instruction,
    mem: &mut GuestMemory,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Option<Completion>, EmulateError> {
    let completion = match insn.mnemonic() {
        Mnemonic::Clac => {
            regs.rflags &= !RFLAGS_AC;
            Completion::Done
        }
        Mnemonic::Stac => {
            regs.rflags |= RFLAGS_AC;
            Completion::Done
        }
        Mnemonic::Popcnt => {
            let source = read_operand(insn, 1, mem, regs, sregs)?;
            let count = u64::from(source.count_ones());
            set_gpr(regs, insn.op0_register(), count);
            // ZF says whether the source was zero; the other arithmetic flags are cleared.
            regs.rflags &= !RFLAGS_ARITH;
            if source == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            Completion::Done
        }
        Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => {
            compare_exchange(insn, mem, regs, sregs)?;
            Completion::Done
        }
        // Only the one-byte form: `int 3` (cd 03) differs in the checks a VM86 guest gets, and none does.
        Mnemonic::Int3 => Completion::Exception(VECTOR_BP),
        _ => return Ok(None),
    };
    regs.rip = insn.next_ip();
    Ok(Some(completion))
}

/// Completes `fnclex`, `fwait` or `fclex` (the two together) with the x87 status word `fsw` and CR0;
/// None for any other instruction. `fwait` checks for #NM (CR0.MP and CR0.TS) and then for a pending
/// unmasked x87 exception (#MF), as the CPU does; on a fault RIP stays on the instruction.
pub fn complete_x87(
    insn: &Instruction,
    fsw: &mut u16,
    cr0: u64,
    regs: &mut kvm_regs,
) -> Option<Completion> {
    let waits = matches!(insn.mnemonic(), Mnemonic::Wait | Mnemonic::Fclex);
    let clears = matches!(insn.mnemonic(), Mnemonic::Fnclex | Mnemonic::Fclex);
    if !waits && !clears {
        return None;
    }
    if waits && cr0 & CR0_MP_TS == CR0_MP_TS {
        return Some(Completion::Fault(VECTOR_NM));
    }
    if waits && *fsw & FSW_ES != 0 {
        return Some(Completion::Fault(VECTOR_MF));
    }
    if clears {
        *fsw &= !FSW_CLEARED_BY_FNCLEX;
    }
    regs.rip = insn.next_ip();
    Some(Completion::Done)
}

/// `cmpxchg8b m64` / `cmpxchg16b m128`: compares EDX:EAX (RDX:RAX) with the operand; if equal, stores
/// ECX:EBX (RCX:RBX) there and sets ZF, else loads the operand into EDX:EAX (RDX:RAX) and clears ZF.
/// The operand is written either way, as the locked CPU instruction does. A `cmpxchg16b` operand that
/// is not 16-byte aligned takes #GP(0) on the CPU, which the VMM cannot deliver: an error.
fn compare_exchange(
    insn: &Instruction,
    mem: &mut GuestMemory,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
) -> Result<(), EmulateError> {
    let wide = insn.mnemonic() == Mnemonic::Cmpxchg16b;
    let half = if wide { 8 } else { 4 };
    let addr = insn
        .virtual_address(0, 0, |reg, _, _| register_or_base(regs, sregs, reg))
        .unwrap_or(0);
    let rip = regs.rip;
    let mnemonic = format!("{:?}", insn.mnemonic()).to_lowercase();
    let operand_err = |source| EmulateError::Operand {
        rip,
        mnemonic: mnemonic.clone(),
        source,
    };
    if wide && !addr.is_multiple_of(16) {
        return Err(EmulateError::Unsupported {
            rip,
            bytes: format!("cmpxchg16b of the unaligned address {addr:#x} (#GP)"),
        });
    }
    let paging = paging_mode(sregs);
    let mut bytes = [0u8; 16];
    paging
        .read_linear(mem, addr, &mut bytes[..2 * half])
        .map_err(operand_err)?;
    let word = |lo: &[u8]| {
        let mut w = [0u8; 8];
        w[..half].copy_from_slice(&lo[..half]);
        u64::from_le_bytes(w)
    };
    let mask = if wide { u64::MAX } else { 0xffff_ffff };
    let (low, high) = (word(&bytes[..half]), word(&bytes[half..]));
    let equal = low == regs.rax & mask && high == regs.rdx & mask;
    if equal {
        bytes[..half].copy_from_slice(&regs.rbx.to_le_bytes()[..half]);
        bytes[half..2 * half].copy_from_slice(&regs.rcx.to_le_bytes()[..half]);
        regs.rflags |= RFLAGS_ZF;
    } else {
        // 32-bit destinations zero-extend, as any 32-bit register write does.
        regs.rax = low;
        regs.rdx = high;
        regs.rflags &= !RFLAGS_ZF;
    }
    paging
        .write_linear(mem, addr, &bytes[..2 * half])
        .map_err(operand_err)
}

/// The value of operand `op` of `insn` (a register or memory), zero-extended.
fn read_operand(
    insn: &Instruction,
    op: u32,
    mem: &GuestMemory,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<u64, EmulateError> {
    let rip = regs.rip;
    match insn.op_kind(op) {
        OpKind::Register => Ok(gpr(regs, insn.op_register(op)).unwrap_or(0)),
        OpKind::Memory => {
            let addr = insn
                .virtual_address(op, 0, |reg, _, _| register_or_base(regs, sregs, reg))
                .unwrap_or(0);
            let size = insn.memory_size().size().min(8);
            let mut bytes = [0u8; 8];
            paging_mode(sregs)
                .read_linear(mem, addr, &mut bytes[..size])
                .map_err(|source| EmulateError::Operand {
                    rip,
                    mnemonic: format!("{:?}", insn.mnemonic()).to_lowercase(),
                    source,
                })?;
            Ok(u64::from_le_bytes(bytes))
        }
        _ => Ok(0),
    }
}

/// A general register's value as `reg` names it (AL, AX, EAX, RAX, ...), or a segment's base.
fn register_or_base(regs: &kvm_regs, sregs: &kvm_sregs, reg: Register) -> Option<u64> {
    match reg {
        Register::ES => Some(sregs.es.base),
        Register::CS => Some(sregs.cs.base),
        Register::SS => Some(sregs.ss.base),
        Register::DS => Some(sregs.ds.base),
        Register::FS => Some(sregs.fs.base),
        Register::GS => Some(sregs.gs.base),
        Register::RIP => Some(regs.rip),
        Register::EIP => Some(regs.rip & 0xffff_ffff),
        _ => gpr(regs, reg),
    }
}

/// The slot of a full general-purpose register.
fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// A general-purpose register's value as `reg` names it: the low 8, 16, 32 or all 64 bits (AH and the
/// like: bits 8-15). None for anything else.
pub fn gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    let mut copy = *regs;
    let value = *gpr_slot(&mut copy, reg.full_register())?;
    Some(match reg.size() {
        1 if matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        ) =>
        {
            (value >> 8) & 0xff
        }
        1 => value & 0xff,
        2 => value & 0xffff,
        4 => value & 0xffff_ffff,
        _ => value,
    })
}

/// Writes `value` to a general-purpose register with the CPU's partial-register rules: 16-bit writes merge,
/// 32- and 64-bit writes replace the whole register.
pub fn set_gpr(regs: &mut kvm_regs, reg: Register, value: u64) {
    let Some(slot) = gpr_slot(regs, reg.full_register()) else {
        return;
    };
    *slot = match reg.size() {
        2 => (*slot & !0xffff) | (value & 0xffff),
        4 => value & 0xffff_ffff,
        _ => value,
    };
}

/// Formats instruction bytes for error messages.
pub fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decodes a segment descriptor into KVM's segment register form.
fn descriptor_to_segment(selector: u16, d: u64) -> kvm_segment {
    let g = ((d >> 55) & 1) as u8;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Reads the descriptor `selector` names from the GDT or LDT.
fn load_descriptor(
    mem: &GuestMemory,
    sregs: &kvm_sregs,
    paging: &PagingMode,
    selector: u16,
    rip: u64,
) -> Result<kvm_segment, EmulateError> {
    let index = u64::from(selector & !7);
    let (base, limit) = if selector & 4 != 0 {
        (sregs.ldt.base, u64::from(sregs.ldt.limit))
    } else {
        (sregs.gdt.base, u64::from(sregs.gdt.limit))
    };
    if selector & !3 == 0 || index + 7 > limit {
        return Err(EmulateError::IretUnsupported {
            rip,
            why: "selector outside the descriptor table (#GP)",
        });
    }
    let mut d = [0u8; 8];
    paging
        .read_linear(mem, base + index, &mut d)
        .map_err(|source| EmulateError::Memory { rip, source })?;
    Ok(descriptor_to_segment(selector, u64::from_le_bytes(d)))
}

/// The paging mode these special registers select.
pub fn paging_mode(sregs: &kvm_sregs) -> PagingMode {
    PagingMode {
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
    }
}

/// Completes a protected-mode `iret` (operand size 32, or 16 with `is16`) at CS:RIP: pops EIP, CS and EFLAGS
/// (and ESP, SS when returning to an outer ring), loads the segments from the descriptor tables and applies the
/// EFLAGS update rules for the current privilege level.
pub fn iret_protected(
    mem: &GuestMemory,
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
    is16: bool,
) -> Result<(), EmulateError> {
    let rip = regs.rip;
    const NT: u64 = 1 << 14;
    const VM: u64 = 1 << 17;
    if regs.rflags & NT != 0 {
        return Err(EmulateError::IretUnsupported {
            rip,
            why: "task return (EFLAGS.NT set)",
        });
    }
    let paging = paging_mode(sregs);
    let width: u64 = if is16 { 2 } else { 4 };
    let sp_mask: u64 = if sregs.ss.db == 1 {
        0xffff_ffff
    } else {
        0xffff
    };
    let pop = |i: u64| -> Result<u64, EmulateError> {
        let sp = (regs.rsp.wrapping_add(i * width)) & sp_mask;
        let mut b = [0u8; 4];
        paging
            .read_linear(
                mem,
                sregs.ss.base.wrapping_add(sp),
                &mut b[..width as usize],
            )
            .map_err(|source| EmulateError::Memory { rip, source })?;
        Ok(u64::from(u32::from_le_bytes(b)))
    };
    let new_ip = pop(0)?;
    let new_cs = pop(1)? as u16;
    let popped_flags = pop(2)?;
    let cpl = sregs.cs.dpl;
    if !is16 && popped_flags & VM != 0 && cpl == 0 {
        return Err(EmulateError::IretUnsupported {
            rip,
            why: "return to virtual-8086 mode",
        });
    }
    let rpl = (new_cs & 3) as u8;
    if rpl < cpl {
        return Err(EmulateError::IretUnsupported {
            rip,
            why: "return to an inner privilege level (#GP)",
        });
    }
    let cs = load_descriptor(mem, sregs, &paging, new_cs, rip)?;
    if cs.present == 0 || cs.s == 0 || cs.type_ & 8 == 0 {
        return Err(EmulateError::IretUnsupported {
            rip,
            why: "return CS is not a present code segment",
        });
    }

    // Which EFLAGS bits the pop may change: IOPL only at CPL 0, IF only when CPL <= IOPL; VM, VIF and VIP
    // are untouched by a protected-mode iret to the same mode.
    let iopl = ((regs.rflags >> 12) & 3) as u8;
    let mut mask: u64 = 0x0004_4dd5 | NT | (1 << 16) | (1 << 21); // CF PF AF ZF SF TF DF OF AC, NT, RF, ID
    if cpl == 0 {
        mask |= 3 << 12;
    }
    if cpl <= iopl {
        mask |= 1 << 9;
    }
    if is16 {
        mask &= 0xffff;
    }
    let flags = (regs.rflags & !mask) | (popped_flags & mask) | 2;

    let mut new_sp = regs.rsp.wrapping_add(3 * width);
    if rpl > cpl {
        // Outer privilege: the stack pointer and stack segment come off the stack too.
        let outer_sp = pop(3)?;
        let outer_ss = pop(4)? as u16;
        let ss = load_descriptor(mem, sregs, &paging, outer_ss, rip)?;
        sregs.ss = ss;
        new_sp = outer_sp;
        // Data segments the outer ring may not use become null, as the CPU does.
        for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs] {
            let conforming_code = seg.type_ & 0xc == 0xc;
            if seg.dpl < rpl && !conforming_code {
                *seg = kvm_segment {
                    unusable: 1,
                    ..Default::default()
                };
            }
        }
    }
    sregs.cs = cs;
    regs.rip = if is16 { new_ip & 0xffff } else { new_ip };
    regs.rflags = flags;
    regs.rsp = (regs.rsp & !sp_mask) | (new_sp & sp_mask);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat_sregs() -> kvm_sregs {
        let code = descriptor_to_segment(0x08, 0x00cf_9a00_0000_ffff);
        let data = descriptor_to_segment(0x10, 0x00cf_9200_0000_ffff);
        let mut s = kvm_sregs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            cr0: 0x11,
            ..Default::default()
        };
        s.gdt.base = 0x500;
        s.gdt.limit = 23;
        s
    }

    #[test]
    fn descriptor_decoding() {
        let s = descriptor_to_segment(0x08, 0x00cf_9a00_0000_ffff);
        assert_eq!(
            (s.base, s.limit, s.type_, s.present, s.db, s.g, s.s, s.dpl),
            (0, 0xffff_ffff, 0xa, 1, 1, 1, 1, 0)
        );
    }

    #[test]
    fn same_ring_iret_pops_ip_cs_flags() {
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        for (i, d) in [0u64, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff]
            .iter()
            .enumerate()
        {
            mem.write(0x500 + 8 * i as u64, &d.to_le_bytes()).unwrap();
        }
        // Stack at 0x7000: eip, cs, eflags (IF set, plus a stray VM bit must not matter at CPL0 here).
        for (i, v) in [0x1234u32, 0x08, 0x246].iter().enumerate() {
            mem.write(0x7000 + 4 * i as u64, &v.to_le_bytes()).unwrap();
        }
        let mut regs = kvm_regs {
            rip: 0x1000,
            rsp: 0x7000,
            rflags: 0x2,
            ..Default::default()
        };
        let mut sregs = flat_sregs();
        iret_protected(&mem, &mut regs, &mut sregs, false).unwrap();
        assert_eq!((regs.rip, regs.rsp, regs.rflags), (0x1234, 0x700c, 0x246));
        assert_eq!(sregs.cs.selector, 0x08);
        // A null CS is refused, not loaded.
        mem.write(0x7004, &0u32.to_le_bytes()).unwrap();
        let mut regs = kvm_regs {
            rip: 0x1000,
            rsp: 0x7000,
            rflags: 0x2,
            ..Default::default()
        };
        assert!(iret_protected(&mem, &mut regs, &mut flat_sregs(), false).is_err());
        // A task return is refused.
        let mut regs = kvm_regs {
            rip: 0x1000,
            rsp: 0x7000,
            rflags: 0x4002,
            ..Default::default()
        };
        assert!(matches!(
            iret_protected(&mem, &mut regs, &mut flat_sregs(), false),
            Err(EmulateError::IretUnsupported { .. })
        ));
    }

    /// Decodes one 64-bit instruction at `rip`.
    fn decode64(bytes: &[u8], rip: u64) -> Instruction {
        iced_x86::Decoder::with_ip(64, bytes, rip, iced_x86::DecoderOptions::NONE).decode()
    }

    #[test]
    fn cmpxchg16b_and_cmpxchg8b_complete_both_ways() {
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        mem.write(0x8000, &[1u64.to_le_bytes(), 2u64.to_le_bytes()].concat())
            .unwrap();
        let sregs = kvm_sregs {
            cr0: 0x11,
            ..Default::default()
        };
        let mut regs = kvm_regs {
            rip: 0x1000,
            rsi: 0x8000,
            rax: 1,
            rdx: 2,
            rbx: 0x33,
            rcx: 0x44,
            rflags: 0x2,
            ..Default::default()
        };
        // lock cmpxchg16b [rsi]: equal, so RCX:RBX is stored and ZF set.
        let insn = decode64(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e], 0x1000);
        let done = complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!(done, Some(Completion::Done));
        assert_eq!(
            (mem.read_u64(0x8000).unwrap(), mem.read_u64(0x8008).unwrap()),
            (0x33, 0x44)
        );
        assert_eq!((regs.rflags & RFLAGS_ZF, regs.rip), (RFLAGS_ZF, 0x1005));
        // Again: now unequal, so the memory is loaded into RDX:RAX and ZF cleared.
        let insn = decode64(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e], regs.rip);
        complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!(
            (regs.rax, regs.rdx, regs.rflags & RFLAGS_ZF),
            (0x33, 0x44, 0)
        );
        assert_eq!(mem.read_u64(0x8000).unwrap(), 0x33, "memory unchanged");
        // cmpxchg8b [rsi]: EDX:EAX against the low 8 bytes, 32-bit halves.
        regs.rax = 0x33;
        regs.rdx = 0;
        regs.rbx = 0xdead_beef_0000_0005;
        regs.rcx = 6;
        let insn = decode64(&[0x0f, 0xc7, 0x0e], regs.rip);
        complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!(mem.read_u64(0x8000).unwrap(), 0x0000_0006_0000_0005);
        assert_eq!(
            mem.read_u64(0x8008).unwrap(),
            0x44,
            "the high half is not touched"
        );
        // An unaligned cmpxchg16b would take #GP: refused, not guessed.
        regs.rsi = 0x8008;
        let insn = decode64(&[0x48, 0x0f, 0xc7, 0x0e], regs.rip);
        assert!(complete_simple(&insn, &mut mem, &mut regs, &sregs).is_err());
    }

    #[test]
    fn fnclex_and_fwait_complete_or_fault() {
        let mut regs = kvm_regs {
            rip: 0x1000,
            ..Default::default()
        };
        // An unmasked exception pending (ES) with a flag (ZE): fwait faults with #MF, RIP unmoved.
        let mut fsw: u16 = FSW_ES | 0x4;
        let wait = decode64(&[0x9b], 0x1000);
        let fault = complete_x87(&wait, &mut fsw, 0x11, &mut regs);
        assert_eq!(
            (fault, regs.rip),
            (Some(Completion::Fault(VECTOR_MF)), 0x1000)
        );
        // fnclex clears them; then fwait passes.
        let fnclex = decode64(&[0xdb, 0xe2], 0x1000);
        assert_eq!(
            complete_x87(&fnclex, &mut fsw, 0x11, &mut regs),
            Some(Completion::Done)
        );
        assert_eq!((fsw, regs.rip), (0, 0x1002));
        let wait = decode64(&[0x9b], regs.rip);
        assert_eq!(
            complete_x87(&wait, &mut fsw, 0x11, &mut regs),
            Some(Completion::Done)
        );
        assert_eq!(regs.rip, 0x1003);
        // With CR0.MP and CR0.TS, fwait is #NM whatever the status.
        let wait = decode64(&[0x9b], regs.rip);
        let nm = complete_x87(&wait, &mut fsw, 0x11 | CR0_MP_TS, &mut regs);
        assert_eq!(nm, Some(Completion::Fault(VECTOR_NM)));
        // Anything else is not ours.
        let nop = decode64(&[0x90], regs.rip);
        assert_eq!(complete_x87(&nop, &mut fsw, 0x11, &mut regs), None);
    }

    #[test]
    fn popcnt_clac_stac_and_int3_complete() {
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        mem.write(0x8010, &0x0f0f_0000_0000_0001u64.to_le_bytes())
            .unwrap();
        let sregs = kvm_sregs {
            cr0: 0x11,
            ..Default::default()
        };
        let mut regs = kvm_regs {
            rip: 0x1000,
            rax: 0xffff_ffff_ffff_ffff,
            rbx: 0x8000,
            rcx: 0xff00_0000_0000_0000,
            rflags: 0x2 | 0x8d5,
            ..Default::default()
        };
        // popcnt rax, [rbx+0x10]: 9 bits; the flags cleared.
        let insn = decode64(&[0xf3, 0x48, 0x0f, 0xb8, 0x43, 0x10], 0x1000);
        let done = complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!(done, Some(Completion::Done));
        assert_eq!((regs.rax, regs.rip, regs.rflags), (9, 0x1006, 0x2));
        // popcnt edx, ecx: 32-bit, so the high half of rcx does not count and rdx is zero-extended.
        regs.rdx = u64::MAX;
        let insn = decode64(&[0xf3, 0x0f, 0xb8, 0xd1], regs.rip);
        complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!((regs.rdx, regs.rflags), (0, 0x2 | RFLAGS_ZF));
        // stac then clac flip AC only.
        let insn = decode64(&[0x0f, 0x01, 0xcb], regs.rip);
        complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!(regs.rflags, 0x2 | RFLAGS_ZF | RFLAGS_AC);
        let insn = decode64(&[0x0f, 0x01, 0xca], regs.rip);
        complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!((regs.rflags, regs.rip), (0x2 | RFLAGS_ZF, 0x1010));
        // int3: past it, and #BP to deliver.
        let insn = decode64(&[0xcc], regs.rip);
        let done = complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap();
        assert_eq!(done, Some(Completion::Exception(VECTOR_BP)));
        assert_eq!(regs.rip, 0x1011);
        // Anything else is not ours; an unreadable operand is an error, not a guess.
        let insn = decode64(&[0x90], regs.rip);
        assert_eq!(
            complete_simple(&insn, &mut mem, &mut regs, &sregs).unwrap(),
            None
        );
        regs.rbx = 0x20_0000;
        let insn = decode64(&[0xf3, 0x48, 0x0f, 0xb8, 0x43, 0x10], regs.rip);
        assert!(matches!(
            complete_simple(&insn, &mut mem, &mut regs, &sregs),
            Err(EmulateError::Operand { .. })
        ));
    }
}
