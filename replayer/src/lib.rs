//! Replay: rebuilds the recorded machine from the trace and the guest image alone, restores a checkpoint
//! and runs forward with every logged input re-applied at exactly its position. Any disagreement
//! between the replay and the log is a divergence, reported with its position and what differed.
//!
//! A [`Replayer`] goes forward only, checking the machine against the log; a [`Timeline`] drives one
//! to any position, backward too, and owns the searches ([`search`]).

pub mod diff;
mod log;
pub mod timeline;
pub mod verify;

use devices::disk::DiskImage;
pub use log::Divergence;
use log::LogHost;
use machine::{Advance, Clock, Landmarks, Machine, MachineConfig, MachineError, Search};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use thiserror::Error;
pub use timeline::{search, Timeline, DEFAULT_SNAPSHOT_MEMORY};
use traces::{Event, EventKind, StopReason, TraceReader};
pub use vocab::{Position, Shown};

// Readers refuse events this machine could not take (traces/FORMAT.md, "What events may say"):
// their limits must be this machine's.
const _: () = assert!(traces::IRQ_LINES == devices::pic::IRQ_LINES);
const _: () = assert!(traces::UART_RX_FIFO_BYTES == devices::serial::RX_FIFO_BYTES);

/// Errors from replay.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The trace cannot be read.
    #[error(transparent)]
    Trace(#[from] traces::ReadError),
    /// The trace's memory map is not the one this retrovisor gives a guest of that size.
    #[error("the trace's guest had the memory map {recorded:x?} (base, length, type), but this retrovisor builds {built:x?}: replay it with the retrovisor that recorded it")]
    MemoryMap {
        /// What the header says.
        recorded: Vec<(u64, u64, u32)>,
        /// What this build gives.
        built: Vec<(u64, u64, u32)>,
    },
    /// The guest image cannot be read.
    #[error("cannot read guest image {path}: {source}")]
    Image {
        /// The image path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The guest image is not the one recorded.
    #[error("guest image {path} is not the one this trace recorded (sha256 {found}, trace expects {expected})")]
    ImageMismatch {
        /// The image path.
        path: PathBuf,
        /// Its hash.
        found: String,
        /// The recorded hash.
        expected: String,
    },
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Replay and recording disagree.
    #[error(transparent)]
    Divergence(#[from] Divergence),
    /// The header names a clock this retrovisor does not know.
    #[error("the trace was recorded with clock {clock:?}, which this retrovisor does not know (it knows step and landmark)")]
    UnknownClock {
        /// The clock the header names.
        clock: String,
    },
    /// A step trace names its positions by instruction counts, which only the step clock finds.
    #[error("a trace recorded with the step clock replays only with the step clock")]
    StepTraceNeedsStepClock,
    /// Only a landmark trace has positions within landmarks.
    #[error("only a trace recorded with the landmark clock has positions within landmarks: a step trace's positions are instruction counts already")]
    NotALandmarkTrace,
    /// Guest output could not be written.
    #[error("cannot write guest output: {0}")]
    Output(std::io::Error),
    /// A checkpoint stores another state than the one the replay reached at it, though that state
    /// matches the digest the checkpoint records: restoring it would start from a wrong state.
    #[error("{}: checkpoint {index} ({position}) does not store the state the replay reached there, though that state matches the digest the checkpoint records: {what}; the file was damaged, altered or written wrong, and a replay from it would start from a wrong state", path.display())]
    CheckpointContent {
        /// The checkpoint file.
        path: PathBuf,
        /// Its index.
        index: usize,
        /// Its position, as the user reads it ("icount N", "landmark N").
        position: Shown,
        /// What differs.
        what: String,
    },
}

/// What a forward run stopped on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// Reached the requested position.
    Target,
    /// The recording ends here, with this reason (None: the trace was cut off here).
    End(Option<StopReason>),
}

/// A replay in progress, going forward.
pub struct Replayer {
    trace: TraceReader,
    /// The guest image given instead of the one the trace names, if one was.
    image_path: Option<PathBuf>,
    machine: Machine,
    host: LogHost,
    /// Where replay ends: the recording's last position.
    end: Position,
    /// Index of the next checkpoint whose digest to verify.
    next_verify: usize,
    /// Hash of all output printed since boot (None once a jump forward skipped some).
    output_hash: Option<Sha256>,
    /// Output of positions before this one has been printed already: after a jump back, re-executed
    /// instructions print nothing, so the user sees the guest's output once, in order.
    printed_upto: Position,
    finished: Option<Halt>,
    /// The trace position and the rip where the machine stood when it got there (or at the kick taken
    /// since): what the recorder tagged the values asked for until the next position with.
    anchor: (u64, u64),
    /// Problems worked around, for the user (see [`Replayer::take_notices`]).
    notices: Vec<String>,
    /// Whether kick points with a waypoint are jumped to rather than searched for (see
    /// [`Replayer::set_waypoints`]).
    waypoints: bool,
    /// Kick points reached by restoring their waypoint.
    waypoint_jumps: u64,
    /// The pages a search asked about last ([`Replayer::wrote_since_probe`]): a watch's page or two.
    probed: Vec<u64>,
    /// The count of the position the current run goes to: a counted run stops there (see
    /// [`Replayer::advance_machine`]).
    limit: u64,
    /// Whether the machine is where the replay put it without error: false from a failed step or restore
    /// until the next restore succeeds, since a failure can leave it anywhere (see [`Timeline::seek`]).
    intact: bool,
    /// The position the last step started from, or the last restore reached: the latest the replay
    /// reached intact (see [`Replayer::last_intact`]).
    last_intact: Position,
    /// The position of each checkpoint.
    checkpoint_positions: Vec<Position>,
    /// A landmark trace replayed with positions within landmarks: free running to a landmark,
    /// single-stepping from there.
    stepping_within: bool,
    /// With `stepping_within`: instructions stepped since the current landmark
    /// ([`Position::UNKNOWN_OFFSET`] after a free run stopped between landmarks).
    offset: u64,
    /// Which hardware stop of a free run fired (see [`Replayer::run_free_with`]).
    free_stop: Option<usize>,
    /// Reads the trace's checkpoints in order as the replay passes them, to compare what each stores
    /// with the machine (see [`Replayer::check_contents`]); None until the first restore.
    chain: Option<traces::ChainCursor>,
    /// By checkpoint index: whether what it stores has been compared with the machine (restored from
    /// it, or checked the first time the replay passed it).
    contents_checked: Vec<bool>,
    /// Checkpoints found unreadable, each said once in the notices (see [`Replayer::note_unreadable`]).
    unreadable: BTreeSet<usize>,
    progress: Option<Progress>,
}

/// What the replay needs, besides guest RAM, to resume at a position it passed: the machine's CPU and
/// device state, the pages written since the checkpoint before (what fingerprints digest), and where
/// it stood in the log.
pub(crate) struct ResumePoint {
    at: Position,
    state: Vec<u8>,
    dirty_since_checkpoint: Vec<u64>,
    cursor: usize,
    anchor: (u64, u64),
}

impl ResumePoint {
    /// Bytes of state it holds.
    pub(crate) fn state_bytes(&self) -> usize {
        self.state.len()
    }

    /// A resume point holding `state` alone, for the snapshot cache's tests.
    #[cfg(test)]
    pub(crate) fn for_test(at: Position, state: Vec<u8>) -> ResumePoint {
        ResumePoint {
            at,
            state,
            dirty_since_checkpoint: Vec::new(),
            cursor: 0,
            anchor: (0, 0),
        }
    }
}

/// A second machine in the state a replay stands in, to run on live from there (see [`Replayer::fork`]),
/// with what a recording of that run keeps besides: the trace's guest image, disk and initrd copies.
pub struct Fork {
    /// The machine, with the trace's clock.
    pub machine: Machine,
    /// The guest image (checked against the trace's hash).
    pub image: Vec<u8>,
    /// The disk images the recording started with (its copies: the guest's writes since are in the
    /// machine's overlays).
    pub disks: Vec<Vec<u8>>,
    /// The initrd, if the machine has one.
    pub initrd: Option<Vec<u8>>,
    /// The guest's monotonic time at the position, as far as the recording read it (its last reading):
    /// where a live run's clock goes on from.
    pub time_ns: u64,
}

/// A progress callback: (current position, target position).
pub type Progress = Box<dyn FnMut(Position, Position)>;

/// How often (in positions) long runs report progress.
const PROGRESS_EVERY: u64 = 16_384;

/// Opens the guest image named in the trace header (or `image` if given) and checks its hash.
fn load_image(trace: &TraceReader, image: Option<&Path>) -> Result<Vec<u8>, ReplayError> {
    let path = image
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(&trace.header().image_path));
    // Only a regular file of a plausible size: a FIFO would block, a device would read forever.
    let bytes = traces::read_regular_file(&path, traces::MAX_IMAGE_BYTES).map_err(|source| {
        ReplayError::Image {
            path: path.clone(),
            source,
        }
    })?;
    let found = traces::sha256_hex(&bytes);
    if found != trace.header().image_sha256 {
        return Err(ReplayError::ImageMismatch {
            path,
            found,
            expected: trace.header().image_sha256.clone(),
        });
    }
    Ok(bytes)
}

