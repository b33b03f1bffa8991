//! The CPU the guest sees: a model of our choosing, so that a trace replays on any x86-64 host of our
//! kinds, Intel or AMD.
//!
//! A guest that is shown the host's CPUID picks its code paths by it (Linux's alternatives, a libc's
//! string functions), so its execution, and a trace of it, depend on the host. The `portable` model
//! (the default) is fixed, in the spirit of QEMU's named models: one vendor, one family/model/stepping,
//! and the features every host we run on offers its guests:
//! - the x86-64 baseline (x86-64-v1): FPU, TSC, MSR, PAE, CX8, APIC, SEP, MTRR, PGE, CMOV, PAT, PSE-36,
//!   CLFLUSH, MMX, FXSR, SSE, SSE2, SYSCALL, NX, long mode;
//! - CMPXCHG16B and LAHF/SAHF in long mode.
//!
//! Not more, because PVM (KVM without hardware virtualization, our machines' kind) emulates ring-0
//! code and offers its guests only what its emulator handles: its KVM_GET_SUPPORTED_CPUID lacks SSE3,
//! SSSE3, SSE4.1/4.2, POPCNT, XSAVE and AVX on Intel and AMD hosts alike. Nor RDRAND, RDSEED or RDTSCP
//! (a free-running guest's results of those cannot be logged), nor the hypervisor leaves (kvmclock
//! reads host time the trace would not hold).
//!
//! Vendor, family, model and stepping are those of QEMU's `kvm64` model (GenuineIntel, family 15, model
//! 6, stepping 1), a virtual CPU kernels have long booted on without quirks; the caches are described
//! by leaf 4. The `host` model passes the host's CPUID as KVM supports it through (less RDRAND, RDSEED
//! and RDTSCP when they must be hidden), as retrovisor did before models existed.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use thiserror::Error;
use vocab::HostCpu;

/// A model the host cannot give the guest, or a trace whose CPU the host cannot give.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// No such model.
    #[error("unknown CPU model {0:?}: the models are `portable` (the default: the same CPU on every host) and `host` (this host's own CPUID)")]
    Unknown(String),
    /// The host's KVM does not offer features the CPU needs.
    #[error("this host's KVM lacks {} that the {what} has ({host})", .missing.join(", "))]
    Missing {
        /// Which CPU: "portable model", "recorded CPU", ...
        what: String,
        /// The features, by name.
        missing: Vec<String>,
        /// This host's CPU, for the message.
        host: String,
    },
}

/// Which CPU a guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuModel {
    /// A fixed x86-64-v2 CPU, the same on every host (see the module documentation).
    #[default]
    Portable,
    /// The host's own CPUID, as KVM supports it.
    Host,
}

impl CpuModel {
    /// The name the command line and the trace use.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Portable => "portable",
            CpuModel::Host => "host",
        }
    }

    /// The model called `name`.
    pub fn from_name(name: &str) -> Result<CpuModel, ModelError> {
        match name {
            "portable" => Ok(CpuModel::Portable),
            "host" => Ok(CpuModel::Host),
            other => Err(ModelError::Unknown(other.to_string())),
        }
    }

    /// The CPUID table of this model on a host whose KVM supports `supported`; `hide_host_values`
    /// removes RDRAND, RDSEED and RDTSCP (the portable model never has them). Fails, naming them, if the
    /// host lacks features the model has.
    pub fn cpuid(self, supported: &CpuId, hide_host_values: bool) -> Result<CpuId, ModelError> {
        let mut entries = match self {
            CpuModel::Host => supported.as_slice().to_vec(),
            CpuModel::Portable => {
                let entries = portable_entries();
                let missing = missing_features(&entries, supported);
                if !missing.is_empty() {
                    return Err(ModelError::Missing {
                        what: "portable model".into(),
                        missing,
                        host: host_cpu().to_string(),
                    });
                }
                entries
            }
        };
        if hide_host_values {
            for e in &mut entries {
                match (e.function, e.index) {
                    (1, _) => e.ecx &= !RDRAND,
                    (7, 0) => e.ebx &= !RDSEED,
                    (0x8000_0001, _) => e.edx &= !RDTSCP,
                    _ => {}
                }
            }
        }
        // At most KVM_MAX_CPUID_ENTRIES, which both tables are well within.
        CpuId::from_entries(&entries).map_err(|_| ModelError::Unknown(self.name().into()))
    }
}

