//! `retrovisor hunt`: records a guest in chaos mode with one seed after another, on every core, until
//! it fails; keeps the failing recordings (and a few passing ones, for `diff`) and reports the failure
//! rate. A range of seeds is a shard: a cluster's batch system (a Slurm job array, a Kubernetes indexed
//! Job, GNU parallel over ssh) runs one shard per task, with no scheduler of our own.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use thiserror::Error;

/// Arguments of `retrovisor hunt`.
#[derive(clap::Args)]
#[command(
    after_help = "Example: retrovisor hunt --seeds 0..200 --fail-status 3 -o hunt -- \
    --kernel smprace.elf --cpus 2\n\nA shard per task of a Slurm job array:\n  retrovisor hunt \
    --seeds $((SLURM_ARRAY_TASK_ID*100))..$(((SLURM_ARRAY_TASK_ID+1)*100)) --all -o \
    hunt/$SLURM_ARRAY_TASK_ID -- --kernel guest.elf --cpus 2"
)]
pub struct HuntArgs {
    /// The seeds to record with, `A..B` (B excluded): recording k uses chaos seed k, so a range is a
    /// shard, and two shards record exactly what one run over both ranges records.
    #[arg(long, value_name = "A..B", value_parser = parse_seeds)]
    seeds: (u64, u64),
    /// Directory for the recordings (`seed-N.rvt`, each with the guest's output beside it as
    /// `seed-N.out`) and the shard's report (`hunt-A..B.json`); created if missing.
    #[arg(short = 'o', long, value_name = "DIR")]
    output: PathBuf,
    /// A recording fails when retrovisor exits with this status (the guest's isa-debug-exit status
    /// `(v<<1)|1`, 6 for a triple fault, ...); may be given several times. Without it or
    /// --fail-output, any status but 0 (halted) and 1 (exit 0) fails.
    #[arg(long, value_name = "STATUS")]
    fail_status: Vec<i32>,
    /// A recording fails when the guest's serial output contains this text.
    #[arg(long, value_name = "TEXT")]
    fail_output: Option<String>,
    /// Stop starting recordings once this many have failed (the ones running finish).
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "all", value_parser = clap::value_parser!(u64).range(1..))]
    failures: u64,
    /// Record every seed of the range, whatever fails: a shard of a larger hunt.
    #[arg(long)]
    all: bool,
    /// Passing recordings to keep (those of the lowest seeds), to `diff` against a failing one.
    #[arg(long, value_name = "N", default_value_t = 1)]
    keep_passing: usize,
    /// Recordings at once (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    jobs: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// What to record, as `record` takes it (after `--`): the guest and machine, such as `--kernel
    /// smprace.elf --cpus 2`. hunt adds --chaos, --seed and -o.
    #[arg(last = true, required = true, value_name = "RECORD ARGS")]
    record: Vec<String>,
}

/// What can stop a hunt.
#[derive(Debug, Error)]
pub enum HuntError {
    /// The output directory cannot be made or written.
    #[error("cannot write {path}: {source}")]
    Output {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// retrovisor itself cannot be started again for a recording.
    #[error("cannot start a recording ({exe}): {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A recording failed for a reason of retrovisor's own (bad arguments, no KVM), not the guest's.
    #[error("the recording with seed {seed} failed: {message}")]
    Record {
        /// The seed.
        seed: u64,
        /// What retrovisor said.
        message: String,
    },
    /// The arguments after `--` already say what hunt sets.
    #[error("give {0} to hunt, not among the record arguments: hunt sets it for each recording")]
    Reserved(&'static str),
}

/// `A..B` with A < B.
fn parse_seeds(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range of seeds such as 0..100"))?;
    let number = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("{t:?} is not a seed (a number)"))
    };
    let (a, b) = (number(a)?, number(b)?);
    if a >= b {
        return Err(format!(
            "{s:?} holds no seed: the end is excluded, so it must be above the start"
        ));
    }
    Ok((a, b))
}

/// How one recording went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Passed,
    Failed,
}

/// One recording's result.
struct Recorded {
    seed: u64,
    status: i32,
    verdict: Verdict,
}

/// Exit status of a recording retrovisor itself could not make.
const EXIT_ERROR: i32 = 2;
/// Exit status of a recording stopped by Ctrl-C.
const EXIT_INTERRUPTED: i32 = 130;