/// Builds the machine the trace was recorded on, with `image` (checked against the header's hash)
/// loaded: what replay checks before it restores anything. Disks and initrd come from the trace's own
/// hashed copies; the header's clock, memory map, command line and CPUID must be ones this machine
/// takes.
fn build_machine(trace: &TraceReader, image: &[u8]) -> Result<Machine, ReplayError> {
    let h = trace.header();
    // Disks come from the trace's own hashed copies, never from the user's image files.
    let disks = (0..h.disks.len())
        .map(|i| {
            let path = PathBuf::from(&h.disks[i].path);
            trace.read_disk(i).map(|bytes| DiskImage::new(bytes, path))
        })
        .collect::<Result<_, _>>()?;
    let clock = Clock::from_name(&h.clock).ok_or_else(|| ReplayError::UnknownClock {
        clock: h.clock.clone(),
    })?;
    let landmarks = Landmarks::of_clock(&h.clock);
    let map = memory::pc_memory_map(h.machine.ram_bytes);
    if !h.machine.memory_map.is_empty() && h.machine.memory_map != map {
        return Err(ReplayError::MemoryMap {
            recorded: h.machine.memory_map.clone(),
            built: map.to_vec(),
        });
    }
    let config = MachineConfig {
        ram_bytes: h.machine.ram_bytes,
        cmdline: h.machine.cmdline.clone(),
        // Like the disks, from the trace's own hashed copy.
        initrd: trace.read_initrd()?,
        disks,
        // The pmu clock's simulated counter steps, as the step clock does; a hardware counter runs free
        // and traps host instructions, as the landmark clock does.
        hide_host_values: clock.runs_free() && (landmarks == Landmarks::Exits || h.host_traps),
        trap_host_insns: h.host_traps,
        cpuid: (!h.cpuid.is_empty()).then(|| h.cpuid.clone()),
        // Only for traces that kept no CPUID: they gave the guest the host's.
        cpu: machine::CpuModel::Host,
        answer_cpuid: h.vmm_cpuid,
        cpus: h.cpus,
        cold_checkpoints: h.cold_checkpoints,
    };
    let mut machine = Machine::new(&config, image)?;
    if h.format_version == 1 {
        machine.keep_stale_registers();
    }
    machine.set_digest_pages(h.digest == traces::DigestKind::Pages);
    machine.set_positions(clock);
    machine.set_clock(clock)?;
    machine.set_landmarks(landmarks)?;
    machine.set_counter_skid(machine::counter::DEFAULT_SKID);
    Ok(machine)
}

impl Replayer {
    /// Opens a trace and positions the replay at its first checkpoint.
    pub fn open(dir: &Path, image: Option<&Path>) -> Result<Replayer, ReplayError> {
        let mut replayer = Replayer::load(dir, image)?;
        replayer.restore_checkpoint(0)?;
        Ok(replayer)
    }

