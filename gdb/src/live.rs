//! Going live: from where a replay stands, a second machine in the same state runs on the host's inputs
//! (serial input, the host clock going on from the guest's), optionally recorded into a new trace that
//! names where it branched. The replay itself is left as it was, and its trace is never changed.

use machine::Machine;
use recorder::{LiveRecording, LiveStart, Pass, RecordError, SerialInput, Session, TimeSourceKind};
use replayer::search::{StopSet, Watch};
use replayer::{ReplayError, Replayer};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;
use traces::{BranchPoint, StopReason, TimeMode};

/// Errors from going live.
#[derive(Debug, Error)]
pub enum LiveError {
    /// The replay's machine cannot be copied.
    #[error("cannot copy the replay's machine to go live: {0}")]
    Fork(#[from] ReplayError),
    /// The live run cannot start (its trace cannot be created, say).
    #[error("cannot go live: {0}")]
    Start(#[from] RecordError),
}

/// What a live run takes besides the replay: where its serial input comes from, and where to record it.
#[derive(Default)]
pub struct LiveSetup {
    /// Serial input from now on (taken by the first go-live).
    pub serial_input: Option<SerialInput>,
    /// Record the live run into this new trace directory (`--go-live-record`).
    pub record: Option<PathBuf>,
    /// The trace being replayed, as the user named it (the new trace's header names it).
    pub trace: PathBuf,
}

/// Starts a live run from where `replay` stands, recorded into `record` if given.
pub fn start(
    replay: &Replayer,
    trace: &Path,
    serial_input: SerialInput,
    record: Option<&Path>,
) -> Result<Session, LiveError> {
    let fork = replay.fork()?;
    let header = replay.trace().header();
    let time = match header.time_mode {
        TimeMode::Host => TimeSourceKind::Host,
        TimeMode::Virtual => TimeSourceKind::Virtual,
    };
    let record = record.map(|dir| LiveRecording {
        dir: dir.to_path_buf(),
        header: recorder::branch_header(
            header,
            BranchPoint {
                trace: trace.display().to_string(),
                trace_created_unix_secs: header.created_unix_secs,
                position: replay.position().to_string(),
            },
        ),
        image: fork.image,
        disks: fork.disks,
        initrd: fork.initrd,
    });
    Ok(recorder::go_live(LiveStart {
        machine: fork.machine,
        time_ns: fork.time_ns,
        time,
        serial_input,
        checkpoint_every: header.checkpoint_every,
        record,
    })?)
}

/// Why a live run stopped for gdb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LiveStop {
    /// At a breakpoint (this rip), before it.
    Breakpoint(u64),
    /// A watched range changed.
    Watch(Watch),
    /// After one instruction (or a range step's last).
    Stepped,
    /// gdb asked (Ctrl-C).
    Interrupted,
    /// The guest ended the run; what the user is told (the trace it went into).
    Ended(StopReason, String),
}

/// A live run under gdb: the session while it goes, and where it branched from.
pub(crate) struct LiveRun {
    session: Option<Session>,
    /// Where it branched from, as the user reads it.
    pub(crate) from: String,
    /// The trace it is recorded into, if it is.
    pub(crate) record: Option<PathBuf>,
}

/// How many breakpoints a free-running live run can hold: the debug registers, less the one the
/// recorder arms at loop exits.
const MAX_LIVE_BREAKPOINTS: usize = 3;

impl LiveRun {
    /// A live run of `session`, branched at `from`.
    pub(crate) fn new(session: Session, from: String, record: Option<PathBuf>) -> LiveRun {
        LiveRun {
            session: Some(session),
            from,
            record,
        }
    }

    /// The machine (None once the run ended).
    pub(crate) fn machine(&self) -> Option<&Machine> {
        self.session.as_ref().map(Session::machine)
    }

