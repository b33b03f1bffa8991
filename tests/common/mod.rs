//! Shared helpers for the end-to-end tests: build the guests from source, run the real `retrovisor`
//! binary on real KVM, and compare what comes out.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Builds every guest in tests/guests once per test binary (make makes it cheap when up to date) and
/// returns the directory holding the ELFs.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guests");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
        // A file lock keeps concurrently starting test binaries from running make in the same directory.
        std::fs::create_dir_all(&out).unwrap();
        let status = Command::new("flock")
            .arg(out.join(".lock"))
            .arg("make")
            .arg("-s")
            .arg("-C")
            .arg(&src)
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("cannot run make (gcc, ld and make are needed to build the test guests)");
        assert!(status.success(), "building the test guests failed");
        out
    })
}

/// Path of a built guest.
pub fn guest(name: &str) -> PathBuf {
    guests().join(format!("{name}.elf"))
}

/// A trace's checkpoint files (`NNN.ckpt`, not the `.written` lists beside full ones), in position order.
pub fn checkpoint_files(trace: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(trace.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .collect();
    files.sort();
    files
}

/// A fresh, empty scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("scratch")
        .join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The retrovisor binary under test.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_retrovisor"));
    c.stdin(Stdio::null());
    c
}

/// Runs retrovisor with `args` to completion.
pub fn rv(args: &[&str]) -> Output {
    bin().args(args).output().expect("cannot start retrovisor")
}

