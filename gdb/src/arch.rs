//! The register layouts gdb sees: i386 for 32-bit guests, x86-64 for 64-bit ones: gdbstub_arch's core + SSE
//! registers, with a complete target description so gdb needs no `set architecture` and no guess about the
//! packet layout. The x86-64 layout adds `fs_base` and `gs_base` (gdb's `org.gnu.gdb.i386.segments` feature);
//! the i386 one cannot, because gdb 13 fails an internal assertion on a 32-bit description with that feature.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::id::{X86CoreRegId, X86_64CoreRegId};
use gdbstub_arch::x86::reg::{
    X86CoreRegs, X86SegmentRegs, X86_64CoreRegs, X87FpuInternalRegs, F80,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use machine::Machine;

/// What the gdb target needs from a register layout beyond gdbstub's [`Arch`].
pub trait GuestArch: Arch<BreakpointKind = usize> {
    /// The name the user sees (and `--gdb-arch` takes).
    const NAME: &'static str;
    /// The registers of `machine` now, with `fpu` its x87/SSE state.
    fn registers(regs: &kvm_regs, sregs: &kvm_sregs, fpu: &kvm_fpu) -> Self::Registers;
    /// Puts the general registers, instruction pointer and flags of `regs` (what gdb wrote) into `kvm`;
    /// segment, x87 and SSE registers are not written.
    fn set_general(regs: &Self::Registers, kvm: &mut kvm_regs);
    /// An address in gdb's width.
    fn to_gdb(addr: u64) -> Self::Usize;
    /// An address from gdb.
    fn from_gdb(addr: Self::Usize) -> u64;
}

/// A 4-byte `<flags>` type `$id` of one-bit fields, each `$name` at bit `$bit`.
macro_rules! flags {
    ($id:literal { $($name:literal: $bit:literal),* $(,)? }) => {
        concat!(
            "<flags id=\"", $id, "\" size=\"4\">",
            $("<field name=\"", $name, "\" start=\"", $bit, "\" end=\"", $bit, "\"/>",)*
            "</flags>"
        )
    };
}

/// `<reg>`s of `$bits` bits and type `$ty` (in gdb's register group `$group`, if given), one per `$name`,
/// in the order given: gdb takes a `g` packet's registers in the order the description lists them.
macro_rules! regs {
    ($bits:literal $ty:literal: $($name:literal)*) => {
        concat!($("<reg name=\"", $name, "\" bitsize=\"", $bits, "\" type=\"", $ty, "\"/>",)*)
    };
    ($bits:literal $ty:literal in $group:literal: $($name:literal)*) => {
        concat!(
            $("<reg name=\"", $name, "\" bitsize=\"", $bits, "\" type=\"", $ty, "\" group=\"", $group, "\"/>",)*
        )
    };
}

/// A complete target description with gdb's `org.gnu.gdb.i386.core` and `.sse` features, which the two
/// layouts share but for their general registers (`$gprs`, up to eflags) and XMM registers (`$xmm`);
/// `$extra` are features after those two. (gdb scopes types to the feature that defines them, hence the
/// flags and vector types inside each feature.)
macro_rules! target_xml {
    ($arch:literal, gprs: $gprs:expr, xmm: $xmm:expr, extra: $extra:expr) => {
        concat!(
            r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">"#,
            "<architecture>", $arch, "</architecture>",
            r#"<feature name="org.gnu.gdb.i386.core">"#,
            flags!("i386_eflags" {
                "CF": 0, "": 1, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "TF": 8, "IF": 9, "DF": 10, "OF": 11,
                "NT": 14, "RF": 16, "VM": 17, "AC": 18, "VIF": 19, "VIP": 20, "ID": 21,
            }),
            $gprs,
            regs!(32 "int32": "cs" "ss" "ds" "es" "fs" "gs"),
            regs!(80 "i387_ext": "st0" "st1" "st2" "st3" "st4" "st5" "st6" "st7"),
            regs!(32 "int" in "float": "fctrl" "fstat" "ftag" "fiseg" "fioff" "foseg" "fooff" "fop"),
            r#"</feature><feature name="org.gnu.gdb.i386.sse">"#,
            r#"<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>"#,
            r#"<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>"#,
            r#"<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>"#,
            r#"<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>"#,
            r#"<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>"#,
            r#"<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>"#,
            r#"<field name="uint128" type="uint128"/></union>"#,
            flags!("i386_mxcsr" {
                "IE": 0, "DE": 1, "ZE": 2, "OE": 3, "UE": 4, "PE": 5, "DAZ": 6, "IM": 7, "DM": 8, "ZM": 9,
                "OM": 10, "UM": 11, "PM": 12, "FZ": 15,
            }),
            $xmm,
            regs!(32 "i386_mxcsr" in "vector": "mxcsr"),
            "</feature>",
            $extra,
            "</target>"
        )
    };
}

/// The 64-bit target description: registers in the order [`Regs64`] sends them.
const XML_64: &str = target_xml!(
    "i386:x86-64",
    gprs: concat!(
        regs!(64 "int64": "rax" "rbx" "rcx" "rdx" "rsi" "rdi"),
        regs!(64 "data_ptr": "rbp" "rsp"),
        regs!(64 "int64": "r8" "r9" "r10" "r11" "r12" "r13" "r14" "r15"),
        regs!(64 "code_ptr": "rip"),
        regs!(32 "i386_eflags": "eflags"),
    ),
    xmm: regs!(128 "vec128": "xmm0" "xmm1" "xmm2" "xmm3" "xmm4" "xmm5" "xmm6" "xmm7" "xmm8" "xmm9" "xmm10"
        "xmm11" "xmm12" "xmm13" "xmm14" "xmm15"),
    extra: concat!(
        r#"<feature name="org.gnu.gdb.i386.segments">"#,
        regs!(64 "int": "fs_base" "gs_base"),
        "</feature>",
    )
);

/// The 32-bit target description: registers in the order gdbstub_arch's `X86CoreRegs` sends them.
const XML_32: &str = target_xml!(
    "i386",
    gprs: concat!(
        regs!(32 "int32": "eax" "ecx" "edx" "ebx"),
        regs!(32 "data_ptr": "esp" "ebp"),
        regs!(32 "int32": "esi" "edi"),
        regs!(32 "code_ptr": "eip"),
        regs!(32 "i386_eflags": "eflags"),
    ),
    xmm: regs!(128 "vec128": "xmm0" "xmm1" "xmm2" "xmm3" "xmm4" "xmm5" "xmm6" "xmm7"),
    extra: ""
);

/// Bytes of gdbstub_arch's 64-bit core + SSE registers in a `g` packet.
const CORE_64_LEN: usize = 0x218;

/// x86-64 registers as gdb's `i386:x86-64` description lists them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Regs64 {
    /// General, segment, x87 and SSE registers.
    pub core: X86_64CoreRegs,
    /// FS segment base.
    pub fs_base: u64,
    /// GS segment base.
    pub gs_base: u64,
}

