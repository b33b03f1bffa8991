//! Linux guests: a tinyconfig Linux 6.1 built from Debian's kernel source by tests/linux/build.sh (cached
//! under target/linux; the first build takes a few minutes, `.ci/run` does it before the suite), booted
//! through its PVH entry with an initramfs, recorded with the landmark clock on a busy machine (another
//! Linux recording and its replays run meanwhile) while a scripted serial session runs (a virtio disk read and written, the planted bug of the Linux demo triggered), replayed
//! exactly, and debugged backwards with real gdb on the kernel's own source.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The kernel command line of every Linux test: serial console, no APIC (PIC only), the virtio disk at
/// retrovisor's first slot. (No `noxsave` or `clearcpuid=`: the portable CPU model has no XSAVE, and
/// it is what the kernel sees on every host.)
const APPEND: &str = "console=ttyS0 panic=-1 noapic nolapic \
                      virtio_mmio.device=512@0xd0000000:5";

/// The scripted session /init runs (tests/linux/init.c lists its commands).
const SESSION: &str = "echo hello from the session\n\
                       cat /proc/version\n\
                       head /dev/vda 24\n\
                       write /dev/vda written-by-linux\n\
                       write /proc/rv_demo retrovisor-demo-overrun\n\
                       echo some time later\n\
                       cat /proc/rv_demo\n\
                       poweroff 3\n";

/// The test kernel and initramfs, built once per machine.
fn linux() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = repo.join("target/linux");
        let status = Command::new("bash")
            .arg(repo.join("tests/linux/build.sh"))
            .arg(&out)
            .status()
            .expect("cannot run bash");
        assert!(
            status.success(),
            "tests/linux/build.sh failed: it says what is missing (.ci/run installs it)"
        );
        (out.join("vmlinux"), out.join("initramfs.cpio"))
    })
}

/// One recording of the session, shared by the tests: its trace, what record printed, and the disk image
/// (which must come out untouched).
struct Session {
    trace: PathBuf,
    record: std::process::Output,
    disk: PathBuf,
    disk_bytes: Vec<u8>,
}

fn session() -> &'static Session {
    static REC: OnceLock<Session> = OnceLock::new();
    REC.get_or_init(|| {
        let (vmlinux, initramfs) = linux();
        let dir = scratch("linux");
        let input = dir.join("session.txt");
        std::fs::write(&input, SESSION).unwrap();
        let disk = dir.join("disk.img");
        let mut disk_bytes = b"disk-made-by-the-test-0123456789".to_vec();
        disk_bytes.resize(1 << 20, 0x2e);
        std::fs::write(&disk, &disk_bytes).unwrap();
        let trace = dir.join("boot.rvt");
        // Recorded on a busy machine, as users record: the other tests build and load beside it (and
        // tests/load.rs records small guests under CPU hogs).
        let record = rv(&[
            "record",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initramfs.to_str().unwrap(),
            "--append",
            APPEND,
            "--ram",
            "64",
            "--disk",
            disk.to_str().unwrap(),
            "--serial-input",
            input.to_str().unwrap(),
            // The 8250 driver empties the UART while it sets the port up: type once /init runs.
            "--serial-input-after",
            "Run /init",
            "-o",
            trace.to_str().unwrap(),
        ]);
        Session {
            trace,
            record,
            disk,
            disk_bytes,
        }
    })
}

