//! Deterministic record and replay, end to end: real KVM, real guests built from tests/guests.

mod common;
use common::*;

#[test]
fn hello_runs_records_and_replays_identically() {
    let dir = scratch("hello");
    let run = rv(&["run", "--kernel", guest("hello").to_str().unwrap()]);
    assert_eq!(status(&run), 1, "stderr: {}", text(&run.stderr));
    assert!(
        text(&run.stdout).starts_with("hello from retrovisor guest\n"),
        "{}",
        text(&run.stdout)
    );
    let (trace, rec) = record(&dir, "hello", &[]);
    assert_eq!(
        rec.stdout, run.stdout,
        "a deterministic guest prints the same recorded and unrecorded"
    );
    assert_replays(&trace, &rec);
}

#[test]
fn timer_guest_differs_between_runs_but_replays_exactly() {
    let dir = scratch("timer");
    let kernel = guest("timer");
    // Interrupt timing follows the host clock, so free runs disagree with each other.
    let runs: Vec<Vec<u8>> = (0..3)
        .map(|_| rv(&["run", "--kernel", kernel.to_str().unwrap()]).stdout)
        .collect();
    assert!(
        runs.iter().any(|r| r != &runs[0]),
        "three host-time runs printed the same; the test guest lost its point"
    );
    let (trace, rec) = record(&dir, "timer", &["--checkpoint-every", "20000"]);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    for _ in 0..3 {
        assert_replays(&trace, &rec);
    }
}

#[test]
fn serial_input_is_recorded_and_replayed() {
    let dir = scratch("echo");
    let input = dir.join("input.txt");
    std::fs::write(&input, "first line\nsecond\nquit\n").unwrap();
    let (trace, rec) = record(&dir, "echo", &["--serial-input", input.to_str().unwrap()]);
    let out = text(&rec.stdout);
    assert!(
        out.contains("got: first line\n") && out.contains("got: second\n"),
        "{out}"
    );
    assert_eq!(status(&rec), 1);
    assert_replays(&trace, &rec);
}

