//! `retrovisor doctor`: what this host can do for retrovisor and what that means for the user. KVM usable
//! or not (and why not, in one line, when retrovisor cannot run at all), which kind of KVM, whether it
//! has a counter of the guest's conditional branches for a pmu clock (and if not, why not), the KVM
//! capabilities retrovisor uses, the measured single-step and free-run rates, the clocks, and the quirks
//! the machine works around, each measured with a few bytes of guest code.

mod host;

use machine::probe::{Capability, KvmProbe, ProbeError};
use std::io::Write;
use std::time::Duration;
use thiserror::Error;

/// How long each rate is measured: long enough for a steady figure, short enough to wait for.
const MEASURE: Duration = Duration::from_millis(300);

/// Why the doctor's answer is that retrovisor cannot run here, or why it could not answer.
#[derive(Debug, Error)]
pub enum DoctorError {
    /// /dev/kvm cannot be opened, or no VM can be created.
    #[error("{source}: retrovisor cannot run on this host ({advice})")]
    NoKvm {
        /// What failed.
        source: ProbeError,
        /// What to do about it.
        advice: &'static str,
    },
    /// KVM lacks capabilities the machine cannot do without.
    #[error("KVM lacks {missing}, which retrovisor needs: it cannot run on this host")]
    MissingCapabilities {
        /// Their names.
        missing: String,
    },
    /// A probe failed part-way.
    #[error("probing this host's KVM failed: {0}")]
    Probe(#[from] ProbeError),
    /// The report could not be written.
    #[error("cannot write to standard output: {0}")]
    Output(#[from] std::io::Error),
}

/// What to do when /dev/kvm does not work, from the error it gave.
fn advice(e: &ProbeError) -> &'static str {
    let errno = match e {
        ProbeError::Open(e) | ProbeError::Kvm { source: e, .. } => e.errno(),
        _ => 0,
    };
    match errno {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => {
            "there is no KVM device: load the kvm module, or use a machine or VM that offers KVM"
        }
        libc::EACCES | libc::EPERM => {
            "you may not read and write /dev/kvm: join the group that owns it (often kvm) or ask for access"
        }
        _ => "/dev/kvm does not answer as KVM does",
    }
}

/// Whether this host has a counter of the guest's retired conditional branches that a pmu clock could
/// use: the counter and its event's name, or why there is none (what doctor's `pmu:` line says).
pub fn branch_counter() -> Result<(machine::perf::CounterEvent, String), String> {
    let flags = host::cpu_flags();
    let in_vm = flags.iter().any(|f| f == "hypervisor");
    host::branch_counter(&machine::host_cpu(), host::kind(&flags), in_vm)
        .verdict()
        .map(|(counter, event)| (counter, event.to_string()))
}

/// Runs every probe and prints the report. Exits 0 when retrovisor can run here.
pub fn run() -> Result<i32, DoctorError> {
    let kvm = KvmProbe::open().map_err(|source| DoctorError::NoKvm {
        advice: advice(&source),
        source,
    })?;
    let mut out = std::io::stdout().lock();
    let flags = host::cpu_flags();
    let kind = host::kind(&flags);
    writeln!(
        out,
        "retrovisor doctor: what this host can do for retrovisor"
    )?;
    writeln!(out)?;
    field(
        &mut out,
        "KVM",
        &format!(
            "usable: /dev/kvm opened (API version {}) and a VM created",
            kvm.api_version()
        ),
    )?;
    field(
        &mut out,
        "kind",
        &format!("{}: {}", kind.name(), kind.meaning()),
    )?;
    let in_vm = flags.iter().any(|f| f == "hypervisor");
    if in_vm {
        field(
            &mut out,
            "host",
            "itself a virtual machine (the CPU flag hypervisor is set)",
        )?;
    }
    let cpu = machine::host_cpu();
    field(&mut out, "CPU", &cpu.to_string())?;
    let portable = match kvm.portable_model() {
        Ok(()) => "portable: yes (the default: the same x86-64 CPU on every host, Intel or AMD)"
            .to_string(),
        Err(e) => format!("portable: NO: {e}"),
    };
    field(&mut out, "CPU models", &portable)?;
    continuation(
        &mut out,
        "host: yes (this host's own CPUID; its traces replay only on hosts with the same features)",
    )?;
    let pmu = host::branch_counter(&cpu, kind, in_vm);
    field(&mut out, "PMU", &pmu.summary())?;

    let caps = kvm.capabilities()?;
    write_capabilities(&mut out, &caps)?;
    out.flush()?;

    let step = kvm.step_rate(MEASURE)?;
    field(
        &mut out,
        "single-step",
        &format!(
            "{} steps/s measured: the ceiling of the step clock (record and replay reach about three quarters of it)",
            per_second(step)
        ),
    )?;
    out.flush()?;
    let free = kvm.free_run_rate(MEASURE)?;
    field(
        &mut out,
        "free run",
        &format!(
            "{} instructions/s measured in ring-0 guest code: how fast `run` and the landmark clock go between exits ({:.0}x the single-step rate)",
            per_second(free),
            free / step.max(1.0)
        ),
    )?;
    if let Some((load, cpus)) = host::load().filter(|&(load, cpus)| load > cpus as f64 / 2.0) {
        // Other work shares the CPUs with the probe guests, so the figures understate this host.
        continuation(
            &mut out,
            &format!(
                "(measured while the host was busy, load average {load:.1} on {cpus} CPUs: expect more when it is idle)"
            ),
        )?;
    }

    let cpuid = kvm.cpuid_honoured()?;
    let landmark_note = match cpuid {
        Some(c) if !c.honoured => {
            " (but see KVM_SET_CPUID2 below: guests that use RDRAND, RDSEED or RDTSCP need --clock step)"
        }
        _ => "",
    };
    field(
        &mut out,
        "clocks",
        "step: available: exact on any KVM, one exit per instruction",
    )?;
    continuation(
        &mut out,
        &format!(
            "landmark: available: needs no PMU, runs free between the guest's own exits (the default of run, and of record without a pmu clock){landmark_note}"
        ),
    )?;
    continuation(
        &mut out,
        &match pmu.verdict() {
            Ok((_, event)) => format!(
                "pmu: available (the guest's retired conditional branches, {event}): the default of \
                 record"
            ),
            Err(why) => format!("pmu: unavailable: {why}; record uses the landmark clock"),
        },
    )?;

    let mut quirks = vec![
        if kvm.iret32_runs()? {
            "32-bit iret: KVM runs it".to_string()
        } else {
            "32-bit iret: KVM cannot emulate it (emulation failure); retrovisor completes it itself from the \
             guest's stack and descriptor tables"
                .to_string()
        },
        if kvm.hlt_reported_while_stepping()? {
            "hlt while single-stepping: KVM reports the halt".to_string()
        } else {
            "hlt while single-stepping: KVM steps past it without reporting a halt; retrovisor decodes hlt \
             before each step and halts the guest itself"
                .to_string()
        },
        if kvm.hw_breakpoint_refires()? {
            "hardware breakpoints: resuming fires the same one again; retrovisor steps over it with the \
             breakpoint off"
                .to_string()
        } else {
            "hardware breakpoints: resuming goes past them".to_string()
        },
        if kvm.int3_breakpoints_work()? {
            "int3 breakpoints: KVM reports them (retrovisor does not need them)".to_string()
        } else {
            "int3 breakpoints: KVM cannot emulate them; retrovisor never writes breakpoints into guest memory \
             (gdb's are checked by the replayer)"
                .to_string()
        },
    ];
    quirks.push(match cpuid {
        Some(c) if c.honoured && c.mixed_in != 0 => format!(
            "KVM_SET_CPUID2: partly honoured (a guest saw {} hidden, but also leaf 1 ECX bits {:#x} the table \
             did not set: KVM mixes the host's own features in); so for the portable model retrovisor \
             answers CPUID itself",
            c.feature, c.mixed_in
        ),
        Some(c) if c.honoured => format!(
            "KVM_SET_CPUID2: honoured (a guest saw {} hidden); the landmark clock hides RDRAND, RDSEED and \
             RDTSCP, whose results it cannot record",
            c.feature
        ),
        Some(c) => format!(
            "KVM_SET_CPUID2: NOT honoured (a guest's CPUID did not say what was set: {} hidden, FPU kept): \
             under the landmark clock a guest that uses RDRAND, RDSEED or RDTSCP will not replay; record it \
             with --clock step",
            c.feature
        ),
        None => "KVM_SET_CPUID2: not checked (CPUID leaf 1 offers no feature to hide)".to_string(),
    });
    if kind == host::Kind::Pvm {
        quirks.push(
            "ring-3 code: PVM does not single-step it (known, not measured): keep guests in ring 0 for exact \
             instruction counts"
                .to_string(),
        );
    }
    for (i, q) in quirks.iter().enumerate() {
        if i == 0 {
            field(&mut out, "quirks", q)?;
        } else {
            continuation(&mut out, q)?;
        }
    }

    let missing: Vec<&str> = caps
        .iter()
        .filter(|c| c.needed && !c.present)
        .map(|c| c.name)
        .collect();
    if !missing.is_empty() {
        out.flush()?;
        return Err(DoctorError::MissingCapabilities {
            missing: missing.join(", "),
        });
    }
    field(
        &mut out,
        "verdict",
        "retrovisor can run here: record, replay and gdb, with the step and landmark clocks",
    )?;
    Ok(0)
}

/// The capabilities, needed ones first, with what each is for.
fn write_capabilities(out: &mut dyn Write, caps: &[Capability]) -> std::io::Result<()> {
    let needed = caps.iter().filter(|c| c.needed).count();
    let present = caps.iter().filter(|c| c.needed && c.present).count();
    field(
        out,
        "capabilities",
        &format!("{present} of the {needed} that retrovisor needs are present"),
    )?;
    for c in caps {
        if !c.needed
            && caps
                .iter()
                .take_while(|x| x.name != c.name)
                .all(|x| x.needed)
        {
            continuation(out, "and others it does without:")?;
        }
        continuation(
            out,
            &format!(
                "  {:<26} {:<4} {}",
                c.name,
                if c.present { "yes" } else { "no" },
                c.role
            ),
        )?;
    }
    Ok(())
}

/// A report line: `name:` padded to a column, then the text.
fn field(out: &mut dyn Write, name: &str, text: &str) -> std::io::Result<()> {
    writeln!(out, "{:<14}{text}", format!("{name}:"))
}

/// A line that continues the field above it.
fn continuation(out: &mut dyn Write, text: &str) -> std::io::Result<()> {
    writeln!(out, "{:<14}{text}", "")
}

/// A rate for people: 312 k, 1.52 M, 2.1 G.
fn per_second(rate: f64) -> String {
    match rate {
        r if r >= 1e9 => format!("{:.1} G", r / 1e9),
        r if r >= 1e6 => format!("{:.2} M", r / 1e6),
        r if r >= 1e3 => format!("{:.0} k", r / 1e3),
        r => format!("{r:.0}"),
    }
}