    /// The machine to write to, or why not.
    pub(crate) fn machine_mut(&mut self) -> Result<&mut Machine, &'static str> {
        let recorded = self.record.is_some();
        let session = self.session.as_mut().ok_or("the live run has ended")?;
        session.machine_mut().ok_or(if recorded {
            "the live run is recorded from its first instruction on, so writes after that would be missing \
             from the recording: write before the first continue or step"
        } else {
            "the live run cannot be changed now"
        })
    }

    /// Runs on: to a breakpoint or a change of a watched range, one instruction (`step`), out of
    /// `range`, or until gdb interrupts or the guest ends the run.
    pub(crate) fn run(
        &mut self,
        stops: &StopSet,
        motion: LiveMotion,
        out: &mut dyn Write,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<LiveStop, RecordError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(LiveStop::Interrupted);
        };
        let breakpoints: Vec<u64> = stops.breakpoints.iter().copied().collect();
        // Watched ranges, and free runs with more breakpoints than debug registers, go by single
        // steps, looking at every instruction.
        let by_steps = motion != LiveMotion::Continue
            || !stops.watches.is_empty()
            || breakpoints.len() > MAX_LIVE_BREAKPOINTS;
        session.set_breakpoints(if by_steps { &[] } else { &breakpoints });
        let watched = |m: &Machine| -> Vec<Option<Vec<u8>>> {
            stops
                .watches
                .iter()
                .map(|w| {
                    let mut buf = vec![0; w.len as usize];
                    m.read_virtual(w.addr, &mut buf).ok().map(|()| buf)
                })
                .collect()
        };
        let mut first = true;
        loop {
            if !first && interrupted() {
                return Ok(LiveStop::Interrupted);
            }
            let rip = session.machine().rip();
            // From a breakpoint it stands on, the first instruction goes by a single step: resuming
            // onto an armed breakpoint would stop there again.
            let step = by_steps || (first && breakpoints.contains(&rip));
            let before = (!stops.watches.is_empty()).then(|| watched(session.machine()));
            let pass = session.pass(out, step)?;
            first = false;
            match pass {
                Pass::Stopped(stop) => return self.end(stop),
                Pass::Breakpoint(rip) => return Ok(LiveStop::Breakpoint(rip)),
                Pass::Went => {}
            }
            let m = session.machine();
            if let Some(before) = before {
                let after = watched(m);
                let hit = stops
                    .watches
                    .iter()
                    .zip(before.iter().zip(&after))
                    .find(|(_, (b, a))| b.is_some() && a.is_some() && b != a);
                if let Some((w, _)) = hit {
                    return Ok(LiveStop::Watch(*w));
                }
            }
            match motion {
                LiveMotion::Step => return Ok(LiveStop::Stepped),
                LiveMotion::Range(start, end) if !(start..end).contains(&m.rip()) => {
                    return Ok(LiveStop::Stepped)
                }
                _ => {}
            }
            if step && breakpoints.contains(&m.rip()) {
                return Ok(LiveStop::Breakpoint(m.rip()));
            }
        }
    }

    /// Ends the run for `stop`: its trace gets its end. Says what happened.
    pub(crate) fn end(&mut self, stop: StopReason) -> Result<LiveStop, RecordError> {
        let Some(session) = self.session.take() else {
            return Ok(LiveStop::Ended(stop, String::new()));
        };
        let outcome = session.finish(stop)?;
        let told = match &self.record {
            Some(dir) => format!(
                "retrovisor: the live run ended ({stop:?}) after {} checkpoint(s); it is recorded in {}: \
                 `retrovisor replay {}` replays it, --gdb to debug it backwards\n",
                outcome.checkpoints,
                dir.display(),
                dir.display()
            ),
            None => format!("retrovisor: the live run ended ({stop:?})\n"),
        };
        Ok(LiveStop::Ended(stop, told))
    }

    /// Whether the run goes on.
    pub(crate) fn running(&self) -> bool {
        self.session.is_some()
    }
}

/// How a live run moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveMotion {
    /// Until something stops it.
    Continue,
    /// One instruction.
    Step,
    /// While rip stays in `start..end`.
    Range(u64, u64),
}
