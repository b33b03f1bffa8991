//! gdb sessions that explain instead of ending: a divergence or a damaged checkpoint met while gdb drives
//! the replay stops it at a position it reached intact and says why on gdb's console; and retrovisor's gdb
//! commands move by position with gdb's view of registers and memory refreshed. Real gdb, real replays.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Writes a copy of `trace` into `dir` with `tamper` applied to its events; returns the copy.
fn tampered(
    trace: &Path,
    dir: &Path,
    tamper: impl FnOnce(&mut Vec<traces::Event>) -> u64,
) -> (PathBuf, u64) {
    let reader = traces::TraceReader::open(trace).unwrap();
    let mut events = reader.events().to_vec();
    let at = tamper(&mut events);
    let copy = dir.join("tampered.rvt");
    rewrite(&reader, events, &copy);
    (copy, at)
}

/// The index of the first interrupt event.
fn first_interrupt(events: &[traces::Event]) -> usize {
    events
        .iter()
        .position(|e| matches!(e.kind, traces::EventKind::Interrupt { .. }))
        .expect("no interrupt recorded")
}

#[test]
fn a_divergence_on_a_step_trace_stops_gdb_where_the_replay_was_intact() {
    let dir = scratch("gdb-diverge-step");
    let (trace, rec) = record(&dir, "timer", &["--checkpoint-every", "2000"]);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    // An interrupt logged one instruction later than it came: replay diverges there. It is one with
    // no checkpoint at its new position or the next, so that seeking one past it must replay
    // through it (where the interrupt falls depends on the host's timing).
    let (trace, at) = tampered(&trace, &dir, |events| {
        let i = events
            .iter()
            .position(|e| {
                matches!(e.kind, traces::EventKind::Interrupt { .. })
                    && (1..=1997).contains(&(e.at % 2000))
            })
            .expect("no interrupt away from the checkpoints recorded");
        events[i].at += 1;
        events[i].at
    });
    let mut server = GdbServer::start(&trace, &[]);
    let out = gdb_batch(
        server.port,
        &guest("timer"),
        &[
            "continue",
            "monitor when",
            "info registers eip",
            // Running into it again says so again.
            "stepi",
            "monitor when",
            // Before it, the replay works.
            "reverse-stepi",
            "monitor when",
            // Past it (a checkpoint after it is restored), and backward from there into it.
            "monitor seek 100000",
            "monitor when",
            "break main",
            "reverse-continue",
            "monitor when",
            // A seek that has to replay through it.
            "monitor seek 1000",
            &format!("monitor seek {}", at + 1),
            "monitor when",
            "detach",
        ],
    );
    let diverged = format!("retrovisor: replay diverged from the recording at icount {at}: ");
    assert_in_order(
        &out,
        &[
            &diverged,
            &format!("retrovisor: stopped at icount {at}, the last position the replay reached intact"),
            "No more reverse-execution history.",
            "eip            0x",
            &diverged,
            &format!("retrovisor: stopped at icount {at}"),
            "No more reverse-execution history.",
            "now at icount 100000",
            &diverged,
            "retrovisor: still at icount 100000, where the command started; the replay cannot run \
             backward past the failure",
            "No more reverse-execution history.",
            "now at icount 1000",
            &diverged,
            &format!("retrovisor: now at icount {at}, the last position replayed intact on the way there"),
        ],
    );
    let now: Vec<u64> = when_answers(&out).iter().map(|w| w.0).collect();
    assert_eq!(now, [at, at, at - 1, 100000, 100000, at], "{out}");
    assert!(!out.contains("Remote connection closed"), "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn a_divergence_on_a_landmark_trace_stops_gdb_at_its_landmark() {
    let dir = scratch("gdb-diverge-landmark");
    let (trace, rec) = record_echo_landmark(&dir);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    // The first interrupt logged at another rip than the guest stands at when it comes.
    let (trace, landmark) = tampered(&trace, &dir, |events| {
        let i = first_interrupt(events);
        events[i].rip ^= 1;
        events[i].at
    });
    let mut server = GdbServer::start(&trace, &[]);
    let out = gdb_batch(
        server.port,
        &guest("echo"),
        &[
            "continue",
            "monitor when",
            "stepi",
            "monitor when",
            "reverse-stepi",
            "monitor when",
            "continue",
            "monitor when",
            "reverse-continue",
            "monitor when",
            &format!("monitor seek {}", landmark + 5),
            "monitor when",
            "detach",
        ],
    );
    let diverged =
        format!("retrovisor: replay diverged from the recording at landmark {landmark}: rip is ");
    let stopped = format!(
        "retrovisor: stopped at landmark {landmark}, the last position the replay reached intact"
    );
    assert_in_order(
        &out,
        &[
            &diverged,
            &stopped,
            "No more reverse-execution history.",
            &diverged,
            &stopped,
            &diverged,
            &stopped,
            "No more reverse-execution history.",
            &diverged,
            &format!(
                "retrovisor: now at landmark {landmark}, the last position replayed intact on the way \
                 there"
            ),
        ],
    );
    let here = landmark << 32;
    let now: Vec<u64> = when_answers(&out).iter().map(|w| w.0).collect();
    assert_eq!(now.len(), 6, "{out}");
    assert_eq!([now[0], now[1], now[3], now[5]], [here; 4], "{out}");
    assert!(now[2] < here, "reverse-stepi went back: {out}");
    assert_eq!(now[4], 0, "reverse-continue without breakpoints: {out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

/// demo.elf recorded with checkpoints every 2000 instructions; the path of its checkpoint `index`.
fn demo_trace_and_checkpoint(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
    let (trace, rec) = record(dir, "demo", &["--checkpoint-every", "2000"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    let files = checkpoint_files(&trace);
    let file = files[index].clone();
    (trace, file)
}

#[test]
fn a_damaged_checkpoint_in_a_reverse_watch_search_is_worked_around_and_said() {
    let dir = scratch("gdb-damaged-search");
    let (trace, victim) = demo_trace_and_checkpoint(&dir, 3);
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let check = guest_source_line("demo.c", "if (guard != GUARD_VALUE)");
    let bug = guest_source_line("demo.c", "/* BUG: off-by-one store */");
    // Checkpoint 4 builds on the damaged one.
    let next: u64 = checkpoint_files(&trace)[4]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let mut server = GdbServer::start(&trace, &[]);
    // Only a watchpoint: the search skips intervals by the pages each checkpoint lists, which the damaged
    // one cannot tell.
    let out = gdb_batch(
        server.port,
        &guest("demo"),
        &[
            &format!("break demo.c:{check}"),
            "continue",
            "delete",
            "watch guard",
            "reverse-continue",
            "monitor when",
            &format!("monitor seek {}", next + 100),
            "detach",
        ],
    );
    assert_in_order(
        &out,
        &[
            "retrovisor: warning: checkpoint 3 cannot be read (",
            "Old value = 71",
            "New value = 12648430",
            &format!("demo.c:{bug}"),
        ],
    );
    // Restoring a later checkpoint (the seek's) falls back too: it builds on the damaged one.
    assert!(
        out.contains("cannot be used (it builds on checkpoint 3: ")
            && out.contains("starting from checkpoint 2 instead"),
        "{out}"
    );
    assert_eq!(
        out.matches("checkpoint 3 cannot be read").count(),
        1,
        "said once: {out}"
    );
    assert_eq!(when_answers(&out).len(), 1, "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn a_checkpoint_damaged_during_the_session_ends_only_the_command() {
    let dir = scratch("gdb-damaged-later");
    let (trace, first) = demo_trace_and_checkpoint(&dir, 0);
    let mut server = GdbServer::start(&trace, &[]);
    let out = gdb_batch(
        server.port,
        &guest("demo"),
        &[
            "monitor seek 30000",
            // Every checkpoint builds on the first one, the only full one: none can be restored now.
            &format!("shell truncate -s -16 {}", first.display()),
            "monitor seek 10000",
            "monitor when",
            "stepi",
            "monitor when",
            "detach",
        ],
    );
    assert_in_order(
        &out,
        &[
            "now at icount 30000",
            &format!("retrovisor: {}", first.display()),
            "retrovisor: still at icount 30000, where the command started; the replay cannot get past \
             the failure",
        ],
    );
    let now: Vec<u64> = when_answers(&out).iter().map(|w| w.0).collect();
    assert_eq!(now, [30000, 30001], "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn rv_seek_moves_and_gdb_shows_the_new_position() {
    let dir = scratch("gdb-rv-seek");
    let (trace, rec) = record(&dir, "demo", &["--checkpoint-every", "2000"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    let mut server = GdbServer::start(&trace, &[]);
    let script = server.script.clone().expect("no `source` line printed");
    assert!(
        script.starts_with(dir.parent().unwrap()) && script.ends_with("retrovisor/retrovisor.gdb"),
        "installed in the runtime directory: {script:?}"
    );
    let shipped = rv(&["gdb-script"]);
    assert_eq!(status(&shipped), 0);
    assert_eq!(std::fs::read(&script).unwrap(), shipped.stdout);
    let elf = guest("demo");

    // Where sum_history starts: the first gdb leaves the replay there.
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            "break sum_history",
            "continue",
            "monitor when",
            "disconnect",
        ],
    );
    let there = when_answers(&out)[0].0;
    let entry = out
        .split("Breakpoint 1 at ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .unwrap()
        .to_string();

    // Two moves, each followed by what gdb shows: without the refresh, gdb would show sum_history's frame
    // and registers after the first.
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            &format!("source {}", script.display()),
            "bt",
            "rv-seek 1000",
            "bt",
            "info registers eip",
            &format!("rv-seek {there}"),
            "bt",
            "info registers eip",
            "x/i $pc",
            "rv-when",
            "rv-seek",
            "rv-help",
            "disconnect",
        ],
    );
    assert_in_order(
        &out,
        &[
            "#0  sum_history () at demo.c:",
            "#1  ",
            "in main () at demo.c:",
            "now at icount 1000",
            "#0  ",
            "puts (s=",
            "main () at demo.c:",
            "eip            0x",
            &format!("now at icount {there}"),
            "#0  sum_history () at demo.c:",
            "#0  sum_history () at demo.c:",
            "#1  ",
            "in main () at demo.c:",
            &format!("eip            {entry}"),
            &format!("=> {entry} <sum_history+"),
            "usage: rv-seek POSITION",
            "rv-seek POSITION   move the replay there",
            "monitor seek P",
        ],
    );
    let eips: Vec<&str> = out.lines().filter(|l| l.starts_with("eip ")).collect();
    assert!(
        !eips[0].contains(&entry),
        "stale registers after rv-seek: {out}"
    );
    let now: Vec<u64> = when_answers(&out).iter().map(|w| w.0).collect();
    assert_eq!(now, [there], "{out}");
    // rv-seek sends no advice on refreshing gdb; a plain `monitor seek` does.
    let advice = "`maint flush register-cache` and `maint flush dcache`, or move with rv-seek";
    assert!(!out.contains(advice), "{out}");
    let out = gdb_batch(server.port, &elf, &["monitor seek 5", "detach"]);
    assert!(out.contains(advice), "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}
