//! Going live from a replay: under the real gdb (`monitor go-live`, a memory write that changes what the
//! guest prints) and from the command line (`replay --to --go-live-record` with other serial input). Each
//! live run is recorded into a new trace, which must replay byte for byte on its own and name where it
//! branched from; the original trace is never changed.

mod common;
use common::*;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file of a trace directory with its bytes, to see that nothing changed.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn gdb_goes_live_fixes_the_clobbered_guard_and_the_recorded_what_if_replays_exactly() {
    let dir = scratch("go-live-gdb");
    let (trace, rec) = record(&dir, "demo", &["--clock", "landmark"]);
    assert!(text(&rec.stdout).contains("BUG: guard clobbered"));
    let before = contents(&trace);
    let live = dir.join("what-if.rvt");
    let mut server = GdbServer::start(&trace, &["--go-live-record", s(&live)]);
    let out = gdb_batch(
        server.port,
        &guest("demo"),
        &[
            "break checksum",
            "continue",
            "monitor when",
            "monitor go-live",
            // Before the live run's first instruction, writes are allowed, and recorded.
            "set var guard = 0xC0FFEE",
            "p/x guard",
            "reverse-stepi",
            "continue",
            // Now the live run is being recorded: a write would be missing from the recording.
            "set var guard = 5",
            "p/x guard",
            "delete",
            "continue",
        ],
    );
    assert_eq!(server.wait_exit(60), Some(0), "{out}\n{}", server.stderr());
    assert_in_order(
        &out,
        &[
            "Breakpoint 1, checksum",
            "live from landmark",
            "Writes are allowed until the first continue or step",
            "$1 = 0xc0ffee",
            "a live run has no history to go back through",
            "No more reverse-execution history",
            // The live run stops at the breakpoint too: the second checksum call.
            "Breakpoint 1, checksum (s=",
            "time travel debugging",
            "Cannot access memory at address",
            "$2 = 0xc0ffee",
            "refused a memory write: the live run is recorded from its first instruction on",
            "exited with code 01",
        ],
    );
    let branched_at = out
        .lines()
        .find_map(|l| l.strip_prefix("landmark "))
        .and_then(|l| l.split(" (the recording ends").next())
        .map(|p| p.replace(" + ", "+"))
        .unwrap_or_else(|| panic!("no `monitor when` answer: {out}"));
    // The guest ran on with the guard fixed: it reports it intact where the recording had the bug.
    let served = server.stdout();
    assert!(served.contains("demo: guard intact"), "{served}");
    assert!(!served.contains("BUG"), "{served}");
    // The what-if replays on its own, byte for byte, to the same end.
    let replayed = replay(&live, &[]);
    assert_eq!(status(&replayed), 1, "{}", text(&replayed.stderr));
    assert!(
        text(&replayed.stderr).contains("replay matched the recording"),
        "{}",
        text(&replayed.stderr)
    );
    let replayed_out = text(&replayed.stdout);
    assert!(
        replayed_out.contains("demo: guard intact"),
        "{replayed_out}"
    );
    assert!(
        served.ends_with(&replayed_out),
        "the live run printed:\n{served}\nits replay:\n{replayed_out}"
    );
    let info = rv(&["info", s(&live), "--verify"]);
    assert_eq!(status(&info), 0, "{}", text(&info.stderr));
    let info = text(&info.stdout);
    assert!(
        info.contains(&format!("branched from: {} (recorded 20", trace.display()))
            && info.contains(&format!("at {branched_at}, by going live there")),
        "info does not name {branched_at}:\n{info}"
    );
    assert!(before == contents(&trace), "the original trace changed");
}

#[test]
fn replay_to_a_position_goes_live_on_other_input_and_the_branch_replays_exactly() {
    let dir = scratch("go-live-cli");
    let input = dir.join("input.txt");
    // Longer than the UART's 64-byte FIFO, so that it arrives in two pieces.
    std::fs::write(
        &input,
        "first line of input here\nsecond line of input here\nthird line of input here\nquit\n",
    )
    .unwrap();
    let (trace, rec) = record(
        &dir,
        "echo",
        &["--clock", "landmark", "--serial-input", s(&input)],
    );
    assert!(text(&rec.stdout).contains("got: third line of input here"));
    let before = contents(&trace);
    // Branch where the second piece of input arrived (the first filled the UART at boot): from there
    // the guest gets the other input instead of the rest.
    let second_input = traces::TraceReader::open(&trace)
        .unwrap()
        .events()
        .iter()
        .filter(|e| matches!(e.kind, traces::EventKind::SerialRx { .. }))
        .nth(1)
        .expect("the recording has serial input in pieces")
        .at;
    let at = second_input.to_string();
    let prefix = replay(&trace, &["--to", &at]);
    let other = dir.join("other.txt");
    std::fs::write(&other, "what if\nquit\n").unwrap();
    let live = dir.join("branch.rvt");
    let went = replay(
        &trace,
        &[
            "--to",
            &at,
            "--go-live-record",
            s(&live),
            "--serial-input",
            s(&other),
        ],
    );
    assert_eq!(status(&went), 1, "{}", text(&went.stderr));
    let went_out = text(&went.stdout);
    assert!(
        text(&went.stderr).contains(&format!("live from landmark {at}")),
        "{}",
        text(&went.stderr)
    );
    // Up to the branch, the recording's output; then the guest's answer to the other input.
    let prefix = text(&prefix.stdout);
    assert!(went_out.starts_with(&prefix), "{went_out}");
    let live_part = &went_out[prefix.len()..];
    assert!(live_part.contains("what if"), "{went_out}");
    assert!(!went_out.contains("third line of input here"), "{went_out}");
    let replayed = replay(&live, &[]);
    assert_eq!(status(&replayed), 1, "{}", text(&replayed.stderr));
    assert_eq!(text(&replayed.stdout), live_part);
    assert!(text(&replayed.stderr).contains("replay matched the recording"));
    let info = text(&rv(&["info", s(&live)]).stdout);
    assert!(
        info.contains(&format!("at {at}, by going live there")),
        "{info}"
    );
    assert!(before == contents(&trace), "the original trace changed");
    // Going live where the guest had already stopped is refused, and says why.
    let ended = replay(&trace, &["--go-live"]);
    assert_eq!(status(&ended), 2);
    assert!(
        text(&ended.stderr).contains("the guest had already stopped there"),
        "{}",
        text(&ended.stderr)
    );
}
