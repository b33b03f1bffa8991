//! The vCPU's architectural state: what a checkpoint saves and restores.

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A vCPU state ioctl failed.
#[derive(Debug, Error)]
#[error("KVM {what} failed: {source}")]
pub struct CpuError {
    /// Which ioctl.
    pub what: &'static str,
    /// The error KVM returned.
    pub source: kvm_ioctls::Error,
}

/// The MSRs a checkpoint saves: the ones a ring-0 guest can set and that KVM keeps. The TSC is left out on
/// purpose: the guest never sees the host TSC (RDTSC is intercepted and logged), so it carries no state.
const SAVED_MSRS: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Everything needed to put the vCPU back exactly where it was.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct CpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state: the legacy 4 KiB XSAVE region (`kvm_xsave` itself is not Clone), in the
    /// canonical form of [`XsaveLayout::canonicalize`].
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// (index, value) of [`SAVED_MSRS`] that KVM reported.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupt shadow, NMI state.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, ...
    pub mp_state: kvm_mp_state,
    /// DR0-3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for CpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CpuState {{ rip: {:#x}, rsp: {:#x}, rflags: {:#x} }}",
            self.regs.rip, self.regs.rsp, self.regs.rflags
        )
    }
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError { what, source }
}

impl CpuState {
    /// Reads the whole state from the vCPU, whose XSAVE components lie as `layout` says.
    pub fn capture(vcpu: &VcpuFd, layout: &XsaveLayout) -> Result<CpuState, CpuError> {
        let entries: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| CpuError {
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        let mut xsave = vcpu
            .get_xsave()
            .map_err(err("KVM_GET_XSAVE"))?
            .region
            .to_vec();
        layout.canonicalize(&mut xsave);
        Ok(CpuState {
            regs: vcpu.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            xsave,
            xcrs: vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
            events: vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            debugregs: vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes the whole state into the vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), CpuError> {
        // sregs before regs: setting CR0/EFER can change how KVM interprets RIP/RFLAGS.
        vcpu.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        let mut xsave = kvm_xsave::default();
        let n = self.xsave.len().min(xsave.region.len());
        xsave.region[..n].copy_from_slice(&self.xsave[..n]);
        // SAFETY: a legacy-size kvm_xsave (4 KiB region, no extra area) is what KVM_SET_XSAVE reads; the
        // region came from KVM_GET_XSAVE on a vCPU with the same CPUID.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError {
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// Appends "`prefix``field` is X, recorded Y" for each listed field that differs; numbers in hex
/// (`{:#x}`) or, with `debug`, any value in hex Debug form (`{:x?}`).
macro_rules! field_differences {
    ($out:expr, $prefix:literal, $now:expr, $recorded:expr, [$($field:ident),* $(,)?]) => {
        field_differences!(@fmt "{:#x}", $out, $prefix, $now, $recorded, [$($field),*])
    };
    (debug $out:expr, $prefix:literal, $now:expr, $recorded:expr, [$($field:ident),* $(,)?]) => {
        field_differences!(@fmt "{:x?}", $out, $prefix, $now, $recorded, [$($field),*])
    };
    (@fmt $fmt:literal, $out:expr, $prefix:literal, $now:expr, $recorded:expr, [$($field:ident),*]) => {
        $(
            if $now.$field != $recorded.$field {
                $out.push(format!(
                    concat!($prefix, stringify!($field), " is ", $fmt, ", recorded ", $fmt),
                    $now.$field, $recorded.$field
                ));
            }
        )*
    };
}

impl CpuState {
    /// What differs between this state and `recorded`, one line per field, named as a user reads
    /// it: `regs.rflags is 0x246, recorded 0x202`, `msr 0x277 ...`, `xsave word 128 (XSTATE_BV) ...`.
    pub fn differences(&self, recorded: &CpuState, layout: &XsaveLayout) -> Vec<String> {
        let mut out = Vec::new();
        let (r, q) = (&self.regs, &recorded.regs);
        field_differences!(
            out,
            "regs.",
            r,
            q,
            [
                rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip,
                rflags
            ]
        );
        let (s, t) = (&self.sregs, &recorded.sregs);
        field_differences!(debug out, "sregs.", s, t, [cs, ds, es, fs, gs, ss, tr, ldt, gdt, idt]);
        field_differences!(
            out,
            "sregs.",
            s,
            t,
            [cr0, cr2, cr3, cr4, cr8, efer, apic_base]
        );
        field_differences!(debug out, "sregs.", s, t, [interrupt_bitmap]);
        for (i, (a, b)) in self.xsave.iter().zip(&recorded.xsave).enumerate() {
            if a != b {
                out.push(format!(
                    "xsave word {i} ({}) is {a:#x}, recorded {b:#x}",
                    layout.word_name(i)
                ));
            }
        }
        if self.xcrs.xcrs[..self.xcrs.nr_xcrs as usize]
            != recorded.xcrs.xcrs[..(recorded.xcrs.nr_xcrs as usize).min(self.xcrs.xcrs.len())]
        {
            out.push(format!(
                "xcrs are {:x?}, recorded {:x?}",
                self.xcrs, recorded.xcrs
            ));
        }
        for &(index, value) in &self.msrs {
            match recorded.msrs.iter().find(|m| m.0 == index) {
                Some(&(_, v)) if v == value => {}
                Some(&(_, v)) => out.push(format!("msr {index:#x} is {value:#x}, recorded {v:#x}")),
                None => out.push(format!("msr {index:#x} is {value:#x}, not recorded")),
            }
        }
        let (e, f) = (&self.events, &recorded.events);
        field_differences!(debug out, "events.", e, f, [exception, interrupt, nmi, smi, triple_fault]);
        field_differences!(
            out,
            "events.",
            e,
            f,
            [sipi_vector, flags, exception_has_payload, exception_payload]
        );
        if self.mp_state != recorded.mp_state {
            out.push(format!(
                "mp_state is {}, recorded {}",
                self.mp_state.mp_state, recorded.mp_state.mp_state
            ));
        }
        let (d, g) = (&self.debugregs, &recorded.debugregs);
        field_differences!(debug out, "debugregs.", d, g, [db]);
        field_differences!(out, "debugregs.", d, g, [dr6, dr7, flags]);
        out
    }
}

/// Byte offset of XSTATE_BV, the XSAVE header's bitmap of components in use.
const XSTATE_BV: usize = 512;
/// Byte offset of XCOMP_BV (zero in the standard format KVM uses).
const XCOMP_BV: usize = 520;
/// End of the XSAVE header; extended components follow.
const XSAVE_HEADER_END: usize = 576;
/// The x87 control word after FNINIT, the only non-zero field of the x87 initial state.
const FCW_INIT: u16 = 0x037f;
/// The legacy-region bytes of the x87 component: FCW..FDP (0..24) and ST0-7 (32..160); MXCSR (24..28)
/// belongs to no single component and is kept as it is.
const X87_BYTES: [std::ops::Range<usize>; 2] = [0..24, 32..160];
/// MXCSR_MASK: which MXCSR bits the host's FPU supports.
const MXCSR_MASK: std::ops::Range<usize> = 28..32;
/// The legacy-region bytes of the SSE component: XMM0-15.
const SSE_BYTES: std::ops::Range<usize> = 160..416;

/// Where the extended XSAVE components (bits 2 and up) of the guest's CPU lie: (bit, byte range in the
/// standard format), from the leaf 0xd of the guest's CPUID, not the host's: a portable guest CPU has
/// none, whatever the host has, and a trace names its components the same on every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XsaveLayout(Vec<(u32, std::ops::Range<usize>)>);

impl XsaveLayout {
    /// The layout a CPUID table ([function, index, flags, eax, ebx, ecx, edx] entries) describes.
    pub fn from_cpuid(table: &[[u32; 7]]) -> XsaveLayout {
        let components = table
            .iter()
            .filter(|e| e[0] == 0xd && (2..63).contains(&e[1]))
            .filter_map(|e| {
                let (size, offset) = (e[3] as usize, e[4] as usize);
                (size > 0 && offset >= XSAVE_HEADER_END).then_some((e[1], offset..offset + size))
            })
            .collect();
        XsaveLayout(components)
    }

    /// What word `i` (32 bits) of the XSAVE region holds, for divergence reports.
    fn word_name(&self, i: usize) -> String {
        let byte = i * 4;
        match byte {
            0 => "FCW, FSW".into(),
            4 => "FTW, FOP".into(),
            8..=15 => "FIP".into(),
            16..=23 => "FDP".into(),
            24 => "MXCSR".into(),
            28 => "MXCSR_MASK".into(),
            32..=159 => format!("ST{}", (byte - 32) / 16),
            160..=415 => format!("XMM{}", (byte - 160) / 16),
            512..=519 => "XSTATE_BV".into(),
            520..=527 => "XCOMP_BV".into(),
            _ => match self.0.iter().find(|(_, r)| r.contains(&byte)) {
                Some((bit, _)) => format!("XSAVE component {bit}"),
                None => "reserved".into(),
            },
        }
    }

    /// Puts an XSAVE region into one canonical form, so that two regions holding the same
    /// architectural state are equal word for word, on any host.
    ///
    /// Why: which components XSTATE_BV marks as in use is not the guest's doing alone. The host saves
    /// the vCPU's FPU state when it preempts or signals the thread, and XSAVE may report a component as
    /// in use although it holds its initial values (the init optimization is allowed, not required). A
    /// recorded checkpoint once had XSTATE_BV = 0x2 ("SSE in use") with every XMM register zero, where
    /// the replay had 0: the same state, a different digest. So: a component whose bit is clear takes
    /// its initial values (whatever the save left in its bytes), a component holding its initial values
    /// gets its bit cleared, and the bytes no component of the guest's CPU owns (reserved,
    /// software-available, components of the host's that the guest does not have) are zeroed. And
    /// MXCSR_MASK, which says which MXCSR bits the *host's* FPU supports (0xffff on one Intel host,
    /// 0x2ffff on an AMD EPYC), is host capability rather than guest state: it is zeroed too (restoring
    /// ignores it). Restoring the canonical form gives the guest exactly the state it could observe
    /// before.
    pub fn canonicalize(&self, region: &mut [u32]) {
        let mut bytes: Vec<u8> = region.iter().flat_map(|w| w.to_le_bytes()).collect();
        if bytes.len() < XSAVE_HEADER_END {
            return;
        }
        let mut bv =
            u64::from_le_bytes(bytes[XSTATE_BV..XSTATE_BV + 8].try_into().expect("8 bytes"));
        // x87: initial state is FCW = 0x37f and every other field zero.
        if bv & 1 == 0 {
            for r in X87_BYTES {
                bytes[r].fill(0);
            }
            bytes[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        }
        let x87_init = bytes[0..2] == FCW_INIT.to_le_bytes()
            && bytes[2..24].iter().chain(&bytes[32..160]).all(|&b| b == 0);
        if x87_init {
            bv &= !1;
        }
        bytes[MXCSR_MASK].fill(0);
        // SSE and every extended component: initial state is all zeros.
        let len = bytes.len();
        let extended = self.0.iter().filter(|(_, r)| r.end <= len).cloned();
        let mut owned = vec![false; len];
        owned[..XSAVE_HEADER_END].fill(true);
        for (bit, range) in std::iter::once((1, SSE_BYTES)).chain(extended) {
            owned[range.clone()].fill(true);
            if bv & (1 << bit) == 0 {
                bytes[range.clone()].fill(0);
            }
            if bytes[range].iter().all(|&b| b == 0) {
                bv &= !(1 << bit);
            }
        }
        for (b, owned) in bytes.iter_mut().zip(owned) {
            if !owned {
                *b = 0;
            }
        }
        // Components the guest's CPU does not have are never in use.
        let known = self.0.iter().fold(0b11, |m, (bit, _)| m | 1 << bit);
        bv &= known;
        bytes[416..XSTATE_BV].fill(0);
        bytes[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
        bytes[XCOMP_BV..XSAVE_HEADER_END].fill(0);
        for (word, chunk) in region.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    /// The layout of the host model's CPU, which the test vCPUs have.
    fn layout() -> XsaveLayout {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        let table: Vec<_> = cpuid
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        XsaveLayout::from_cpuid(&table)
    }

    /// A real vCPU: what KVM reports and accepts is what matters here.
    fn new_vcpu() -> (Kvm, kvm_ioctls::VmFd, VcpuFd) {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        (kvm, vm, vcpu)
    }

    fn set_xsave(vcpu: &VcpuFd, region: &[u32]) {
        let mut xsave = kvm_xsave::default();
        let n = xsave.region.len();
        xsave.region.copy_from_slice(&region[..n]);
        // SAFETY: a legacy-size region taken from KVM_GET_XSAVE on this same vCPU.
        unsafe { vcpu.set_xsave(&xsave) }.expect("KVM_SET_XSAVE");
    }

    /// The recorded checkpoint that diverged had XSTATE_BV = 0x2 (SSE in use) with every XMM register
    /// zero, where the replay had 0. Both are the same state and must capture identically.
    #[test]
    fn sse_marked_in_use_at_its_initial_values_captures_like_sse_unused() {
        let (_kvm, _vm, vcpu) = new_vcpu();
        let clean = CpuState::capture(&vcpu, &layout()).unwrap();
        let mut marked = vcpu.get_xsave().unwrap().region.to_vec();
        marked[XSTATE_BV / 4] |= 0x2;
        marked[SSE_BYTES.start / 4..SSE_BYTES.end / 4].fill(0);
        set_xsave(&vcpu, &marked);
        assert_eq!(
            vcpu.get_xsave().unwrap().region[XSTATE_BV / 4] & 0x2,
            0x2,
            "KVM keeps the in-use bit it was given (else this test proves nothing)"
        );
        let again = CpuState::capture(&vcpu, &layout()).unwrap();
        assert_eq!(again.differences(&clean, &layout()), Vec::<String>::new());
        assert!(again == clean);
    }

    /// Real contents survive: a non-zero XMM register is kept, its bit set, and a restore puts it back.
    #[test]
    fn live_sse_state_is_kept_and_restored() {
        let (_kvm, _vm, vcpu) = new_vcpu();
        let mut live = vcpu.get_xsave().unwrap().region.to_vec();
        live[XSTATE_BV / 4] |= 0x2;
        live[SSE_BYTES.start / 4 + 5] = 0xdead_beef; // XMM1, second dword
        set_xsave(&vcpu, &live);
        let state = CpuState::capture(&vcpu, &layout()).unwrap();
        assert_eq!(state.xsave[SSE_BYTES.start / 4 + 5], 0xdead_beef);
        assert_eq!(state.xsave[XSTATE_BV / 4] & 0x2, 0x2);
        let (_kvm2, _vm2, other) = new_vcpu();
        state.restore(&other).unwrap();
        assert!(CpuState::capture(&other, &layout()).unwrap() == state);
    }

    #[test]
    fn differences_name_the_field() {
        let (_kvm, _vm, vcpu) = new_vcpu();
        let a = CpuState::capture(&vcpu, &layout()).unwrap();
        let mut b = a.clone();
        b.regs.rflags ^= 0x40;
        b.xsave[XSTATE_BV / 4] ^= 0x2;
        b.msrs[0].1 ^= 1;
        let d = a.differences(&b, &layout());
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("regs.rflags is 0x"), "{d:?}");
        assert!(d[1].starts_with("xsave word 128 (XSTATE_BV)"), "{d:?}");
        assert!(d[2].starts_with("msr 0x"), "{d:?}");
    }
}