    /// Opens a trace and builds its machine, without restoring a checkpoint yet.
    pub(crate) fn load(dir: &Path, image: Option<&Path>) -> Result<Replayer, ReplayError> {
        let mut trace = TraceReader::open(dir)?;
        let image_path = image.map(Path::to_path_buf);
        let image = load_image(&trace, image)?;
        trace.set_image(image.clone());
        let machine = build_machine(&trace, &image)?;
        let end = trace
            .summary()
            .map(|s| s.end)
            .unwrap_or_else(|| trace.complete_upto());
        let events: Rc<[Event]> = trace.events().into();
        let checkpoint_positions: Vec<Position> = trace
            .checkpoints()
            .iter()
            .map(|c| Position::at(c.at))
            .collect();
        let first_checkpoint = checkpoint_positions
            .first()
            .copied()
            .unwrap_or(Position::START);
        let contents_checked = vec![false; trace.checkpoints().len()];
        // A damaged record is left out of the waypoints' index: its kick point is searched for, which
        // only costs time, and is said once.
        let notices = trace
            .waypoint_summary()
            .2
            .map(|e| format!("{e}; searching for the kick point instead"))
            .into_iter()
            .collect();
        Ok(Replayer {
            image_path,
            chain: None,
            contents_checked,
            unreadable: BTreeSet::new(),
            host: LogHost::new(events),
            checkpoint_positions,
            stepping_within: false,
            offset: 0,
            free_stop: None,
            trace,
            machine,
            end: Position::at(end),
            next_verify: 0,
            output_hash: Some(Sha256::new()),
            // A trace branched off another starts at its first checkpoint: its output is all after it.
            printed_upto: first_checkpoint,
            finished: None,
            anchor: (u64::MAX, 0),
            notices,
            waypoints: true,
            waypoint_jumps: 0,
            probed: Vec::new(),
            limit: u64::MAX,
            intact: false,
            last_intact: Position::START,
            progress: None,
        })
    }

    /// A new machine in the state this replay stands in (CPUs, devices, RAM), built as the recording's
    /// was: what a live run branches off with. The replay itself is left as it is.
    pub fn fork(&self) -> Result<Fork, ReplayError> {
        let image = load_image(&self.trace, self.image_path.as_deref())?;
        let mut machine = build_machine(&self.trace, &image)?;
        let state = self.machine.state_blob()?;
        let memory = self.machine.memory();
        machine.restore(
            &state,
            (0..memory.pages())
                .map(|pfn| (pfn as u64, memory.page(pfn)))
                .filter(|(_, data)| data.iter().any(|&b| b != 0)),
        )?;
        // The images the machine was built with: the trace's copies, read and checked once.
        let disks = machine
            .devices
            .disks
            .iter()
            .map(|d| d.disk().image().bytes().to_vec())
            .collect();
        let time_ns = self.trace.events()[..self.host.cursor()]
            .iter()
            .rev()
            .find_map(|e| match e.kind {
                EventKind::Clock {
                    kind: traces::ClockKind::Monotonic,
                    ns,
                }
                | EventKind::ApicTimer { ns, .. } => Some(ns),
                _ => None,
            })
            .unwrap_or(0);
        Ok(Fork {
            machine,
            image,
            disks,
            initrd: self.trace.read_initrd()?,
            time_ns,
        })
    }

    /// The guest image given instead of the one the trace names, if one was.
    pub fn image_path(&self) -> Option<&Path> {
        self.image_path.as_deref()
    }

    /// The trace being replayed.
    pub fn trace(&self) -> &TraceReader {
        &self.trace
    }

    /// How many of the trace's events the replay has taken so far.
    pub fn events_consumed(&self) -> usize {
        self.host.cursor()
    }

    /// The machine, at the current position.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The machine's digest at the current position (as a checkpoint there would record it).
    pub fn digest(&mut self) -> Result<[u8; 32], ReplayError> {
        Ok(self.machine.digest()?)
    }

    /// The current position: instructions retired (step traces), landmarks passed (landmark traces), and
    /// the instructions since the landmark when stepping within landmarks.
    pub fn position(&self) -> Position {
        if self.stepping_within {
            Position::within(self.machine.landmarks(), self.offset)
        } else {
            Position::at(self.machine.position())
        }
    }

    /// A position as the user reads it: "icount N", "landmark N" or "landmark N + K".
    pub fn show(&self, position: Position) -> Shown {
        position.show(self.positions())
    }

    /// Whether positions have instructions within landmarks (see [`Replayer::step_within_landmarks`]).
    pub fn steps_within_landmarks(&self) -> bool {
        self.stepping_within
    }

    /// Whether `position` names a position of this replay: a step trace's, or a landmark trace's with
    /// no instructions past the landmark unless the replay steps within landmarks.
    pub fn can_reach(&self, position: Position) -> bool {
        position.offset() == 0 || self.stepping_within
    }

    /// Replays a landmark trace with positions within landmarks from now on: a landmark and the
    /// instructions since it. Runs free (landmark clock) to the landmark of a target, then single-steps
    /// to it; so moving by single instructions, backwards too, costs no more than the instructions
    /// since the landmark before. Call it at a landmark (a checkpoint restored).
    pub fn step_within_landmarks(&mut self) -> Result<(), ReplayError> {
        if self.positions() != Clock::Landmark {
            return Err(ReplayError::NotALandmarkTrace);
        }
        self.stepping_within = true;
        self.offset = 0;
        Ok(())
    }

    /// Stepping within landmarks: runs free (landmark clock) to the next landmark with `breakpoints` (rips)
    /// in the debug registers. Returns which one fired first, if one did: the machine is then where it fired,
    /// at a point whose position is unknown until [`Timeline::locate`]. Otherwise it is at the next
    /// landmark (or the end of the recording).
    pub fn run_free_with(
        &mut self,
        breakpoints: &[u64],
        out: &mut dyn Write,
    ) -> Result<Option<usize>, ReplayError> {
        self.use_clock(Clock::Landmark)?;
        self.machine.arm(breakpoints)?;
        self.free_stop = None;
        let ran = self.advance_explained(out);
        self.machine.disarm()?;
        ran?;
        Ok(self.free_stop.take())
    }

    /// The state that names the point the machine is at (see [`Machine::fingerprint`]).
    pub(crate) fn fingerprint(&mut self) -> Result<machine::Fingerprint, ReplayError> {
        Ok(self.machine.fingerprint()?)
    }

    /// Whether the machine is at the point `fingerprint` names.
    pub(crate) fn matches(
        &mut self,
        fingerprint: &machine::Fingerprint,
    ) -> Result<bool, ReplayError> {
        Ok(self.machine.matches(fingerprint)?)
    }

    /// The pages checkpoint `index` lists as written since the one before (None if it cannot be read:
    /// that is in the notices).
    pub(crate) fn pages_written_before(&mut self, index: usize) -> Option<Rc<BTreeSet<u64>>> {
        match self.trace.pages_written_before(index) {
            Ok(pages) => Some(Rc::new(pages.into_iter().collect())),
            // A damaged checkpoint only costs a search its shortcut: it replays the range.
            Err(e) => {
                self.note_unreadable(index, &e);
                None
            }
        }
    }

    /// The positions of the trace's checkpoints.
    pub fn checkpoint_positions(&self) -> &[Position] {
        &self.checkpoint_positions
    }

