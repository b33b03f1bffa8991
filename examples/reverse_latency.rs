//! Reverse-execution latency on a recorded trace: reverse-stepi (seek to the previous instruction) at
//! random positions, and seeking back over growing distances. A step trace: its positions are
//! instruction counts.
//!
//! Usage: cargo run --release --example reverse_latency -- TRACE [STEPS]

use replayer::{Position, Timeline};
use std::time::Instant;

/// A small deterministic generator, so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let trace = args.next().ok_or("usage: reverse_latency TRACE [STEPS]")?;
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let mut r = Timeline::open(std::path::Path::new(&trace), None)?;
    let end = r.replay().end().count();
    let mut sink = std::io::sink();
    let t = Instant::now();
    r.run_to(Position::at(end), &mut sink)?;
    println!(
        "trace: {end} instructions, replayed in {:.2}s ({:.0} k instructions/s)",
        t.elapsed().as_secs_f64(),
        end as f64 / t.elapsed().as_secs_f64() / 1e3
    );

    // reverse-stepi at random positions: the user jumps somewhere, then steps back a few times.
    let mut rng = Lcg(42);
    let mut lat = Vec::new();
    while lat.len() < steps {
        let p = 1 + rng.below(end - 10);
        r.seek(Position::at(p + 5), &mut sink)?;
        for back in 1..=5 {
            let t = Instant::now();
            r.seek(Position::at(p + 5 - back), &mut sink)?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "reverse-stepi over {} steps at random positions: median {:.2} ms, p99 {:.2} ms, worst {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    // Consecutive reverse-stepi from one place (what a user stepping backward does).
    r.seek(Position::at(end / 2), &mut sink)?;
    let mut lat = Vec::new();
    for i in 1..=100 {
        let t = Instant::now();
        r.seek(Position::at(end / 2 - i), &mut sink)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "100 consecutive reverse-stepi: median {:.2} ms, p99 {:.2} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );

    // Seeking back over a distance (the cost a reverse-continue pays per interval it searches).
    for distance in [1_000u64, 10_000, 100_000, 1_000_000, 4_000_000] {
        if distance >= end {
            continue;
        }
        r.seek(Position::at(end), &mut sink)?;
        let t = Instant::now();
        r.seek(Position::at(end - distance), &mut sink)?;
        println!(
            "seek back {distance:>9} instructions: {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let (n, bytes) = r.snapshot_stats();
    println!(
        "snapshot cache: {n} snapshots, {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
