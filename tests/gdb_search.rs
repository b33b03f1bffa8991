//! gdb's searches at free-run speed on landmark traces, and the same answers on step traces: a watchpoint
//! far back found on the store's line, breakpoints beyond the debug registers, `monitor history` equal on
//! both clocks, and a search interrupted with Ctrl-C.

mod common;
use common::*;

/// ledger.elf fed the short input, recorded with `clock`: its `put 64` early clobbers `guard`, which
/// `check` reports at the very end.
fn ledger(name: &str, clock: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests/ledger-short.txt");
    let (trace, rec) = record(&dir, "ledger", &["--clock", clock, "--serial-input", input]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    trace
}

/// The line of ledger.c that stores into the table.
fn store_line() -> usize {
    guest_source_line("ledger.c", "table[key] = value;")
}

/// gdb on a ledger trace: to `check_guard` at the end, then `watch guard` and reverse-continue, then
/// `after`. The server (for its exit) and what gdb printed.
fn back_to_the_store(trace: &std::path::Path, after: &[&str]) -> (GdbServer, String) {
    back_to_the_store_with(trace, &[], after)
}

/// [`back_to_the_store`], the server started with `extra` replay arguments.
fn back_to_the_store_with(
    trace: &std::path::Path,
    extra: &[&str],
    after: &[&str],
) -> (GdbServer, String) {
    let server = GdbServer::start(trace, extra);
    let mut commands = vec![
        "break check_guard",
        "continue",
        "watch guard",
        "reverse-continue",
    ];
    commands.extend_from_slice(after);
    let out = gdb_batch(server.port, &guest("ledger"), &commands);
    (server, out)
}

#[test]
fn watch_and_reverse_continue_find_the_store_far_back_on_both_clocks() {
    let line = store_line();
    for clock in ["step", "landmark"] {
        let trace = ledger(&format!("search-watch-{clock}"), clock);
        let (mut server, out) = back_to_the_store(&trace, &["print key", "detach"]);
        assert!(out.contains("Breakpoint 1, check_guard"), "{clock}: {out}");
        assert!(
            out.contains("Old value = 12345") && out.contains("New value = 1611526157"),
            "{clock}: {out}"
        );
        assert!(
            out.contains(&format!("ledger.c:{line}")),
            "{clock}: not on the store's line: {out}"
        );
        assert!(out.contains("$1 = 64"), "{clock}: {out}");
        assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
    }
}

#[test]
fn breakpoints_beyond_the_debug_registers_are_still_hit() {
    // Five breakpoints are more than a free run can arm, so that run is stepped; one breakpoint runs free.
    // Both must stop at the same first hit.
    let trace = ledger("search-five", "landmark");
    let first_stop = |breaks: &[String]| {
        let mut server = GdbServer::start(&trace, &[]);
        let mut cmds: Vec<String> = breaks.iter().map(|b| format!("break {b}")).collect();
        cmds.extend(
            [
                "continue",
                "monitor when",
                "printf \"PC=%#x\\n\", $pc",
                "detach",
            ]
            .map(String::from),
        );
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let out = gdb_batch(server.port, &guest("ledger"), &cmds);
        assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
        let pc = out
            .lines()
            .find_map(|l| l.strip_prefix("PC="))
            .unwrap_or_else(|| panic!("{out}"))
            .to_string();
        (pc, when_answers(&out)[0].0)
    };
    let five = first_stop(
        &[
            "check_guard",
            "table_put",
            "on_tick",
            "hash_rounds",
            "parse_num",
        ]
        .map(String::from),
    );
    assert!(five.1 > 0, "the run stopped at once");
    let one = first_stop(&[format!("*{}", five.0)]);
    assert_eq!(
        five, one,
        "five breakpoints (stepped) and one (free) stop in different places"
    );
}

/// `monitor history` of `updates` (written by every put): (rip, old, new) of each change.
fn history(trace: &std::path::Path) -> Vec<String> {
    // Positions differ between recordings; the stores and values must not.
    history_lines(trace, &[])
        .into_iter()
        .filter_map(|l| l.split_once(" rip ").map(|(_, rest)| rest.to_string()))
        .collect()
}

/// The lines of `monitor history &updates 4` over `trace`, served with `extra` replay arguments.
fn history_lines(trace: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut server = GdbServer::start(trace, extra);
    let out = gdb_batch(
        server.port,
        &guest("ledger"),
        &[
            "monitor history &updates 4",
            "monitor history-page &updates",
            "detach",
        ],
    );
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
    assert!(out.contains("change(s) of 4 byte(s) at 0x"), "{out}");
    assert!(
        out.contains("is written between these checkpoints"),
        "{out}"
    );
    out.lines()
        .filter(|l| l.contains(" rip "))
        .map(str::to_string)
        .collect()
}

#[test]
fn monitor_history_finds_the_same_changes_on_both_clocks() {
    let step = history(&ledger("search-history-step", "step"));
    let landmark = history(&ledger("search-history-landmark", "landmark"));
    let puts = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/guests/ledger-short.txt"
    ))
    .unwrap()
    .lines()
    .filter(|l| l.starts_with("put ") && !l.starts_with("put 65"))
    .count();
    assert_eq!(step.len(), puts, "one change per put: {step:#?}");
    assert!(
        step[0].contains("table_put") && step[0].ends_with("0x00000000 -> 0x00000001"),
        "{step:#?}"
    );
    assert_eq!(step, landmark, "the stepped scan and the free one disagree");
}