    /// Whether any of the page frames `pfns` was written since the last call (see
    /// [`Machine::wrote_since_probe`]).
    ///
    /// Kick points whose waypoint holds one of these pages are searched for rather than jumped to, from
    /// now on (until the next call with other pages).
    pub fn wrote_since_probe(&mut self, pfns: &[u64]) -> Result<bool, ReplayError> {
        self.probed.clear();
        self.probed.extend_from_slice(pfns);
        Ok(self.machine.wrote_since_probe(pfns)?)
    }

    /// The clock the trace was recorded with: what its positions count.
    pub fn positions(&self) -> Clock {
        Clock::from_name(&self.trace.header().clock).unwrap_or(Clock::Step)
    }

    /// Replays with `clock` from now on. A landmark trace replays with either clock: the step clock finds
    /// every recorded point by single-stepping (slow, and the same answer). A step trace needs the step
    /// clock.
    pub fn set_clock(&mut self, clock: Clock) -> Result<(), ReplayError> {
        if clock == Clock::Landmark && self.positions() == Clock::Step {
            return Err(ReplayError::StepTraceNeedsStepClock);
        }
        Ok(self.machine.set_clock(clock)?)
    }

    /// The last position of the recording.
    pub fn end(&self) -> Position {
        self.end
    }

    /// Whether the replay has reached the end of the recording.
    pub fn finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Whether the machine is where the replay put it without error (see [`Replayer::last_intact`]).
    pub fn is_intact(&self) -> bool {
        self.intact
    }

    /// Restores checkpoint `index` (0 is boot); subsequent runs verify later checkpoints' digests. A
    /// checkpoint that cannot be read (corrupt on disk, or building on one that is) is not fatal while an
    /// earlier one can stand in: the latest good one is restored instead, and the replay runs on from
    /// there. Returns the index restored; the reason for any fallback is in [`Replayer::take_notices`].
    pub fn restore_checkpoint(&mut self, index: usize) -> Result<usize, ReplayError> {
        Ok(self.restore_checkpoint_pages(index)?.0)
    }

    /// [`Replayer::restore_checkpoint`], returning also the memory it restored (page frame, data).
    pub(crate) fn restore_checkpoint_pages(
        &mut self,
        index: usize,
    ) -> Result<(usize, BTreeMap<u64, Vec<u8>>), ReplayError> {
        let mut index = index;
        let (cp, pages) = loop {
            match self.trace.restore_chain(index) {
                Ok(read) => {
                    // The machine holds what this checkpoint stores: its digest is checked when the
                    // run starts, and the checkpoints after it are read on from here.
                    self.chain = Some(read.cursor);
                    self.contents_checked[index] = true;
                    break (read.checkpoint, read.memory);
                }
                Err(e) if e.failed > 0 && e.failed <= index => {
                    let why = if e.failed == index {
                        e.source.to_string()
                    } else {
                        format!("it builds on checkpoint {}: {}", e.failed, e.source)
                    };
                    self.notices.push(format!(
                        "checkpoint {index} cannot be used ({why}); starting from checkpoint {} instead",
                        e.failed - 1
                    ));
                    index = e.failed - 1;
                }
                Err(e) => return Err(e.source.into()),
            }
        };
        self.intact = false;
        self.machine.restore(
            &cp.state,
            pages.iter().map(|(&pfn, data)| (pfn, data.as_slice())),
        )?;
        let position = self.checkpoint_positions[index];
        self.offset = 0;
        self.after_restore(position);
        Ok((index, pages))
    }

    /// Whether to jump to kick points that have a waypoint (the default) or to find every one by
    /// executing the guest up to it, which checks the recording's determinism over those stretches too.
    pub fn set_waypoints(&mut self, on: bool) {
        self.waypoints = on;
    }

    /// A pmu trace: makes the simulated counter's overflow land up to `skid` instructions late (see
    /// [`machine::pmu`]).
    pub fn set_counter_skid(&mut self, skid: u64) {
        self.machine.set_counter_skid(skid);
    }

    /// A pmu trace: counts the guest's branches with the host's hardware counter of `event` (see
    /// [`Machine::use_hardware_counter`]) rather than the simulated counter, and so runs free between
    /// the points it must reach.
    pub fn use_hardware_counter(
        &mut self,
        event: machine::perf::CounterEvent,
    ) -> Result<(), ReplayError> {
        Ok(self.machine.use_hardware_counter(event)?)
    }

    /// How many kick points this replay reached by restoring their waypoints.
    pub fn waypoint_jumps(&self) -> u64 {
        self.waypoint_jumps
    }

    /// Messages about problems the replay worked around (a corrupt checkpoint it could not use), oldest
    /// first; each is returned once.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// Bookkeeping shared by every kind of restore: event cursor, checkpoint verification, output.
    fn after_restore(&mut self, position: Position) {
        self.intact = true;
        self.last_intact = position;
        self.anchor = (u64::MAX, 0);
        self.host.seek_to(position.count());
        self.next_verify = self.checkpoint_positions.partition_point(|&c| c < position);
        if position > self.printed_upto {
            // Jumping ahead: the output in between is never printed, so the whole-output check is off.
            self.output_hash = None;
            self.printed_upto = position;
        }
        self.finished = None;
    }

    /// The page frames written since the last restore or resume point.
    pub(crate) fn take_dirty_pages(&mut self) -> Result<Vec<u64>, ReplayError> {
        Ok(self.machine.take_dirty_pages()?)
    }

    /// Where the replay stands, to resume here later with [`Replayer::restore_snapshot`].
    pub(crate) fn resume_point(&mut self) -> Result<ResumePoint, ReplayError> {
        Ok(ResumePoint {
            at: self.position(),
            state: self.machine.state_blob()?,
            dirty_since_checkpoint: self.machine.dirty_since_checkpoint()?,
            cursor: self.host.cursor(),
            anchor: self.anchor,
        })
    }

    /// Resumes at `resume`, a point this replay passed, with `pages` (page frame, contents; None: zero)
    /// rewritten: those that differ between RAM now and RAM there.
    pub(crate) fn restore_snapshot<'a>(
        &mut self,
        pages: impl Iterator<Item = (u64, Option<&'a [u8]>)>,
        resume: &ResumePoint,
    ) -> Result<(), ReplayError> {
        self.intact = false;
        for (pfn, data) in pages {
            self.machine.restore_page(pfn, data)?;
        }
        self.machine.restore_state(&resume.state)?;
        // RAM was rewritten under KVM's cached translations.
        self.machine.reset_mmu()?;
        self.machine
            .set_dirty_since_checkpoint(&resume.dirty_since_checkpoint);
        self.after_restore(resume.at);
        // Within a landmark, the events consumed so far and the anchor are the snapshot's, not what the
        // position alone implies.
        self.host.set_cursor(resume.cursor);
        self.anchor = resume.anchor;
        self.offset = resume.at.offset();
        Ok(())
    }

