//! Bad input gets a clear one-line error and a non-zero status, and loses nothing; crashes leave a
//! replayable prefix.

mod common;
use common::*;
use std::process::Stdio;
use std::time::Duration;

fn assert_error(o: &std::process::Output, needle: &str) {
    let err = text(&o.stderr);
    assert_eq!(status(o), 2, "expected an error exit; stderr: {err}");
    assert!(
        err.starts_with("retrovisor: error: ") && err.contains(needle),
        "stderr {err:?} lacks {needle:?}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "errors are one line: {err}"
    );
}

#[test]
fn missing_and_non_multiboot_kernels_are_refused() {
    let dir = scratch("badkernel");
    assert_error(
        &rv(&["run", "--kernel", dir.join("nope.elf").to_str().unwrap()]),
        "cannot read kernel",
    );
    let not_mb = dir.join("text.bin");
    std::fs::write(&not_mb, b"just some bytes, not a kernel").unwrap();
    assert_error(
        &rv(&["run", "--kernel", not_mb.to_str().unwrap()]),
        "not a kernel retrovisor can boot",
    );
    let trace = dir.join("t.rvt");
    let o = rv(&[
        "record",
        "--kernel",
        not_mb.to_str().unwrap(),
        "-o",
        trace.to_str().unwrap(),
    ]);
    assert_error(&o, "not a kernel retrovisor can boot");
}

#[test]
fn replay_refuses_another_guest_image() {
    let dir = scratch("mismatch");
    let (trace, _) = record(&dir, "hello", &[]);
    let o = replay(&trace, &["--kernel", guest("rtc").to_str().unwrap()]);
    assert_error(&o, "is not the one this trace recorded");
    let o = replay(&dir.join("missing.rvt"), &[]);
    assert_eq!(status(&o), 2);
}

#[test]
fn a_backward_replay_range_is_refused() {
    let (trace, _) = record(&scratch("range"), "hello", &[]);
    let o = replay(&trace, &["--from", "20", "--to", "10"]);
    assert_error(&o, "--to 10 is before --from 20");
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    // Equal ends are a range of nothing, not an error.
    assert_eq!(status(&replay(&trace, &["--from", "10", "--to", "10"])), 0);
}

