//! Measures what a gdb user waits for when going backward through a trace: `reverse-stepi` (median and
//! worst over 100 steps back from the middle and from the end of the recording) and `reverse-continue` to a
//! breakpoint against how far back it is. It drives [`replayer::search`] directly, as the gdb target does,
//! without the protocol round trip (a few tens of microseconds on loopback). A step trace: its positions
//! are instruction counts.
//!
//! ```text
//! retrovisor record --kernel demo.elf -o demo.rvt --checkpoint-every 5000
//! cargo run --release -p gdb --example latency -- demo.rvt
//! ```

use replayer::search::{self, Outcome, StopSet};
use replayer::{Position, Timeline};
use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args_os().skip(1);
    let trace = PathBuf::from(args.next().ok_or("usage: latency TRACE [IMAGE]")?);
    let image = args.next().map(PathBuf::from);
    let mut r = Timeline::open(&trace, image.as_deref())?;
    let out = &mut std::io::sink();
    let end = r.replay().end().count();
    println!(
        "{}: {end} instructions, {} checkpoints every {} instructions",
        trace.display(),
        r.replay().trace().checkpoints().len(),
        r.replay().trace().header().checkpoint_every
    );
    let none = StopSet::default();
    for start in [end / 40, end / 2, end] {
        r.seek(Position::at(start), out)?;
        let mut times = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            search::step_backward(&mut r, &none, out)?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "reverse-stepi x100 back from icount {start}: median {:.2} ms, worst {:.2} ms",
            millis(times[times.len() / 2]),
            millis(times[times.len() - 1])
        );
    }
    // Where each address last runs: a breakpoint there is hit exactly that far back from the end.
    r.seek(Position::START, out)?;
    let mut last_run = std::collections::BTreeMap::new();
    while r.position().count() < end {
        last_run.insert(r.replay().machine().rip(), r.position().count());
        r.step(out)?;
    }
    for back in [10, 100, 1_000, 5_000, 20_000, 50_000] {
        let Some((&rip, &at)) = last_run
            .iter()
            .min_by_key(|(_, &at)| at.abs_diff(end.saturating_sub(back)))
        else {
            continue;
        };
        let stops = StopSet {
            breakpoints: [rip].into(),
            watches: Vec::new(),
        };
        r.seek(Position::at(end), out)?;
        let t = Instant::now();
        let outcome = search::run_backward(&mut r, &stops, out, &mut || false)?;
        let took = t.elapsed();
        assert!(
            outcome == Outcome::Hit(search::Hit::Breakpoint(rip))
                && r.position() == Position::at(at),
            "{outcome:?} at {}",
            r.position().count()
        );
        println!(
            "reverse-continue to a breakpoint {} instructions back: {:.1} ms",
            end - at,
            millis(took)
        );
    }
    r.seek(Position::at(end), out)?;
    let t = Instant::now();
    search::run_backward(&mut r, &none, out, &mut || false)?;
    println!(
        "reverse-continue with no breakpoint (to icount 0): {:.1} ms",
        millis(t.elapsed())
    );
    let watch_guard = StopSet {
        breakpoints: Default::default(),
        watches: vec![search::Watch {
            addr: 0x100d60,
            len: 4,
            access: search::Access::Write,
        }],
    };
    r.seek(Position::at(end), out)?;
    let t = Instant::now();
    let outcome = search::run_backward(&mut r, &watch_guard, out, &mut || false)?;
    println!(
        "reverse-continue with a write watchpoint on 0x100d60 (demo.elf's guard): {:?} at icount {}, {:.1} ms",
        outcome,
        r.position().count(),
        millis(t.elapsed())
    );
    Ok(())
}
