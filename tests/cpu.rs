//! The guest's CPU does not depend on the host: the portable model shows every host's guests the same
//! CPUID (the VMM answers it, since this host's KVM mixes the host's own features into what it is
//! given), a trace keeps the CPU it gave and the host it was made on, and replay refuses a host that
//! lacks a feature of the trace's CPU, naming it.

mod common;
use common::*;

/// What cpuid.elf prints under the portable model, on any host.
const PORTABLE: &str = "vendor: GenuineIntel\n\
                        brand: Retrovisor portable x86-64 CPU\n\
                        leaf 1: 0x00000f61 0x00010800 0x00002000 0x078bbb7f\n\
                        leaf 7: 0x00000000 0x00000000 0x00000000 0x00000000\n\
                        leaf 0x80000001: 0x00000000 0x00000000 0x00000001 0x20100800\n\
                        leaf 0x80000008: 0x00003028 0x00000000 0x00000000 0x00000000\n";

#[test]
fn the_portable_cpu_is_the_same_on_every_host_with_both_clocks() {
    let dir = scratch("cpu-portable");
    for clock in ["step", "landmark"] {
        let run = rv(&[
            "run",
            "--clock",
            clock,
            "--kernel",
            guest("cpuid").to_str().unwrap(),
        ]);
        assert_eq!(status(&run), 1, "{}", text(&run.stderr));
        assert_eq!(text(&run.stdout), PORTABLE, "{clock} clock");
        let (trace, rec) = record(&dir.join(clock), "cpuid", &["--clock", clock]);
        assert_eq!(text(&rec.stdout), PORTABLE);
        assert_replays(&trace, &rec);
        let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
        assert!(info.contains("cpu:           portable model"), "{info}");
        assert!(info.contains("recorded on:   "), "{info}");
    }
    // The host model is this host's own CPUID: its vendor, whatever it is, and not the model's brand.
    let host = rv(&[
        "run",
        "--cpu",
        "host",
        "--kernel",
        guest("cpuid").to_str().unwrap(),
    ]);
    let out = text(&host.stdout);
    assert!(!out.contains("Retrovisor portable"), "{out}");
    assert!(
        out.contains("vendor: GenuineIntel") || out.contains("vendor: AuthenticAMD"),
        "{out}"
    );
}

/// Rewrites a trace's header.json through `change`.
fn edit_header(trace: &std::path::Path, change: impl FnOnce(&mut serde_json::Value)) {
    let path = trace.join("header.json");
    let mut header: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    change(&mut header);
    std::fs::write(&path, serde_json::to_vec(&header).unwrap()).unwrap();
}

#[test]
fn a_trace_whose_cpu_this_host_lacks_is_refused_naming_the_feature() {
    let dir = scratch("cpu-missing");
    let (trace, rec) = record(&dir, "cpuid", &["--clock", "landmark", "--cpu", "host"]);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    // As if recorded on a host whose KVM offers AVX-512F and SHA, which this PVM host never does.
    edit_header(&trace, |h| {
        for e in h["cpuid"].as_array_mut().unwrap() {
            if e[0] == 7 && e[1] == 0 {
                let ebx = e[4].as_u64().unwrap() | 1 << 16 | 1 << 29;
                e[4] = ebx.into();
            }
        }
    });
    let r = replay(&trace, &[]);
    let err = text(&r.stderr);
    assert_eq!(status(&r), 2, "{err}");
    assert!(
        err.contains("this host's KVM lacks AVX-512F, SHA that the recorded CPU has"),
        "{err}"
    );
}

#[test]
fn a_divergence_on_a_trace_from_another_cpu_says_where_it_was_recorded() {
    let dir = scratch("cpu-elsewhere");
    // An rdtsc made at run time: a landmark recording of it never replays (see tests/load.rs).
    let (trace, _) = record(&dir, "rand", &["--clock", "landmark", "--cmdline", "jit"]);
    let here = text(&replay(&trace, &[]).stderr);
    assert!(here.contains("replay diverged"), "{here}");
    assert!(!here.contains("recorded on another CPU"), "{here}");
    edit_header(&trace, |h| {
        h["recorded_on"] = serde_json::json!({
            "vendor": "CyrixInstead", "family": 6, "model": 2, "stepping": 0, "brand": "6x86MX"
        });
    });
    let r = replay(&trace, &[]);
    let err = text(&r.stderr);
    assert_eq!(status(&r), 4, "{err}");
    assert!(
        err.contains("the trace was recorded on another CPU (CyrixInstead family 6 model 2 stepping 0, 6x86MX; this host: "),
        "{err}"
    );
}