const RDRAND: u32 = 1 << 30;
const RDSEED: u32 = 1 << 18;
const RDTSCP: u32 = 1 << 27;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// The features a refusal names, by (leaf, subleaf, register, bit): the architectural ones, which mean
/// the same on every vendor. Vendor-specific bits (AMD's CMP_LEGACY, Intel's ...) are not compared: a
/// trace of one vendor's host model would otherwise never replay on the other, and guests that care
/// about them check the vendor first.
const FEATURES: &[(u32, u32, Reg, u32, &str)] = &[
    (1, 0, Reg::Edx, 0, "FPU"),
    (1, 0, Reg::Edx, 4, "TSC"),
    (1, 0, Reg::Edx, 5, "MSR"),
    (1, 0, Reg::Edx, 6, "PAE"),
    (1, 0, Reg::Edx, 8, "CX8"),
    (1, 0, Reg::Edx, 9, "APIC"),
    (1, 0, Reg::Edx, 11, "SEP"),
    (1, 0, Reg::Edx, 12, "MTRR"),
    (1, 0, Reg::Edx, 13, "PGE"),
    (1, 0, Reg::Edx, 15, "CMOV"),
    (1, 0, Reg::Edx, 16, "PAT"),
    (1, 0, Reg::Edx, 17, "PSE-36"),
    (1, 0, Reg::Edx, 19, "CLFLUSH"),
    (1, 0, Reg::Edx, 23, "MMX"),
    (1, 0, Reg::Edx, 24, "FXSR"),
    (1, 0, Reg::Edx, 25, "SSE"),
    (1, 0, Reg::Edx, 26, "SSE2"),
    (1, 0, Reg::Ecx, 0, "SSE3"),
    (1, 0, Reg::Ecx, 1, "PCLMULQDQ"),
    (1, 0, Reg::Ecx, 9, "SSSE3"),
    (1, 0, Reg::Ecx, 12, "FMA"),
    (1, 0, Reg::Ecx, 13, "CMPXCHG16B"),
    (1, 0, Reg::Ecx, 19, "SSE4.1"),
    (1, 0, Reg::Ecx, 20, "SSE4.2"),
    (1, 0, Reg::Ecx, 21, "x2APIC"),
    (1, 0, Reg::Ecx, 22, "MOVBE"),
    (1, 0, Reg::Ecx, 23, "POPCNT"),
    (1, 0, Reg::Ecx, 24, "TSC-deadline"),
    (1, 0, Reg::Ecx, 25, "AES"),
    (1, 0, Reg::Ecx, 26, "XSAVE"),
    (1, 0, Reg::Ecx, 28, "AVX"),
    (1, 0, Reg::Ecx, 29, "F16C"),
    (1, 0, Reg::Ecx, 30, "RDRAND"),
    (7, 0, Reg::Ebx, 0, "FSGSBASE"),
    (7, 0, Reg::Ebx, 3, "BMI1"),
    (7, 0, Reg::Ebx, 5, "AVX2"),
    (7, 0, Reg::Ebx, 7, "SMEP"),
    (7, 0, Reg::Ebx, 8, "BMI2"),
    (7, 0, Reg::Ebx, 9, "ERMS"),
    (7, 0, Reg::Ebx, 16, "AVX-512F"),
    (7, 0, Reg::Ebx, 18, "RDSEED"),
    (7, 0, Reg::Ebx, 19, "ADX"),
    (7, 0, Reg::Ebx, 20, "SMAP"),
    (7, 0, Reg::Ebx, 29, "SHA"),
    (7, 0, Reg::Ecx, 2, "UMIP"),
    (7, 0, Reg::Ecx, 22, "RDPID"),
    (0x8000_0001, 0, Reg::Ecx, 0, "LAHF-SAHF"),
    (0x8000_0001, 0, Reg::Ecx, 5, "LZCNT"),
    (0x8000_0001, 0, Reg::Edx, 11, "SYSCALL"),
    (0x8000_0001, 0, Reg::Edx, 20, "NX"),
    (0x8000_0001, 0, Reg::Edx, 26, "1 GiB pages"),
    (0x8000_0001, 0, Reg::Edx, 27, "RDTSCP"),
    (0x8000_0001, 0, Reg::Edx, 29, "long mode"),
];