fn trace_path(dir: &Path, seed: u64) -> PathBuf {
    dir.join(format!("seed-{seed}.rvt"))
}

fn output_path(dir: &Path, seed: u64) -> PathBuf {
    dir.join(format!("seed-{seed}.out"))
}

/// How one recording ended: its exit status, what it printed on stderr, and whether it failed.
type Ended = (i32, Vec<u8>, Verdict);

/// Records seed `seed` into `dir`, and judges it.
fn record_one(exe: &Path, args: &HuntArgs, seed: u64) -> Result<Ended, HuntError> {
    let out_path = output_path(&args.output, seed);
    let output = std::fs::File::create(&out_path).map_err(|source| HuntError::Output {
        path: out_path.clone(),
        source,
    })?;
    let done = Command::new(exe)
        .arg("record")
        .args(&args.record)
        .args(["--chaos", "--seed", &seed.to_string(), "-o"])
        .arg(trace_path(&args.output, seed))
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| HuntError::Spawn {
            exe: exe.to_path_buf(),
            source,
        })?;
    let status = done.status.code().unwrap_or(EXIT_INTERRUPTED);
    let output = std::fs::read(&out_path).unwrap_or_default();
    Ok((status, done.stderr, verdict(args, status, &output)))
}

/// Whether a recording that ended with `status` and printed `output` failed.
fn verdict(args: &HuntArgs, status: i32, output: &[u8]) -> Verdict {
    let by_status = args.fail_status.contains(&status);
    let by_output = args.fail_output.as_ref().is_some_and(|text| {
        !text.is_empty() && output.windows(text.len()).any(|w| w == text.as_bytes())
    });
    let by_default =
        args.fail_status.is_empty() && args.fail_output.is_none() && !matches!(status, 0 | 1);
    if by_status || by_output || by_default {
        Verdict::Failed
    } else {
        Verdict::Passed
    }
}

