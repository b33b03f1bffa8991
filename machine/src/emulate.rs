//! Instructions our KVM cannot emulate, completed by the VMM itself.
//!
//! On PVM hosts a protected-mode `iret` with 32- or 16-bit operand size ends in an emulation failure
//! (PLATFORM.md). We complete it here from the guest's own stack and descriptor tables, the same way in
//! record and replay, so the result is deterministic. Anything we cannot complete is reported with its bytes.

use crate::memory::GuestMemory;
use crate::paging::{PagingError, PagingMode};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
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
}