/// Runs retrovisor with `args`, killed after `secs` seconds if it has not finished (its status is
/// then 124, which retrovisor never returns): for inputs that could make it block forever.
pub fn rv_within(secs: u64, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("--kill-after=5")
        .arg(secs.to_string())
        .arg(env!("CARGO_BIN_EXE_retrovisor"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run timeout (coreutils)")
}

/// Makes a FIFO at `path`: a file name that blocks whoever opens it for reading until a writer
/// comes, and none ever does here.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let made = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(made, 0, "mkfifo {path:?}");
}

/// The exit status of a finished process.
pub fn status(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Lossy text of a byte buffer, for assertions and messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Records `guest` with extra args into `dir/name.rvt`; asserts retrovisor itself did not fail. Without a
/// `--clock` among them, it records with the step clock: most tests are about what a step trace holds.
pub fn record(dir: &Path, guest_name: &str, extra: &[&str]) -> (PathBuf, Output) {
    let trace = dir.join(format!("{guest_name}.rvt"));
    let kernel = guest(guest_name);
    let mut args = vec![
        "record",
        "--kernel",
        kernel.to_str().unwrap(),
        "-o",
        trace.to_str().unwrap(),
    ];
    if !extra.contains(&"--clock") {
        args.extend(["--clock", "step"]);
    }
    args.extend_from_slice(extra);
    let out = rv(&args);
    assert_ne!(status(&out), 2, "record failed: {}", text(&out.stderr));
    (trace, out)
}

/// Replays a trace with extra args.
pub fn replay(trace: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["replay", trace.to_str().unwrap()];
    args.extend_from_slice(extra);
    rv(&args)
}

/// Asserts that replay reproduces the recording byte for byte, with the same exit status.
pub fn assert_replays(trace: &Path, recorded: &Output) {
    assert_replays_with(trace, recorded, &[]);
}

/// [`assert_replays`] with extra replay arguments (such as `--clock step`).
pub fn assert_replays_with(trace: &Path, recorded: &Output, extra: &[&str]) {
    let r = replay(trace, extra);
    assert_eq!(
        status(&r),
        status(recorded),
        "replay status differs; replay stderr: {}",
        text(&r.stderr)
    );
    assert_eq!(
        text(&r.stdout),
        text(&recorded.stdout),
        "replay output differs from the recording"
    );
    assert_eq!(r.stdout, recorded.stdout);
}

/// Replays `trace` `n` times at once and asserts that every replay reproduces the recording byte for
/// byte, with its exit status, and says it matched (every checkpoint and the output).
pub fn assert_replays_at_once(trace: &Path, recorded: &Output, n: usize) {
    let replays: Vec<_> = (0..n)
        .map(|_| {
            let trace = trace.to_path_buf();
            std::thread::spawn(move || replay(&trace, &[]))
        })
        .collect();
    for r in replays {
        let r = r.join().unwrap();
        assert_eq!(r.stdout, recorded.stdout, "{}", text(&r.stderr));
        assert_eq!(status(&r), status(recorded));
        assert!(
            text(&r.stderr).contains("replay matched"),
            "{}",
            text(&r.stderr)
        );
    }
}

/// A `retrovisor replay TRACE --gdb 127.0.0.1:0` child, serving gdb on the free port it picked and announced;
/// killed when dropped. Its runtime directory (where it installs its gdb commands) is its own.
pub struct GdbServer {
    child: std::process::Child,
    /// The port it listens on.
    pub port: u16,
    /// The gdb command file it installed, from the `source` line it printed.
    pub script: Option<PathBuf>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Collects a child's pipe into a shared string from a background thread.
fn collect(pipe: impl std::io::Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<String>> {
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    text
}

impl GdbServer {
    /// Starts serving `trace` (with extra replay args) and waits until it announces its port.
    pub fn start(trace: &Path, extra: &[&str]) -> GdbServer {
        let mut child = bin()
            .arg("replay")
            .arg(trace)
            .args(["--gdb", "127.0.0.1:0"])
            .args(extra)
            .env("XDG_RUNTIME_DIR", scratch("gdb-runtime"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start retrovisor replay --gdb");
        let stderr = collect(child.stderr.take().unwrap());
        let stdout = collect(child.stdout.take().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let port = loop {
            let announced = stderr
                .lock()
                .unwrap()
                .split("waiting for gdb on 127.0.0.1:")
                .nth(1)
                .and_then(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                });
            if let Some(port) = announced {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "retrovisor replay --gdb exited ({status}) before listening: {}",
                    stderr.lock().unwrap()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "retrovisor never announced its gdb port: {}",
                stderr.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let script = stderr
            .lock()
            .unwrap()
            .split(" -ex 'source ")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .map(PathBuf::from);
        GdbServer {
            child,
            port,
            script,
            stderr,
            stdout,
        }
    }

    /// What the server wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Guest output the server wrote on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits up to `secs` for the server to exit; its exit status, or None if it is still running.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Whether the server process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for GdbServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// gdb's arguments for a batch session on `elf` that connects to `port` and runs each of `cmds`.
pub fn gdb_args(port: u16, elf: &Path, cmds: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "-nx".into(),
        "-batch".into(),
        "-ex".into(),
        format!("target remote 127.0.0.1:{port}").into(),
    ];
    for cmd in cmds {
        args.push("-ex".into());
        args.push((*cmd).into());
    }
    args.push(elf.into());
    args
}

/// Runs `gdb -nx -batch` on `elf`, connected to `port`, with each of `cmds` as an `-ex` command; returns its
/// stdout and stderr interleaved as gdb wrote them. gdb is killed after 120 s.
pub fn gdb_batch(port: u16, elf: &Path, cmds: &[&str]) -> String {
    let dir = scratch("gdb-output");
    let log = dir.join("gdb.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut c = Command::new("timeout");
    c.args(["300", "gdb"])
        .args(gdb_args(port, elf, cmds))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let status = c
        .status()
        .expect("cannot run gdb (GNU gdb is needed for the gdb tests)");
    let out = std::fs::read_to_string(&log).unwrap();
    assert_ne!(
        status.code(),
        Some(124),
        "gdb timed out; it printed:\n{out}"
    );
    out
}

/// The number of the first line of tests/guests/`file` that contains `needle`.
pub fn guest_source_line(file: &str, needle: &str) -> usize {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/guests")
            .join(file),
    )
    .unwrap();
    src.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{file} has no line containing {needle:?}"))
        + 1
}

/// Every `monitor when` answer in gdb output, in order: (current icount, end of the recording).
pub fn when_answers(gdb_output: &str) -> Vec<(u64, u64)> {
    gdb_output
        .lines()
        .filter_map(|line| {
            let (now, end) = line.split_once(" (the recording ends at ")?;
            Some((position(now)?, position(end.strip_suffix(')')?)?))
        })
        .collect()
}

/// A position as `monitor when` prints it: "icount N", or in a landmark trace "landmark L" or
/// "landmark L + K", the latter as the replayer encodes it (L in the upper 32 bits, K in the lower).
pub fn position(text: &str) -> Option<u64> {
    if let Some(n) = text.strip_prefix("icount ") {
        return n.parse().ok();
    }
    let rest = text.strip_prefix("landmark ")?;
    let (landmark, offset) = match rest.split_once(" + ") {
        Some((l, k)) => (l.parse::<u64>().ok()?, k.parse::<u64>().ok()?),
        None => (rest.parse().ok()?, 0),
    };
    Some(landmark << 32 | offset)
}

/// Writes a copy of the trace `reader` holds to `dest`, with `events` instead of its events (the closing
/// stop event among them, as the recorder writes it: without it, replay diverges at the end).
pub fn rewrite(reader: &traces::TraceReader, events: Vec<traces::Event>, dest: &Path) {
    rewrite_with(reader, events, dest, |_, _| {});
}

/// [`rewrite`], with `tamper` applied to each checkpoint (given its index) before it is written: as an
/// attacker would change what one stores, keeping the digest it records and fixing up its CRC.
pub fn rewrite_with(
    reader: &traces::TraceReader,
    events: Vec<traces::Event>,
    dest: &Path,
    mut tamper: impl FnMut(usize, &mut traces::Checkpoint),
) {
    let mut w = traces::TraceWriter::create(dest, reader.header()).unwrap();
    let mut write = |w: &mut traces::TraceWriter, index: usize| {
        let mut cp = reader.read_checkpoint(index).unwrap();
        tamper(index, &mut cp);
        w.write_checkpoint(&cp).unwrap();
    };
    let mut checkpoints = (0..reader.checkpoints().len()).peekable();
    for e in events {
        // Checkpoints go in icount order between the events, as the recorder writes them.
        while let Some(cp) = checkpoints.next_if(|&c| reader.checkpoints()[c].at <= e.at) {
            write(&mut w, cp);
        }
        w.push(e).unwrap();
    }
    for cp in checkpoints {
        write(&mut w, cp);
    }
    w.finish(reader.summary().unwrap()).unwrap();
}

/// Records echo.elf with the landmark clock, fed three lines ending in `quit`, into `dir`.
pub fn record_echo_landmark(dir: &Path) -> (PathBuf, Output) {
    let input = dir.join("input.txt");
    std::fs::write(&input, "first\nsecond\nquit\n").unwrap();
    record(
        dir,
        "echo",
        &[
            "--clock",
            "landmark",
            "--serial-input",
            input.to_str().unwrap(),
        ],
    )
}

/// Asserts that `needles` occur in `haystack` in this order.
pub fn assert_in_order(haystack: &str, needles: &[&str]) {
    let mut rest = haystack;
    for needle in needles {
        match rest.find(needle) {
            Some(at) => rest = &rest[at + needle.len()..],
            None => panic!("expected {needle:?} (after the previous expectations) in:\n{haystack}"),
        }
    }
}

/// Busy loops in child processes, killed when dropped.
pub struct Hogs(Vec<std::process::Child>);

impl Hogs {
    /// `per_core` busy loops for every online CPU.
    pub fn start(per_core: usize) -> Hogs {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let hogs = (0..cores * per_core)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("cannot start a CPU hog (sh)")
            })
            .collect();
        Hogs(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

/// Time for a machine driven by hand (a test that drives `machine` itself): it advances a little at
/// every reading.
pub struct Clockwork(pub u64);

impl devices::TimeSource for Clockwork {
    fn monotonic_ns(&mut self) -> u64 {
        self.0 += 1_000;
        self.0
    }
    fn wall_ns(&mut self) -> u64 {
        1_767_225_600_000_000_000 + self.monotonic_ns()
    }
}

impl machine::Host for Clockwork {
    fn host_value(&mut self, _: machine::HostInsn) -> (u64, u64) {
        (self.0, 0)
    }
}

/// The machine configuration of a test that drives `machine` itself: one vCPU, 32 MiB, host values
/// hidden and trapped as the landmark clock records.
pub fn machine_config(cmdline: &str) -> machine::MachineConfig {
    machine::MachineConfig {
        ram_bytes: 32 << 20,
        cmdline: cmdline.into(),
        initrd: None,
        disks: Vec::new(),
        hide_host_values: true,
        cpuid: None,
        cpu: machine::CpuModel::Portable,
        answer_cpuid: true,
        trap_host_insns: true,
        cpus: 1,
        cold_checkpoints: true,
    }
}
