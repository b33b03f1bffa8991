//! Several vCPUs: a bare-metal guest whose bootstrap processor starts the second CPU with INIT and
//! STARTUP IPIs (real-mode trampoline, then protected mode) and races it on a counter updated without a
//! lock. The vCPUs run one at a time and the recording keeps the interleaving, so the lost-update count
//! a recording shows is the one every replay shows, with either clock.

mod common;
use common::*;
use std::path::Path;

/// The numbers the race guest prints on its last line: (expected, counter, lost).
fn race_result(output: &str) -> (u64, u64, u64) {
    let line = output
        .lines()
        .find(|l| l.starts_with("smprace: cpus=2"))
        .unwrap_or_else(|| panic!("no result line in {output:?}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("expected="), field("counter="), field("lost="))
}

/// A step-clock chaos recording of the race guest whose seed loses updates (the step clock's schedule
/// depends only on the seed).
const CHAOS_7: &[&str] = &[
    "--clock",
    "step",
    "--cpus",
    "2",
    "--append",
    "iters=3000",
    "--chaos",
    "--seed",
    "7",
];

fn info(trace: &Path) -> String {
    text(&rv(&["info", trace.to_str().unwrap()]).stdout)
}

#[test]
fn two_vcpus_started_by_init_and_sipi_race_and_the_landmark_recording_replays_exactly() {
    let dir = scratch("smp-landmark");
    let (trace, rec) = record(
        &dir,
        "smprace",
        &[
            "--clock",
            "landmark",
            "--cpus",
            "2",
            "--append",
            "iters=20000",
        ],
    );
    let out = text(&rec.stdout);
    assert!(out.contains("smprace: ap apic id=1"), "{out}");
    assert!(out.contains("iterations bsp=20000 ap=20000"), "{out}");
    let (expected, counter, lost) = race_result(&out);
    assert_eq!((expected, counter + lost), (40_000, 40_000));
    // The guest's own verdict is its exit status: 1 (status 3) when updates were lost.
    assert_eq!(status(&rec), if lost > 0 { 3 } else { 1 });
    for _ in 0..2 {
        assert_replays(&trace, &rec);
    }
    assert_replays_with(&trace, &rec, &["--clock", "step"]);
    let info = info(&trace);
    assert!(info.contains("2 vCPUs"), "{info}");
    assert!(info.contains("switch"), "no switch counted: {info}");
    let events = text(&rv(&["events", trace.to_str().unwrap(), "--kind", "switch"]).stdout);
    assert!(events.contains("vCPU 1 runs"), "{events}");
}

#[test]
fn a_chaos_recording_loses_updates_and_three_replays_at_once_show_the_same_count() {
    let dir = scratch("smp-chaos");
    let (trace, rec) = record(&dir, "smprace", CHAOS_7);
    let out = text(&rec.stdout);
    let (_, _, lost) = race_result(&out);
    assert!(lost > 0, "chaos mode lost no update: {out}");
    assert!(
        info(&trace).contains("seed 7"),
        "the seed is not in the trace"
    );
    // The step clock's slices are counted in instructions: the same seed draws the same schedule.
    let again = dir.join("again.rvt");
    let mut rerun = vec![
        "record",
        "--kernel",
        guest_path("smprace"),
        "-o",
        again.to_str().unwrap(),
    ];
    rerun.extend(CHAOS_7);
    let rec2 = rv(&rerun);
    assert_eq!(text(&rec2.stdout), out, "the same seed gave another run");
    assert_replays_at_once(&trace, &rec, 3);
}

/// The guest's path as the command line takes it.
fn guest_path(name: &str) -> &'static str {
    Box::leak(guest(name).to_str().unwrap().to_owned().into_boxed_str())
}

#[test]
fn vcpu_counts_outside_one_to_eight_are_refused_with_the_range() {
    for bad in ["0", "9"] {
        let out = rv(&["run", "--kernel", guest_path("hello"), "--cpus", bad]);
        assert_eq!(status(&out), 2, "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("--cpus") && err.contains("1..=8"), "{err}");
    }
}

#[test]
fn a_trace_that_switches_to_a_vcpu_the_machine_lacks_is_refused_when_opened() {
    let dir = scratch("smp-bad-switch");
    let (trace, rec) = record(
        &dir,
        "smprace",
        &["--clock", "step", "--cpus", "2", "--append", "iters=500"],
    );
    assert!(text(&rec.stdout).contains("smprace: cpus=2"));
    let reader = traces::TraceReader::open(&trace).unwrap();
    let mut events = reader.events().to_vec();
    let switch = events
        .iter_mut()
        .find(|e| matches!(e.kind, traces::EventKind::Switch { .. }))
        .expect("the recording switched vCPUs");
    switch.kind = traces::EventKind::Switch { cpu: 5 };
    let bad = dir.join("bad.rvt");
    rewrite(&reader, events, &bad);
    let out = replay(&bad, &[]);
    let err = text(&out.stderr);
    assert_ne!(status(&out), 0);
    assert!(
        err.contains("vCPU 5") && err.contains("has 2"),
        "unclear error: {err}"
    );
}

/// The vCPU that runs at step-trace position `at`: the last switch at or before it (vCPU 0 before any).
fn running_at(trace: &Path, at: u64) -> u8 {
    let reader = traces::TraceReader::open(trace).unwrap();
    reader
        .events()
        .iter()
        .rev()
        .filter(|e| e.at <= at)
        .find_map(|e| match e.kind {
            traces::EventKind::Switch { cpu } => Some(cpu),
            _ => None,
        })
        .unwrap_or(0)
}

#[test]
fn gdb_sees_a_thread_per_vcpu_and_a_reverse_watch_finds_the_racing_store_on_its_thread() {
    let dir = scratch("smp-gdb");
    let (trace, rec) = record(&dir, "smprace", CHAOS_7);
    assert!(race_result(&text(&rec.stdout)).2 > 0);
    let server = GdbServer::start(&trace, &[]);
    let out = gdb_batch(
        server.port,
        &guest("smprace"),
        &[
            "info threads",
            "continue",
            "watch -l counter",
            "reverse-continue",
            "monitor when",
            "thread",
            "info threads",
            "x/i $pc",
        ],
    );
    assert!(
        out.contains("Thread 1.1") && out.contains("Thread 1.2"),
        "no thread per vCPU: {out}"
    );
    let store = guest_source_line("smprace.c", "counter = v + 1;");
    assert!(
        out.contains(&format!("smprace.c:{store}")) || out.contains(&format!("{store}\t")),
        "the reverse watch did not stop at the racing store (line {store}): {out}"
    );
    let (at, _) = *when_answers(&out).last().expect("monitor when answered");
    let cpu = running_at(&trace, at);
    let thread = format!("Current thread is {} ", cpu + 1);
    assert!(
        out.contains(&thread),
        "the store at icount {at} ran on vCPU {cpu}, but gdb says otherwise: {out}"
    );
    assert!(
        !out.contains("without sending a thread-id"),
        "a stop named no thread: {out}"
    );
}

#[test]
fn stepping_a_thread_moves_to_that_vcpus_next_or_previous_instruction() {
    let dir = scratch("smp-gdb-step");
    let (trace, rec) = record(&dir, "smprace", CHAOS_7);
    assert!(text(&rec.stdout).contains("smprace: cpus=2"));
    // A switch from vCPU 1 (thread 2) to vCPU 0 (thread 1) at icount s, vCPU 1 having run a while.
    let reader = traces::TraceReader::open(&trace).unwrap();
    let switches: Vec<(u64, u8)> = reader
        .events()
        .iter()
        .filter_map(|e| match e.kind {
            traces::EventKind::Switch { cpu } => Some((e.at, cpu)),
            _ => None,
        })
        .collect();
    let s = switches
        .windows(3)
        .find(|w| w[1].1 == 1 && w[2].1 == 0 && w[2].0 > w[1].0 + 5 && w[0].0 + 10 < w[1].0)
        .map(|w| w[2].0)
        .expect("vCPU 1 handed over to vCPU 0 after running a while");
    let server = GdbServer::start(&trace, &[]);
    let out = gdb_batch(
        server.port,
        &guest("smprace"),
        &[
            &format!("monitor seek {}", s + 5),
            "maint flush register-cache",
            // What retrovisor.gdb sets: gdb then says which thread a reverse-stepi is for.
            "set scheduler-locking step",
            "thread 2",
            "reverse-stepi",
            "monitor when",
            "thread",
            "thread 1",
            "stepi",
            "monitor when",
            "thread",
        ],
    );
    let whens: Vec<u64> = when_answers(&out).iter().map(|w| w.0).collect();
    // Back over vCPU 0's five instructions to vCPU 1's last one; then forward over that one to vCPU
    // 0's first.
    assert_eq!(whens, [s - 1, s + 1], "{out}");
    assert_in_order(&out, &["Current thread is 2 ", "Current thread is 1 "]);
}
