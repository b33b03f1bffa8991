//! `retrovisor calls`: every call of a function over a whole recording, from the command line, for
//! scripts and CI: what gdb's `monitor calls` answers, as text or JSON.

use gdb::calls::{self as listing, Function};
use indicatif::{ProgressBar, ProgressStyle};
use replayer::timeline::calls::{self, Progress};
use replayer::{ReplayError, Timeline};
use std::io::IsTerminal;
use std::path::PathBuf;
use thiserror::Error;

/// Arguments of `retrovisor calls`.
#[derive(clap::Args)]
pub struct CallsArgs {
    /// Trace directory written by `record`.
    trace: PathBuf,
    /// The function: a name from the guest image's symbols, or an address (0x1234).
    function: String,
    /// List at most this many calls (their returns are still looked for).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    limit: u64,
    /// Print one JSON document instead of text: the function, its parameters, and each call's position
    /// (as `replay --to` and rv-seek take it), vCPU, arguments, stack pointer and return.
    #[arg(long)]
    json: bool,
    /// Replay a landmark trace with another clock: `step` single-steps the whole recording (slow; the same
    /// calls, at instruction counts, which is the check that the search skips nothing).
    #[arg(long, value_enum)]
    clock: Option<crate::clock_arg::ClockArg>,
    /// Guest image to replay with instead of the path stored in the trace (its hash must match).
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
    /// The ELF whose symbols and DWARF name the function and its parameters, if not the guest image (the
    /// ELF64 build with symbols of a 32-bit container image, for example).
    #[arg(long, value_name = "ELF")]
    symbols: Option<PathBuf>,
}

/// What can stop a listing.
#[derive(Debug, Error)]
pub enum CallsCliError {
    /// The trace cannot be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The search failed (a divergence, an unreachable position).
    #[error(transparent)]
    Search(#[from] replayer::search::SearchError),
    /// The image with the symbols cannot be read.
    #[error("cannot read {path} for its symbols: {source}")]
    Symbols {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The function is not in the image.
    #[error(transparent)]
    Function(#[from] gdb::calls::CallsError),
    /// Standard output cannot be written.
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
}

/// Runs `retrovisor calls`; exit status 0, or 130 if interrupted (the calls found are printed).
pub fn run(a: &CallsArgs) -> Result<i32, CallsCliError> {
    let mut timeline = Timeline::open(&a.trace, a.kernel.as_deref())?;
    if let Some(clock) = a.clock {
        timeline.set_clock(clock.clock())?;
    }
    if timeline.replay().positions() == machine::Clock::Landmark {
        // A call is found at the instruction, within its landmark, as gdb finds it.
        timeline.step_within_landmarks()?;
    }
    let image_path = a
        .symbols
        .clone()
        .or_else(|| a.kernel.clone())
        .unwrap_or_else(|| PathBuf::from(&timeline.replay().trace().header().image_path));
    let image = std::fs::read(&image_path).map_err(|source| CallsCliError::Symbols {
        path: image_path.clone(),
        source,
    })?;
    let symbols = boot::symbols::Symbols::from_elf(&image);
    let f = Function::find(&image, &symbols, &a.function)?;
    let limit = usize::try_from(a.limit).unwrap_or(usize::MAX);
    let bar = progress_bar(timeline.replay().end().count());
    recorder::install_stop_handlers();
    let mut poll = |p: Progress| {
        bar.set_position(p.position.count());
        bar.set_message(format!("{} call(s)", p.calls));
        recorder::stop_requested()
    };
    let (found, end) = calls::calls(
        &mut timeline,
        &f.query(limit),
        &mut std::io::sink(),
        &mut poll,
    )?;
    bar.finish_and_clear();
    let text = if a.json {
        listing::json(&f, &found, end)
    } else {
        listing::text(&f, timeline.replay(), &found, end, limit).join("\n")
    };
    println_checked(&text)?;
    Ok(match end {
        replayer::search::ListingEnd::Interrupted => 130,
        _ => 0,
    })
}

fn println_checked(text: &str) -> Result<(), CallsCliError> {
    use std::io::Write;
    writeln!(std::io::stdout(), "{text}").map_err(CallsCliError::Output)
}

/// A bar over the recording's positions on stderr, when stderr is a terminal.
fn progress_bar(end: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(end);
    bar.set_style(
        ProgressStyle::with_template("searching [{bar:40}] {pos}/{len} ({msg}), {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
