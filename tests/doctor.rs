//! `retrovisor doctor` on the real host: what it must report wherever retrovisor runs, figures that agree
//! with what the host is, and one clear line where retrovisor cannot run at all.

mod common;
use common::*;
use std::process::{Command, Stdio};

/// The text of a report field (`name:` at the start of a line).
fn field<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name}: line in\n{report}"))
}

/// The rate at the start of a field ("211 k steps/s ..."), in units per second.
fn rate(text: &str) -> f64 {
    let mut words = text.split_whitespace();
    let n: f64 = words.next().unwrap().parse().unwrap();
    n * match words.next().unwrap() {
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        _ => 1.0,
    }
}

#[test]
fn doctor_reports_what_this_host_can_do() {
    let o = rv(&["doctor"]);
    let report = text(&o.stdout);
    assert_eq!(status(&o), 0, "{report}{}", text(&o.stderr));
    assert!(field(&report, "KVM").starts_with("usable"), "{report}");

    // The kind agrees with the module that serves /dev/kvm, whichever host this is.
    let kind = field(&report, "kind").split(':').next().unwrap();
    assert!(["PVM", "VMX", "SVM", "unknown"].contains(&kind), "{report}");
    let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if module("kvm_pvm") {
        assert_eq!(kind, "PVM");
    } else if module("kvm_intel") {
        assert_eq!(kind, "VMX");
    } else if module("kvm_amd") {
        assert_eq!(kind, "SVM");
    }

    let pmu = field(&report, "PMU");
    assert!(
        ["present", "absent", "unknown"]
            .iter()
            .any(|w| pmu.starts_with(w)),
        "{report}"
    );
    if pmu.starts_with("absent") {
        assert!(pmu.contains("os error"), "the reason is missing: {pmu}");
    }

    assert_eq!(
        field(&report, "capabilities"),
        "7 of the 7 that retrovisor needs are present"
    );
    for cap in [
        "SYNC_REGS",
        "SET_GUEST_DEBUG",
        "XSAVE",
        "XCRS",
        "VCPU_EVENTS",
        "DEBUGREGS",
        "IMMEDIATE_EXIT",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([cap, "yes"])),
            "{cap} not listed as present:\n{report}"
        );
    }
    for cap in [
        "MANUAL_DIRTY_LOG_PROTECT2",
        "GUEST_DEBUG_HW_BPS",
        "PMU_CAPABILITY",
        "TSC_CONTROL",
    ] {
        assert!(
            report.lines().any(|l| l.trim_start().starts_with(cap)),
            "{cap} not listed:\n{report}"
        );
    }

    // Measured, and plausible: stepping is slower than running free, and neither is stuck.
    let step = rate(field(&report, "single-step"));
    let free = rate(field(&report, "free run"));
    assert!(step > 10e3, "{report}");
    assert!(free > step, "{report}");

    assert!(field(&report, "clocks").starts_with("step: available"));
    assert!(
        report
            .lines()
            .any(|l| l.trim_start().starts_with("landmark: available")),
        "landmark clock missing:\n{report}"
    );
    // The pmu clock is probed: available, or unavailable with its reason.
    let pmu_clock = report
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with("pmu: "))
        .unwrap_or_else(|| panic!("no pmu clock line:\n{report}"));
    assert!(
        pmu_clock.starts_with("pmu: available (") || pmu_clock.starts_with("pmu: unavailable: "),
        "{pmu_clock}"
    );
    if !pmu.starts_with("present: ") {
        assert!(pmu_clock.starts_with("pmu: unavailable: "), "{report}");
    }
    assert!(field(&report, "quirks").starts_with("32-bit iret: "));
    for quirk in [
        "hlt while single-stepping: ",
        "hardware breakpoints: ",
        "int3 breakpoints: ",
        "KVM_SET_CPUID2: ",
    ] {
        assert!(
            report.lines().any(|l| l.trim_start().starts_with(quirk)),
            "{quirk:?} missing:\n{report}"
        );
    }
    if kind == "PVM" {
        // What PLATFORM.md measured on this machine kind, measured again.
        assert!(
            report.contains("32-bit iret: KVM cannot emulate it"),
            "{report}"
        );
        assert!(report.contains("hardware breakpoints: resuming fires the same one again"));
        // No guest branch counter under PVM, whichever CPU vendor is under it: either there is no PMU
        // at all (as on our machines), or one that cannot count a kvm_pvm guest.
        assert!(pmu_clock.starts_with("pmu: unavailable: "), "{report}");
        assert!(
            pmu_clock.contains("no PMU") || pmu_clock.contains("hypervisor"),
            "{pmu_clock}"
        );
    }
    assert!(field(&report, "verdict").starts_with("retrovisor can run here"));
}

/// Runs `retrovisor doctor` through `sh -c script` in a private mount namespace (script ends in exec).
fn doctor_in_namespace(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .arg(env!("CARGO_BIN_EXE_retrovisor"))
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) is needed")
}

/// Asserts the doctor said in one line on stderr, and nothing on stdout, that retrovisor cannot run here.
fn assert_cannot_run(o: &std::process::Output, why: &str) {
    let err = text(&o.stderr);
    assert_eq!(status(o), 2, "{err}");
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("retrovisor: error: ")
            && err.contains("retrovisor cannot run on this host")
            && err.contains(why),
        "{err}"
    );
}

#[test]
fn without_kvm_the_doctor_says_so_in_one_line() {
    // Hide /dev, as on a machine without KVM.
    let o = doctor_in_namespace("mount -t tmpfs none /dev && exec \"$0\" doctor");
    assert_cannot_run(&o, "there is no KVM device");
    // A /dev/kvm that is not KVM.
    let o = doctor_in_namespace("mount -t tmpfs none /dev && touch /dev/kvm && exec \"$0\" doctor");
    assert_cannot_run(&o, "KVM_CREATE_VM failed");
}

#[test]
fn without_permission_for_kvm_the_doctor_says_what_to_do() {
    // As nobody, who may not open /dev/kvm (crw------- root, or a kvm group nobody is not in). Like the
    // unshare tests, this needs root (to change user).
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_retrovisor"))
        .arg("doctor")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) is needed");
    assert_cannot_run(&o, "you may not read and write /dev/kvm");
}
