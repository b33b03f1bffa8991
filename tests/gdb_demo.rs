//! The reverse-debugging demo and gdb's everyday commands, under a real gdb in batch mode against
//! `retrovisor replay --gdb`.

mod common;
use common::*;
use std::path::PathBuf;

/// Records demo.elf (checkpoints close together so that reverse steps are quick) and serves it to gdb.
fn demo(name: &str) -> (GdbServer, PathBuf, String) {
    let dir = scratch(name);
    let (trace, rec) = record(&dir, "demo", &["--checkpoint-every", "2000"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    (
        GdbServer::start(&trace, &[]),
        guest("demo"),
        text(&rec.stdout),
    )
}

#[test]
fn watch_guard_and_reverse_continue_stop_on_the_bug_line() {
    let (mut server, elf, recorded) = demo("gdb-demo-bug");
    let check = guest_source_line("demo.c", "if (guard != GUARD_VALUE)");
    let bug = guest_source_line("demo.c", "/* BUG: off-by-one store */");
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            &format!("break demo.c:{check}"),
            "continue",
            "print/x guard",
            "watch guard",
            "reverse-continue",
            "info line *$pc",
            "print i",
            "bt",
            "detach",
        ],
    );
    assert_in_order(
        &out,
        &[
            &format!("Breakpoint 1, main () at demo.c:{check}"),
            "$1 = 0x47",
            "Hardware watchpoint 2: guard",
            "Old value = 71",
            "New value = 12648430",
            &format!("in record_history (seed=7) at demo.c:{bug}"),
            &format!("Line {bug} of \"demo.c\""),
            // The store of history[8] is the one that hits guard.
            "$2 = 8",
            "#0  ",
            "record_history (seed=7) at demo.c",
            "#1  ",
            "main () at demo.c",
        ],
    );
    assert_eq!(server.wait_exit(10), Some(0), "detach ends the server");
    // Guest output up to the check was printed once, in order, although execution went back over it.
    let printed = server.stdout();
    assert!(printed.ends_with("demo: history sum 196\n"), "{printed}");
    assert!(recorded.starts_with(&printed), "{printed}");
}

#[test]
fn forward_watch_reports_the_store_after_it_happens() {
    let (server, elf, _) = demo("gdb-demo-forward-watch");
    let loop_line = guest_source_line("demo.c", "for (i = 0; i <= 8; i++)");
    let out = gdb_batch(
        server.port,
        &elf,
        &["watch guard", "continue", "print i", "kill"],
    );
    assert_in_order(
        &out,
        &[
            "Hardware watchpoint 1: guard",
            "Old value = 12648430",
            "New value = 71",
            &format!("demo.c:{loop_line}"),
            "$1 = 8",
        ],
    );
}

#[test]
fn step_next_finish_and_their_reverses_over_a_call() {
    let (server, elf, _) = demo("gdb-demo-step");
    let first = guest_source_line("demo.c", "c1 = checksum(\"retrovisor\");");
    let second = guest_source_line("demo.c", "c2 = checksum(\"time travel debugging\");");
    let after = guest_source_line("demo.c", "puts(\"demo: checksums \");");
    let body = guest_source_line("demo.c", "int sum = 0;");
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            &format!("break demo.c:{second}"),
            "continue",
            "step",
            "bt",
            "reverse-finish",
            "info line *$pc",
            "next",
            "info line *$pc",
            "reverse-next",
            "info line *$pc",
            "reverse-next",
            "info line *$pc",
            "step",
            "finish",
            "reverse-step",
            "info line *$pc",
            "kill",
        ],
    );
    assert_in_order(
        &out,
        &[
            &format!("main () at demo.c:{second}"),
            // step enters the call
            "checksum (s=0x",
            "\"time travel debugging\") at demo.c:",
            &format!("{body}\t"),
            "#1  ",
            &format!("in main () at demo.c:{second}"),
            // reverse-finish goes back to the call instruction
            &format!("Line {second} of \"demo.c\""),
            // next steps over the call
            &format!("Line {after} of \"demo.c\""),
            // reverse-next steps back over it, then over the first call too
            &format!("Line {second} of \"demo.c\""),
            &format!("Line {first} of \"demo.c\""),
            // step into checksum("retrovisor") and finish it: checksum 0xac5d1e25 as an int
            "\"retrovisor\") at demo.c:",
            "Value returned is $1 = -1403183579",
            // reverse-step from after the call goes back into the callee's last line
            "Line ",
            " of \"demo.c\"",
        ],
    );
}

