//! What the host is, from /proc, /sys and one `perf_event_open`: which kind of KVM serves /dev/kvm,
//! whether the host itself runs in a virtual machine, and whether it has a PMU.

use std::path::Path;

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

/// Whether the host has a PMU that counts instructions.
#[derive(Debug)]
pub enum Pmu {
    /// A hardware instruction counter opened.
    Present,
    /// The kernel knows no such counter (ENOENT, EOPNOTSUPP): there is no PMU.
    Absent(std::io::Error),
    /// The kernel refused (EACCES, EPERM: perf_event_paranoid), so whether one exists is unknown.
    Refused(std::io::Error),
}

/// The first 64 bytes of `struct perf_event_attr` (PERF_ATTR_SIZE_VER0), which every kernel accepts.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
}

const PERF_TYPE_HARDWARE: u32 = 0;
const PERF_COUNT_HW_INSTRUCTIONS: u64 = 1;
/// attr.flags bits: disabled, exclude_kernel, exclude_hv (user-mode counting needs no privilege).
const PERF_FLAGS: u64 = 1 | (1 << 5) | (1 << 6);

/// Opens (and closes) a hardware instruction counter for this process, as a PMU clock would need.
pub fn pmu() -> Pmu {
    let attr = PerfEventAttr {
        type_: PERF_TYPE_HARDWARE,
        size: size_of::<PerfEventAttr>() as u32,
        config: PERF_COUNT_HW_INSTRUCTIONS,
        flags: PERF_FLAGS,
        ..Default::default()
    };
    // SAFETY: perf_event_open reads `size` bytes of a live, initialised attr; pid 0 and cpu -1 count
    // this process on any CPU; group -1 and flags 0 ask for nothing else.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            0,
            -1,
            -1,
            0,
        )
    };
    if fd >= 0 {
        // SAFETY: closing the descriptor perf_event_open just returned, which nothing else holds.
        unsafe { libc::close(fd as libc::c_int) };
        return Pmu::Present;
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => Pmu::Refused(e),
        _ => Pmu::Absent(e),
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
}