    /// Index of the last checkpoint at or before `position`.
    pub fn checkpoint_before(&self, position: Position) -> usize {
        self.checkpoint_positions
            .partition_point(|&c| c <= position)
            .saturating_sub(1)
    }

    /// Runs forward until `target` or the end of the recording, writing guest output to `out`.
    pub fn run_to(&mut self, target: Position, out: &mut dyn Write) -> Result<Halt, ReplayError> {
        loop {
            if let Some(halt) = self.reached(target) {
                return Ok(halt);
            }
            self.advance_toward(target, out)?;
        }
    }

    /// How a run to `target` ends here, if it does: the end of the recording, or the target.
    pub(crate) fn reached(&self, target: Position) -> Option<Halt> {
        if let Some(h) = &self.finished {
            return Some(h.clone());
        }
        (self.position() >= target).then_some(Halt::Target)
    }

    /// One advance of a run to `target`: stepping within landmarks, free to the target's landmark and then
    /// one instruction at a time.
    pub(crate) fn advance_toward(
        &mut self,
        target: Position,
        out: &mut dyn Write,
    ) -> Result<(), ReplayError> {
        let position = self.position();
        self.limit = target.count();
        if self.stepping_within {
            let before = self.machine.landmarks() < target.count();
            self.use_clock(if before { Clock::Landmark } else { Clock::Step })?;
        }
        // A cadence only: the offset is u64::MAX where a free run did not count it, so wrap.
        if position
            .count()
            .wrapping_add(position.offset())
            .is_multiple_of(PROGRESS_EVERY)
        {
            let end = self.end;
            if let Some(p) = self.progress.as_mut() {
                p(position, target.min(end));
            }
        }
        self.advance_explained(out)
    }

    fn use_clock(&mut self, clock: Clock) -> Result<(), ReplayError> {
        if self.machine.clock() != clock {
            self.machine.set_clock(clock)?;
        }
        Ok(())
    }

    /// Installs a callback that long runs call now and then with (current position, target position).
    pub fn set_progress(&mut self, progress: Option<Progress>) {
        self.progress = progress;
    }

    /// Advances the machine to its next position (applying the events logged before it), or finds the end
    /// of the recording: one instruction with the step clock, to the next landmark with the landmark clock.
    /// Stepping within landmarks, it is always one instruction.
    pub fn step(&mut self, out: &mut dyn Write) -> Result<(), ReplayError> {
        if self.stepping_within {
            self.use_clock(Clock::Step)?;
        }
        self.limit = self.position().count() + 1;
        self.advance_explained(out)
    }

    /// [`Replayer::advance`] with divergences explained, keeping track of where the replay stood intact.
    fn advance_explained(&mut self, out: &mut dyn Write) -> Result<(), ReplayError> {
        if self.intact {
            self.last_intact = self.position();
        }
        self.intact = false;
        self.advance(out).map_err(|e| match e {
            ReplayError::Divergence(d) => ReplayError::Divergence(self.explain(d)),
            other => other,
        })?;
        self.intact = true;
        Ok(())
    }

    /// The latest position the replay reached without error: after a failed step (a divergence, a
    /// checkpoint that cannot be read), the position that step started from, to [`Timeline::seek`] back
    /// to. (Within a landmark whose instructions a free run did not count, the landmark's start.)
    pub fn last_intact(&self) -> Position {
        if self.last_intact.located() {
            self.last_intact
        } else {
            Position::at(self.last_intact.count())
        }
    }

    /// Says what a divergence in a landmark trace most likely means, and names positions as the trace does.
    fn explain(&self, mut d: Divergence) -> Divergence {
        d.clock = self.positions();
        if self.machine.clock().runs_free() && d.host_value_hint {
            d.what.push_str(
                "; running free, the landmark clock logs RDTSC, RDRAND and RDSEED only where the guest \
                 image has them (the VMM traps them when it loads the image): if the guest reads them in \
                 code it makes at run time or runs in user mode, record it with --clock step \
                 (`retrovisor replay --clock step` on this trace stops at the instruction that differs)",
            );
        }
        if let Some(recorded) = self.recorded_elsewhere() {
            d.what.push_str(&format!(
                "; the trace was recorded on another CPU ({recorded}; this host: {}): instructions whose \
                 results differ between CPUs beyond what CPUID says (the undefined flags of BSF, BSR, MUL \
                 and shifts, the MXCSR_MASK that FXSAVE stores, CPUID run outside the image's code) can \
                 make a replay part from its recording; `retrovisor replay --clock step` on the trace \
                 stops at the instruction that differs",
                machine::host_cpu()
            ));
        }
        d
    }

    /// The CPU the trace was recorded on, if it is not the kind this host has (traces recorded before
    /// it was kept do not say).
    fn recorded_elsewhere(&self) -> Option<String> {
        let recorded = self.trace.header().recorded_on.as_ref()?;
        (!recorded.same_kind(&machine::host_cpu())).then(|| recorded.to_string())
    }