impl Registers for Regs64 {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for b in self
            .fs_base
            .to_le_bytes()
            .into_iter()
            .chain(self.gs_base.to_le_bytes())
        {
            write_byte(Some(b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != CORE_64_LEN + 16 {
            return Err(());
        }
        self.core.gdb_deserialize(&bytes[..CORE_64_LEN])?;
        let (fs, gs) = bytes[CORE_64_LEN..].split_at(8);
        self.fs_base = u64::from_le_bytes(fs.try_into().map_err(|_| ())?);
        self.gs_base = u64::from_le_bytes(gs.try_into().map_err(|_| ())?);
        Ok(())
    }
}

/// The 64-bit layout.
pub enum X86_64 {}

impl Arch for X86_64 {
    type Usize = u64;
    type Registers = Regs64;
    type BreakpointKind = usize;
    type RegId = X86_64CoreRegId;

    fn target_description_xml() -> Option<&'static str> {
        Some(XML_64)
    }
}

/// The 32-bit layout.
pub enum I386 {}

impl Arch for I386 {
    type Usize = u32;
    type Registers = X86CoreRegs;
    type BreakpointKind = usize;
    type RegId = X86CoreRegId;

    fn target_description_xml() -> Option<&'static str> {
        Some(XML_32)
    }
}

