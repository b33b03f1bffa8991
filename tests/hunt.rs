//! `retrovisor hunt`: chaos recordings of the race guest on every core, seed after seed. A range of
//! seeds is a shard: two shards record exactly what one run over both ranges records (the step clock
//! and a guest without timers make a seed's recording the same every time). Failing recordings replay
//! to their failure, and `diff` finds where a passing and a failing one part.

mod common;
use common::*;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `retrovisor hunt` of the race guest over `seeds`, failing on status 3 (an update was lost), into
/// `dir`, with `extra` hunt options; its status and JSON report.
fn hunt(dir: &Path, seeds: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let kernel = guest("smprace");
    let mut args = vec![
        "hunt",
        "--seeds",
        seeds,
        "--fail-status",
        "3",
        "--json",
        "-o",
        s(dir),
    ];
    args.extend_from_slice(extra);
    args.extend([
        "--",
        "--kernel",
        s(&kernel),
        "--cpus",
        "2",
        "--clock",
        "step",
        "--cmdline",
        "iters=1500",
    ]);
    let out = rv(&args);
    let code = status(&out);
    assert!(
        code == 0 || code == 1,
        "hunt failed ({code}): {}",
        text(&out.stderr)
    );
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("hunt --json printed no JSON ({e}): {}", text(&out.stdout)));
    (code, report)
}

/// (seed, status, failed) of every recording in a report.
fn outcomes(report: &serde_json::Value) -> Vec<(u64, i64, bool)> {
    report["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["seed"].as_u64().unwrap(),
                r["status"].as_i64().unwrap(),
                r["failed"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn events(trace: &Path) -> Vec<traces::Event> {
    traces::TraceReader::open(trace).unwrap().events().to_vec()
}

#[test]
fn two_shards_record_what_one_hunt_over_both_ranges_records() {
    let dir = scratch("hunt-shards");
    let (whole, a, b) = (dir.join("whole"), dir.join("a"), dir.join("b"));
    let (code, report) = hunt(&whole, "0..6", &["--all", "--keep-passing", "6"]);
    let all = outcomes(&report);
    assert_eq!(
        all.iter().map(|o| o.0).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    let failed = all.iter().filter(|o| o.2).count();
    assert_eq!(code, i32::from(failed > 0));
    assert!(failed > 0, "chaos mode lost no update in 6 seeds: {report}");
    assert_eq!(report["failed"], failed);
    assert_eq!(report["failure_rate"], failed as f64 / 6.0);
    for o in &all {
        assert_eq!(o.2, o.1 == 3, "seed {} has status {}", o.0, o.1);
    }
    let (_, first) = hunt(&a, "0..3", &["--all", "--keep-passing", "6"]);
    let (_, second) = hunt(&b, "3..6", &["--all", "--keep-passing", "6"]);
    let sharded: Vec<_> = outcomes(&first)
        .into_iter()
        .chain(outcomes(&second))
        .collect();
    assert_eq!(
        sharded, all,
        "the shards' outcomes differ from the whole hunt's"
    );
    for seed in 0..6u64 {
        let shard = if seed < 3 { &a } else { &b };
        let name = format!("seed-{seed}.rvt");
        assert_eq!(
            events(&whole.join(&name)),
            events(&shard.join(&name)),
            "seed {seed} recorded other events in its shard"
        );
        assert_eq!(
            std::fs::read(whole.join(format!("seed-{seed}.out"))).unwrap(),
            std::fs::read(shard.join(format!("seed-{seed}.out"))).unwrap()
        );
    }
    // Each shard wrote its report beside its recordings.
    assert!(a.join("hunt-0..3.json").is_file() && b.join("hunt-3..6.json").is_file());
}

#[test]
fn a_hunt_stops_at_the_first_failure_keeps_it_and_it_replays_to_the_lost_update() {
    let dir = scratch("hunt-first");
    let (code, report) = hunt(&dir, "0..40", &["--jobs", "2"]);
    assert_eq!(code, 1, "{report}");
    let all = outcomes(&report);
    let failing: Vec<u64> = all.iter().filter(|o| o.2).map(|o| o.0).collect();
    assert!(!failing.is_empty());
    // It stopped starting recordings after the first failure: at most the two running then finish.
    assert!(all.len() < 40, "it recorded every seed: {report}");
    assert!(failing.len() <= 2, "{report}");
    // The failing recordings are kept; of the passing ones, only the lowest seed's.
    let kept: Vec<u64> = all.iter().filter(|o| !o.2).map(|o| o.0).take(1).collect();
    for o in &all {
        let trace = dir.join(format!("seed-{}.rvt", o.0));
        assert_eq!(trace.is_dir(), o.2 || kept.contains(&o.0), "seed {}", o.0);
    }
    let failed = dir.join(format!("seed-{}.rvt", failing[0]));
    let replayed = replay(&failed, &[]);
    assert_eq!(status(&replayed), 3, "{}", text(&replayed.stderr));
    assert!(text(&replayed.stdout).contains("lost="));
    assert!(text(&replayed.stderr).contains("replay matched the recording"));
    assert_eq!(
        text(&replayed.stdout).as_bytes(),
        std::fs::read(dir.join(format!("seed-{}.out", failing[0]))).unwrap()
    );
    if let Some(passing) = kept.first() {
        let passing = dir.join(format!("seed-{passing}.rvt"));
        let out = rv(&["diff", s(&passing), s(&failed)]);
        assert_eq!(status(&out), 1, "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("They part at icount"),
            "{}",
            text(&out.stdout)
        );
    }
}

/// `retrovisor hunt --seeds SEEDS -o DIR -- RECORD` that must fail with status 2 and say `reason`.
fn refused(dir: &Path, seeds: &str, record: &[&str], reason: &str) {
    let mut args = vec!["hunt", "--seeds", seeds, "-o", s(dir), "--"];
    args.extend_from_slice(record);
    let out = rv(&args);
    assert_eq!(status(&out), 2, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(reason), "{}", text(&out.stderr));
}

#[test]
fn hunt_refuses_what_it_sets_itself_and_empty_ranges() {
    let dir = scratch("hunt-refuse");
    let kernel = guest("smprace");
    refused(
        &dir,
        "0..2",
        &["--kernel", s(&kernel), "--seed", "4"],
        "give --seed to hunt, not among the record arguments",
    );
    refused(&dir, "5..5", &["--kernel", s(&kernel)], "holds no seed");
    // A recording retrovisor itself cannot make ends the hunt with its reason.
    let missing = dir.join("missing.elf");
    refused(&dir, "0..2", &["--kernel", s(&missing)], "missing.elf");
}