    fn advance(&mut self, out: &mut dyn Write) -> Result<(), ReplayError> {
        loop {
            let position = self.position();
            self.verify_checkpoint(position)?;
            if position >= self.end && !self.guest_ends_after(position) {
                return self.finish_at_end(position);
            }
            // The anchor follows the trace's own positions (landmarks, even when replaying by index).
            if self.anchor.0 != self.machine.position() {
                self.anchor = (self.machine.position(), self.machine.rip());
            }
            // Where the log is: the replay's position, or its landmark when stepping within landmarks.
            let at = position.count();
            self.apply_inputs(at)?;
            // Several kick points may follow one landmark (a vCPU switched at each, for one): reach
            // each in turn.
            while let Some(fingerprint) = self.host.kick_here(at) {
                if !self.reach_kick(at, &fingerprint)? {
                    if self.free_stop.is_some() {
                        return Ok(());
                    }
                    break;
                }
                self.host.take_kick();
                self.anchor.1 = self.machine.rip();
                self.apply_inputs(at)?;
            }
            if let Some(reason) = self.host.stop_here(at) {
                // Only the user or the instruction limit ends a recording without the guest doing
                // something; anything else the guest must reproduce itself (checked below when its step
                // stops).
                if matches!(reason, StopReason::UserStop | StopReason::InstructionLimit) {
                    self.finished = Some(Halt::End(Some(reason)));
                    return Ok(());
                }
            }
            // Values the machine asks for on the way are logged with the rip where the recorder last stood
            // at a position or kick: with the landmark clock, the start of the run that made the exit.
            self.host.begin_step(at, self.anchor.1);
            let landmarks = self.machine.landmarks();
            let advance = self.advance_machine(at)?;
            if self.machine.landmarks() != landmarks {
                self.offset = 0;
            } else if advance == Advance::Moved {
                self.offset = self.offset.saturating_add(1);
            }
            let now = self.position().count();
            self.host.end_step(now)?;
            let output = self.machine.take_output();
            // Output of positions before `printed_upto` has been printed already (after a jump back).
            if !output.is_empty() && position >= self.printed_upto {
                out.write_all(&output)
                    .and_then(|_| out.flush())
                    .map_err(ReplayError::Output)?;
                if let Some(h) = self.output_hash.as_mut() {
                    h.update(&output);
                }
            }
            self.printed_upto = self.printed_upto.max(self.position());
            match advance {
                Advance::Moved => return Ok(()),
                // Only the recorder kicks; a kick here is a signal meant for something else.
                Advance::Kicked => continue,
                // A stop of a free run (see `run_free_with`).
                Advance::Breakpoint => {
                    self.free_stop = self.machine.stop_hit();
                    self.offset = Position::UNKNOWN_OFFSET;
                    return Ok(());
                }
                Advance::Idle => {
                    // Recorded inputs at this position must wake it; if none are left it diverged.
                    if !self.host.has_inputs_at(at) {
                        return Err(Divergence::new(
                            at,
                            "the guest is halted here but the recording has no input that wakes it",
                        )
                        .into());
                    }
                }
                Advance::Stopped(got) => {
                    let now = self.position();
                    match self
                        .host
                        .stop_here(now.count())
                        .or_else(|| self.host.stop_here(at))
                    {
                        Some(expected) if expected == got => {
                            self.finished = Some(Halt::End(Some(got)));
                            self.check_output()?;
                            return Ok(());
                        }
                        other => {
                            return Err(Divergence::new(
                                now.count(),
                                format!(
                                    "the guest stopped ({got:?}) but the recording {}",
                                    match other {
                                        Some(r) => format!("stopped differently ({r:?})"),
                                        None => "went on".to_string(),
                                    }
                                ),
                            )
                            .into())
                        }
                    }
                }
            }
        }
    }

    /// Runs the machine to its next position ([`Machine::advance`]). Where landmarks are branches and the
    /// replay runs counted, as far as the next branch where something happens instead: the next event,
    /// checkpoint, the end, or the position the run is going to ([`Machine::run_to_count`]).
    fn advance_machine(&mut self, at: u64) -> Result<Advance, ReplayError> {
        let counted = self.machine.landmarks_are() == Landmarks::Branches
            && self.machine.clock() == Clock::Landmark;
        if counted && !self.machine.armed() {
            let next_event = self.host.next_event_at().unwrap_or(u64::MAX);
            let next_checkpoint = self
                .checkpoint_positions
                .get(self.next_verify)
                .map_or(u64::MAX, |c| c.count());
            let next = [next_event, next_checkpoint, self.end.count(), self.limit]
                .into_iter()
                .filter(|&n| n > at)
                .min()
                .unwrap_or(at + 1);
            // Values the stretch from here asks for are logged at this branch: go one at a time.
            if next_event > at && next > at + 1 {
                return Ok(self.machine.run_to_count(next, &mut self.host)?);
            }
        }
        Ok(self.machine.advance(&mut self.host)?)
    }

    /// Applies the boundary inputs logged at `at`. After a switch of vCPU, what the next step asks for
    /// is tagged, as the recorder tagged it, with the rip of the vCPU that now runs.
    fn apply_inputs(&mut self, at: u64) -> Result<(), ReplayError> {
        let cpu = self.machine.current_cpu();
        self.host.apply_inputs(&mut self.machine, at)?;
        if self.machine.current_cpu() != cpu {
            self.anchor.1 = self.machine.rip();
        }
        Ok(())
    }

    /// Gets the machine to the point a kick stopped the recording at, after landmark `position`. With the
    /// landmark clock: runs to it (breakpoint search); with the step clock: says whether this instruction
    /// boundary is it (the caller steps on if not). Passing the next landmark without finding it is a
    /// divergence.
    fn reach_kick(
        &mut self,
        position: u64,
        fp: &machine::Fingerprint,
    ) -> Result<bool, ReplayError> {
        match self.machine.clock() {
            Clock::Step => Ok(self.machine.matches(fp)?),
            Clock::Landmark => {
                if self.jump_to_kick(position, fp)? {
                    return Ok(true);
                }
                self.host.begin_step(position, self.machine.rip());
                let search = self.machine.run_to_fingerprint(fp, &mut self.host)?;
                // Running free, the instructions since the landmark went uncounted.
                self.offset = Position::UNKNOWN_OFFSET;
                self.host.end_step(self.machine.position())?;
                match search {
                    Search::Found => Ok(true),
                    // A stop of a free run fired before the kick point: the run ends there, the kick waits.
                    Search::Stopped => {
                        self.free_stop = self.machine.stop_hit();
                        Ok(false)
                    }
                    Search::GaveUp => Err(Divergence::new(
                        position,
                        format!(
                            "the recording delivered input at a point after landmark {position} (rip {:#x}, rsp {:#x}) \
                             that the replay did not reach in {} passes of that rip without an exit",
                            fp.rip,
                            fp.rsp,
                            machine::MAX_SEARCH_HITS
                        ),
                    )
                    .into()),
                    Search::Passed => Err(Divergence::new(
                        position,
                        format!(
                            "the recording delivered input at a point after landmark {position} (rip {:#x}, rsp {:#x}) \
                             that the replay never reached before its next landmark (now at rip {:#x})",
                            fp.rip,
                            fp.rsp,
                            self.machine.rip()
                        ),
                    )
                    .into()),
                }
            }
        }
    }