#[test]
fn existing_trace_is_never_overwritten() {
    let dir = scratch("overwrite");
    let (trace, _) = record(&dir, "hello", &[]);
    let before = std::fs::read(trace.join("header.json")).unwrap();
    let o = rv(&[
        "record",
        "--kernel",
        guest("hello").to_str().unwrap(),
        "-o",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(status(&o), 2, "{}", text(&o.stderr));
    assert_eq!(std::fs::read(trace.join("header.json")).unwrap(), before);

    // An empty directory is refused as well, as `record --help` says (-o must not exist), and left empty.
    let empty = dir.join("empty.rvt");
    std::fs::create_dir(&empty).unwrap();
    let o = rv(&[
        "record",
        "--kernel",
        guest("hello").to_str().unwrap(),
        "-o",
        empty.to_str().unwrap(),
    ]);
    assert_error(&o, "already exists");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

#[test]
fn corrupt_chunk_and_future_format_are_reported() {
    let dir = scratch("corrupt");
    let (trace, _) = record(&dir, "timer", &[]);
    let events = trace.join("events.bin");
    let mut bytes = std::fs::read(&events).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&events, &bytes).unwrap();
    let o = replay(&trace, &[]);
    assert_eq!(status(&o), 2, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("chunk"), "{}", text(&o.stderr));

    let (trace, _) = record(&scratch("future"), "hello", &[]);
    let header = trace.join("header.json");
    let h = std::fs::read_to_string(&header)
        .unwrap()
        .replace("\"format_version\":2", "\"format_version\":99");
    assert!(h.contains("99"), "{h}");
    std::fs::write(&header, h).unwrap();
    assert_error(&replay(&trace, &[]), "newer than this retrovisor supports");
}

#[test]
fn tampered_event_is_detected_as_divergence_with_its_icount() {
    let dir = scratch("tamper");
    let (trace, _) = record(&dir, "timer", &[]);
    // Rewrite the trace with the first interrupt injected one instruction later than recorded.
    let reader = traces::TraceReader::open(&trace).unwrap();
    let mut events = reader.events().to_vec();
    let i = events
        .iter()
        .position(|e| matches!(e.kind, traces::EventKind::Interrupt { .. }))
        .expect("no interrupt recorded");
    events[i].at += 1;
    let moved_to = events[i].at;
    let tampered = dir.join("tampered.rvt");
    rewrite(&reader, events, &tampered);
    let o = replay(&tampered, &[]);
    let err = text(&o.stderr);
    assert_eq!(status(&o), 4, "{err}");
    assert!(err.contains("diverged") && err.contains("icount"), "{err}");
    let at: u64 = err
        .split("icount ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        at <= moved_to,
        "divergence reported at {at}, after the tampered event at {moved_to}"
    );
}

#[test]
fn a_checkpoint_divergence_names_what_differs() {
    let dir = scratch("tamper-value");
    let (trace, _) = record(&dir, "rand", &["--checkpoint-every", "1000"]);
    // The guest keeps its first RDTSC result in memory: give it another value than recorded.
    let reader = traces::TraceReader::open(&trace).unwrap();
    let mut events = reader.events().to_vec();
    let first = events
        .iter_mut()
        .find_map(|e| match &mut e.kind {
            traces::EventKind::HostValue { value, .. } => Some(value),
            _ => None,
        })
        .expect("rand.elf executes RDTSC");
    *first ^= 0x5a5a_0000_0000;
    let tampered = dir.join("tampered.rvt");
    rewrite(&reader, events, &tampered);
    let o = replay(&tampered, &[]);
    let err = text(&o.stderr);
    assert_eq!(status(&o), 4, "{err}");
    // Not just "state differs": the report names the page (or register) and the bytes.
    assert!(err.contains("at checkpoint"), "{err}");
    assert!(
        err.contains("guest memory differs in") && err.contains("recorded 0x"),
        "{err}"
    );
}

#[test]
fn missing_kvm_is_a_clear_error() {
    // Hide /dev in a private mount namespace, as on a machine without KVM.
    let o = std::process::Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" run --kernel \"$1\"",
        ])
        .arg(env!("CARGO_BIN_EXE_retrovisor"))
        .arg(guest("hello"))
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) is needed");
    assert_error(&o, "cannot open /dev/kvm");
}

