//! What the host is, from /proc, /sys, CPUID and one `perf_event_open`: which kind of KVM serves
//! /dev/kvm, whether the host itself runs in a virtual machine, and whether it has a counter of the
//! guest's retired conditional branches that a `--clock pmu` could use (and if not, why not).

use std::path::Path;

use machine::perf::{CounterEvent, PerfCounter, PerfError};

/// What serves /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// kvm_pvm: KVM without hardware virtualization, guest kernel code emulated or run deprivileged.
    Pvm,
    /// kvm_intel: Intel VT-x.
    Vmx,
    /// kvm_amd: AMD-V.
    Svm,
    /// None of the modules or CPU flags that would say.
    Unknown,
}

impl Kind {
    /// Its short name, as `doctor` prints it after `kind:`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pvm => "PVM",
            Kind::Vmx => "VMX",
            Kind::Svm => "SVM",
            Kind::Unknown => "unknown",
        }
    }

    /// What it means for retrovisor.
    pub fn meaning(self) -> &'static str {
        match self {
            Kind::Pvm => {
                "KVM without hardware virtualization (kvm_pvm): ring-0 guest code is emulated, so it runs at \
                 millions rather than billions of instructions a second, and some instructions need the VMM"
            }
            Kind::Vmx => "hardware virtualization, Intel VT-x (kvm_intel)",
            Kind::Svm => "hardware virtualization, AMD-V (kvm_amd)",
            Kind::Unknown => "neither kvm_pvm, kvm_intel nor kvm_amd is loaded, and the CPU shows no vmx or svm",
        }
    }
}

/// The kind of KVM: from the module that provides it, or else from the CPU's flags.
pub fn kind(flags: &[String]) -> Kind {
    let loaded = |module: &str| Path::new("/sys/module").join(module).exists();
    let has = |flag: &str| flags.iter().any(|f| f == flag);
    if loaded("kvm_pvm") {
        Kind::Pvm
    } else if loaded("kvm_intel") || has("vmx") {
        Kind::Vmx
    } else if loaded("kvm_amd") || has("svm") {
        Kind::Svm
    } else {
        Kind::Unknown
    }
}

/// The first CPU's flags in /proc/cpuinfo (empty if it cannot be read).
pub fn cpu_flags() -> Vec<String> {
    flags_in(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// The flags of the first `flags` line of a /proc/cpuinfo text.
fn flags_in(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then(|| value.split_whitespace().map(String::from).collect())
        })
        .unwrap_or_default()
}

/// The one-minute load average and the CPUs there are to carry it, if /proc says.
pub fn load() -> Option<(f64, usize)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load = text.split_whitespace().next()?.parse().ok()?;
    Some((load, std::thread::available_parallelism().ok()?.get()))
}

/// A retired-conditional-branch event: what a `--clock pmu` would count in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchEvent {
    /// `perf_event_attr.config` for the CPU's core PMU (a raw event: umask << 8 | event select, with the
    /// 0x51 of the counter's control bits that perf ignores but that keeps the usual spelling).
    pub config: u64,
    /// The vendor's name for it.
    pub name: &'static str,
    /// Branches before a target at which the pmu clock programs its overflow (the counter's skid).
    pub margin: u64,
}

/// The overflow margin on Intel, whose counters' skid rr measures at about 100 branches.
const INTEL_MARGIN: u64 = 256;
/// The overflow margin on AMD Zen, whose skid rr finds unbounded and allows 10,000 branches for.
const AMD_MARGIN: u64 = 10_000;

impl std::fmt::Display for BranchEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, raw event {:#x}", self.name, self.config)
    }
}