#[test]
fn breakpoint_kinds_and_read_and_access_watchpoints() {
    let (server, elf, _) = demo("gdb-demo-kinds");
    let check = guest_source_line("demo.c", "if (guard != GUARD_VALUE)");
    let bug = guest_source_line("demo.c", "/* BUG: off-by-one store */");
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            "tbreak is_prime",
            "continue",
            "hbreak sum_history",
            "continue",
            "rwatch guard",
            "continue",
            "info line *$pc",
            "delete",
            // Backward, the access just run is the read itself (stop before it), then the clobbering store.
            "awatch guard",
            "reverse-continue",
            "info line *$pc",
            "reverse-continue",
            "info line *$pc",
            "x/4xw &history",
            "x/xw 0xfffff000",
            "info registers eip",
            "kill",
        ],
    );
    assert_in_order(
        &out,
        &[
            "Temporary breakpoint 1, is_prime (n=2)",
            "Hardware assisted breakpoint 2 at",
            "Breakpoint 2, sum_history ()",
            "Hardware read watchpoint 3: guard",
            "Value = 71",
            &format!("Line {check} of \"demo.c\""),
            "Hardware access (read/write) watchpoint 4: guard",
            "Value = 71",
            &format!("Line {check} of \"demo.c\""),
            "Old value = 71",
            "New value = 12648430",
            &format!("Line {bug} of \"demo.c\""),
            "<history>:\t0x00000007\t0x00000008\t0x0000000b\t0x00000010",
            "Cannot access memory at address 0xfffff000",
            "eip            0x",
        ],
    );
}

#[test]
fn both_ends_of_the_recording_say_there_is_no_more_history() {
    let (server, elf, _) = demo("gdb-demo-ends");
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            "reverse-stepi",
            "monitor when",
            "reverse-continue",
            "monitor when",
            "continue",
            "monitor when",
            "stepi",
            "monitor when",
            "reverse-stepi",
            "monitor when",
            "kill",
        ],
    );
    assert_eq!(
        out.matches("No more reverse-execution history.").count(),
        4,
        "{out}"
    );
    let whens = when_answers(&out);
    let end = whens[0].1;
    let now: Vec<u64> = whens.iter().map(|w| w.0).collect();
    assert_eq!(now, [0, 0, end, end, end - 1], "{out}");
}

#[test]
fn register_and_memory_writes_are_refused_and_the_replay_is_untouched() {
    let (server, elf, _) = demo("gdb-demo-writes");
    let script = server.script.clone().expect("no `source` line printed");
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            "stepi 3",
            "monitor when",
            "print/x $pc",
            "print/x $eax",
            "set $eax = 5",
            "set var guard = 1",
            "print/x $eax",
            "print/x guard",
            "print/x $pc",
            // gdb cannot show why in its error; the next chance to say it is the next command that talks.
            "monitor when",
            "set var guard = 2",
            "stepi",
            "monitor when",
            // With retrovisor's gdb commands, gdb refuses memory writes itself and says so.
            &format!("source {}", script.display()),
            "set var guard = 3",
            "kill",
        ],
    );
    assert_in_order(
        &out,
        &[
            "$1 = 0x",
            "$2 = 0x2badb002",
            "Could not write registers; remote failure reply 'E1e'",
            "Cannot access memory at address 0x",
            "$3 = 0x2badb002",
            "$4 = 0xc0ffee",
            "retrovisor: the replay is read-only: it shows what the recording did, so writes to its \
             registers and memory are refused",
            "`monitor go-live` turns it into a live run you can change, and `monitor help` lists what else can be done",
            "Cannot access memory at address 0x",
            "Writing to memory is not allowed (addr 0x",
        ],
    );
    assert_eq!(
        out.matches("retrovisor: the replay is read-only").count(),
        1,
        "explained once: {out}"
    );
    let pc_of = |n: usize| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("${n} = ")))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        pc_of(1),
        pc_of(5),
        "the refused writes moved the replay: {out}"
    );
    let now: Vec<u64> = when_answers(&out).iter().map(|w| w.0).collect();
    assert_eq!(now, [3, 3, 4], "{out}");
    assert!(
        server.stderr().contains("refused a register write"),
        "{}",
        server.stderr()
    );
}

#[test]
fn monitor_commands_tell_and_move_the_position() {
    let (server, elf, _) = demo("gdb-demo-monitor");
    let out = gdb_batch(
        server.port,
        &elf,
        &[
            "monitor help",
            "monitor when",
            "monitor seek 1000",
            "maint flush register-cache",
            "monitor when",
            "stepi",
            "monitor when",
            "monitor seek 0x10",
            "monitor when",
            "monitor seek 999999999",
            "monitor when",
            "monitor seek banana",
            "monitor frobnicate",
            "kill",
        ],
    );
    assert_in_order(
        &out,
        &[
            "The replay is read-only",
            "monitor when",
            "monitor seek P",
            "monitor help",
            "now at icount 1000",
            "now at icount 16",
            "(the end of the recording)",
            "monitor seek: \"banana\" is not an icount",
            "unknown monitor command \"frobnicate\"",
        ],
    );
    let whens = when_answers(&out);
    let end = whens[0].1;
    let now: Vec<u64> = whens.iter().map(|w| w.0).collect();
    assert_eq!(now, [0, 1000, 1001, 16, end], "{out}");
}
