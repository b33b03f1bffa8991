//! The landmark clock: recordings made at free-run speed replay exactly, with the landmark clock and with
//! the step clock (which finds every recorded point by single-stepping: the two clocks must agree).

mod common;
use common::*;

/// Records `guest_name` with the landmark clock and checks that both clocks replay it byte for byte,
/// `times` times each. Returns the trace and the recording's output.
fn record_and_replay(
    dir: &std::path::Path,
    guest_name: &str,
    extra: &[&str],
    times: usize,
) -> (std::path::PathBuf, std::process::Output) {
    let mut args = vec!["--clock", "landmark"];
    args.extend_from_slice(extra);
    let (trace, rec) = record(dir, guest_name, &args);
    for _ in 0..times {
        assert_replays(&trace, &rec);
    }
    // Executing every stretch instead of jumping over it by its waypoint gives the same run.
    assert_replays_with(&trace, &rec, &["--no-waypoints"]);
    assert_replays_with(&trace, &rec, &["--clock", "step"]);
    (trace, rec)
}

/// How many events of `kind` the trace holds, from `retrovisor info`.
fn events_of(trace: &std::path::Path, kind: &str) -> u64 {
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    info.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(kind)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[test]
fn timer_interrupts_in_a_compute_loop_replay_exactly() {
    let dir = scratch("lm-timer");
    // The loop makes no exits: ticks are delivered at kicks, in the middle of it, where the same rip
    // comes back with different registers every pass.
    let (trace, rec) = record_and_replay(&dir, "timer", &[], 3);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    assert!(
        text(&rec.stdout).contains("tick 0:"),
        "no tick arrived during the loop: {}",
        text(&rec.stdout)
    );
    assert!(events_of(&trace, "kick") > 0, "no kick was recorded");
}

/// The waypoint count `info` gives, and the kick points a replay reached by them.
fn waypoints(trace: &std::path::Path) -> (u64, u64) {
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    let count = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("waypoints:")?
                .trim()
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let o = replay(trace, &[]);
    let err = text(&o.stderr);
    let jumps = err
        .split(", ")
        .find_map(|p| {
            p.strip_suffix(" kick points reached by their waypoints")?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (count, jumps)
}

#[test]
fn kick_points_after_long_stretches_are_reached_by_waypoints_and_damage_only_costs_time() {
    let dir = scratch("lm-waypoints");
    let (trace, rec) = record_and_replay(&dir, "timer", &[], 1);
    // The timer guest computes for milliseconds without exits: its kick points get waypoints, and a
    // replay jumps to each instead of running to it.
    let (count, jumps) = waypoints(&trace);
    assert!(count > 0, "no waypoint was recorded");
    assert_eq!(jumps, count, "the replay did not use every waypoint");
    let verify = rv(&["info", "--verify", trace.to_str().unwrap()]);
    assert_eq!(status(&verify), 0, "{}", text(&verify.stdout));

    // A damaged record: that one kick point is searched for, with a warning, and the replay is exact.
    let copy = |name: &str| {
        let dest = dir.join(name);
        let o = std::process::Command::new("cp")
            .arg("-r")
            .arg(&trace)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(o.status.success());
        dest
    };
    let damaged = copy("damaged.rvt");
    let file = damaged.join("waypoints.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let o = replay(&damaged, &[]);
    let err = text(&o.stderr);
    assert_eq!(o.stdout, rec.stdout, "{err}");
    assert_eq!(status(&o), status(&rec), "{err}");
    assert!(
        err.contains("waypoints.bin: the waypoint at byte")
            && err.contains("searching for the kick point instead"),
        "{err}"
    );
    let verify = rv(&["info", "--verify", damaged.to_str().unwrap()]);
    assert_eq!(status(&verify), 2, "{}", text(&verify.stdout));
    assert!(text(&verify.stdout).contains("waypoints.bin"));

    // A file cut short, as a killed recording leaves it: the records before the cut are used.
    let cut = copy("cut.rvt");
    let file = cut.join("waypoints.bin");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (kept, jumps) = waypoints(&cut);
    assert_eq!((kept, jumps), (count - 1, count - 1));
    assert_replays(&cut, &rec);
    let verify = rv(&["info", "--verify", cut.to_str().unwrap()]);
    assert_eq!(status(&verify), 0, "{}", text(&verify.stdout));
}

#[test]
fn a_guest_spinning_on_a_flag_only_the_timer_sets_replays() {
    let dir = scratch("lm-spinwait");
    let (trace, rec) = record_and_replay(&dir, "spinwait", &[], 3);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    assert!(text(&rec.stdout).contains("spinwait: done"));
    assert!(events_of(&trace, "kick") >= 12, "each tick needs a kick");
}

#[test]
fn serial_input_interrupts_and_long_computation_replay() {
    let dir = scratch("lm-ledger");
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests/ledger-short.txt");
    let (_, rec) = record_and_replay(&dir, "ledger", &["--serial-input", input], 2);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    assert!(text(&rec.stdout).contains("BUG: guard clobbered: 0x00003039"));
}

#[test]
fn rtc_disk_and_64_bit_guests_replay() {
    let dir = scratch("lm-devices");
    record_and_replay(&dir, "rtc", &[], 1);
    record_and_replay(&dir, "long64", &[], 1);
    let image = dir.join("disk.img");
    std::fs::write(
        &image,
        (0..65536u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let (_, rec) = record_and_replay(&dir, "disk", &["--disk", image.to_str().unwrap()], 1);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
}

#[test]
fn a_guest_reading_the_tsc_and_random_numbers_replays_exactly() {
    let dir = scratch("lm-rdtsc");
    // rand.elf prints RDTSC, RDTSCP, RDRAND and RDSEED values (`always`: whatever the portable CPU's
    // CPUID says, as a guest may on this KVM). Running free they never exit, so the VMM traps them where
    // the image has them and logs what they returned.
    let (trace, rec) = record(
        &dir,
        "rand",
        &["--clock", "landmark", "--cmdline", "always"],
    );
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    assert!(
        text(&rec.stdout).contains("rdtsc: increasing"),
        "{}",
        text(&rec.stdout)
    );
    assert_replays(&trace, &rec);
    let events = text(&rv(&["events", trace.to_str().unwrap(), "--kind", "host_value"]).stdout);
    for insn in ["Rdtsc", "Rdtscp", "Rdrand", "Rdseed"] {
        assert!(events.contains(insn), "no {insn} result logged: {events}");
    }
    // The step clock replays the same trace through the same traps.
    assert_replays_with(&trace, &rec, &["--clock", "step"]);
}

#[test]
fn instructions_the_vmm_completes_replay_exactly() {
    let dir = scratch("lm-insns");
    let (trace, rec) = record(&dir, "insns64", &["--clock", "landmark"]);
    let out = text(&rec.stdout);
    assert_eq!(status(&rec), 0x7e * 2 + 1, "{}", text(&rec.stderr));
    for line in [
        "popcnt: 28\n",
        "cmpxchg16b: zf=1 rdx:rax=0x0000000000000002:0x0000000000000001 memory=0x0000000000000044:0x0000000000000033\n",
        "cmpxchg16b: zf=0 rdx:rax=0x0000000000000044:0x0000000000000033 memory=0x0000000000000044:0x0000000000000033\n",
        "x87: fnclex and fwait passed\n",
        "EXCEPTION vector=3 ",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    assert_replays(&trace, &rec);
    assert_replays_with(&trace, &rec, &["--clock", "step"]);
}

#[test]
fn landmark_options_that_need_instruction_counts_are_refused() {
    let dir = scratch("lm-refused");
    let trace = dir.join("t.rvt");
    let hello = guest("hello");
    for extra in [["--time", "virtual"], ["--max-instructions", "1000"]] {
        let mut args = vec![
            "record",
            "--clock",
            "landmark",
            "--kernel",
            hello.to_str().unwrap(),
            "-o",
            trace.to_str().unwrap(),
        ];
        args.extend_from_slice(&extra);
        let o = rv(&args);
        assert_eq!(status(&o), 2, "{}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("--clock step"),
            "{}",
            text(&o.stderr)
        );
        assert!(
            !trace.exists(),
            "nothing is written for a refused recording"
        );
    }
    // A step trace cannot be replayed by the landmark clock.
    let (step_trace, _) = record(&dir, "hello", &[]);
    let o = replay(&step_trace, &["--clock", "landmark"]);
    assert_eq!(status(&o), 2, "{}", text(&o.stderr));
}

#[test]
fn stepping_a_landmark_trace_counts_the_instructions_the_step_clock_counts() {
    // hello.elf takes no interrupt: both clocks run it identically, so replaying the landmark trace by
    // stepping must count the very length the step clock recorded.
    let dir = scratch("lm-count");
    let (step, _) = record(&dir.join("step"), "hello", &["--clock", "step"]);
    let (landmark, rec) = record(&dir, "hello", &["--clock", "landmark"]);
    let info = |t: &std::path::Path| text(&rv(&["info", t.to_str().unwrap()]).stdout);
    let step_length: u64 = info(&step)
        .lines()
        .find_map(|l| l.strip_prefix("instructions:")?.trim().parse().ok())
        .expect("info gives a step trace's length");
    let o = replay(&landmark, &["--clock", "step"]);
    assert_eq!(o.stdout, rec.stdout);
    let said = text(&o.stderr);
    assert!(
        said.contains(&format!(
            "({step_length} instructions, counted by stepping)"
        )),
        "step clock: {step_length} instructions; stepped replay: {said}"
    );
}

#[test]
fn a_killed_landmark_recording_replays_its_prefix_and_from_a_checkpoint() {
    let dir = scratch("lm-kill");
    let trace = dir.join("spin.rvt");
    let child = bin()
        .args([
            "record",
            "--clock",
            "landmark",
            "--checkpoint-ms",
            "50",
            "--kernel",
        ])
        .arg(guest("spin"))
        .arg("-o")
        .arg(&trace)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let mut child = child;
    child.kill().unwrap(); // SIGKILL: no chance to finish the trace
    let rec = child.wait_with_output().unwrap();
    let o = replay(&trace, &[]);
    assert_eq!(status(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cut off"), "{}", text(&o.stderr));
    assert!(
        rec.stdout.starts_with(&o.stdout),
        "the replayed prefix is not a prefix of the recording"
    );
    assert!(
        text(&o.stdout).contains("spinning\n."),
        "{}",
        text(&o.stdout)
    );
    // From the last checkpoint: the rest of the output, exactly.
    let events = text(&rv(&["events", trace.to_str().unwrap(), "--kind", "checkpoint"]).stdout);
    let last: u64 = events
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(last > 0, "{events}");
    let tail = replay(&trace, &["--from", &last.to_string()]);
    assert_eq!(status(&tail), 0, "{}", text(&tail.stderr));
    assert!(
        o.stdout.ends_with(&tail.stdout),
        "replay --from printed what the full replay did not end with"
    );
}

#[test]
fn a_tampered_landmark_trace_diverges_at_a_landmark() {
    let dir = scratch("lm-tamper");
    let (trace, _) = record_echo_landmark(&dir);
    let reader = traces::TraceReader::open(&trace).unwrap();
    let mut events = reader.events().to_vec();
    let rx = events
        .iter_mut()
        .find_map(|e| match &mut e.kind {
            traces::EventKind::SerialRx { bytes } => Some(bytes),
            _ => None,
        })
        .unwrap();
    rx[0] ^= 0x20; // another letter: the guest echoes something else
    let tampered = dir.join("tampered.rvt");
    rewrite(&reader, events, &tampered);
    let o = replay(&tampered, &[]);
    let err = text(&o.stderr);
    assert_eq!(status(&o), 4, "{err}");
    assert!(
        err.contains("diverged from the recording at landmark"),
        "{err}"
    );
}

#[test]
fn no_interrupt_is_queued_beside_the_breakpoint_exception_of_an_int3() {
    let dir = scratch("lm-int3");
    let (trace, rec) = record_and_replay(&dir, "int3loop", &[], 1);
    let out = text(&rec.stdout);
    assert_eq!(status(&rec), 1, "{}\n{out}", text(&rec.stderr));
    assert!(out.contains("breakpoints=75 "), "{out}");
    let ticks: u32 = out
        .split("ticks=")
        .nth(1)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tick count in {out:?}"));
    assert!(ticks > 100, "the timer was starved: {out}");
    // At the landmark of an int3 the VMM has just queued its #BP; an interrupt queued there too would be
    // delivered at an entry host preemption picks. None may be: the recording has none where the #BP
    // returns to (the landmark's rip).
    let image = std::fs::read(guest("int3loop.sym")).unwrap();
    let (after_int3, _) = boot::symbols::Symbols::from_elf(&image)
        .find("after_int3")
        .expect("int3loop.sym.elf names after_int3");
    let interrupts = text(&rv(&["events", trace.to_str().unwrap(), "--kind", "interrupt"]).stdout);
    assert!(interrupts.lines().count() >= ticks as usize, "{interrupts}");
    let there = format!("rip {after_int3:#010x} ");
    assert!(
        !interrupts.contains(&there),
        "an interrupt was queued beside a #BP:\n{interrupts}"
    );
}
