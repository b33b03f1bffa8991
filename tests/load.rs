//! Recordings made on a busy machine replay exactly, and `record --verify` says so.
//!
//! A recording gets one chance at a heisenbug, often on a loaded machine, where the host preempts the
//! recorder and its kick signals land at other moments than on an idle one. Whatever the host does must
//! not change what the recording logs: here the recordings are made while CPU hogs run (two per core),
//! and every one of them is replayed. The guest that showed the problem is `tickrace`: a 1 kHz timer
//! races a loop that calls an out-of-line helper, so ticks are delivered at kicks, many right after the
//! previous tick's `iret` (which the VMM completes on this host) returned to that helper.

mod common;
use common::*;
use machine::{Advance, Clock, Kicker, Machine};
use std::time::Duration;

/// Records `guest_name` (landmark clock) into its own directory under `dir`.
fn record_into(
    dir: &std::path::Path,
    guest_name: &str,
    n: usize,
) -> (std::path::PathBuf, std::process::Output) {
    let dir = dir.join(format!("{guest_name}-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    record(&dir, guest_name, &["--clock", "landmark"])
}

#[test]
fn recordings_made_while_cpu_hogs_run_replay_exactly() {
    let dir = scratch("load");
    let hogs = Hogs::start(2);
    let mut recordings = Vec::new();
    for n in 0..4 {
        recordings.push(record_into(&dir, "tickrace", n));
    }
    for n in 0..3 {
        recordings.push(record_into(&dir, "timer", n));
    }
    // Replayed while the machine is still busy, as a user on a loaded CI runner would.
    for (trace, rec) in &recordings {
        assert_eq!(status(rec), 1, "{}", text(&rec.stderr));
        let r = replay(trace, &[]);
        assert!(
            text(&r.stderr).contains("replay matched the recording"),
            "{} recorded under load does not replay: {}",
            trace.display(),
            text(&r.stderr)
        );
        assert_eq!(r.stdout, rec.stdout, "{}", trace.display());
        assert_eq!(status(&r), status(rec));
    }
    drop(hogs);
    let tickrace = text(&rv(&["info", recordings[0].0.to_str().unwrap()]).stdout);
    assert!(
        tickrace.contains("kick "),
        "the kick-heavy guest was recorded without kicks: {tickrace}"
    );
}

/// Whether the guest can take an interrupt must follow from its state alone, the same however the point
/// was reached: a kick's signal in the recording, a breakpoint in replay, a checkpoint restored by gdb.
/// At every landmark and kick of a run of the race guest, the answer is compared with the one the same
/// state gives once restored. (It used to come from kvm_run fields that depend on the kind of exit: after
/// the VMM completed an `iret`, the two disagreed, and recordings made under load did not replay.)
#[test]
fn whether_an_interrupt_can_be_taken_follows_from_the_state_alone() {
    let image = std::fs::read(guest("tickrace")).unwrap();
    let config = machine_config("iters=20000");
    let mut m = Machine::new(&config, &image).unwrap();
    m.set_clock(Clock::Landmark).unwrap();
    m.set_positions(Clock::Landmark);
    let mut host = Clockwork(0);
    let _kicks = Kicker::start(Duration::from_micros(300));
    let (mut open, mut closed, mut kicks) = (0, 0, 0);
    let mut out = Vec::new();
    loop {
        let advance = m.advance(&mut host).unwrap();
        match advance {
            Advance::Stopped(_) | Advance::Idle => break,
            Advance::Kicked => kicks += 1,
            _ => {}
        }
        if m.landmarks().is_multiple_of(3) {
            m.pulse_irq(0).unwrap();
        }
        out.extend(m.take_output());
        let (enabled, blocker) = (m.interrupts_enabled(), m.interrupt_blocker());
        let state = m.state_blob().unwrap();
        m.restore_state(&state).unwrap();
        assert_eq!(
            m.interrupts_enabled(),
            enabled,
            "at landmark {} ({advance:?}), rip {:#x}: the window was {enabled} ({blocker:?}) as reached, \
             {:?} from the same state restored",
            m.landmarks(),
            m.rip(),
            m.interrupt_blocker()
        );
        if enabled {
            open += 1;
        } else {
            closed += 1;
        }
        if m.interrupt_ready() {
            m.inject_interrupt().unwrap();
        }
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("tickrace: done"), "{out}");
    assert!(open > 100 && closed > 100, "open {open}, closed {closed}");
    assert!(kicks > 0, "no kick stopped the guest");
}

#[test]
fn record_verify_says_a_recording_replays_or_names_the_divergence() {
    let dir = scratch("verify");
    let (_, rec) = record(&dir, "tickrace", &["--clock", "landmark", "--verify"]);
    let err = text(&rec.stderr);
    assert_eq!(status(&rec), 1, "{err}");
    assert!(
        err.contains("verified: ") && err.contains("replays exactly"),
        "{err}"
    );
    // An rdtsc the guest writes into RAM at run time is one the VMM could not trap: the landmark
    // recording does not replay, and --verify says so at once, with the divergence status.
    let jit = scratch("verify-jit");
    let (_, rec) = record(
        &jit,
        "rand",
        &["--clock", "landmark", "--cmdline", "jit", "--verify"],
    );
    let err = text(&rec.stderr);
    assert_eq!(status(&rec), 4, "{err}");
    assert!(
        err.contains("not verified:") && err.contains("does not replay: replay diverged"),
        "{err}"
    );
    assert!(
        err.contains("RDTSC"),
        "the hint names the likely cause: {err}"
    );
}
