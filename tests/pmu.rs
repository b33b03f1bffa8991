//! The pmu clock on its simulated counter: positions are the guest's retired conditional branches, and a
//! replay reaches each branch count through the counter's path (programmed overflow, a skid of up to
//! 100 instructions, single-step refinement). This host has no PMU, so the hardware counter itself is
//! never exercised here (README).

mod common;
use common::*;
use std::path::{Path, PathBuf};

const PMU: [&str; 3] = ["--clock", "pmu", "--simulated-counter"];

/// Records `guest_name` with the pmu clock on the simulated counter, with `extra` arguments.
fn record_pmu(dir: &Path, guest_name: &str, extra: &[&str]) -> (PathBuf, std::process::Output) {
    let mut args = PMU.to_vec();
    args.extend_from_slice(extra);
    let (trace, rec) = record(dir, guest_name, &args);
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    assert!(info.contains("clock:         pmu ("), "{info}");
    (trace, rec)
}

/// Replays `trace` with a skid of `skid` and asserts it reproduces the recording byte for byte and says
/// it matched; returns how many runs went through the counter's overflow.
fn replays_exactly(trace: &Path, rec: &std::process::Output, skid: &str) -> u64 {
    let o = replay(trace, &["--skid", skid]);
    let err = text(&o.stderr);
    assert_eq!(status(&o), status(rec), "{err}");
    assert_eq!(o.stdout, rec.stdout, "{err}");
    assert!(err.contains("replay matched the recording"), "{err}");
    let runs = err.find(" runs to a branch count").map(|end| &err[..end]);
    runs.and_then(|head| head.rsplit(", ").next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn without_a_counter_the_pmu_clock_says_why_and_names_the_simulated_one() {
    let dir = scratch("pmu-refused");
    let trace = dir.join("t.rvt");
    let o = rv(&[
        "record",
        "--clock",
        "pmu",
        "--kernel",
        guest("timer").to_str().unwrap(),
        "-o",
        trace.to_str().unwrap(),
    ]);
    let err = text(&o.stderr);
    assert_eq!(status(&o), 2, "{err}");
    assert!(err.contains("--simulated-counter"), "{err}");
    assert!(!trace.exists(), "a refused recording left a trace behind");
    let run = rv(&[
        "run",
        "--clock",
        "pmu",
        "--kernel",
        guest("timer").to_str().unwrap(),
    ]);
    assert_eq!(status(&run), 2, "{}", text(&run.stderr));
    // Without --clock, record takes the landmark clock here, and says why not the pmu clock.
    let rec = rv(&[
        "record",
        "--kernel",
        guest("timer").to_str().unwrap(),
        "-o",
        dir.join("default.rvt").to_str().unwrap(),
    ]);
    let err = text(&rec.stderr);
    assert!(
        err.contains("with the landmark clock (no pmu clock here: no PMU"),
        "{err}"
    );
}

#[test]
fn timer_ticks_in_a_loop_replay_exactly_whatever_the_skid_and_by_stepping() {
    let dir = scratch("pmu-timer");
    let (trace, rec) = record_pmu(&dir, "timer", &[]);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    assert!(
        text(&rec.stdout).contains("tick 0:"),
        "{}",
        text(&rec.stdout)
    );
    assert!(
        text(&rec.stderr).contains(" branches in "),
        "{}",
        text(&rec.stderr)
    );
    // Without --skid, the trace replays on the counter it was recorded on, which replay says.
    let o = replay(&trace, &[]);
    assert_eq!(o.stdout, rec.stdout);
    assert!(
        text(&o.stderr).contains("recorded on the simulated counter, replayed on it"),
        "{}",
        text(&o.stderr)
    );
    // Ticks come every hundred branches or so at stepping speed: runs are short, and each is refined.
    replays_exactly(&trace, &rec, "0");
    replays_exactly(&trace, &rec, "100");
    // The step clock reaches every recorded point by single steps, counting the same branches.
    let stepped = replay(&trace, &["--clock", "step"]);
    assert_eq!(stepped.stdout, rec.stdout, "{}", text(&stepped.stderr));
    assert!(
        text(&stepped.stderr).contains("branches (")
            && text(&stepped.stderr).contains("instructions, counted by stepping"),
        "{}",
        text(&stepped.stderr)
    );
}

#[test]
fn serial_input_a_ledger_and_a_disk_replay_exactly() {
    let dir = scratch("pmu-inputs");
    let input = dir.join("input.txt");
    std::fs::write(&input, "first\nsecond\nquit\n").unwrap();
    let (trace, rec) = record_pmu(&dir, "echo", &["--serial-input", input.to_str().unwrap()]);
    assert!(
        text(&rec.stdout).contains("second"),
        "{}",
        text(&rec.stdout)
    );
    replays_exactly(&trace, &rec, "100");
    replays_exactly(&trace, &rec, "0");

    let ledger = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/ledger-short.txt");
    let (trace, rec) = record_pmu(
        &dir,
        "ledger",
        &["--serial-input", ledger.to_str().unwrap()],
    );
    replays_exactly(&trace, &rec, "100");

    let disk = dir.join("disk.img");
    std::fs::write(
        &disk,
        (0..=255u8).cycle().take(256 * 1024).collect::<Vec<u8>>(),
    )
    .unwrap();
    let (trace, rec) = record_pmu(&dir, "disk", &["--disk", disk.to_str().unwrap()]);
    // The disk guest computes long between inputs: its runs go through the counter's overflow.
    assert!(
        replays_exactly(&trace, &rec, "100") > 0,
        "no run went through the counter's overflow"
    );
    replays_exactly(&trace, &rec, "0");
}

#[test]
fn gdb_finds_the_demo_bug_backwards_on_a_pmu_trace() {
    let dir = scratch("pmu-gdb");
    // Checkpoints close together, so that reverse steps are quick.
    let (trace, rec) = record_pmu(&dir, "demo", &["--checkpoint-ms", "5"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    let mut server = GdbServer::start(&trace, &[]);
    let check = guest_source_line("demo.c", "if (guard != GUARD_VALUE)");
    let bug = guest_source_line("demo.c", "/* BUG: off-by-one store */");
    let out = gdb_batch(
        server.port,
        &guest("demo"),
        &[
            &format!("break demo.c:{check}"),
            "continue",
            "watch guard",
            "reverse-continue",
            "print i",
            "reverse-stepi",
            "stepi",
            "monitor when",
            "detach",
        ],
    );
    assert_in_order(
        &out,
        &[
            &format!("Breakpoint 1, main () at demo.c:{check}"),
            "Old value = 71",
            "New value = 12648430",
            &format!("demo.c:{bug}"),
            "$1 = 8",
        ],
    );
    assert!(
        out.contains(" + "),
        "monitor when gave no branch and offset: {out}"
    );
    assert_eq!(server.wait_exit(10), Some(0), "detach ends the server");
}

/// The hardware counter's path, driven here by the thread's task clock (a software counter every kernel
/// has) in place of a PMU's branch counter: the counter opens on the thread that runs the vCPU, its
/// overflow signal ends the free run of a guest that spins without a single exit, and a count that
/// lands past the target is reported, never taken for it. Task-clock nanoseconds are no branch count
/// and land far past any margin, so only the plumbing is checked, not exactness (README).
#[test]
fn a_hardware_counters_overflow_ends_a_free_run_and_an_overshoot_is_reported() {
    use machine::perf::CounterEvent;
    use machine::{Advance, Clock, Kicker, Landmarks, Machine, MachineError};
    use std::time::{Duration, Instant};

    let image = std::fs::read(guest("spinwait")).unwrap();
    let mut m = Machine::new(&machine_config(""), &image).unwrap();
    m.set_clock(Clock::Landmark).unwrap();
    m.set_positions(Clock::Landmark);
    m.set_landmarks(Landmarks::Branches).unwrap();
    m.use_hardware_counter(CounterEvent::TASK_CLOCK).unwrap();
    // Nothing delivers the timer's interrupt, so the guest spins in `while (!tick_seen);` for good. A
    // kicker much slower than the overflow is the safety net should the overflow's signal not come.
    let _net = Kicker::start(Duration::from_secs(20));
    let target = m.landmarks() + 100_000_000;
    let start = Instant::now();
    let run = m.run_to_count(target, &mut Clockwork(0));
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the overflow did not end the run ({took:?})"
    );
    match run {
        Err(MachineError::CounterOvershot { target: t, counted }) => {
            assert_eq!(t, target);
            assert!(counted > target && m.landmarks() == counted);
        }
        Ok(Advance::Moved) => assert!(m.landmarks() >= target),
        other => panic!("{other:?}"),
    }
    assert_eq!(m.counter_overflows(), 1);
}