fn entry(table: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    table.iter().find(|e| {
        e.function == leaf && (e.index == subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

fn reg(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

/// The features `table` has that `supported` (a host's KVM) lacks, by name.
pub fn missing_features(table: &[kvm_cpuid_entry2], supported: &CpuId) -> Vec<String> {
    let has = |t: &[kvm_cpuid_entry2], &(leaf, subleaf, r, bit, _): &(u32, u32, Reg, u32, &str)| {
        entry(t, leaf, subleaf).is_some_and(|e| reg(e, r) & (1 << bit) != 0)
    };
    FEATURES
        .iter()
        .filter(|f| has(table, f) && !has(supported.as_slice(), f))
        .map(|f| f.4.to_string())
        .collect()
}

/// Leaf 1 EDX of the portable model.
const PORTABLE_1_EDX: u32 = 1 // FPU
    | 1 << 1 // VME
    | 1 << 2 // DE
    | 1 << 3 // PSE
    | 1 << 4 // TSC
    | 1 << 5 // MSR
    | 1 << 6 // PAE
    | 1 << 8 // CX8
    | 1 << 9 // APIC
    | 1 << 11 // SEP
    | 1 << 12 // MTRR
    | 1 << 13 // PGE
    | 1 << 15 // CMOV
    | 1 << 16 // PAT
    | 1 << 17 // PSE-36
    | 1 << 19 // CLFLUSH
    | 1 << 23 // MMX
    | 1 << 24 // FXSR
    | 1 << 25 // SSE
    | 1 << 26; // SSE2
/// Leaf 1 ECX of the portable model.
const PORTABLE_1_ECX: u32 = 1 << 13; // CMPXCHG16B
/// Family 15, model 6, stepping 1.
const PORTABLE_SIGNATURE: u32 = 0x0000_0f61;
/// The brand string of leaves 0x80000002-4.
const PORTABLE_BRAND: &[u8; 48] =
    b"Retrovisor portable x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// The portable model's CPUID entries.
fn portable_entries() -> Vec<kvm_cpuid_entry2> {
    let leaf = |function: u32, index: u32, [eax, ebx, ecx, edx]: [u32; 4]| kvm_cpuid_entry2 {
        function,
        index,
        flags: if matches!(function, 4 | 7) {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    };
    let text = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
    let mut entries = vec![
        // Leaf 0: the highest basic leaf and the vendor, "GenuineIntel" in EBX, EDX, ECX.
        leaf(0, 0, [7, text(b"Genu"), text(b"ntel"), text(b"ineI")]),
        // CLFLUSH line 8 quadwords, one logical processor, APIC ID 0.
        leaf(
            1,
            0,
            [
                PORTABLE_SIGNATURE,
                8 << 8 | 1 << 16,
                PORTABLE_1_ECX,
                PORTABLE_1_EDX,
            ],
        ),
        // Leaf 2 defers to leaf 4 (descriptor 0xff).
        leaf(2, 0, [0x0000_ff01, 0, 0, 0]),
        // Leaf 4: 32 KiB 8-way L1d and L1i, 1 MiB 16-way L2, 64-byte lines, then the end of the list.
        leaf(4, 0, [0x121, 7 << 22 | 63, 63, 0]),
        leaf(4, 1, [0x122, 7 << 22 | 63, 63, 0]),
        leaf(4, 2, [0x143, 15 << 22 | 63, 1023, 0]),
        leaf(4, 3, [0, 0, 0, 0]),
        leaf(5, 0, [0, 0, 0, 0]),
        leaf(6, 0, [0, 0, 0, 0]),
        leaf(7, 0, [0, 0, 0, 0]),
        leaf(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
        // LAHF/SAHF in long mode; SYSCALL, NX, long mode.
        leaf(0x8000_0001, 0, [0, 0, 1, 1 << 11 | 1 << 20 | 1 << 29]),
        leaf(0x8000_0005, 0, [0, 0, 0, 0]),
        // L2: 1024 KiB, 16-way (code 8), 64-byte lines.
        leaf(0x8000_0006, 0, [0, 0, 1024 << 16 | 8 << 12 | 64, 0]),
        leaf(0x8000_0007, 0, [0, 0, 0, 0]),
        // 40 physical and 48 linear address bits.
        leaf(0x8000_0008, 0, [0x3028, 0, 0, 0]),
    ];
    for (i, chunk) in PORTABLE_BRAND.chunks_exact(16).enumerate() {
        let w = |j: usize| text(&chunk[4 * j..4 * j + 4]);
        entries.push(leaf(0x8000_0002 + i as u32, 0, [w(0), w(1), w(2), w(3)]));
    }
    entries
}

/// The CPU this process runs on: what a trace records it was made on, and what `doctor` shows.
pub fn host_cpu() -> HostCpu {
    // CPUID is available on every x86-64 CPU and has no side effects.
    let leaf = core::arch::x86_64::__cpuid;
    let l0 = leaf(0);
    let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    let sig = leaf(1).eax;
    let base_family = (sig >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((sig >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 6 || base_family == 0xf {
        ((sig >> 16) & 0xf) << 4 | (sig >> 4) & 0xf
    } else {
        (sig >> 4) & 0xf
    };
    let brand: Vec<u8> = if leaf(0x8000_0000).eax >= 0x8000_0004 {
        (0x8000_0002..=0x8000_0004)
            .flat_map(|l| {
                let r = leaf(l);
                [r.eax, r.ebx, r.ecx, r.edx]
            })
            .flat_map(u32::to_le_bytes)
            .collect()
    } else {
        Vec::new()
    };
    HostCpu {
        vendor: String::from_utf8_lossy(&vendor).into_owned(),
        family,
        model,
        stepping: sig & 0xf,
        brand: String::from_utf8_lossy(&brand)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string(),
    }
}

/// Makes a CPUID table fit a machine with `cpus` vCPUs: the APIC present, `cpus` logical processors,
/// and no x2APIC or TSC-deadline timer, which the local APIC model does not have.
pub(crate) fn multiprocessor_cpuid(cpuid: &mut CpuId, cpus: usize) {
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.edx |= 1 << 9;
        e.ecx &= !(1 << 21 | 1 << 24);
        e.ebx = (e.ebx & !0x00ff_0000) | (cpus as u32) << 16;
    }
}

/// Sets the initial APIC ID CPUID reports (leaf 1 EBX bits 31-24, leaf 0xB EDX) to `id`.
pub(crate) fn set_apic_id(cpuid: &mut CpuId, id: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | u32::from(id) << 24,
            0xb => e.edx = u32::from(id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        kvm_ioctls::Kvm::new()
            .expect("these tests need /dev/kvm")
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID")
    }

    /// The portable model is the same table on every host that can run it: nothing of the host leaks in.
    #[test]
    fn the_portable_model_is_fixed_and_this_host_can_run_it() {
        let table = CpuModel::Portable.cpuid(&supported(), true).unwrap();
        let words: Vec<_> = table
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        let again: Vec<_> = portable_entries()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        assert_eq!(words, again);
        let l1 = entry(table.as_slice(), 1, 0).unwrap();
        assert_eq!(l1.ecx & (1 << 26 | RDRAND), 0, "no XSAVE, no RDRAND");
    }

    /// A feature the host lacks is named.
    #[test]
    fn a_missing_feature_is_named() {
        let mut supported = supported();
        for e in supported.as_mut_slice() {
            if e.function == 1 {
                e.ecx &= !(1 << 13);
            }
        }
        match CpuModel::Portable.cpuid(&supported, true) {
            Err(ModelError::Missing { missing, .. }) => assert_eq!(missing, ["CMPXCHG16B"]),
            other => panic!("{other:?}"),
        }
        let mut leaf7 = *portable_entries().iter().find(|e| e.function == 7).unwrap();
        // AVX-512F, and a bit no feature of ours names (it is not compared).
        leaf7.ebx = 1 << 16 | 1 << 1;
        let missing = missing_features(&[leaf7], &CpuId::new(0).unwrap());
        assert_eq!(missing, ["AVX-512F"]);
    }

    #[test]
    fn model_names_round_trip() {
        for m in [CpuModel::Portable, CpuModel::Host] {
            assert_eq!(CpuModel::from_name(m.name()), Ok(m));
        }
        assert!(CpuModel::from_name("pentium").is_err());
    }
}