/// The retired-conditional-branch event of a CPU, from its CPUID vendor, display family and display
/// model, for the CPUs whose event is known (the ones rr supports); `None` for any other.
pub fn branch_event(vendor: &str, family: u32, model: u32) -> Option<BranchEvent> {
    match (vendor, family) {
        ("GenuineIntel", 6) => match model {
            // Nehalem, Westmere, Sandy Bridge, Ivy Bridge, Haswell, Broadwell, Skylake, Kaby Lake,
            // Coffee Lake, Comet Lake: umask 0x01 is every retired conditional branch.
            0x1a | 0x1e | 0x2e | 0x25 | 0x2c | 0x2f | 0x2a | 0x2d | 0x3a | 0x3e | 0x3c | 0x3f
            | 0x45 | 0x46 | 0x3d | 0x47 | 0x4f | 0x56 | 0x4e | 0x55 | 0x5e | 0x8e | 0x9e | 0xa5
            | 0xa6 => Some(BranchEvent {
                config: 0x5101c4,
                name: "BR_INST_RETIRED.CONDITIONAL",
                margin: INTEL_MARGIN,
            }),
            // Ice Lake and later big cores (Tiger, Rocket, Alder, Raptor, Meteor, Lunar, Arrow Lake,
            // Sapphire, Emerald and Granite Rapids): umask 0x01 became taken-only, 0x11 is all of them.
            0x6a | 0x6c | 0x7d | 0x7e | 0x8c | 0x8d | 0xa7 | 0x97 | 0x9a | 0xb7 | 0xba | 0xbf
            | 0xaa | 0xbd | 0xc6 | 0x8f | 0xcf | 0xad => Some(BranchEvent {
                config: 0x5111c4,
                name: "BR_INST_RETIRED.COND",
                margin: INTEL_MARGIN,
            }),
            // Atom cores: Silvermont, Knights Landing, Goldmont (Plus), Tremont.
            0x37 | 0x4c | 0x57 | 0x5c | 0x5f | 0x7a | 0x9c => Some(BranchEvent {
                config: 0x517ec4,
                name: "BR_INST_RETIRED.JCC",
                margin: INTEL_MARGIN,
            }),
            // Core 2 (Merom, Penryn) and anything newer than this list: not known to count exactly.
            _ => None,
        },
        // Zen, Zen+, Zen 2 (0x17), Zen 3 and 4 (0x19), Zen 5 (0x1a). Family 0x15 counts only taken
        // branches, and later families are not known yet.
        ("AuthenticAMD", 0x17 | 0x19 | 0x1a) => Some(BranchEvent {
            config: 0x5100d1,
            name: "EX_RET_COND",
            margin: AMD_MARGIN,
        }),
        _ => None,
    }
}

/// Whether this host has a counter of the guest's retired conditional branches that a `--clock pmu`
/// could use, and if not, the one reason that decides it.
#[derive(Debug)]
pub enum BranchCounter {
    /// A guest-only counter of the CPU's branch event opened, enabled, read and disabled.
    Usable {
        /// The event it counts.
        event: BranchEvent,
        /// How the pmu clock opens it.
        counter: CounterEvent,
        /// The perf PMU it was opened on (`cpu`, or `cpu_core` on hybrid Intel CPUs).
        pmu: String,
    },
    /// The kernel has no hardware performance counters: the counter's open failed with ENOENT, or
    /// EOPNOTSUPP or anything else where /sys/bus/event_source/devices lists no core PMU.
    NoPmu {
        /// What was opened.
        tried: String,
        /// perf_event_open's error.
        error: std::io::Error,
        /// Whether /sys/bus/event_source/devices lists a core PMU (`cpu` or `cpu_core`).
        listed: bool,
        /// Whether the host is itself a virtual machine (CPU flag `hypervisor`).
        in_vm: bool,
    },
    /// perf_event_open refused (EACCES, EPERM): the counter may exist but this process may not use it.
    Refused {
        /// What was opened.
        tried: String,
        /// perf_event_open's error.
        error: std::io::Error,
        /// /proc/sys/kernel/perf_event_paranoid, if it could be read.
        paranoid: Option<String>,
    },
    /// A hybrid Intel CPU: a counter of its big cores' PMU (`cpu_core`) misses what the vCPU thread
    /// runs on its small ones.
    Hybrid {
        /// The event that would count.
        event: BranchEvent,
    },
    /// A counter opens on this host, but the KVM that serves /dev/kvm cannot let it count a guest.
    NoGuestCounting {
        /// The event that opened.
        event: BranchEvent,
        /// Why the guest cannot be counted.
        reason: String,
    },
    /// A branch counter opens, but no retired-conditional-branch event is known for this CPU.
    UnknownCpu {
        /// The CPUID vendor string.
        vendor: String,
        /// Display family.
        family: u32,
        /// Display model.
        model: u32,
    },
    /// The counter failed in some other way: opened with an unexpected error, or failed its read-back.
    Failed {
        /// What was tried.
        tried: String,
        /// The step that failed: "perf_event_open", "enable", "read" or "disable".
        step: &'static str,
        /// Its error.
        error: std::io::Error,
    },
}

