//! `retrovisor timeline`: a picture of a recording over its positions, as an SVG file. One lane per kind
//! of input (interrupts by vector, IRQ edges by line, serial input, clock reads, host values, kicks), the
//! checkpoints, the lines the guest printed (found by replaying the trace), and where a replay diverged.

mod replay;
mod svg;

use replay::{OutputLine, Verdict};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;
use traces::{EventKind, HostInsn, TraceReader};

use crate::words;

/// Arguments of `retrovisor timeline`.
#[derive(clap::Args)]
pub struct TimelineArgs {
    /// Trace directory written by `record`.
    trace: PathBuf,
    /// SVG file to write (replaced if it exists).
    #[arg(short, long, value_name = "SVG")]
    output: PathBuf,
    /// Guest image to replay with instead of the path stored in the trace (its hash must match).
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
    /// Draw only what the trace holds, without replaying it: fast on long recordings, but with no
    /// guest output lane and no check for a divergence.
    #[arg(long)]
    no_replay: bool,
}

/// What can stop a timeline from being drawn.
#[derive(Debug, Error)]
pub enum TimelineError {
    /// The trace cannot be read.
    #[error(transparent)]
    Trace(#[from] traces::ReadError),
    /// The SVG file cannot be written.
    #[error("cannot write the timeline to {path}: {source}")]
    Write {
        /// The output path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One row of the picture: the events of one kind (and vector or line).
pub struct Lane {
    /// The event kind it shows ([`EventKind::name`], `checkpoint` or `output`): its colour and legend entry.
    pub kind: &'static str,
    /// What distinguishes it from other lanes of its kind (a vector, an IRQ line), if anything.
    pub key: Option<String>,
    /// Its label on the left.
    pub label: String,
    /// Its marks, in position order.
    pub marks: Vec<Mark>,
}

/// One event in a lane.
pub struct Mark {
    /// Where it happened.
    pub position: u64,
    /// What a tooltip says about it.
    pub detail: String,
    /// Drawn taller: a full checkpoint among incremental ones.
    pub tall: bool,
}

/// Everything the picture shows, in the trace's positions.
pub struct Picture {
    /// The trace's directory name.
    pub trace_name: String,
    /// The guest image's file name.
    pub guest_name: String,
    /// The clock the header names.
    pub clock: String,
    /// `--time` as the command line spells it.
    pub time: &'static str,
    /// What a position is called: "icount" or "landmark".
    pub unit: &'static str,
    /// What positions count, in the plural.
    pub counted: &'static str,
    /// What the axis means, in a few words.
    pub axis_meaning: &'static str,
    /// The last position of the recording.
    pub end: u64,
    /// Events in the trace (the stop included).
    pub events: usize,
    /// How the recording ended.
    pub ended: String,
    /// The lanes, top to bottom.
    pub lanes: Vec<Lane>,
    /// The guest's output lines (empty without a replay).
    pub output: Vec<OutputLine>,
    /// How the replay went.
    pub verdict: Verdict,
}

/// Writes the timeline of `a.trace` to `a.output`; prints one line saying what it drew.
pub fn run(a: &TimelineArgs) -> Result<i32, TimelineError> {
    let trace = TraceReader::open(&a.trace)?;
    let replayed = if a.no_replay {
        None
    } else {
        Some(replay::replay(&a.trace, a.kernel.as_deref()))
    };
    for notice in replayed.iter().flat_map(|r| &r.notices) {
        words::say(format_args!("retrovisor: warning: {notice}"));
    }
    let picture = picture(&trace, replayed);
    std::fs::write(&a.output, svg::render(&picture)).map_err(|source| TimelineError::Write {
        path: a.output.clone(),
        source,
    })?;
    let verdict = match &picture.verdict {
        Verdict::Matched => "the replay matched the recording".to_string(),
        Verdict::CutOff => "replayed to where the recording was cut off".to_string(),
        Verdict::Diverged { position, .. } => {
            format!(
                "the replay diverged at {} {position} (marked in red)",
                picture.unit
            )
        }
        Verdict::Failed(why) => format!("not replayed: {why}"),
        Verdict::Skipped => "not replayed (--no-replay)".to_string(),
    };
    words::say(format_args!(
        "retrovisor: wrote {}: {} lanes over {} {}, {} events, {} output lines; {verdict}",
        a.output.display(),
        picture.lanes.len(),
        picture.end,
        picture.counted,
        picture.events,
        picture.output.len(),
    ));
    Ok(0)
}

/// Gathers the lanes from the trace and what the replay found.
fn picture(trace: &TraceReader, replayed: Option<replay::Replayed>) -> Picture {
    let h = trace.header();
    let clock = words::clock_of(h);
    let end = trace
        .summary()
        .map(|s| s.end)
        .unwrap_or_else(|| trace.complete_upto());
    let (output, verdict) = match replayed {
        Some(r) => (r.lines, r.verdict),
        None => (Vec::new(), Verdict::Skipped),
    };
    let mut lanes = Vec::new();
    if !output.is_empty() {
        lanes.push(Lane {
            kind: "output",
            key: None,
            label: "guest output".into(),
            marks: output
                .iter()
                .map(|l| Mark {
                    position: l.position,
                    detail: format!("printed: {}", shorten(&l.text, 100)),
                    tall: false,
                })
                .collect(),
        });
    }
    lanes.extend(event_lanes(trace));
    lanes.push(Lane {
        kind: "checkpoint",
        key: None,
        label: "checkpoints".into(),
        marks: trace
            .checkpoints()
            .iter()
            .map(|c| Mark {
                position: c.at,
                detail: format!(
                    "{} checkpoint, rip {:#x}",
                    if c.full { "full" } else { "incremental" },
                    c.rip
                ),
                tall: c.full,
            })
            .collect(),
    });
    Picture {
        trace_name: file_name(trace.dir()),
        guest_name: file_name(Path::new(&h.image_path)),
        clock: h.clock.clone(),
        time: words::time_mode(&h.time_mode),
        unit: words::unit(clock),
        counted: words::counted_by(&h.clock),
        axis_meaning: match clock {
            Some(machine::Clock::Landmark) if h.clock == machine::Landmarks::PMU_CLOCK => {
                "conditional branches the guest retired since boot"
            }
            Some(machine::Clock::Landmark) => "exits the guest caused since boot",
            _ => "instructions retired since boot",
        },
        end: end.max(trace.events().last().map_or(0, |e| e.at)),
        events: trace.events().len(),
        ended: match trace.summary() {
            Some(s) => format!("guest {}", words::describe_stop(&s.stop)),
            None => "cut off (no clean end)".into(),
        },
        lanes,
        output,
        verdict,
    }
}

/// The lanes of the event stream: one per interrupt vector and per IRQ line, one for each other kind
/// that occurs. The stop is not a lane: it is the end of the axis.
fn event_lanes(trace: &TraceReader) -> Vec<Lane> {
    // Keyed by (order of the kind in the picture, vector or line) so lanes come out sorted.
    let mut lanes: BTreeMap<(u8, u16), Lane> = BTreeMap::new();
    for e in trace.events() {
        // (where its lanes go, which lane of its kind, that lane's key as text, what the event says)
        let (order, key, key_text, detail) = match &e.kind {
            EventKind::SerialRx { bytes } => (
                0,
                0,
                None,
                format!(
                    "{} bytes received: {:?}",
                    bytes.len(),
                    shorten(&String::from_utf8_lossy(bytes), 40)
                ),
            ),
            EventKind::Interrupt { vector } => (
                1,
                u16::from(*vector),
                Some(format!("{vector:#x}")),
                format!("vector {vector:#x} injected"),
            ),
            EventKind::Irq { line } => (
                2,
                u16::from(*line),
                Some(line.to_string()),
                format!("edge on IRQ line {line}"),
            ),
            EventKind::Clock { kind, ns } => (
                3,
                0,
                None,
                format!(
                    "{} clock read: {ns} ns",
                    match kind {
                        traces::ClockKind::Monotonic => "monotonic",
                        traces::ClockKind::Wall => "wall",
                    }
                ),
            ),
            EventKind::HostValue { insn, value, .. } => {
                (4, 0, None, format!("{} gave {value:#x}", insn_name(*insn)))
            }
            EventKind::Kick { fingerprint } => {
                (5, 0, None, format!("kicked at rip {:#x}", fingerprint.rip))
            }
            // A lane per vCPU: a mark where it takes over (it runs until the next mark on another lane).
            EventKind::Switch { cpu } => (
                6,
                u16::from(*cpu),
                Some(cpu.to_string()),
                format!("vCPU {cpu} takes over"),
            ),
            EventKind::ApicTimer { cpu, ns } => (
                7,
                u16::from(*cpu),
                Some(cpu.to_string()),
                format!("vCPU {cpu}'s APIC timer expires ({ns} ns)"),
            ),
            EventKind::Stop { .. } => continue,
        };
        let kind = e.kind.name();
        let lane = lanes.entry((order, key)).or_insert_with(|| Lane {
            kind,
            label: match &key_text {
                Some(k) if kind == "interrupt" => format!("interrupt {k}"),
                Some(k) if kind == "switch" => format!("vCPU {k} runs"),
                Some(k) if kind == "apic_timer" => format!("vCPU {k} APIC timer"),
                Some(k) => format!("irq line {k}"),
                None => lane_label(kind).into(),
            },
            key: key_text,
            marks: Vec::new(),
        });
        lane.marks.push(Mark {
            position: e.at,
            detail: format!("{detail} (rip {:#x})", e.rip),
            tall: false,
        });
    }
    lanes.into_values().collect()
}

/// The label of a lane that shows all events of a kind.
fn lane_label(kind: &str) -> &'static str {
    match kind {
        "serial_rx" => "serial input",
        "clock" => "clock reads",
        "host_value" => "host values",
        "kick" => "kicks",
        _ => "other events",
    }
}

fn insn_name(insn: HostInsn) -> &'static str {
    match insn {
        HostInsn::Rdtsc => "RDTSC",
        HostInsn::Rdtscp => "RDTSCP",
        HostInsn::Rdrand => "RDRAND",
        HostInsn::Rdseed => "RDSEED",
    }
}

/// The last component of a path, for titles.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `text` cut to at most `max` characters, with an ellipsis when cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}