#[test]
fn a_linux_session_records_and_replays_exactly() {
    let s = session();
    let out = text(&s.record.stdout);
    assert_eq!(status(&s.record), 7, "{}\n{out}", text(&s.record.stderr));
    for line in [
        "Run /init as init process",
        "init: hello from user space",
        "hello from the session",
        "Linux version 6.1",
        // The disk's first bytes, read by virtio DMA.
        "disk-made-by-the-test-01",
        "rv_demo: budget corrupted",
        "init: powering off",
    ] {
        assert!(
            out.contains(line),
            "no {line:?} in the guest's output:\n{out}"
        );
    }
    let info = text(&rv(&["info", s.trace.to_str().unwrap()]).stdout);
    assert!(info.contains("initrd:"), "{info}");
    assert!(info.contains("host_value"), "{info}");
    // A replay: identical output and status, and every checkpoint's state (CPU, devices, memory) equal
    // to the recorded one. (The SMP test below runs three at once.)
    let r = replay(&s.trace, &[]);
    assert_eq!(status(&r), 7, "{}", text(&r.stderr));
    assert_eq!(r.stdout, s.record.stdout, "replay output differs");
    assert!(
        text(&r.stderr).contains("replay matched the recording"),
        "{}",
        text(&r.stderr)
    );
    // From checkpoints late in the session (where /init runs in user mode): a restore starts with no
    // translations cached in KVM, and the recording dropped them at every checkpoint too, so the pages
    // PVM writes as it fills them are the same, and so are the kicks' fingerprints.
    let listing = rv(&["events", s.trace.to_str().unwrap(), "--kind", "checkpoint"]);
    let checkpoints: Vec<String> = text(&listing.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    for from in checkpoints.iter().rev().skip(1).step_by(7).take(3) {
        let r = replay(&s.trace, &["--from", from]);
        assert_eq!(
            status(&r),
            7,
            "from checkpoint at {from}: {}",
            text(&r.stderr)
        );
    }
    // The guest wrote its disk, but only the overlay: the image is as the test made it.
    assert_eq!(std::fs::read(&s.disk).unwrap(), s.disk_bytes);
}

/// gdb on the kernel's own source, with Linux's own gdb scripts (scripts/gdb, CONFIG_GDB_SCRIPTS) loaded:
/// `lx-dmesg` is a time-travel dmesg (the log as of the position: longer later in the boot, the same
/// again back at the early position), `$lx_current()` and `lx-ps` name the tasks; then the planted
/// overrun is found backwards from where it is seen, on its kernel source line.
#[test]
fn gdb_with_the_kernels_scripts_reads_the_log_at_any_position_and_finds_the_planted_overrun() {
    let s = session();
    assert_eq!(status(&s.record), 7, "{}", text(&s.record.stderr));
    let (vmlinux, _) = linux();
    let src = vmlinux.parent().unwrap().join("src");
    let server = GdbServer::start(&s.trace, &[]);
    let out = gdb_batch(
        server.port,
        vmlinux,
        &[
            &format!("add-auto-load-safe-path {}", src.display()),
            &format!("source {}", src.join("vmlinux-gdb.py").display()),
            // Early in the boot: the initcall that creates /proc/rv_demo.
            "break proc_version_init",
            "continue",
            "echo ==early==\\n",
            "lx-dmesg",
            // Late in the boot: /init about to start.
            "echo ==late==\\n",
            "delete",
            "break kernel_execve",
            "continue",
            "lx-dmesg",
            // Back to the early position: the log is as it was there.
            "echo ==again==\\n",
            "delete",
            "break proc_version_init",
            "reverse-continue",
            "lx-dmesg",
            "echo ==bug==\\n",
            // Where the damage is seen, then back to the store that did it.
            "delete",
            "break rv_demo_show",
            "continue",
            "print/x rv_demo.budget",
            "watch rv_demo.budget",
            "reverse-continue",
            "bt 3",
            "info line *$pc",
            // The task that made the store, and every task, as of then.
            "echo ==current==\\n",
            "print $lx_current().comm",
            "echo ==ps==\\n",
            "lx-ps",
            "echo ==finish==\\n",
            // Backwards through kernel source: out of the write handler, to its caller's line.
            "delete",
            "reverse-finish",
            "info line *$pc",
        ],
    );
    let part = |from: &str, to: &str| -> String {
        let start = out
            .find(from)
            .unwrap_or_else(|| panic!("no {from} in:\n{out}\n{}", server.stderr()));
        let rest = &out[start + from.len()..];
        rest[..rest.find(to).unwrap_or(rest.len())].to_string()
    };
    // lx-dmesg's lines, without gdb's own (breakpoint reports and the like, which have no timestamp).
    let log = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with('['))
            .map(str::to_string)
            .collect()
    };
    let early = log(part("==early==", "==late=="));
    let late = log(part("==late==", "==again=="));
    let again = log(part("==again==", "==bug=="));
    assert!(
        early.iter().any(|l| l.contains("Linux version 6.1")),
        "the early log lacks the banner:\n{out}"
    );
    assert!(
        late.len() > early.len() && late.starts_with(&early),
        "the later log does not extend the earlier one:\n{out}"
    );
    assert!(late.iter().any(|l| l.contains("Run /init")), "{out}");
    assert_eq!(
        again, early,
        "after reverse-continue the log is the early one again:\n{out}"
    );

    let bug = part("==bug==", "==current==");
    assert!(
        // (Two locations: the function and a copy the compiler inlined.)
        bug.contains("Breakpoint 4.1, rv_demo_show") || bug.contains("Breakpoint 4, rv_demo_show"),
        "the breakpoint in kernel text was not hit:\n{out}\n{}",
        server.stderr()
    );
    assert!(bug.contains("Old value = "), "{out}");
    assert!(bug.contains("New value = "), "{out}");
    // The store is the copy loop of the write handler, in fs/proc/version.c.
    let source = patched_source_line("rv_demo.name[i] = scratch[i]");
    assert!(
        bug.contains(&format!("Line {source} of \"fs/proc/version.c\"")),
        "not stopped on the store (line {source}):\n{out}"
    );
    assert!(bug.contains("rv_demo_write"), "{out}");
    assert!(
        part("==current==", "==ps==").contains("\"init\""),
        "$lx_current() is not /init at its write:\n{out}"
    );
    let ps = part("==ps==", "==finish==");
    assert!(ps.contains("swapper") && ps.contains("init"), "{ps}");
    assert!(
        part("==finish==", "\u{0}").contains("of \"fs/proc/inode.c\""),
        "reverse-finish did not reach the caller in fs/proc/inode.c:\n{out}"
    );
}