/// Whether `machine` is in long mode (EFER.LMA set).
pub(crate) fn in_long_mode(machine: &Machine) -> bool {
    machine::arch::long_mode(machine.sregs())
}

/// The segment selectors.
fn segments(s: &kvm_sregs) -> X86SegmentRegs {
    X86SegmentRegs {
        cs: s.cs.selector.into(),
        ss: s.ss.selector.into(),
        ds: s.ds.selector.into(),
        es: s.es.selector.into(),
        fs: s.fs.selector.into(),
        gs: s.gs.selector.into(),
    }
}

/// ST0-ST7: KVM keeps them in stack order, 16 bytes each, of which the first 10 are the value.
fn st(fpu: &kvm_fpu) -> [F80; 8] {
    let mut st = [[0u8; 10]; 8];
    for (dst, src) in st.iter_mut().zip(&fpu.fpr) {
        dst.copy_from_slice(&src[..10]);
    }
    st
}

/// The full x87 tag word gdb shows (2 bits per physical register) from KVM's abridged one (1 bit: empty or
/// not), classifying each non-empty register's value as FNSTENV would.
fn tag_word(fpu: &kvm_fpu) -> u32 {
    let top = usize::from((fpu.fsw >> 11) & 7);
    (0..8).fold(0u32, |tag, physical| {
        let value = if fpu.ftwx & (1 << physical) == 0 {
            3 // empty
        } else {
            let reg = &fpu.fpr[(physical + 8 - top) % 8];
            let exponent = u16::from_le_bytes([reg[8], reg[9]]) & 0x7fff;
            let mut mantissa = [0u8; 8];
            mantissa.copy_from_slice(&reg[..8]);
            let mantissa = u64::from_le_bytes(mantissa);
            match exponent {
                0 if mantissa == 0 => 1,       // zero
                0 | 0x7fff => 2,               // denormal, infinity or NaN
                _ if mantissa >> 63 == 1 => 0, // valid
                _ => 2,                        // unnormal
            }
        };
        tag | (value << (2 * physical))
    })
}

/// The x87 control registers as gdb lists them.
fn x87(fpu: &kvm_fpu) -> X87FpuInternalRegs {
    X87FpuInternalRegs {
        fctrl: fpu.fcw.into(),
        fstat: fpu.fsw.into(),
        ftag: tag_word(fpu),
        // KVM gives the last instruction and operand pointers as 64-bit values (FXSAVE64 layout); the 32-bit
        // layout's selector sits in their upper half.
        fiseg: (fpu.last_ip >> 32) as u32 & 0xffff,
        fioff: fpu.last_ip as u32,
        foseg: (fpu.last_dp >> 32) as u32 & 0xffff,
        fooff: fpu.last_dp as u32,
        fop: u32::from(fpu.last_opcode) & 0x7ff,
    }
}

/// XMM0 up to XMM`N - 1`.
fn xmm<const N: usize>(fpu: &kvm_fpu) -> [u128; N] {
    let mut x = [0u128; N];
    for (dst, src) in x.iter_mut().zip(&fpu.xmm) {
        *dst = u128::from_le_bytes(*src);
    }
    x
}

impl GuestArch for X86_64 {
    const NAME: &'static str = "x86-64";

    fn registers(r: &kvm_regs, s: &kvm_sregs, fpu: &kvm_fpu) -> Regs64 {
        Regs64 {
            core: X86_64CoreRegs {
                regs: [
                    r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10,
                    r.r11, r.r12, r.r13, r.r14, r.r15,
                ],
                eflags: r.rflags as u32,
                rip: r.rip,
                segments: segments(s),
                st: st(fpu),
                fpu: x87(fpu),
                xmm: xmm(fpu),
                mxcsr: fpu.mxcsr,
            },
            fs_base: s.fs.base,
            gs_base: s.gs.base,
        }
    }

