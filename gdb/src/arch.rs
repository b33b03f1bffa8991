//! The register layouts gdb sees: i386 for 32-bit guests, x86-64 for 64-bit ones: gdbstub_arch's core + SSE
//! registers, with a complete target description so gdb needs no `set architecture` and no guess about the
//! packet layout. The x86-64 layout adds `fs_base` and `gs_base` (gdb's `org.gnu.gdb.i386.segments` feature);
//! the i386 one cannot, because gdb 13 fails an internal assertion on a 32-bit description with that feature.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::id::{X86CoreRegId, X86_64CoreRegId};
use gdbstub_arch::x86::reg::{
    X86CoreRegs, X86SegmentRegs, X86_64CoreRegs, X87FpuInternalRegs, F80,
};
use kvm_bindings::kvm_fpu;
use machine::Machine;

/// What the gdb target needs from a register layout beyond gdbstub's [`Arch`].
pub trait GuestArch: Arch<BreakpointKind = usize> {
    /// The name the user sees (and `--gdb-arch` takes).
    const NAME: &'static str;
    /// The registers of `machine` now, with `fpu` its x87/SSE state.
    fn registers(machine: &Machine, fpu: &kvm_fpu) -> Self::Registers;
    /// An address in gdb's width.
    fn to_gdb(addr: u64) -> Self::Usize;
    /// An address from gdb.
    fn from_gdb(addr: Self::Usize) -> u64;
}

/// The flags type of the core feature (gdb scopes types to the feature that defines them).
macro_rules! core_types {
    () => {
        r#"<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/><field name="PF" start="2" end="2"/>
<field name="AF" start="4" end="4"/><field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/><field name="DF" start="10" end="10"/>
<field name="OF" start="11" end="11"/><field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/><field name="VIF" start="19" end="19"/>
<field name="VIP" start="20" end="20"/><field name="ID" start="21" end="21"/>
</flags>"#
    };
}

/// The vector, union and flags types of the SSE feature.
macro_rules! sse_types {
    () => {
        r#"<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>
<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>
<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/><field name="ZE" start="2" end="2"/>
<field name="OE" start="3" end="3"/><field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/><field name="DM" start="8" end="8"/>
<field name="ZM" start="9" end="9"/><field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
</flags>"#
    };
}

/// Segment selectors, x87 stack and x87 control registers: the same in both layouts.
macro_rules! x87_and_segments {
    () => {
        r#"<reg name="cs" bitsize="32" type="int32"/><reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/><reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/><reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/><reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/><reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/><reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/><reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/><reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/><reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/><reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/><reg name="fop" bitsize="32" type="int" group="float"/>"#
    };
}

/// The 64-bit target description: registers in the order [`Regs64`] sends them.
const XML_64: &str = concat!(
    r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">"#,
    r#"<architecture>i386:x86-64</architecture><feature name="org.gnu.gdb.i386.core">"#,
    core_types!(),
    r#"<reg name="rax" bitsize="64" type="int64"/><reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/><reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/><reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/><reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/><reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/><reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/><reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/><reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/>"#,
    x87_and_segments!(),
    r#"</feature><feature name="org.gnu.gdb.i386.sse">"#,
    sse_types!(),
    r#"<reg name="xmm0" bitsize="128" type="vec128"/><reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/><reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/><reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/><reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/><reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/><reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/><reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/><reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>"#,
    r#"</feature><feature name="org.gnu.gdb.i386.segments">"#,
    r#"<reg name="fs_base" bitsize="64" type="int"/><reg name="gs_base" bitsize="64" type="int"/>"#,
    r#"</feature></target>"#
);

/// The 32-bit target description: registers in the order gdbstub_arch's `X86CoreRegs` sends them.
const XML_32: &str = concat!(
    r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">"#,
    r#"<architecture>i386</architecture><feature name="org.gnu.gdb.i386.core">"#,
    core_types!(),
    r#"<reg name="eax" bitsize="32" type="int32"/><reg name="ecx" bitsize="32" type="int32"/>
<reg name="edx" bitsize="32" type="int32"/><reg name="ebx" bitsize="32" type="int32"/>
<reg name="esp" bitsize="32" type="data_ptr"/><reg name="ebp" bitsize="32" type="data_ptr"/>
<reg name="esi" bitsize="32" type="int32"/><reg name="edi" bitsize="32" type="int32"/>
<reg name="eip" bitsize="32" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/>"#,
    x87_and_segments!(),
    r#"</feature><feature name="org.gnu.gdb.i386.sse">"#,
    sse_types!(),
    r#"<reg name="xmm0" bitsize="128" type="vec128"/><reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/><reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/><reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/><reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>"#,
    r#"</feature></target>"#
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

fn segments(m: &Machine) -> X86SegmentRegs {
    let s = m.sregs();
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

fn xmm<const N: usize>(fpu: &kvm_fpu) -> [u128; N] {
    let mut x = [0u128; N];
    for (dst, src) in x.iter_mut().zip(&fpu.xmm) {
        *dst = u128::from_le_bytes(*src);
    }
    x
}

impl GuestArch for X86_64 {
    const NAME: &'static str = "x86-64";

    fn registers(m: &Machine, fpu: &kvm_fpu) -> Regs64 {
        let r = m.regs();
        Regs64 {
            core: X86_64CoreRegs {
                regs: [
                    r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10,
                    r.r11, r.r12, r.r13, r.r14, r.r15,
                ],
                eflags: r.rflags as u32,
                rip: r.rip,
                segments: segments(m),
                st: st(fpu),
                fpu: x87(fpu),
                xmm: xmm(fpu),
                mxcsr: fpu.mxcsr,
            },
            fs_base: m.sregs().fs.base,
            gs_base: m.sregs().gs.base,
        }
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

    fn registers(m: &Machine, fpu: &kvm_fpu) -> X86CoreRegs {
        let r = m.regs();
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
            segments: segments(m),
            st: st(fpu),
            fpu: x87(fpu),
            xmm: xmm(fpu),
            mxcsr: fpu.mxcsr,
        }
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
