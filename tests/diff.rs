//! `retrovisor diff`: two recordings of one guest, and the first position where they part. Real guests
//! recorded twice on real KVM; the answer is checked against the traces' own events and, through the
//! real gdb over each replay, against the registers at the positions it names.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `retrovisor diff A B --json` (and the text form); its status and parsed JSON.
fn diff(a: &Path, b: &Path) -> (i32, serde_json::Value, String) {
    let json = rv(&["diff", s(a), s(b), "--json"]);
    let code = status(&json);
    assert!(
        code == 0 || code == 1,
        "diff failed ({code}): {}",
        text(&json.stderr)
    );
    let value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("diff --json printed no JSON ({e}): {}", text(&json.stdout)));
    let plain = rv(&["diff", s(a), s(b)]);
    assert_eq!(status(&plain), code, "{}", text(&plain.stderr));
    (code, value, text(&plain.stdout))
}

/// Records `guest` with the landmark clock into `dir/name.rvt`, asserting it ended with `expected`.
fn record_as(dir: &Path, guest_name: &str, name: &str, extra: &[&str]) -> PathBuf {
    let trace = dir.join(format!("{name}.rvt"));
    let kernel = guest(guest_name);
    let mut args = vec!["record", "--kernel", s(&kernel), "-o", s(&trace)];
    args.extend_from_slice(extra);
    let out = rv(&args);
    assert_eq!(status(&out), 1, "record failed: {}", text(&out.stderr));
    trace
}

/// The pc gdb reads at each of `positions` of a replay of `trace`.
fn pcs_at(trace: &Path, elf: &Path, positions: &[&str]) -> Vec<String> {
    let server = GdbServer::start(trace, &[]);
    let mut cmds = Vec::new();
    let seeks: Vec<String> = positions
        .iter()
        .map(|p| format!("monitor seek {p}"))
        .collect();
    for seek in &seeks {
        cmds.extend([seek.as_str(), "maint flush register-cache", "p/x $pc"]);
    }
    let out = gdb_batch(server.port, elf, &cmds);
    let pcs: Vec<String> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix('$')?
                .split_once(" = ")
                .map(|(_, v)| v.to_string())
        })
        .collect();
    assert_eq!(pcs.len(), positions.len(), "gdb printed:\n{out}");
    pcs
}