    fn set_general(regs: &Regs64, k: &mut kvm_regs) {
        let r = &regs.core.regs;
        [
            k.rax, k.rbx, k.rcx, k.rdx, k.rsi, k.rdi, k.rbp, k.rsp, k.r8, k.r9, k.r10, k.r11,
            k.r12, k.r13, k.r14, k.r15,
        ] = *r;
        k.rip = regs.core.rip;
        k.rflags = k.rflags & !0xffff_ffff | u64::from(regs.core.eflags);
    }

    fn to_gdb(addr: u64) -> u64 {
        addr
    }

    fn from_gdb(addr: u64) -> u64 {
        addr
    }
}

impl GuestArch for I386 {
    const NAME: &'static str = "i386";

    fn registers(r: &kvm_regs, s: &kvm_sregs, fpu: &kvm_fpu) -> X86CoreRegs {
        X86CoreRegs {
            eax: r.rax as u32,
            ecx: r.rcx as u32,
            edx: r.rdx as u32,
            ebx: r.rbx as u32,
            esp: r.rsp as u32,
            ebp: r.rbp as u32,
            esi: r.rsi as u32,
            edi: r.rdi as u32,
            eip: r.rip as u32,
            eflags: r.rflags as u32,
            segments: segments(s),
            st: st(fpu),
            fpu: x87(fpu),
            xmm: xmm(fpu),
            mxcsr: fpu.mxcsr,
        }
    }

    fn set_general(r: &X86CoreRegs, k: &mut kvm_regs) {
        // A 32-bit guest's registers: the upper halves stay as they are.
        let low = |reg: &mut u64, v: u32| *reg = *reg & !0xffff_ffff | u64::from(v);
        low(&mut k.rax, r.eax);
        low(&mut k.rcx, r.ecx);
        low(&mut k.rdx, r.edx);
        low(&mut k.rbx, r.ebx);
        low(&mut k.rsp, r.esp);
        low(&mut k.rbp, r.ebp);
        low(&mut k.rsi, r.esi);
        low(&mut k.rdi, r.edi);
        low(&mut k.rip, r.eip);
        low(&mut k.rflags, r.eflags);
    }

    fn to_gdb(addr: u64) -> u32 {
        // gdb's addresses are 32 bits wide here; watched addresses came from gdb, so they fit.
        addr as u32
    }

    fn from_gdb(addr: u32) -> u64 {
        addr.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_packets_round_trip_and_match_the_descriptions() {
        let regs = Regs64 {
            fs_base: 0x1234,
            gs_base: 0xffff_8000_0000_0000,
            ..Default::default()
        };
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        // 16 GPRs, rip, eflags, 6 segments, 8 x87, 8 x87 control, 16 xmm, mxcsr, fs_base, gs_base.
        assert_eq!(
            bytes.len(),
            16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 16
        );
        let mut back = Regs64::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, regs);
        // A `G` packet of them ($, two hex digits a byte, #, checksum) fits in the packets gdb may send.
        assert!(1 + 2 * bytes.len() + 3 <= crate::wire::PACKET_SIZE);
        assert_eq!(
            XML_64.matches("<reg ").count(),
            16 + 2 + 6 + 16 + 16 + 1 + 2
        );

        let regs = X86CoreRegs {
            eip: 0x10_0000,
            ..Default::default()
        };
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        assert_eq!(bytes.len(), 10 * 4 + 6 * 4 + 8 * 10 + 8 * 4 + 8 * 16 + 4);
        assert_eq!(XML_32.matches("<reg ").count(), 10 + 6 + 16 + 8 + 1);
        let mut back = Regs64::default();
        assert!(back.gdb_deserialize(&bytes[1..]).is_err());
    }

    #[test]
    fn tag_word_classifies_registers() {
        // TOP = 7: ST0 is physical register 7. Physical 7 holds 1.0 (valid), physical 0 (ST1) holds zero.
        let mut fpu = kvm_fpu {
            fsw: 7 << 11,
            ftwx: 0x81,
            ..Default::default()
        };
        fpu.fpr[0][7] = 0x80;
        fpu.fpr[0][8] = 0xff;
        fpu.fpr[0][9] = 0x3f;
        assert_eq!(tag_word(&fpu), 0x3ffd);
    }
}