    /// Puts the machine at the kick point after landmark `position` by restoring its waypoint, if the
    /// trace has one and a search would not be needed anyway (no stop of a free run is armed, which the
    /// stretch might pass); says whether it did. A waypoint that cannot be read is said once in the
    /// notices, and the caller searches instead. The restored state must have the kick's fingerprint:
    /// its memory digest covers the pages this replay wrote itself since the checkpoint.
    fn jump_to_kick(
        &mut self,
        position: u64,
        fp: &machine::Fingerprint,
    ) -> Result<bool, ReplayError> {
        if !self.waypoints || self.machine.armed() {
            return Ok(false);
        }
        let kick = self.host.cursor() as u64;
        let waypoint = match self.trace.waypoint(kick) {
            None => return Ok(false),
            Some(Ok(w)) if w.rip == fp.rip => w,
            Some(Ok(w)) => {
                self.notices.push(format!(
                    "the waypoint of event {kick} is at rip {:#x}, but that kick's point is at {:#x}; \
                     searching for the point instead",
                    w.rip, fp.rip
                ));
                return Ok(false);
            }
            Some(Err(e)) => {
                self.notices
                    .push(format!("{e}; searching for the kick point instead"));
                return Ok(false);
            }
        };
        // A search watching pages must see which of them the stretch wrote, even with their old
        // contents, which only running it tells: the waypoint's pages are those written since the
        // previous waypoint or checkpoint, more than the stretch wrote.
        if waypoint
            .pages
            .iter()
            .any(|(pfn, _)| self.probed.contains(pfn))
        {
            return Ok(false);
        }
        self.machine.restore_waypoint(&machine::Waypoint {
            state: waypoint.state,
            pages: waypoint.pages,
        })?;
        self.offset = Position::UNKNOWN_OFFSET;
        if !self.machine.matches(fp)? {
            return Err(Divergence::new(
                position,
                format!(
                    "at the point after landmark {position} where the recording delivered input (rip {:#x}), \
                     its waypoint does not give the recorded state: the pages this replay wrote since the \
                     last checkpoint differ from the recording's",
                    fp.rip
                ),
            )
            .into());
        }
        self.waypoint_jumps += 1;
        Ok(true)
    }

    /// Whether the guest ends the recording by itself after `position`, the last position, before the
    /// next: where landmarks are branches, its exit comes some instructions after the last one (an exit
    /// the guest causes is no landmark), so the replay runs on to it.
    fn guest_ends_after(&self, position: Position) -> bool {
        self.machine.landmarks_are() == Landmarks::Branches
            && position.count() == self.end.count()
            && matches!(
                self.trace.summary().map(|s| s.stop),
                Some(StopReason::GuestExit { .. } | StopReason::TripleFault | StopReason::Halted)
            )
    }

    fn finish_at_end(&mut self, position: Position) -> Result<(), ReplayError> {
        let reason = self.trace.summary().map(|s| s.stop);
        match &reason {
            // The guest stops by itself in the step that reaches `end`; reaching it without stopping is a divergence.
            Some(StopReason::GuestExit { .. } | StopReason::TripleFault) => {
                return Err(Divergence::new(
                    position.count(),
                    format!("the recording ended here ({reason:?}) but the replayed guest did not"),
                )
                .into());
            }
            Some(_) => self.check_output()?,
            None => {}
        }
        self.finished = Some(Halt::End(reason));
        Ok(())
    }

    fn verify_checkpoint(&mut self, position: Position) -> Result<(), ReplayError> {
        let cps = &self.checkpoint_positions;
        while self.next_verify < cps.len() && cps[self.next_verify] < position {
            self.next_verify += 1;
        }
        if cps.get(self.next_verify) == Some(&position) {
            let info = &self.trace.checkpoints()[self.next_verify];
            let recorded = info.digest;
            let digest = self.machine.digest()?;
            if digest != recorded && !self.equivalent_to_checkpoint(self.next_verify, &recorded) {
                if let Err(e) = self.trace.checkpoint_state(self.next_verify) {
                    // Its recorded digest is part of what is damaged: nothing to compare against.
                    self.notices.push(format!(
                        "checkpoint {} is corrupt and cannot be checked: {e}",
                        self.next_verify
                    ));
                    self.machine.mark_checkpoint()?;
                    self.next_verify += 1;
                    return Ok(());
                }
                let what = self.describe_mismatch(self.next_verify, digest);
                return Err(Divergence::new(
                    position.count(),
                    format!("at checkpoint {}: {what}", self.next_verify),
                )
                .into());
            }
            if !self.contents_checked[self.next_verify] {
                self.check_contents(self.next_verify, position)?;
                self.contents_checked[self.next_verify] = true;
            }
            // Fingerprints digest the pages written since the last checkpoint, as the recorder saw them.
            self.machine.mark_checkpoint()?;
            self.next_verify += 1;
        }
        Ok(())
    }

    /// Tells the user, once per checkpoint, that checkpoint `index` cannot be read, and what that costs.
    /// Adds a message for [`Replayer::take_notices`].
    pub(crate) fn notice(&mut self, message: String) {
        self.notices.push(message);
    }

    fn note_unreadable(&mut self, index: usize, e: &traces::ReadError) {
        if self.unreadable.insert(index) {
            self.notices.push(format!(
                "checkpoint {index} cannot be read ({e}): what it stores is not compared with the \
                 replay, and searches replay the instructions before it rather than skip them"
            ));
        }
    }