impl BranchCounter {
    /// The `PMU:` field of the report: present, absent or unknown, then what was found.
    pub fn summary(&self) -> String {
        match self {
            BranchCounter::Usable { event, pmu, .. } => format!(
                "present: a guest-only counter of retired conditional branches ({event}) opened on \
                 the {pmu} PMU, and enabled, read and disabled"
            ),
            BranchCounter::NoGuestCounting { event, reason } => format!(
                "present (a guest-only counter of retired conditional branches ({event}) opened), \
                 but it cannot count a guest here: {reason}"
            ),
            BranchCounter::Hybrid { event } => format!(
                "present (a guest-only counter of retired conditional branches ({event}) opened on the \
                 cpu_core PMU), but this is a hybrid CPU"
            ),
            BranchCounter::UnknownCpu { .. } => {
                "present (a hardware branch counter opened), but there is no known retired-conditional-\
                 branch event for this CPU"
                    .into()
            }
            BranchCounter::NoPmu {
                tried,
                error,
                listed,
                ..
            } => format!(
                "absent: perf_event_open of {tried} failed: {error}{}",
                if *listed {
                    ""
                } else {
                    "; /sys/bus/event_source/devices lists no cpu (or cpu_core) PMU"
                }
            ),
            BranchCounter::Refused { tried, error, .. } => {
                format!("unknown: perf_event_open of {tried} was refused: {error}")
            }
            BranchCounter::Failed { tried, step, error } => {
                format!("unknown: {step} of {tried} failed: {error}")
            }
        }
    }

    /// The counter a `--clock pmu` would count with here and its event, or why it cannot work here,
    /// in a phrase.
    pub fn verdict(&self) -> Result<(CounterEvent, BranchEvent), String> {
        Err(match self {
            BranchCounter::Usable { event, counter, .. } => return Ok((*counter, *event)),
            BranchCounter::NoPmu { in_vm, .. } => format!(
                "no PMU: the kernel has no hardware performance counters{}",
                if *in_vm {
                    " (this host is itself a virtual machine, without a virtual PMU)"
                } else {
                    ""
                }
            ),
            BranchCounter::Refused { paranoid, .. } => format!(
                "perf_event_open was refused: /proc/sys/kernel/perf_event_paranoid is {}, and counting a \
                 guest's kernel needs 1 or less (or CAP_PERFMON)",
                paranoid.as_deref().unwrap_or("unreadable")
            ),
            BranchCounter::NoGuestCounting { reason, .. } => {
                format!("no guest counting under this hypervisor: {reason}")
            }
            BranchCounter::Hybrid { .. } => "a hybrid CPU: a counter of its big cores (cpu_core) \
                misses the branches the vCPU thread runs on its small ones"
                .into(),
            BranchCounter::UnknownCpu {
                vendor,
                family,
                model,
            } => format!(
                "no known retired-conditional-branch event for this CPU ({vendor}, family {family:#x}, \
                 model {model:#x})"
            ),
            BranchCounter::Failed { step, error, .. } => {
                format!("the branch counter does not work: its {step} failed: {error}")
            }
        })
    }
}

const PERF_TYPE_HARDWARE: u32 = 0;
const PERF_TYPE_RAW: u32 = 4;
const PERF_COUNT_HW_BRANCH_INSTRUCTIONS: u64 = 4;

/// Where perf lists its PMUs.
const EVENT_SOURCES: &str = "/sys/bus/event_source/devices";