#[test]
fn two_runs_of_the_timer_guest_part_where_the_first_interrupt_landed_elsewhere() {
    let dir = scratch("diff-timer");
    let a = record_as(&dir, "timer", "a", &[]);
    // Two runs of the timer guest take their ticks at different points; should two ever agree, a
    // third run will not.
    let (mut code, mut report, mut plain) = (0, serde_json::Value::Null, String::new());
    for attempt in 0..3 {
        let b = record_as(&dir, "timer", &format!("b{attempt}"), &[]);
        (code, report, plain) = diff(&a, &b);
        if code == 1 {
            break;
        }
    }
    assert_eq!(
        code, 1,
        "three runs of the timer guest never parted:\n{plain}"
    );
    let parting = &report["parting"];
    assert_eq!(parting["cause"], "placement", "{plain}");
    assert!(
        plain.contains("no input differs: the interleaving or an interrupt's position differs"),
        "{plain}"
    );
    // The first events that differ are the timer's: its IRQ or the interrupt it raised.
    for side in ["a", "b"] {
        let what = parting[side]["what"].as_str().unwrap_or("");
        assert!(
            what.contains("IRQ 0") || what.contains("interrupt vector 0x20"),
            "{side}'s first differing event is not the timer's: {plain}"
        );
    }
    // Nothing before the parting differs but host clock readings.
    let b = PathBuf::from(report["b"].as_str().unwrap());
    let index = parting["a"]["index"].as_u64().unwrap() as usize;
    let events = |t: &Path| traces::TraceReader::open(t).unwrap().events().to_vec();
    let (ea, eb) = (events(&a), events(&b));
    for i in 0..index {
        assert_eq!(
            (ea[i].at, ea[i].rip, ea[i].kind.name()),
            (eb[i].at, eb[i].rip, eb[i].kind.name()),
            "event {i} differs before the reported one"
        );
    }
    // At the parting both replays stand at the same instruction; just after it they do not, and gdb
    // reads the rips the report names.
    let (at, after) = (
        parting["position"].as_str().unwrap(),
        parting["after"].as_str().unwrap(),
    );
    let elf = guest("timer");
    let pa = pcs_at(&a, &elf, &[at, after]);
    let pb = pcs_at(&b, &elf, &[at, after]);
    assert_eq!(pa[0], pb[0], "the guests differ at the parting:\n{plain}");
    assert_ne!(
        pa[1], pb[1],
        "the guests are alike after the parting:\n{plain}"
    );
    let rip_line = format!(
        "regs.rip is {:#x} in A, {:#x} in B",
        u64::from_str_radix(pa[1].trim_start_matches("0x"), 16).unwrap(),
        u64::from_str_radix(pb[1].trim_start_matches("0x"), 16).unwrap()
    );
    assert!(
        parting["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str() == Some(rip_line.as_str())),
        "the report does not say {rip_line:?}:\n{plain}"
    );
    // A recording does not part from itself.
    let (same, _, text_same) = diff(&a, &a);
    assert_eq!(same, 0, "{text_same}");
    assert!(
        text_same.contains("The recordings do not part"),
        "{text_same}"
    );
}

#[test]
fn two_runs_of_a_serial_guest_with_inputs_that_differ_at_the_100th_byte_part_at_that_byte() {
    let dir = scratch("diff-serial");
    let input: String = (1..8)
        .map(|i| format!("line {i}: the quick brown fox\n"))
        .chain(["quit\n".to_string()])
        .collect();
    let mut other = input.clone().into_bytes();
    assert_eq!(other[99], b'c');
    other[99] = b'#';
    let (ia, ib) = (dir.join("a.txt"), dir.join("b.txt"));
    std::fs::write(&ia, &input).unwrap();
    std::fs::write(&ib, &other).unwrap();
    let a = record_as(&dir, "echo", "a", &["--serial-input", s(&ia)]);
    let b = record_as(&dir, "echo", "b", &["--serial-input", s(&ib)]);
    let (code, report, plain) = diff(&a, &b);
    assert_eq!(code, 1, "{plain}");
    let parting = &report["parting"];
    assert_eq!(parting["cause"], "input", "{plain}");
    assert_eq!(
        parting["serial_byte"],
        serde_json::json!({"index": 99, "a": b'c', "b": b'#'}),
        "{plain}"
    );
    assert!(
        plain.contains("Serial input byte 99 (the 100th) is 'c' (0x63) in A, '#' (0x23) in B."),
        "{plain}"
    );
    // The parting is where the byte arrived: the event that carries it, at its position in both.
    let events = traces::TraceReader::open(&a).unwrap().events().to_vec();
    let index = parting["a"]["index"].as_u64().unwrap() as usize;
    let mut before = 0;
    for e in &events[..index] {
        if let traces::EventKind::SerialRx { bytes } = &e.kind {
            before += bytes.len();
        }
    }
    let traces::EventKind::SerialRx { bytes } = &events[index].kind else {
        panic!("A's first differing event is not serial input: {plain}");
    };
    assert!((before..before + bytes.len()).contains(&99), "{plain}");
    assert_eq!(parting["position"], events[index].at.to_string(), "{plain}");
    assert_eq!(parting["a"]["position"], parting["b"]["position"]);
    // Just after, the byte is in the UART of each.
    assert!(
        parting["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("uart")
                && f.as_str().unwrap().ends_with("99 in A, 35 in B")),
        "{plain}"
    );
}

#[test]
fn recordings_whose_disks_differ_part_where_the_guest_reads_the_byte_found_by_bisection() {
    let dir = scratch("diff-disk");
    let mut image = vec![0u8; 128 * 512];
    image[..31].copy_from_slice(b"retrovisor test disk, sector 0\n");
    let (da, db) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&da, &image).unwrap();
    image[100 * 512 + 7] = 0x55;
    std::fs::write(&db, &image).unwrap();
    let a = record_as(&dir, "disk", "a", &["--disk", s(&da)]);
    let b = record_as(&dir, "disk", "b", &["--disk", s(&db)]);
    let (code, report, plain) = diff(&a, &b);
    assert_eq!(code, 1, "{plain}");
    let parting = &report["parting"];
    assert_eq!(parting["cause"], "state", "{plain}");
    assert!(
        plain.contains("note: disk 0 differs between the recordings"),
        "{plain}"
    );
    // The device wrote the differing byte into the guest's buffer: one byte of one page differs, and
    // the page holds the driver's buffer.
    let pages = parting["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 1, "{plain}");
    assert_eq!(pages[0]["bytes"], 1, "{plain}");
    assert_eq!(
        (pages[0]["a"].as_u64(), pages[0]["b"].as_u64()),
        (Some(0), Some(0x55)),
        "{plain}"
    );
    assert!(
        pages[0]["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "buf"),
        "{plain}"
    );
    // Found by replays, a few dozen of them, not by stepping the whole recording.
    let replays = report["replays"].as_u64().unwrap();
    assert!(replays < 200, "{replays} replays: {plain}");
}

#[test]
fn diff_refuses_recordings_of_different_guests_or_clocks_and_says_why() {
    let dir = scratch("diff-refuse");
    let timer = record_as(&dir, "timer", "timer", &[]);
    let hello = record_as(&dir, "hello", "hello", &[]);
    let out = rv(&["diff", s(&timer), s(&hello)]);
    assert_eq!(status(&out), 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("are not recordings of the same guest: they ran different guest images"),
        "{err}"
    );
    let step = record_as(&dir, "timer", "step", &["--clock", "step"]);
    let out = rv(&["diff", s(&timer), s(&step)]);
    assert_eq!(status(&out), 2);
    assert!(
        text(&out.stderr)
            .contains("one was recorded with the landmark clock and the other with the step clock"),
        "{}",
        text(&out.stderr)
    );
    let out = rv(&["diff", s(&timer), s(&dir.join("missing.rvt"))]);
    assert_eq!(status(&out), 2);
    assert!(
        text(&out.stderr).contains("missing.rvt"),
        "{}",
        text(&out.stderr)
    );
}