#[test]
fn rtc_is_recorded_and_virtual_time_is_reproducible() {
    let dir = scratch("rtc");
    let (trace, rec) = record(&dir, "rtc", &[]);
    assert!(
        text(&rec.stdout).contains("rtc: 20"),
        "{}",
        text(&rec.stdout)
    );
    assert_replays(&trace, &rec);
    // Virtual time starts at 2026-01-01 00:00:00 and follows the instruction count: same in every run.
    let a = rv(&[
        "run",
        "--time",
        "virtual",
        "--kernel",
        guest("rtc").to_str().unwrap(),
    ]);
    let b = rv(&[
        "run",
        "--time",
        "virtual",
        "--kernel",
        guest("rtc").to_str().unwrap(),
    ]);
    assert!(
        text(&a.stdout).contains("rtc: 2026-01-01 00:00:0"),
        "{}",
        text(&a.stdout)
    );
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn rdtsc_and_rdrand_results_are_logged_and_replayed() {
    let dir = scratch("rand");
    // `always`: RDRAND and RDSEED too, whatever the portable CPU's CPUID says.
    let (trace, rec) = record(&dir, "rand", &["--cmdline", "always"]);
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    assert!(info.contains("host_value"), "{info}");
    assert!(
        text(&rec.stdout).contains("rdrand: 0x"),
        "{}",
        text(&rec.stdout)
    );
    // Two recordings see different host values; each replays its own exactly.
    let (trace2, rec2) = record(&scratch("rand2"), "rand", &["--cmdline", "always"]);
    assert_ne!(
        rec.stdout, rec2.stdout,
        "RDTSC/RDRAND gave identical values twice"
    );
    assert_replays(&trace, &rec);
    assert_replays(&trace2, &rec2);
}

#[test]
fn long_mode_guest_records_and_replays() {
    let dir = scratch("long64");
    let (trace, rec) = record(&dir, "long64", &[]);
    assert!(
        text(&rec.stdout).contains("long mode ok"),
        "{}",
        text(&rec.stdout)
    );
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    assert_replays(&trace, &rec);
}

#[test]
fn triple_fault_is_recorded_as_the_end_and_replayed() {
    let dir = scratch("fault");
    let (trace, rec) = record(&dir, "fault", &[]);
    assert_eq!(status(&rec), 6, "{}", text(&rec.stderr));
    assert!(text(&rec.stdout).contains("about to triple fault"));
    assert_replays(&trace, &rec);
    assert!(text(&rv(&["info", trace.to_str().unwrap()]).stdout).contains("triple-faulted"));
}

#[test]
fn replay_from_a_middle_checkpoint_reaches_the_same_end() {
    let dir = scratch("middle");
    let (trace, rec) = record(&dir, "timer", &["--checkpoint-every", "10000"]);
    let cps = checkpoint_files(&trace).len();
    assert!(cps >= 3, "expected several checkpoints, found {cps}");
    let end: u64 = text(&rv(&["info", trace.to_str().unwrap()]).stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("instructions:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mid = replay(&trace, &["--from", &(end / 2).to_string()]);
    assert_eq!(status(&mid), status(&rec), "{}", text(&mid.stderr));
    // Output from the middle is the tail of the recorded output.
    assert!(
        !mid.stdout.is_empty() && rec.stdout.ends_with(&mid.stdout),
        "{}",
        text(&mid.stdout)
    );
}

/// Traces committed with the image that recorded them and the output it printed, and the CPU vendor of
/// the host that made each (tests/fixtures/README.md): version 1 (Intel, step clock, 32-bit), and
/// version 2 as the release before CPU models wrote it (AMD: a 32-bit landmark trace with kicks, a
/// 64-bit step trace with SSE state in every checkpoint).
const FIXTURES: &[(&str, &str)] = &[
    ("v1-timer", "GenuineIntel"),
    ("v2-amd-timer", "AuthenticAMD"),
    ("v2-amd-sse64", "AuthenticAMD"),
];

/// This host's CPU vendor.
fn host_vendor() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("vendor_id")?.split(':').nth(1))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn traces_recorded_on_either_vendor_replay() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let info = rv(&["info", fixtures.join("v1-timer.rvt").to_str().unwrap()]);
    assert!(
        text(&info.stdout).contains("version 1"),
        "{}",
        text(&info.stdout)
    );
    let here = host_vendor();
    for (name, vendor) in FIXTURES {
        let trace = fixtures.join(format!("{name}.rvt"));
        let kernel = fixtures.join(format!("{name}.elf"));
        let kernel = ["--kernel", kernel.to_str().unwrap()];
        let recorded = std::fs::read(fixtures.join(format!("{name}.out"))).unwrap();
        // Host capability is not guest state: the first checkpoint (MXCSR_MASK, XSAVE sizes) matches on
        // any host, whichever vendor recorded it.
        let start = replay(&trace, &[&kernel[..], &["--to", "1"]].concat());
        assert_eq!(status(&start), 0, "{name}: {}", text(&start.stderr));
        let r = replay(&trace, &kernel);
        if here == *vendor {
            assert_eq!(status(&r), 1, "{name}: {}", text(&r.stderr));
            assert_eq!(r.stdout, recorded, "{name}");
            assert!(text(&r.stderr).contains("replay matched the recording"));
        } else if status(&r) != 1 || r.stdout != recorded {
            // What CPUID cannot hide may differ between vendors: the flags an instruction leaves
            // undefined (IMUL's SF differs between Intel and AMD, and an interrupt frame stores it). Such a
            // replay must stop at a divergence, never end with other output.
            assert_eq!(status(&r), 4, "{name} on {here}: {}", text(&r.stderr));
            assert!(text(&r.stderr).contains("replay diverged"), "{name}");
        }
    }
}

#[test]
fn the_minimal_guest_records_and_replays() {
    let dir = scratch("minimal");
    let (trace, rec) = record(&dir, "minimal", &[]);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    assert_eq!(text(&rec.stdout), "hello from a minimal guest\n");
    assert_replays(&trace, &rec);
}

#[test]
fn the_readme_builds_a_guest_from_the_minimal_one() {
    // The README's commands for starting one's own guest, as a user would type them.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut lines = readme.lines().skip_while(|l| !l.starts_with("gcc -m32"));
    let mut build = String::new();
    for line in lines.by_ref() {
        build.push_str(line.trim_end_matches('\\'));
        if !line.ends_with('\\') {
            break;
        }
    }
    assert!(
        build.contains("-o my-guest.elf my-guest.c"),
        "the README has no build command for my-guest.c: {build:?}"
    );
    let dir = scratch("my-guest");
    std::fs::copy(root.join("tests/guests/minimal.c"), dir.join("my-guest.c")).unwrap();
    let built = std::process::Command::new("sh")
        .args(["-c", &build])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(built.status.success(), "{build}: {}", text(&built.stderr));
    let run = rv(&[
        "run",
        "--kernel",
        dir.join("my-guest.elf").to_str().unwrap(),
    ]);
    assert_eq!(status(&run), 1, "{}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "hello from a minimal guest\n");
}

#[test]
fn the_instruction_limit_is_its_own_end_with_its_own_status() {
    let dir = scratch("limit");
    let (trace, rec) = record(&dir, "spin", &["--max-instructions", "20000"]);
    assert_eq!(status(&rec), 8, "{}", text(&rec.stderr));
    assert!(
        text(&rec.stderr).contains("stopped at the instruction limit (--max-instructions)"),
        "{}",
        text(&rec.stderr)
    );
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    assert!(info.contains("instruction limit"), "{info}");
    assert!(info.contains("instructions:  20000"), "{info}");
    assert_replays(&trace, &rec);
    let run = rv(&[
        "run",
        "--max-instructions",
        "20000",
        "--kernel",
        guest("spin").to_str().unwrap(),
    ]);
    assert_eq!(status(&run), 8, "{}", text(&run.stderr));
}

#[test]
fn info_explains_its_words_and_a_matching_replay_says_so() {
    let dir = scratch("words");
    let (trace, rec) = record(&dir, "timer", &[]);
    let t = trace.to_str().unwrap();
    let info = text(&rv(&["info", t]).stdout);
    // The CLI's own spelling (`--time host`), not Rust's Debug formatting.
    assert!(info.contains("\ntime:          host ("), "{info}");
    assert!(!info.contains("Host"), "{info}");
    assert!(
        info.contains("interrupt") && info.contains("vectors injected into the vCPU"),
        "{info}"
    );
    assert!(
        info.contains("edges on a PIC line raised by a timer"),
        "{info}"
    );
    assert!(info.contains("every 100000 instructions"), "{info}");

    let r = replay(&trace, &[]);
    assert_eq!(status(&r), status(&rec));
    let err = text(&r.stderr);
    let end = text(&rv(&["info", t]).stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("instructions:")
                .map(|v| v.trim().to_string())
        })
        .unwrap();
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with(&format!(
                "retrovisor: replay matched the recording: {end} instructions, output identical ({} bytes, sha256 ",
                rec.stdout.len()
            )))
            .count(),
        1,
        "{err}"
    );
    // Only a replay from boot to the end checked everything: one from a checkpoint or to a point says nothing.
    for extra in [&["--from", "150000"][..], &["--to", "1000"][..]] {
        let r = replay(&trace, extra);
        assert!(
            !text(&r.stderr).contains("matched"),
            "{extra:?}: {}",
            text(&r.stderr)
        );
    }
}

#[test]
fn info_names_landmark_positions_and_checkpoint_time() {
    let dir = scratch("words-landmark");
    let (trace, _) = record(&dir, "hello", &["--clock", "landmark"]);
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    assert!(info.contains("\nlandmarks:     "), "{info}");
    assert!(!info.contains("instructions"), "{info}");
    assert!(info.contains("every 25 ms"), "{info}");
    let r = replay(&trace, &[]);
    assert!(
        text(&r.stderr).contains("replay matched the recording: ")
            && text(&r.stderr).contains(" landmarks, output identical"),
        "{}",
        text(&r.stderr)
    );
}