/// Starts recording the guest that never ends into `trace`, with its output captured.
fn record_spin(trace: &std::path::Path) -> std::process::Child {
    bin()
        .args([
            "record",
            "--kernel",
            guest("spin").to_str().unwrap(),
            "-o",
            trace.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn killed_recording_leaves_a_replayable_prefix() {
    let dir = scratch("kill");
    let trace = dir.join("spin.rvt");
    let mut child = record_spin(&trace);
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().unwrap(); // SIGKILL: no chance to finish the trace
    let rec = child.wait_with_output().unwrap();
    let o = replay(&trace, &[]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cut off"), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).starts_with("spinning"),
        "{}",
        text(&o.stdout)
    );
    assert!(
        rec.stdout.starts_with(&o.stdout),
        "the replayed prefix is not a prefix of what was recorded"
    );
    assert!(text(&rv(&["info", trace.to_str().unwrap()]).stdout).contains("cut off"));
}

#[test]
fn sigint_ends_a_recording_cleanly() {
    let dir = scratch("sigint");
    let trace = dir.join("spin.rvt");
    let child = record_spin(&trace);
    std::thread::sleep(Duration::from_millis(2000));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rec = child.wait_with_output().unwrap();
    assert_eq!(status(&rec), 130, "{}", text(&rec.stderr));
    assert!(
        std::fs::metadata(trace.join("summary.json")).is_ok(),
        "no summary after Ctrl-C"
    );
    assert_replays(&trace, &rec);
}

#[test]
fn kvm_without_permission_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm")
        .expect("/dev/kvm is needed")
        .permissions()
        .mode();
    // Where everyone may open /dev/kvm there is no unprivileged user to test with; say so rather than pass.
    if mode & 0o006 == 0o006 {
        eprintln!("note: /dev/kvm is world-accessible here ({mode:o}); the permission error cannot be provoked");
        return;
    }
    let kernel = guest("hello");
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_retrovisor"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) is needed");
    assert_error(&o, "cannot open /dev/kvm");
    assert!(
        text(&o.stderr).contains("Permission denied"),
        "{}",
        text(&o.stderr)
    );
}

/// Records timer.elf into `trace` (a checkpoint every 2,000 instructions) with every file it writes
/// limited to `limit` bytes: a disk with that little room. Past the limit, writes fail with EFBIG;
/// SIGXFSZ, which would kill the process instead, is ignored as a shell's `trap '' XFSZ` would.
fn record_with_file_limit(trace: &std::path::Path, limit: Option<u64>) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut c = bin();
    c.args(["record", "--clock", "step", "--kernel"])
        .arg(guest("timer"))
        .arg("-o")
        .arg(trace)
        .args(["--checkpoint-every", "2000"]);
    let Some(limit) = limit else {
        return c.output().unwrap();
    };
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls.
    unsafe {
        c.pre_exec(move || {
            let rlim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    c.output().unwrap()
}

/// The sizes of what a recording of timer.elf writes with no limit, on this host and with this build:
/// (header, first checkpoint, largest checkpoint, event stream). The limits the tests set derive from
/// them, so no test depends on the size of a host's CPUID or XSAVE area.
fn unlimited_sizes() -> (u64, u64, u64, u64) {
    let dir = scratch("unlimited");
    let trace = dir.join("timer.rvt");
    let rec = record_with_file_limit(&trace, None);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    let checkpoints = checkpoint_files(&trace);
    (
        size(&trace.join("header.json")),
        size(&checkpoints[0]),
        checkpoints.iter().map(|p| size(p)).max().unwrap(),
        size(&trace.join("events.bin")),
    )
}

/// The number after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> u64 {
    let rest = text
        .split(prefix)
        .nth(1)
        .unwrap_or_else(|| panic!("{prefix:?} not in {text:?}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_recording_that_runs_out_of_space_keeps_a_replayable_prefix() {
    let dir = scratch("full-disk");
    let trace = dir.join("timer.rvt");
    // Room for the header and the checkpoints (with a margin: a recording under host time varies) but
    // not for the whole event stream: the recording stops in the middle of appending an event chunk.
    let (header, _, largest, events) = unlimited_sizes();
    let limit = header.max(largest) * 5 / 4;
    assert!(
        limit * 2 < events,
        "the event stream ({events} bytes) is not much larger than {limit}"
    );
    let rec = record_with_file_limit(&trace, Some(limit));
    assert_error(
        &rec,
        "because a file reached this process's file size limit",
    );
    let err = text(&rec.stderr);
    assert!(
        err.contains("the recording stopped at icount") && err.contains("events.bin"),
        "{err}"
    );
    let upto = number_after(&err, "keeps a cut-off recording, replayable up to icount ");
    assert!(upto > 0, "{err}");
    // Nothing half-written is left behind, and no checkpoint lies past what replays.
    for entry in std::fs::read_dir(trace.join("checkpoints")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "temporary file {name} left behind");
        // NNN.ckpt, or NNN.written beside a full one.
        let icount: u64 = name.split('.').next().unwrap().parse().unwrap();
        assert!(icount <= upto, "checkpoint file {name} past icount {upto}");
    }
    let info = rv(&["info", trace.to_str().unwrap()]);
    assert_eq!(status(&info), 0, "{}", text(&info.stderr));
    assert!(
        text(&info.stdout).contains(&format!("replayable up to icount {upto}")),
        "{}",
        text(&info.stdout)
    );
    let o = replay(&trace, &[]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains(&format!("replaying up to icount {upto}")),
        "{}",
        text(&o.stderr)
    );
    assert!(
        rec.stdout.starts_with(&o.stdout),
        "the replayed prefix is not a prefix of what was recorded"
    );
}

#[test]
fn a_recording_with_no_room_for_its_first_checkpoint_says_so() {
    let dir = scratch("no-room");
    let trace = dir.join("timer.rvt");
    // Room for the header but not for the first checkpoint (a full one, at boot: the same every time).
    let (header, first, _, _) = unlimited_sizes();
    assert!(
        header < first,
        "header {header} bytes, first checkpoint {first}"
    );
    let rec = record_with_file_limit(&trace, Some((header + first) / 2));
    assert_error(&rec, "holds nothing replayable (no checkpoint was written)");
    assert_eq!(
        std::fs::read_dir(trace.join("checkpoints"))
            .unwrap()
            .count(),
        0,
        "a temporary checkpoint file was left behind"
    );
    assert_error(
        &replay(&trace, &[]),
        "holds nothing replayable: it has no checkpoint",
    );
    let info = rv(&["info", trace.to_str().unwrap()]);
    assert_eq!(status(&info), 0, "{}", text(&info.stderr));
    assert!(
        text(&info.stdout).contains("before its first checkpoint: nothing replayable"),
        "{}",
        text(&info.stdout)
    );
}

#[test]
fn a_recording_killed_at_once_says_nothing_was_recorded() {
    let dir = scratch("kill-at-once");
    let trace = dir.join("spin.rvt");
    let mut child = record_spin(&trace);
    // Kill it as soon as the trace exists: before its first checkpoint, normally.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !trace.join("events.bin").exists() {
        assert!(std::time::Instant::now() < deadline, "no trace appeared");
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let checkpoints = std::fs::read_dir(trace.join("checkpoints"))
        .map(Iterator::count)
        .unwrap_or(0);
    if checkpoints > 0 {
        eprintln!(
            "note: the first checkpoint was written before the kill landed; nothing to check"
        );
        return;
    }
    // Killed before or after it wrote its header: either way, one clear line.
    assert_error(&replay(&trace, &[]), "nothing");
    let info = rv(&["info", trace.to_str().unwrap()]);
    if status(&info) == 0 {
        assert!(
            text(&info.stdout).contains("nothing replayable"),
            "{}",
            text(&info.stdout)
        );
    } else {
        assert_error(&info, "nothing was recorded");
    }
}

#[test]
fn info_verify_finds_a_flipped_byte_in_a_later_checkpoint() {
    let dir = scratch("verify");
    let (trace, _) = record(&dir, "timer", &["--checkpoint-every", "2000"]);
    let t = trace.to_str().unwrap();
    let o = rv(&["info", "--verify", t]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("verify:        ok"),
        "{}",
        text(&o.stdout)
    );

    let checkpoints = checkpoint_files(&trace);
    assert!(checkpoints.len() > 50, "{}", checkpoints.len());
    let victim = &checkpoints[checkpoints.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() - 4;
    bytes[at] ^= 0x10;
    std::fs::write(victim, &bytes).unwrap();

    // Plain info stays fast: it reads checkpoint headers only.
    assert_eq!(status(&rv(&["info", t])), 0);
    let o = rv(&["info", "--verify", t]);
    assert_error(&o, "failed verification: 2 problems (listed above)");
    let out = text(&o.stdout);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        out.contains(name) && out.contains("crc32 mismatch"),
        "{out}"
    );
    assert!(out.contains("cannot be restored"), "{out}");
}

#[test]
fn fifos_and_devices_as_guest_images_are_refused_without_blocking() {
    let dir = scratch("fifo-image");
    let fifo = dir.join("guest.fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let trace = dir.join("t.rvt");
    let o = rv_within(
        60,
        &["record", "--kernel", f, "-o", trace.to_str().unwrap()],
    );
    assert_error(&o, "cannot read kernel");
    assert!(text(&o.stderr).contains("it is a FIFO, not a regular file"));

    let (trace, _) = record(&dir, "hello", &[]);
    let t = trace.to_str().unwrap();
    assert_error(
        &rv_within(60, &["replay", t, "--kernel", f]),
        "it is a FIFO, not a regular file",
    );
    // The same through the image path a (hostile) header names.
    let header = trace.join("header.json");
    let good = std::fs::read_to_string(&header).unwrap();
    let image_path = string_field(&good, "image_path");
    for (path, what) in [(f, "a FIFO"), ("/dev/zero", "a character device")] {
        std::fs::write(&header, good.replace(&image_path, path)).unwrap();
        assert_error(&rv_within(60, &["replay", t]), what);
    }
}

/// The value of the string field `name` of a compact JSON object.
fn string_field(json: &str, name: &str) -> String {
    let start = json.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
    let len = json[start..].find('"').unwrap();
    json[start..start + len].to_string()
}

#[test]
fn an_error_is_not_a_panic_when_standard_error_cannot_be_written() {
    // Say stderr is a file on the disk that just filled up.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = bin()
        .args(["replay", "/nonexistent/t.rvt"])
        .stderr(full)
        .output()
        .unwrap();
    assert_eq!(status(&o), 2);
}

#[test]
fn a_trace_whose_memory_map_this_build_would_not_give_is_refused() {
    let (trace, _) = record(&scratch("memory-map"), "hello", &[]);
    let header = trace.join("header.json");
    let good = std::fs::read_to_string(&header).unwrap();
    assert!(good.contains("[0,654336,1]"), "{good}");
    std::fs::write(&header, good.replace("[0,654336,1]", "[0,655360,1]")).unwrap();
    assert_error(&replay(&trace, &[]), "this retrovisor builds");
}

/// Records timer.elf (which takes timer interrupts) into `dir`, and opens the trace.
fn timer_trace(dir: &std::path::Path) -> (std::path::PathBuf, traces::TraceReader) {
    let (trace, _) = record(dir, "timer", &["--checkpoint-every", "2000"]);
    let reader = traces::TraceReader::open(&trace).unwrap();
    (trace, reader)
}

/// Asserts that `replay`, `info` and `info --verify` all refuse `trace` with an error containing
/// `needle`: the trace is checked when it is read, whatever reads it.
fn assert_refused_everywhere(trace: &std::path::Path, needle: &str) {
    let t = trace.to_str().unwrap();
    for args in [&["replay", t][..], &["info", t], &["info", "--verify", t]] {
        let o = rv(args);
        assert_error(&o, needle);
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
    }
}

#[test]
fn an_irq_on_a_line_the_pic_pair_lacks_is_refused_naming_the_event() {
    let dir = scratch("irq-line");
    let (_, reader) = timer_trace(&dir);
    for line in [255u8, 33] {
        let mut events = reader.events().to_vec();
        let (index, event) = events
            .iter_mut()
            .enumerate()
            .find(|(_, e)| matches!(e.kind, traces::EventKind::Irq { .. }))
            .expect("timer.elf takes timer interrupts");
        event.kind = traces::EventKind::Irq { line };
        let position = event.at;
        let tampered = dir.join(format!("line{line}.rvt"));
        rewrite(&reader, events, &tampered);
        assert_refused_everywhere(
            &tampered,
            &format!("event {index} (irq at icount {position}, in chunk "),
        );
        assert_refused_everywhere(
            &tampered,
            &format!("IRQ line {line} does not exist: the PIC pair has lines 0 to 15"),
        );
    }
}

#[test]
fn a_finished_trace_whose_stop_event_was_replaced_is_refused() {
    let dir = scratch("stop-replaced");
    let (_, reader) = timer_trace(&dir);
    let mut events = reader.events().to_vec();
    let last = events.last_mut().unwrap();
    assert!(matches!(last.kind, traces::EventKind::Stop { .. }));
    last.kind = traces::EventKind::Irq { line: 0 };
    let tampered = dir.join("tampered.rvt");
    rewrite(&reader, events, &tampered);
    assert_refused_everywhere(
        &tampered,
        "the recording finished, so its last event must be its stop event",
    );
}

#[test]
fn a_duplicated_or_deleted_event_disagrees_with_the_summary_counts() {
    let dir = scratch("duplicated");
    let (_, reader) = timer_trace(&dir);
    let irqs = reader
        .events()
        .iter()
        .filter(|e| matches!(e.kind, traces::EventKind::Irq { .. }))
        .count();
    let first = reader
        .events()
        .iter()
        .position(|e| matches!(e.kind, traces::EventKind::Irq { .. }))
        .unwrap();
    for (name, more) in [("duplicated", true), ("deleted", false)] {
        let mut events = reader.events().to_vec();
        let held = if more {
            events.insert(first, events[first].clone());
            irqs + 1
        } else {
            events.remove(first);
            irqs - 1
        };
        let tampered = dir.join(format!("{name}.rvt"));
        rewrite(&reader, events, &tampered);
        assert_refused_everywhere(
            &tampered,
            &format!("events_by_kind counts {irqs} irq events, but events.bin holds {held}"),
        );
    }
}

#[test]
fn a_lowered_chunk_bound_is_refused() {
    let dir = scratch("upto");
    let (trace, reader) = timer_trace(&dir);
    let path = trace.join("events.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    // Frame offsets and bounds, as FORMAT.md lays them out.
    let mut frames = Vec::new();
    let mut at = 16;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let upto = u64::from_le_bytes(bytes[at + 16..at + 24].try_into().unwrap());
        frames.push((at, upto));
        at += 32 + len;
    }
    assert!(frames.len() > 3, "{frames:?}");
    // Frame 2 ends where frame 1 does, header CRC fixed up: its events, or the checkpoint the writer
    // ended it at, now lie past it.
    let (at, upto) = frames[2];
    let lowered = frames[1].1;
    assert!(lowered < upto && reader.checkpoints().iter().any(|c| c.at == upto));
    bytes[at + 16..at + 24].copy_from_slice(&lowered.to_le_bytes());
    let crc = crc32fast::hash(&bytes[at..at + 28]);
    bytes[at + 28..at + 32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let o = rv(&["info", trace.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("lies past the chunk's own upto_icount {lowered}"))
            || err.contains(&format!("no chunk ends at icount {upto}, where checkpoint")),
        "{err}"
    );
    assert_refused_everywhere(&trace, "events.bin");
}

#[test]
fn a_replay_from_boot_compares_what_each_checkpoint_stores_with_the_state_it_reached() {
    let dir = scratch("checkpoint-contents");
    let (_, reader) = timer_trace(&dir);
    let victim = reader.checkpoints().len() / 2;
    assert!(!reader.checkpoints()[victim].full);
    let position = reader.checkpoints()[victim].at;
    let name = format!("{position:020}.ckpt");
    // State bytes flipped: the first is the position's varint, so the state still decodes. A stored
    // page changed. A written page left out, so restoring keeps its older content.
    type Tamper = fn(&mut traces::Checkpoint);
    let cases: [(&str, Tamper, String); 3] = [
        (
            "state",
            |cp| cp.state[0] ^= 1,
            format!("in its CPU and device state, icount is {position}, recorded "),
        ),
        (
            "page",
            |cp| cp.pages[0].1[100] ^= 0x80,
            "guest memory differs in 1 page(s): page 0x".to_string(),
        ),
        (
            "dropped",
            |cp| {
                cp.pages.remove(0);
            },
            "(restoring the checkpoint gives it other content)".to_string(),
        ),
    ];
    for (what, tamper, needle) in cases {
        let tampered = dir.join(format!("{what}.rvt"));
        rewrite_with(&reader, reader.events().to_vec(), &tampered, |i, cp| {
            if i == victim {
                tamper(cp);
            }
        });
        let before = reader.checkpoints()[victim - 2].at.to_string();
        // From boot, and from a checkpoint before it.
        for extra in [&[][..], &["--from", &before]] {
            let o = replay(&tampered, extra);
            assert_error(
                &o,
                &format!(
                    "{name}: checkpoint {victim} (icount {position}) does not store the state the \
                     replay reached there, though that state matches the digest the checkpoint \
                     records: "
                ),
            );
            assert_error(&o, &needle);
        }
        // info --verify restores it and finds it does not hash to its digest.
        let o = rv(&["info", "--verify", tampered.to_str().unwrap()]);
        assert_error(&o, "failed verification: 1 problem (listed above)");
        assert!(
            text(&o.stdout).contains(&format!(
                "{name}: what this checkpoint stores (its CPU and device state, and the memory \
                 restoring it gives) does not hash to the digest it records"
            )),
            "{what}: {}",
            text(&o.stdout)
        );
    }
}

#[test]
fn ranges_and_kinds_that_select_nothing_sensible_are_refused_saying_what_is_valid() {
    let (trace, _) = record(&scratch("ranges"), "hello", &[]);
    let t = trace.to_str().unwrap();
    let end = traces::TraceReader::open(&trace)
        .unwrap()
        .summary()
        .unwrap()
        .end;
    let past = (end + 1).to_string();
    for (args, needle) in [
        (
            vec!["replay", t, "--from", &past],
            format!(
                "--from {past} is past the end of the recording, which runs from icount 0 to icount \
                 {end}: give --from at most {end}"
            ),
        ),
        (
            vec!["replay", t, "--to", "0"],
            format!(
                "--to 0 replays nothing: the replay starts at icount 0, the first checkpoint, so \
                 --to must be after 0 (the recording ends at icount {end})"
            ),
        ),
        (
            vec!["events", t, "--kind", "bogus"],
            "--kind bogus is not a kind of event: use one of serial_rx, clock, irq, interrupt, \
             host_value, stop, kick, switch, apic_timer, checkpoint"
                .to_string(),
        ),
        (
            vec!["events", t, "--from", "500", "--to", "100"],
            "--to 100 is before --from 500".to_string(),
        ),
    ] {
        let o = rv(&args);
        assert_error(&o, &needle);
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
    }
    // Their valid neighbours still work.
    let at_end = end.to_string();
    assert_ne!(status(&rv(&["replay", t, "--from", &at_end])), 2);
    assert_eq!(status(&rv(&["replay", t, "--to", "1"])), 0);
    let o = rv(&[
        "events",
        t,
        "--kind",
        "checkpoint",
        "--from",
        "0",
        "--to",
        "0",
    ]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("checkpoint"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn info_verify_refuses_what_replay_refuses() {
    let dir = scratch("verify-like-replay");
    let (trace, reader) = timer_trace(&dir);
    let t = trace.to_str().unwrap();
    let o = rv(&["info", "--verify", t]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("verify:        ok"),
        "{}",
        text(&o.stdout)
    );

    let header = trace.join("header.json");
    let good = std::fs::read_to_string(&header).unwrap();
    // A CPUID table KVM refuses: XSAVE features (leaf 0xd) no CPU has, put first.
    let xsave = "\"cpuid\":[[13,0,1,4294967295,832,832,4294967295],";
    let rtc = guest("rtc");
    let long_cmdline = format!("\"cmdline\":\"{}\"", "x".repeat(100_000));
    let cases = [
        (
            ("\"clock\":\"step\"", "\"clock\":\"bogus\""),
            "header.json: the trace was recorded with clock \"bogus\"",
        ),
        (
            ("[0,654336,1]", "[0,655360,1]"),
            "header.json: the trace's guest had the memory map",
        ),
        (
            ("\"cmdline\":\"\"", long_cmdline.as_str()),
            "header.json: kernel command line is 100000 bytes",
        ),
        (
            ("\"cpuid\":[", xsave),
            "header.json: KVM KVM_SET_CPUID2 failed",
        ),
        (
            (reader.header().image_path.as_str(), rtc.to_str().unwrap()),
            "rtc.elf is not the one this trace recorded",
        ),
    ];
    for ((from, to), needle) in cases {
        assert!(good.contains(from), "{from}");
        std::fs::write(&header, good.replacen(from, to, 1)).unwrap();
        let o = rv(&["info", "--verify", t]);
        assert_error(&o, "failed verification: 1 problem (listed above)");
        assert!(
            text(&o.stdout).contains(needle),
            "{needle}: {}",
            text(&o.stdout)
        );
        assert_eq!(status(&replay(&trace, &[])), 2, "{needle}");
    }
    std::fs::write(&header, &good).unwrap();

    // A checkpoint whose state does not decode.
    let victim = reader.checkpoints().len() / 2;
    let tampered = dir.join("state.rvt");
    rewrite_with(&reader, reader.events().to_vec(), &tampered, |i, cp| {
        if i == victim {
            cp.state.truncate(3);
        }
    });
    let name = format!("{:020}.ckpt", reader.checkpoints()[victim].at);
    let o = rv(&["info", "--verify", tampered.to_str().unwrap()]);
    assert_error(&o, "failed verification: 1 problem (listed above)");
    assert!(
        text(&o.stdout).contains(&format!(
            "{name}: this checkpoint cannot be restored: checkpoint machine state does not decode"
        )),
        "{}",
        text(&o.stdout)
    );
    assert_error(
        &replay(&tampered, &[]),
        "its CPU and device state does not decode",
    );

    // A recording cut off before its first checkpoint: nothing to replay.
    std::fs::remove_file(tampered.join("summary.json")).unwrap();
    for file in checkpoint_files(&tampered) {
        std::fs::remove_file(file).unwrap();
    }
    let o = rv(&["info", "--verify", tampered.to_str().unwrap()]);
    assert_error(&o, "failed verification: 1 problem (listed above)");
    let nothing = "holds nothing replayable: it has no checkpoint";
    assert!(text(&o.stdout).contains(nothing), "{}", text(&o.stdout));
    assert_error(&replay(&tampered, &[]), nothing);
}