/// The core PMU perf lists, and its perf type: `cpu`, or `cpu_core` (the big cores of a hybrid Intel
/// CPU, whose raw events need that PMU's own type).
fn core_pmu() -> Option<(String, u32)> {
    ["cpu", "cpu_core"].iter().find_map(|name| {
        let dir = Path::new(EVENT_SOURCES).join(name);
        dir.is_dir().then(|| {
            let ty = std::fs::read_to_string(dir.join("type"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(PERF_TYPE_RAW);
            (name.to_string(), ty)
        })
    })
}

/// Opens a disabled counter of this thread that counts only while it runs a guest, as the pmu clock
/// opens it (see [`machine::perf`]).
fn open_guest_counter(type_: u32, config: u64) -> std::io::Result<PerfCounter> {
    let event = CounterEvent {
        type_,
        config,
        guest_only: true,
        margin: 0,
    };
    PerfCounter::open(event, libc::SIGUSR1).map_err(|e| match e {
        PerfError::Open { source, .. } | PerfError::Control { source, .. } => source,
    })
}

/// Enables the counter, runs a few host branches, disables it and reads it: the count, or the step
/// that failed and its error.
fn read_back(counter: &PerfCounter) -> Result<u64, (&'static str, std::io::Error)> {
    let step = |step: &'static str| {
        move |e: PerfError| match e {
            PerfError::Open { source, .. } | PerfError::Control { source, .. } => (step, source),
        }
    };
    counter.enable().map_err(step("enable"))?;
    // Branches on the host, which a guest-only counter must not count.
    let mut x = std::hint::black_box(1u64);
    for i in 0..1000u64 {
        if std::hint::black_box(i) % 3 == 0 {
            x = x.wrapping_mul(3);
        }
    }
    std::hint::black_box(x);
    counter.disable().map_err(step("disable"))?;
    counter.read().map_err(step("read"))
}

/// What keeps the KVM serving /dev/kvm from letting a host counter count its guests, if anything:
/// `enable_pmu` is /sys/module/kvm/parameters/enable_pmu.
fn guest_obstacle(kind: Kind, enable_pmu: Option<&str>) -> Option<String> {
    if kind == Kind::Pvm {
        return Some(
            "kvm_pvm runs guests without VMX or SVM, so the CPU never enters a guest mode for a \
             guest-only counter to count in"
                .into(),
        );
    }
    match enable_pmu.map(str::trim) {
        Some("N" | "n" | "0") => Some(
            "KVM's PMU support is disabled (/sys/module/kvm/parameters/enable_pmu is N)".into(),
        ),
        _ => None,
    }
}

/// Sorts out a failed open of the branch counter: `listed` is whether perf lists a core PMU.
fn open_failed(tried: String, error: std::io::Error, listed: bool, in_vm: bool) -> BranchCounter {
    match error.raw_os_error() {
        Some(libc::ENOENT) => {}
        _ if !listed => {}
        Some(libc::EACCES | libc::EPERM) => {
            return BranchCounter::Refused {
                tried,
                error,
                paranoid: std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                    .ok()
                    .map(|p| p.trim().to_string()),
            }
        }
        _ => {
            return BranchCounter::Failed {
                tried,
                step: "perf_event_open",
                error,
            }
        }
    }
    BranchCounter::NoPmu {
        tried,
        error,
        listed,
        in_vm,
    }
}

/// Probes for a usable counter of the guest's retired conditional branches, as `--clock pmu` would
/// open it: the CPU's event, guest-only (exclude_host), counting the guest's kernel and user code.
/// `kind` is the KVM that serves /dev/kvm; `in_vm` whether this host is itself a virtual machine.
pub fn branch_counter(cpu: &vocab::HostCpu, kind: Kind, in_vm: bool) -> BranchCounter {
    let event = branch_event(&cpu.vendor, cpu.family, cpu.model);
    let pmu = core_pmu();
    // Without a known event, a generic branch counter still tells whether there is a PMU at all.
    let (type_, config, tried) = match event {
        Some(e) => (
            pmu.as_ref().map_or(PERF_TYPE_RAW, |p| p.1),
            e.config,
            format!("a guest-only counter of retired conditional branches ({e})"),
        ),
        None => (
            PERF_TYPE_HARDWARE,
            PERF_COUNT_HW_BRANCH_INSTRUCTIONS,
            "a guest-only hardware branch counter".to_string(),
        ),
    };
    let counter = match open_guest_counter(type_, config) {
        Ok(c) => c,
        Err(e) => return open_failed(tried, e, pmu.is_some(), in_vm),
    };
    let Some(event) = event else {
        return BranchCounter::UnknownCpu {
            vendor: cpu.vendor.clone(),
            family: cpu.family,
            model: cpu.model,
        };
    };
    let enable_pmu = std::fs::read_to_string("/sys/module/kvm/parameters/enable_pmu").ok();
    if let Some(reason) = guest_obstacle(kind, enable_pmu.as_deref()) {
        return BranchCounter::NoGuestCounting { event, reason };
    }
    match read_back(&counter) {
        Ok(0) if pmu.as_ref().is_some_and(|p| p.0 == "cpu_core") => BranchCounter::Hybrid { event },
        Ok(0) => BranchCounter::Usable {
            event,
            counter: CounterEvent {
                type_,
                config,
                guest_only: true,
                margin: event.margin,
            },
            pmu: pmu.map_or_else(|| "raw".into(), |p| p.0),
        },
        Ok(n) => BranchCounter::NoGuestCounting {
            event,
            reason: format!(
                "the guest-only counter counted {n} of this process's own branches: the PMU does not tell \
                 guest from host"
            ),
        },
        Err((step, error)) => BranchCounter::Failed { tried, step, error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_from_the_first_flags_line() {
        let cpuinfo =
            "processor\t: 0\nflags\t\t: fpu vme hypervisor\nprocessor\t: 1\nflags\t: other\n";
        assert_eq!(flags_in(cpuinfo), ["fpu", "vme", "hypervisor"]);
        assert!(flags_in("no flags here").is_empty());
    }

    #[test]
    fn each_cpu_gets_its_conditional_branch_event() {
        let config = |vendor, family, model| branch_event(vendor, family, model).map(|e| e.config);
        // Intel: Skylake and Cascade Lake servers, Coffee Lake; Ice Lake on; Atom cores.
        assert_eq!(config("GenuineIntel", 6, 0x55), Some(0x5101c4));
        assert_eq!(config("GenuineIntel", 6, 0x9e), Some(0x5101c4));
        assert_eq!(config("GenuineIntel", 6, 0x6a), Some(0x5111c4));
        assert_eq!(config("GenuineIntel", 6, 0x8f), Some(0x5111c4));
        assert_eq!(config("GenuineIntel", 6, 0x9a), Some(0x5111c4));
        assert_eq!(config("GenuineIntel", 6, 0x5c), Some(0x517ec4));
        // Core 2, Pentium 4, and a model not known yet.
        assert_eq!(config("GenuineIntel", 6, 0x17), None);
        assert_eq!(config("GenuineIntel", 0xf, 0x6), None);
        assert_eq!(config("GenuineIntel", 6, 0xff), None);
        // AMD: Zen 1 to 5 (EPYC Rome 0x17/0x31, Milan 0x19/0x01, Genoa 0x19/0x11, Turin 0x1a/0x02).
        for (family, model) in [
            (0x17, 0x01),
            (0x17, 0x31),
            (0x19, 0x01),
            (0x19, 0x11),
            (0x1a, 0x02),
        ] {
            assert_eq!(config("AuthenticAMD", family, model), Some(0x5100d1));
        }
        // Bulldozer-family AMD counts only taken branches; other vendors are unknown.
        assert_eq!(config("AuthenticAMD", 0x15, 0x02), None);
        assert_eq!(config("HygonGenuine", 0x18, 0x00), None);
        assert_eq!(config("CentaurHauls", 6, 0x0f), None);
        // The overflow margin covers each vendor's skid: rr's 10,000 branches on Zen.
        let margin = |vendor, family, model| branch_event(vendor, family, model).map(|e| e.margin);
        assert_eq!(margin("GenuineIntel", 6, 0x55), Some(256));
        assert_eq!(margin("AuthenticAMD", 0x19, 0x01), Some(10_000));
    }

    #[test]
    fn a_failed_open_says_which_failure() {
        let e = |errno| std::io::Error::from_raw_os_error(errno);
        let open = |errno, listed| open_failed("a counter".into(), e(errno), listed, true);
        assert!(matches!(
            open(libc::ENOENT, false),
            BranchCounter::NoPmu { .. }
        ));
        assert!(matches!(
            open(libc::ENOENT, true),
            BranchCounter::NoPmu { .. }
        ));
        assert!(matches!(
            open(libc::EOPNOTSUPP, false),
            BranchCounter::NoPmu { .. }
        ));
        // No PMU listed decides it, whatever else the kernel said.
        assert!(matches!(
            open(libc::EACCES, false),
            BranchCounter::NoPmu { .. }
        ));
        assert!(matches!(
            open(libc::EACCES, true),
            BranchCounter::Refused { .. }
        ));
        assert!(matches!(
            open(libc::EPERM, true),
            BranchCounter::Refused { .. }
        ));
        assert!(matches!(
            open(libc::EINVAL, true),
            BranchCounter::Failed { .. }
        ));
        let why = open(libc::ENOENT, false).verdict().unwrap_err();
        assert!(why.starts_with("no PMU: "), "{why}");
        let summary = open(libc::ENOENT, false).summary();
        assert!(
            summary.starts_with("absent: ") && summary.contains("os error 2"),
            "{summary}"
        );
    }

    #[test]
    fn pvm_and_a_disabled_kvm_pmu_cannot_count_a_guest() {
        assert!(guest_obstacle(Kind::Pvm, Some("Y\n")).is_some());
        assert!(guest_obstacle(Kind::Vmx, Some("N\n")).is_some());
        assert!(guest_obstacle(Kind::Svm, Some("Y\n")).is_none());
        assert!(guest_obstacle(Kind::Vmx, None).is_none());
    }
}
