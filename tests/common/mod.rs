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

/// The exit status of a finished process.
pub fn status(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Lossy text of a byte buffer, for assertions and messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Records `guest` with extra args into `dir/name.rvt`; asserts retrovisor itself did not fail.
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
    let r = replay(trace, &[]);
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