/// Runs `retrovisor hunt`: 1 when a recording failed, 0 when none did, 130 when interrupted.
pub fn run(args: &HuntArgs) -> Result<i32, HuntError> {
    for reserved in ["--chaos", "--seed", "-o", "--output"] {
        if args
            .record
            .iter()
            .any(|a| a == reserved || a.starts_with(&format!("{reserved}=")))
        {
            return Err(HuntError::Reserved(reserved));
        }
    }
    std::fs::create_dir_all(&args.output).map_err(|source| HuntError::Output {
        path: args.output.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| HuntError::Spawn {
        exe: PathBuf::from("retrovisor"),
        source,
    })?;
    recorder::install_stop_handlers();
    let jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        |j| j as usize,
    );
    let (first, end) = args.seeds;
    let next = Arc::new(AtomicU64::new(first));
    let stop = Arc::new(AtomicBool::new(false));
    // Failures so far, counted where each recording ends: a worker that records a failure stops the
    // others from starting one more before the next seed is drawn.
    let failures = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let mut results: BTreeMap<u64, Recorded> = BTreeMap::new();
    let mut error = None;
    std::thread::scope(|scope| {
        for _ in 0..jobs.min((end - first) as usize) {
            let (next, stop, failures, tx, exe) = (
                next.clone(),
                stop.clone(),
                failures.clone(),
                tx.clone(),
                &exe,
            );
            scope.spawn(move || loop {
                if stop.load(Ordering::SeqCst) || recorder::stop_requested() {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= end {
                    return;
                }
                let ended = record_one(exe, args, seed);
                let failed = ended.as_ref().is_ok_and(|(status, _, v)| {
                    *v == Verdict::Failed && !matches!(*status, EXIT_ERROR | EXIT_INTERRUPTED)
                });
                if failed
                    && failures.fetch_add(1, Ordering::SeqCst) + 1 >= args.failures
                    && !args.all
                {
                    stop.store(true, Ordering::SeqCst);
                }
                if tx.send((seed, ended)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        for (seed, done) in rx {
            let (status, stderr, verdict) = match done {
                Ok(done) => done,
                Err(e) => {
                    error.get_or_insert(e);
                    stop.store(true, Ordering::SeqCst);
                    continue;
                }
            };
            if status == EXIT_INTERRUPTED {
                stop.store(true, Ordering::SeqCst);
                continue;
            }
            if status == EXIT_ERROR {
                let message = String::from_utf8_lossy(&stderr).trim().to_string();
                error.get_or_insert(HuntError::Record { seed, message });
                stop.store(true, Ordering::SeqCst);
                continue;
            }
            if verdict == Verdict::Failed {
                eprintln!(
                    "retrovisor: hunt: seed {seed} failed (status {status}): {}",
                    trace_path(&args.output, seed).display()
                );
            }
            results.insert(
                seed,
                Recorded {
                    seed,
                    status,
                    verdict,
                },
            );
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    // Keep the failing recordings and the lowest-seeded passing ones.
    let mut kept_passing = Vec::new();
    for r in results.values().filter(|r| r.verdict == Verdict::Passed) {
        if kept_passing.len() < args.keep_passing {
            kept_passing.push(r.seed);
        } else {
            let _ = std::fs::remove_dir_all(trace_path(&args.output, r.seed));
            let _ = std::fs::remove_file(output_path(&args.output, r.seed));
        }
    }
    let interrupted = recorder::stop_requested();
    let report = report(args, &results, &kept_passing, interrupted);
    let report_path = args.output.join(format!("hunt-{first}..{end}.json"));
    std::fs::write(&report_path, report.to_string()).map_err(|source| HuntError::Output {
        path: report_path.clone(),
        source,
    })?;
    let text = if args.json {
        report.to_string()
    } else {
        summary(args, &results, &kept_passing)
    };
    let _ = writeln!(std::io::stdout(), "{text}");
    let failed = results.values().any(|r| r.verdict == Verdict::Failed);
    Ok(if interrupted {
        EXIT_INTERRUPTED
    } else if failed {
        1
    } else {
        0
    })
}

/// The shard's report: every seed recorded with its status and verdict, the failure rate, and which
/// recordings were kept.
fn report(
    args: &HuntArgs,
    results: &BTreeMap<u64, Recorded>,
    kept_passing: &[u64],
    interrupted: bool,
) -> serde_json::Value {
    let failed: Vec<u64> = results
        .values()
        .filter(|r| r.verdict == Verdict::Failed)
        .map(|r| r.seed)
        .collect();
    let path = |seed| trace_path(&args.output, seed).display().to_string();
    serde_json::json!({
        "seeds": format!("{}..{}", args.seeds.0, args.seeds.1),
        "recorded": results.len(),
        "failed": failed.len(),
        "failure_rate": rate(failed.len(), results.len()),
        "interrupted": interrupted,
        "recordings": results.values().map(|r| serde_json::json!({
            "seed": r.seed,
            "status": r.status,
            "failed": r.verdict == Verdict::Failed,
        })).collect::<Vec<_>>(),
        "failing_traces": failed.iter().map(|&s| path(s)).collect::<Vec<_>>(),
        "passing_traces": kept_passing.iter().map(|&s| path(s)).collect::<Vec<_>>(),
    })
}

fn rate(failed: usize, recorded: usize) -> f64 {
    if recorded == 0 {
        0.0
    } else {
        failed as f64 / recorded as f64
    }
}

fn summary(args: &HuntArgs, results: &BTreeMap<u64, Recorded>, kept_passing: &[u64]) -> String {
    let failed: Vec<&Recorded> = results
        .values()
        .filter(|r| r.verdict == Verdict::Failed)
        .collect();
    let mut out = vec![format!(
        "hunt: {} recording(s) of seeds {}..{}: {} failed ({:.1}%), {} passed",
        results.len(),
        args.seeds.0,
        args.seeds.1,
        failed.len(),
        100.0 * rate(failed.len(), results.len()),
        results.len() - failed.len()
    )];
    for r in &failed {
        out.push(format!(
            "  failed: seed {} (status {}): {}",
            r.seed,
            r.status,
            trace_path(&args.output, r.seed).display()
        ));
    }
    for &seed in kept_passing {
        out.push(format!(
            "  passed: seed {seed}: {}",
            trace_path(&args.output, seed).display()
        ));
    }
    if let (Some(f), Some(&p)) = (failed.first(), kept_passing.first()) {
        out.push(format!(
            "where they part: retrovisor diff {} {}",
            trace_path(&args.output, p).display(),
            trace_path(&args.output, f.seed).display()
        ));
    }
    out.join("\n")
}