/// `calls` over the whole session: the one write to /proc/rv_demo, with its length and return value.
/// (gdb's `monitor calls`, the same search, is tested on a small guest in tests/calls.rs.)
#[test]
fn calls_lists_the_write_to_proc_rv_demo_with_its_length_and_result() {
    let s = session();
    assert_eq!(status(&s.record), 7, "{}", text(&s.record.stderr));
    let out = rv(&[
        "calls",
        s.trace.to_str().unwrap(),
        "rv_demo_write",
        "--json",
    ]);
    assert_eq!(status(&out), 0, "{}", text(&out.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = listing["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["file", "buf", "count", "ppos"], "{listing}");
    let calls = listing["calls"].as_array().unwrap();
    assert_eq!(
        calls.len(),
        1,
        "one `write /proc/rv_demo` in the session: {listing}"
    );
    let length = "retrovisor-demo-overrun".len() as u64;
    assert_eq!(calls[0]["abi"], "x86-64 System V");
    assert_eq!(calls[0]["args"][2]["value"], length, "{listing}");
    assert_eq!(calls[0]["returned"]["value"], length, "{listing}");
}

/// The line of fs/proc/version.c, as the demo patch makes it, that contains `needle`.
fn patched_source_line(needle: &str) -> usize {
    let patched = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/linux/src/fs/proc/version.c");
    let src = std::fs::read_to_string(&patched).unwrap();
    src.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} is not in {}", patched.display()))
}

#[test]
fn a_damaged_initrd_copy_or_another_kernel_is_refused() {
    let s = session();
    assert_eq!(status(&s.record), 7, "{}", text(&s.record.stderr));
    // A copy of the trace whose initrd copy lost its last bytes: refused before the guest starts.
    let dir = scratch("linux-damaged");
    let copy = dir.join("boot.rvt");
    let status_cp = Command::new("cp")
        .arg("-a")
        .arg(&s.trace)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status_cp.success());
    let initrd = copy.join("initrd.zst");
    let bytes = std::fs::read(&initrd).unwrap();
    std::fs::write(&initrd, &bytes[..bytes.len() - 64]).unwrap();
    let r = rv_within(60, &["replay", copy.to_str().unwrap()]);
    assert_eq!(status(&r), 2, "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("initrd.zst"),
        "{}",
        text(&r.stderr)
    );
    // The recording's kernel is checked by its hash: another image is refused, by name.
    let other = guest("hello");
    let r = rv_within(
        60,
        &[
            "replay",
            s.trace.to_str().unwrap(),
            "--kernel",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(status(&r), 2, "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("is not the one this trace recorded"),
        "{}",
        text(&r.stderr)
    );
    // An initrd for a Multiboot kernel is refused: only PVH kernels take one.
    let o = rv(&[
        "run",
        "--kernel",
        other.to_str().unwrap(),
        "--initrd",
        linux().1.to_str().unwrap(),
    ]);
    assert_eq!(status(&o), 2, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("the kernel is a Multiboot kernel"),
        "{}",
        text(&o.stderr)
    );
}

/// The SMP test's kernel command line: the APICs on (no `noapic nolapic`), no disk.
const APPEND_SMP: &str = "console=ttyS0 panic=-1";

/// Boots the test kernel on two vCPUs with its local APICs and the IOAPIC (found through the MP table)
/// and runs a short session; the recording replays exactly, three replays at once. It records while the
/// other Linux tests replay their session beside it: load enough. Not while the session is being
/// recorded: on this 2-core host two Linux recordings at once starve each other's guest so far that PIT
/// ticks pile up and merge (there is no lost-tick reinjection yet), and Linux's check of its APIC timer
/// against them fails.
#[test]
fn the_kernel_boots_two_cpus_with_apics_on_and_its_recording_replays_three_at_once() {
    let (vmlinux, initramfs) = linux();
    let _recorded = session();
    let dir = scratch("linux-smp");
    let input = dir.join("session.txt");
    std::fs::write(&input, "cat /proc/stat\ncat /proc/interrupts\npoweroff 3\n").unwrap();
    let trace = dir.join("smp.rvt");
    let record = rv(&[
        "record",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--initrd",
        initramfs.to_str().unwrap(),
        "--append",
        APPEND_SMP,
        "--ram",
        "64",
        "--cpus",
        "2",
        "--serial-input",
        input.to_str().unwrap(),
        "--serial-input-after",
        "Run /init",
        "-o",
        trace.to_str().unwrap(),
    ]);
    let out = text(&record.stdout);
    assert_eq!(status(&record), 7, "{out}\n{}", text(&record.stderr));
    assert!(out.contains("Brought up 1 node, 2 CPUs"), "{out}");
    assert!(
        out.contains("cpu1 "),
        "/proc/stat shows no second CPU: {out}"
    );
    assert!(out.contains("LOC"), "no local APIC timer interrupts: {out}");
    // Linux checks the APIC timer it calibrated against the PIT's ticks, and falls back to the PIT if
    // the two disagree: ticks delivered late and merged would make them disagree.
    assert!(
        !out.contains("APIC timer disabled"),
        "Linux does not use the local APIC timer: {out}"
    );
    let info = text(&rv(&["info", trace.to_str().unwrap()]).stdout);
    assert!(info.contains("apic_timer"), "{info}");
    assert_replays_at_once(&trace, &record, 3);
}