    /// Compares what checkpoint `index` stores (its CPU and device state, and the memory restoring it
    /// gives) with the machine, which has just matched its recorded digest at `position`. The digest
    /// alone proves the replay right, but not the file: state or pages changed after the digest was
    /// taken pass it unnoticed, until a replay starts from them. Reading the checkpoints in order as
    /// the replay passes them costs one file each; then only the pages the checkpoint stores and those
    /// written since the checkpoint before it can differ. After a jump, the chain is read from its
    /// last full checkpoint and all of memory compared.
    fn check_contents(&mut self, index: usize, position: Position) -> Result<(), ReplayError> {
        /// Enough to diagnose from the message alone, few enough to read.
        const MAX_FIELDS: usize = 8;
        const MAX_PAGES: usize = 8;
        let sequential = self.chain.as_ref().is_some_and(|c| c.next() == index);
        if !sequential {
            self.chain = None;
        }
        let cursor = self
            .chain
            .get_or_insert_with(|| self.trace.chain_cursor(index));
        let (mut checkpoint, mut unreadable) = (None, Vec::new());
        while cursor.next() <= index {
            let at = cursor.next();
            match self.trace.read_next(cursor) {
                Ok(cp) => checkpoint = (at == index).then_some(cp),
                // Said when the checkpoint it builds on was read.
                Err(traces::ReadError::BuildsOnBroken { .. }) => {}
                Err(e) => unreadable.push((at, e)),
            }
        }
        for (at, e) in unreadable {
            self.note_unreadable(at, &e);
        }
        let Some(cp) = checkpoint else {
            return Ok(());
        };
        let mut what = Vec::new();
        match self.machine.state_matches(&cp.state) {
            Ok(true) => {}
            Ok(false) => {
                let fields = self
                    .machine
                    .state_differences(&cp.state, MAX_FIELDS)
                    .unwrap_or_default();
                what.push(if fields.is_empty() {
                    "its CPU or device state differs".to_string()
                } else {
                    format!("in its CPU and device state, {}", fields.join(", "))
                });
            }
            Err(e) => what.push(format!("its CPU and device state does not decode: {e}")),
        }
        let cursor = self.chain.as_ref().expect("read above");
        let memory = self.machine.memory();
        let mut pages = Vec::new();
        // The pages it stores, byte for byte (in full: references and zero markers are resolved).
        let mut stored = BTreeSet::new();
        for (pfn, data) in &cp.pages {
            stored.insert(*pfn);
            let now = memory.page(*pfn as usize);
            if let Some(at) = now.iter().zip(data).position(|(a, b)| a != b) {
                pages.push(format!(
                    "page {pfn:#x} (first at {:#x}: {:#04x}, stored {:#04x})",
                    pfn * memory::PAGE_SIZE as u64 + at as u64,
                    now[at],
                    data[at]
                ));
            }
        }
        // The other pages a restore of it sets: all of them after a jump or at a full checkpoint,
        // otherwise those the replay wrote since the checkpoint before (the rest were compared there).
        let others: Vec<u64> = if sequential && !cp.full {
            self.machine.dirty_since_checkpoint()?
        } else {
            (0..memory.pages() as u64).collect()
        };
        let memory = self.machine.memory();
        for pfn in others.into_iter().filter(|p| !stored.contains(p)) {
            let now = memory.page(pfn as usize);
            let hash = now.iter().any(|&b| b != 0).then(|| traces::page_hash(now));
            if hash != cursor.restored_hash(pfn) {
                pages.push(format!(
                    "page {pfn:#x} (restoring the checkpoint gives it other content)"
                ));
            }
        }
        if !pages.is_empty() {
            let mut text = format!(
                "guest memory differs in {} page(s): {}",
                pages.len(),
                pages[..pages.len().min(MAX_PAGES)].join(", ")
            );
            if pages.len() > MAX_PAGES {
                text.push_str(&format!(" and {} more", pages.len() - MAX_PAGES));
            }
            what.push(text);
        }
        if what.is_empty() {
            return Ok(());
        }
        Err(ReplayError::CheckpointContent {
            path: self.trace.checkpoints()[index].path.clone(),
            index,
            position: self.show(position),
            what: what.join("; "),
        })
    }

    /// Whether the machine is in checkpoint `index`'s state although its digest differs (see
    /// [`Machine::equivalent_to`]); false if the checkpoint cannot be read.
    fn equivalent_to_checkpoint(&mut self, index: usize, digest: &[u8; 32]) -> bool {
        self.trace
            .checkpoint_state(index)
            .ok()
            .and_then(|state| self.machine.equivalent_to(&state, digest).ok())
            .unwrap_or(false)
    }

    /// Names what differs between the machine now and checkpoint `index`, whose digest it does not match:
    /// rip, then each CPU or device field, then the pages of RAM (read back from the checkpoint chain).
    fn describe_mismatch(&self, index: usize, digest: [u8; 32]) -> String {
        /// Enough lines to diagnose from the message alone, few enough to read.
        const MAX_FIELDS: usize = 12;
        const MAX_PAGES: usize = 8;
        let info = &self.trace.checkpoints()[index];
        let mut parts = Vec::new();
        let (cp, pages) = match self.trace.restore_point(index) {
            Ok(read) => read,
            Err(e) => {
                if self.machine.rip() != info.rip {
                    parts.push(format!(
                        "rip is {:#x}, recorded {:#x}",
                        self.machine.rip(),
                        info.rip
                    ));
                }
                let part = if digest[16..] != info.digest[16..] {
                    "CPU or device state"
                } else {
                    "guest memory"
                };
                parts.push(format!(
                    "{part} differs from the recorded checkpoint (which cannot be read to say more: {e})"
                ));
                return parts.join("; ");
            }
        };
        match self.machine.state_differences(&cp.state, MAX_FIELDS) {
            Ok(fields) if !fields.is_empty() => parts.push(fields.join(", ")),
            Ok(_) => {}
            Err(e) => parts.push(format!("the recorded CPU state does not decode: {e}")),
        }
        let memory = self.machine.memory();
        let zero = [0u8; memory::PAGE_SIZE];
        let differing: Vec<String> = (0..memory.pages() as u64)
            .filter_map(|pfn| {
                let now = memory.page(pfn as usize);
                let then = pages.get(&pfn).map_or(&zero[..], |p| &p[..]);
                let at = now.iter().zip(then).position(|(a, b)| a != b)?;
                Some(format!(
                    "page {pfn:#x} (first at {:#x}: {:#04x}, recorded {:#04x})",
                    pfn * memory::PAGE_SIZE as u64 + at as u64,
                    now[at],
                    then[at]
                ))
            })
            .collect();
        if !differing.is_empty() {
            let more = differing.len().saturating_sub(MAX_PAGES);
            let mut text = format!(
                "guest memory differs in {} page(s): {}",
                differing.len(),
                differing[..differing.len().min(MAX_PAGES)].join(", ")
            );
            if more > 0 {
                text.push_str(&format!(" and {more} more"));
            }
            parts.push(text);
        }
        if parts.is_empty() {
            // The digests differ, yet no field or page does: the digest itself covers something else.
            parts.push("the state digest differs, though no field or page does".into());
        }
        parts.join("; ")
    }

    /// At the end of a replay from boot, the guest's whole output must hash to what the recording saw.
    fn check_output(&mut self) -> Result<(), ReplayError> {
        if let (Some(h), Some(summary)) = (self.output_hash.take(), self.trace.summary()) {
            let got = traces::hex(&h.finalize());
            if got != summary.output_sha256 {
                return Err(Divergence::new(
                    self.position().count(),
                    "the guest's serial output differs from the recording's",
                )
                .into());
            }
        }
        Ok(())
    }
}