#[test]
fn monitor_history_answers_alike_whether_kick_points_are_jumped_to_or_searched_for() {
    let trace = ledger("search-history-waypoints", "landmark");
    assert!(
        trace.join("waypoints.bin").exists(),
        "no waypoint was recorded: the comparison would prove nothing"
    );
    // The same recording without its waypoints: every kick point is found by running to it.
    let searched = trace.with_file_name("searched.rvt");
    let o = std::process::Command::new("cp")
        .arg("-r")
        .arg(&trace)
        .arg(&searched)
        .output()
        .unwrap();
    assert!(o.status.success());
    std::fs::remove_file(searched.join("waypoints.bin")).unwrap();
    let jumped = history_lines(&trace, &[]);
    assert!(jumped.len() > 5, "{jumped:#?}");
    assert_eq!(
        jumped,
        history_lines(&searched, &[]),
        "waypoints changed what a search finds"
    );
}

/// The short ledger recorded with the step clock and checkpoints every 20,000 instructions: many
/// checkpoint intervals for a search to share out among workers.
fn ledger_in_short_intervals(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests/ledger-short.txt");
    let flags = [
        "--clock",
        "step",
        "--checkpoint-every",
        "20000",
        "--serial-input",
        input,
    ];
    record(&dir, "ledger", &flags).0
}

#[test]
fn reverse_continue_on_two_cores_stops_where_it_does_on_one() {
    // The store lies many checkpoint intervals back.
    let trace = ledger_in_short_intervals("search-reverse-workers");
    let stops: Vec<String> = ["1", "2"]
        .iter()
        .map(|workers| {
            let (mut server, out) = back_to_the_store_with(
                &trace,
                &["--search-workers", workers],
                &["monitor when", "detach"],
            );
            assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
            assert!(out.contains(&format!("ledger.c:{}", store_line())), "{out}");
            out.lines()
                .find(|l| l.starts_with("icount "))
                .unwrap_or_else(|| panic!("no position: {out}"))
                .to_string()
        })
        .collect();
    assert_eq!(stops[0], stops[1]);
}

#[test]
fn monitor_history_on_two_cores_answers_as_on_one() {
    let trace = ledger_in_short_intervals("search-history-workers");
    let one = history_lines(&trace, &["--search-workers", "1"]);
    let two = history_lines(&trace, &["--search-workers", "2"]);
    assert!(one.len() > 5, "{one:#?}");
    assert_eq!(
        one, two,
        "the workers found other changes, or in another order"
    );
}

#[test]
fn ctrl_c_interrupts_a_reverse_search_at_a_known_position() {
    let trace = ledger("search-ctrl-c", "step");
    let mut server = GdbServer::start(&trace, &[]);
    let dir = scratch("search-ctrl-c-log");
    let log = dir.join("gdb.log");
    let file = std::fs::File::create(&log).unwrap();
    // A watchpoint on a byte nobody writes: the search would run back to the start, stepped.
    let mut gdb = std::process::Command::new("gdb")
        .args(gdb_args(
            server.port,
            &guest("ledger"),
            &[
                "break check_guard",
                "continue",
                "rwatch guard",
                "echo SEARCHING\\n",
                "reverse-continue",
                "monitor when",
                "stepi",
                "monitor when",
                "detach",
            ],
        ))
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap().contains("SEARCHING") {
        assert!(
            std::time::Instant::now() < deadline,
            "gdb never got to the search"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(gdb.id() as i32, libc::SIGINT) };
    gdb.wait().unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    let whens = when_answers(&out);
    assert_eq!(whens.len(), 2, "{out}");
    // Stopped somewhere before where it began, and the replay goes on from there.
    assert_eq!(whens[1].0, whens[0].0 + 1, "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn full_checkpoints_list_the_pages_written_before_them_so_searches_skip_their_intervals() {
    let dir = scratch("search-written");
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests/ledger-short.txt");
    let args = [
        "--clock",
        "step",
        "--checkpoint-every",
        "5000",
        "--serial-input",
        input,
    ];
    let (trace, rec) = record(&dir, "ledger", &args);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    let mut reader = traces::TraceReader::open(&trace).unwrap();
    // Checkpoint pages equal to a block of the image are stored as references to it.
    reader.set_image(std::fs::read(guest("ledger")).unwrap());
    let infos = reader.checkpoints();
    // The ledger's table and guard have a page of their own, which only `put` writes.
    let table_page = 0x102;
    let (mut full, mut skippable_full) = (0, 0);
    let fulls = infos.iter().enumerate().skip(1).filter(|(_, c)| c.full);
    for i in fulls.map(|(i, _)| i) {
        let written = reader.pages_written_before(i).unwrap();
        let stored = reader.restore_point(i).unwrap().1.len();
        assert!(
            written.len() < stored,
            "checkpoint {i} lists every page it stores: {written:x?}"
        );
        full += 1;
        skippable_full += usize::from(!written.contains(&table_page));
    }
    assert!(full >= 2, "only {full} full checkpoints after the first");
    assert!(
        skippable_full > 0,
        "every full checkpoint's interval wrote the table page"
    );
    // And the search through those intervals still lands on the store.
    let (mut server, out) = back_to_the_store(&trace, &[]);
    assert!(out.contains(&format!("ledger.c:{}", store_line())), "{out}");
    assert_eq!(server.wait_exit(30), Some(0), "{}", server.stderr());
}
