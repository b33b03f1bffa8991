//! Replay: rebuilds the recorded machine from the trace and the guest image alone, restores a checkpoint
//! and runs forward with every logged input re-applied at exactly its instruction count. Any disagreement
//! between the replay and the log is a divergence, reported with its icount and what differed.

mod log;
pub mod position;
pub mod search;
mod snapshots;
pub mod verify;

use devices::disk::DiskImage;
pub use log::Divergence;
use log::LogHost;
use machine::{Advance, Clock, Machine, MachineConfig, MachineError, Search};
use sha2::{Digest, Sha256};
use snapshots::{PageMap, Snap, SnapshotCache};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use thiserror::Error;
use traces::{Event, StopReason, TraceReader};

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
        position: String,
        /// What differs.
        what: String,
    },
}

/// What a forward run stopped on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// Reached the requested icount.
    Target,
    /// The recording ends here, with this reason (None: the trace was cut off here).
    End(Option<StopReason>),
}

/// A replay in progress.
pub struct Replayer {
    trace: TraceReader,
    machine: Machine,
    host: LogHost,
    /// Where replay ends: the recording's last instruction boundary.
    end: u64,
    /// Index of the next checkpoint whose digest to verify.
    next_verify: usize,
    /// Hash of all output printed since boot (None once a jump forward skipped some).
    output_hash: Option<Sha256>,
    /// Output of instructions before this icount has been printed already: after a jump back, re-executed
    /// instructions print nothing, so the user sees the guest's output once, in order.
    printed_upto: u64,
    finished: Option<Halt>,
    /// In-memory snapshots taken while replaying, for fast moves backward.
    cache: SnapshotCache,
    /// Guest RAM as of the last restore or snapshot: the base the next snapshot's dirty pages apply to.
    base_pages: Rc<PageMap>,
    /// The position the user is looking at: snapshots are densest around it.
    focus: u64,
    /// The current position and the rip where the machine stood when it got there (or at the kick taken
    /// since): what the recorder tagged the values asked for until the next position with.
    anchor: (u64, u64),
    /// Problems worked around, for the user (see [`Replayer::take_notices`]).
    notices: Vec<String>,
    /// Whether the machine is where the replay put it without error: false from a failed step or restore
    /// until the next restore succeeds, since a failure can leave it anywhere (see [`Replayer::seek`]).
    intact: bool,
    /// The position the last step started from, or the last restore reached: the latest the replay
    /// reached intact (see [`Replayer::last_intact`]).
    last_intact: u64,
    /// The position of each checkpoint, in this replay's unit (see [`Replayer::icount`]).
    checkpoint_positions: Vec<u64>,
    /// A landmark trace replayed with instruction positions relative to landmarks (see
    /// [`position::encode`]): free running to a landmark, single-stepping from there.
    stepping_within: bool,
    /// With `stepping_within`: instructions stepped since the current landmark.
    offset: u64,
    /// Which hardware stop of a free run fired (see [`Replayer::run_free_with`]).
    free_stop: Option<usize>,
    /// Ranges of positions a free run passed through with breakpoints armed that did not fire: (the
    /// breakpoint rips, first position, end position exclusive).
    clear_runs: Vec<(Vec<u64>, u64, u64)>,
    /// Reads the trace's checkpoints in order as the replay passes them, to compare what each stores
    /// with the machine (see [`Replayer::check_contents`]); None until the first restore.
    chain: Option<traces::ChainCursor>,
    /// By checkpoint index: whether what it stores has been compared with the machine (restored from
    /// it, or checked the first time the replay passed it).
    contents_checked: Vec<bool>,
    /// Checkpoints found unreadable, each said once in the notices (see [`Replayer::note_unreadable`]).
    unreadable: BTreeSet<usize>,
    /// The pages each checkpoint lists, by checkpoint index, read when a search first needs them (None:
    /// the checkpoint cannot be read).
    page_sets: std::collections::HashMap<usize, Option<Rc<BTreeSet<u64>>>>,
    progress: Option<Progress>,
}

/// A progress callback: (current icount, target icount).
pub type Progress = Box<dyn FnMut(u64, u64)>;

/// How often (in instructions) long runs report progress.
const PROGRESS_EVERY: u64 = 16_384;

/// Default memory cap of the snapshot cache.
pub const DEFAULT_SNAPSHOT_MEMORY: u64 = 512 << 20;

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
        hide_host_values: clock.runs_free(),
        trap_host_insns: h.host_traps,
        cpuid: (!h.cpuid.is_empty()).then(|| h.cpuid.clone()),
        // Only for traces that kept no CPUID: they gave the guest the host's.
        cpu: machine::CpuModel::Host,
        answer_cpuid: h.vmm_cpuid,
    };
    let mut machine = Machine::new(&config, image)?;
    if h.format_version == 1 {
        machine.keep_stale_registers();
    }
    machine.set_digest_pages(h.digest == traces::DigestKind::Pages);
    machine.set_positions(clock);
    machine.set_clock(clock)?;
    Ok(machine)
}

impl Replayer {
    /// Opens a trace and positions the replay at its first checkpoint.
    pub fn open(dir: &Path, image: Option<&Path>) -> Result<Replayer, ReplayError> {
        let mut trace = TraceReader::open(dir)?;
        let image = load_image(&trace, image)?;
        trace.set_image(image.clone());
        let machine = build_machine(&trace, &image)?;
        let end = trace
            .summary()
            .map(|s| s.end_icount)
            .unwrap_or_else(|| trace.complete_upto());
        let events: Rc<[Event]> = trace.events().into();
        let checkpoint_positions = trace.checkpoints().iter().map(|c| c.icount).collect();
        let contents_checked = vec![false; trace.checkpoints().len()];
        let mut replayer = Replayer {
            chain: None,
            contents_checked,
            unreadable: BTreeSet::new(),
            host: LogHost::new(events),
            checkpoint_positions,
            stepping_within: false,
            offset: 0,
            free_stop: None,
            page_sets: std::collections::HashMap::new(),
            clear_runs: Vec::new(),
            trace,
            machine,
            end,
            next_verify: 0,
            output_hash: Some(Sha256::new()),
            printed_upto: 0,
            finished: None,
            cache: SnapshotCache::new(DEFAULT_SNAPSHOT_MEMORY as usize),
            base_pages: Rc::new(PageMap::new()),
            focus: 0,
            anchor: (u64::MAX, 0),
            notices: Vec::new(),
            intact: false,
            last_intact: 0,
            progress: None,
        };
        replayer.restore_checkpoint(0)?;
        Ok(replayer)
    }

    /// The trace being replayed.
    pub fn trace(&self) -> &TraceReader {
        &self.trace
    }

    /// The machine, at the current position.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The machine's digest at the current position (as a checkpoint there would record it).
    pub fn digest(&mut self) -> Result<[u8; 32], ReplayError> {
        Ok(self.machine.digest()?)
    }

    /// Current position: instructions retired (step traces) or landmarks passed (landmark traces).
    pub fn icount(&self) -> u64 {
        if self.stepping_within {
            position::encode(self.machine.landmarks(), self.offset)
        } else {
            self.machine.position()
        }
    }

    /// What positions count in this replay: "icount" or "landmark".
    pub fn unit(&self) -> &'static str {
        self.positions().unit()
    }

    /// Whether positions are (landmark, instructions since it), encoded by [`position::encode`].
    pub fn steps_within_landmarks(&self) -> bool {
        self.stepping_within
    }

    /// A position as the user reads it: "icount N", "landmark N" or "landmark N + K".
    pub fn describe(&self, position: u64) -> String {
        if self.stepping_within {
            let (landmark, offset) = position::decode(position);
            match offset {
                0 => format!("landmark {landmark}"),
                _ => format!("landmark {landmark} + {offset}"),
            }
        } else {
            format!("{} {position}", self.unit())
        }
    }

    /// Replays a landmark trace with instruction positions from now on, without an index: a position is
    /// a landmark and the instructions since it ([`position::encode`]). Runs free (landmark clock) to the
    /// landmark of a target, then single-steps to it; so moving by single instructions, backwards too,
    /// costs no more than the instructions since the landmark before. Restarts at the first checkpoint.
    pub fn step_within_landmarks(&mut self) -> Result<(), ReplayError> {
        if self.positions() != Clock::Landmark {
            return Err(ReplayError::NotALandmarkTrace);
        }
        self.checkpoint_positions = self
            .trace
            .checkpoints()
            .iter()
            .map(|c| position::encode(c.icount, 0))
            .collect();
        self.end = position::encode(self.end, 0);
        self.stepping_within = true;
        self.cache = SnapshotCache::new(self.cache.cap_bytes());
        self.restore_checkpoint(0)?;
        Ok(())
    }

    /// Stepping within landmarks: runs free (landmark clock) to the next landmark with `breakpoints` (rips)
    /// in the debug registers. Returns which one fired first, if one did: the machine is then where it fired,
    /// at a point whose position is unknown until [`Replayer::locate`]. Otherwise it is at the next
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

    /// After a free run stopped between landmarks ([`Replayer::run_free_with`]): finds the position of
    /// the point the machine is at, by stepping from its landmark to the first point with the same
    /// fingerprint (which has the same future), and leaves the replay there.
    pub fn locate(&mut self, out: &mut dyn Write) -> Result<u64, ReplayError> {
        let fingerprint = self.machine.fingerprint()?;
        let landmark = self.machine.landmarks();
        self.seek(position::encode(landmark, 0), out)?;
        self.use_clock(Clock::Step)?;
        while !self.machine.matches(&fingerprint)? {
            if self.finished.is_some() || self.machine.landmarks() != landmark {
                return Err(Divergence::new(
                    landmark,
                    format!(
                        "a free run stopped at rip {:#x} after landmark {landmark}, but stepping from the \
                         landmark never reached that state",
                        fingerprint.rip
                    ),
                )
                .into());
            }
            self.step(out)?;
        }
        Ok(self.icount())
    }

    /// The guest-physical pages written between positions `from` and `to` (by the guest or a device), as a
    /// superset: the union of what the trace's checkpoints list for the checkpoint intervals that overlap
    /// the range. None where the trace cannot tell (after its last checkpoint, or where a checkpoint's list
    /// cannot be read: that is in [`Replayer::take_notices`]).
    pub fn pages_written(&mut self, from: u64, to: u64) -> Option<Rc<BTreeSet<u64>>> {
        let first = self.checkpoint_before(from);
        let last = self.checkpoint_positions.partition_point(|&c| c < to);
        if last >= self.checkpoint_positions.len() {
            return None;
        }
        let mut union = BTreeSet::new();
        for next in first + 1..=last {
            let pages = match self.page_sets.get(&next) {
                Some(pages) => pages.clone()?,
                None => {
                    let pages = match self.trace.pages_written_before(next) {
                        Ok(pages) => Some(Rc::new(pages.into_iter().collect())),
                        // A damaged checkpoint only costs a search its shortcut: it replays the range.
                        Err(e) => {
                            self.note_unreadable(next, &e);
                            None
                        }
                    };
                    self.page_sets.insert(next, pages.clone());
                    pages?
                }
            };
            if first + 1 == last {
                return Some(pages);
            }
            union.extend(pages.iter().copied());
        }
        Some(Rc::new(union))
    }

    /// The positions of the trace's checkpoints, in this replay's unit.
    pub fn checkpoint_positions(&self) -> &[u64] {
        &self.checkpoint_positions
    }

    /// Whether any of the page frames `pfns` was written since the last call (see
    /// [`Machine::wrote_since_probe`]).
    pub fn wrote_since_probe(&mut self, pfns: &[u64]) -> Result<bool, ReplayError> {
        Ok(self.machine.wrote_since_probe(pfns)?)
    }

    /// Notes that positions `from..to` hold no hit of the breakpoints at `rips`: a free run passed through
    /// them with those armed. (Positions are the recording's: this holds whatever the replay does later.)
    pub fn note_clear(&mut self, rips: &[u64], from: u64, to: u64) {
        if from < to {
            self.clear_runs.push((rips.to_vec(), from, to));
        }
    }

    /// Whether positions `from..to` are known to hold no hit of the breakpoint at `rip`.
    pub fn known_clear(&self, rip: u64, from: u64, to: u64) -> bool {
        self.clear_runs
            .iter()
            .any(|(rips, a, b)| rips.contains(&rip) && *a <= from && to <= *b)
    }

    /// The position just before `position` (> 0): one instruction earlier. At the start of a landmark
    /// that is the last position of the landmark before, found by stepping through it.
    pub fn previous(&mut self, position: u64, out: &mut dyn Write) -> Result<u64, ReplayError> {
        if !self.stepping_within {
            return Ok(position - 1);
        }
        let (landmark, offset) = position::decode(position);
        if offset > 0 {
            return Ok(position - 1);
        }
        // Step through landmark - 1 from its start until the step that makes `landmark`.
        self.seek(position::encode(landmark - 1, 0), out)?;
        let mut last = self.icount();
        while self.machine.landmarks() < landmark && self.finished.is_none() {
            last = self.icount();
            self.step(out)?;
        }
        Ok(last)
    }

    /// The clock the trace was recorded with: what its positions count.
    pub fn positions(&self) -> Clock {
        Clock::from_name(&self.trace.header().clock).unwrap_or(Clock::Step)
    }

    /// Replays with `clock` from now on. A landmark trace replays with either clock: the step clock finds
    /// every recorded point by single-stepping (slow, and the same answer), which is how `index` counts
    /// its instructions. A step trace needs the step clock.
    pub fn set_clock(&mut self, clock: Clock) -> Result<(), ReplayError> {
        if clock == Clock::Landmark && self.positions() == Clock::Step {
            return Err(ReplayError::StepTraceNeedsStepClock);
        }
        Ok(self.machine.set_clock(clock)?)
    }

    /// The last instruction boundary of the recording.
    pub fn end_icount(&self) -> u64 {
        self.end
    }

    /// Restores checkpoint `index` (0 is boot); subsequent runs verify later checkpoints' digests. A
    /// checkpoint that cannot be read (corrupt on disk, or building on one that is) is not fatal while an
    /// earlier one can stand in: the latest good one is restored instead, and the replay runs on from
    /// there. Returns the index restored; the reason for any fallback is in [`Replayer::take_notices`].
    pub fn restore_checkpoint(&mut self, index: usize) -> Result<usize, ReplayError> {
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
        self.base_pages = Rc::new(
            pages
                .into_iter()
                .map(|(pfn, data)| (pfn, Rc::from(data)))
                .collect(),
        );
        let position = self.checkpoint_positions[index];
        self.offset = 0;
        self.after_restore(position);
        Ok(index)
    }

    /// Messages about problems the replay worked around (a corrupt checkpoint it could not use), oldest
    /// first; each is returned once.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// Bookkeeping shared by every kind of restore: event cursor, checkpoint verification, output.
    fn after_restore(&mut self, icount: u64) {
        self.intact = true;
        self.last_intact = icount;
        self.anchor = (u64::MAX, 0);
        let trace_position = if self.stepping_within {
            position::decode(icount).0
        } else {
            icount
        };
        self.host.seek_to(trace_position);
        self.next_verify = self.checkpoint_positions.partition_point(|&c| c < icount);
        if icount > self.printed_upto {
            // Jumping ahead: the output in between is never printed, so the whole-output check is off.
            self.output_hash = None;
            self.printed_upto = icount;
        }
        self.finished = None;
    }

    /// Restores an in-memory snapshot, rewriting only the pages that differ from RAM as it is: those the
    /// guest wrote since the last restore or snapshot, and those where the two page maps differ.
    fn restore_snapshot(&mut self, icount: u64) -> Result<(), ReplayError> {
        let snap = self
            .cache
            .before(icount)
            .expect("caller checked a snapshot exists");
        let (pages, state, at) = (snap.pages.clone(), snap.state.clone(), snap.icount);
        let fingerprint_pages = snap.dirty_since_checkpoint.clone();
        let (cursor, anchor) = (snap.cursor, snap.anchor);
        self.intact = false;
        let mut pfns: BTreeSet<u64> = self.machine.take_dirty_pages()?.into_iter().collect();
        pfns.extend(map_difference(&self.base_pages, &pages));
        for pfn in pfns {
            self.machine
                .restore_page(pfn, pages.get(&pfn).map(|p| &p[..]))?;
        }
        self.machine.restore_state(&state)?;
        self.machine.set_dirty_since_checkpoint(&fingerprint_pages);
        self.base_pages = pages;
        self.after_restore(at);
        // Within a landmark, the events consumed so far and the anchor are the snapshot's, not what the
        // position alone implies.
        self.host.set_cursor(cursor);
        self.anchor = anchor;
        self.offset = position::decode(at).1;
        Ok(())
    }

    /// Takes an in-memory snapshot here if the cache wants one (called at fresh instruction boundaries).
    fn maybe_snapshot(&mut self) -> Result<(), ReplayError> {
        let icount = self.icount();
        self.focus = self.focus.max(icount);
        if !self.cache.wants(icount, self.focus) {
            return Ok(());
        }
        let dirty = self.machine.take_dirty_pages()?;
        let mut pages = (*self.base_pages).clone();
        for &pfn in &dirty {
            let data = self.machine.memory().page(pfn as usize);
            if data.iter().all(|&b| b == 0) {
                pages.remove(&pfn);
            } else {
                pages.insert(pfn, Rc::from(data));
            }
        }
        self.base_pages = Rc::new(pages);
        let snap = Snap {
            icount,
            state: self.machine.state_blob()?,
            pages: self.base_pages.clone(),
            own_bytes: dirty.len() * memory::PAGE_SIZE,
            dirty_since_checkpoint: self.machine.dirty_since_checkpoint()?,
            cursor: self.host.cursor(),
            anchor: self.anchor,
        };
        self.cache.insert(snap, self.focus);
        Ok(())
    }

    /// Sets the memory cap of the in-memory snapshot cache.
    pub fn set_snapshot_memory(&mut self, bytes: usize) {
        self.cache = SnapshotCache::new(bytes);
    }

    /// Number of in-memory snapshots and the bytes they hold.
    pub fn snapshot_stats(&self) -> (usize, usize) {
        (self.cache.len(), self.cache.bytes())
    }

    /// Index of the last checkpoint at or before `icount`.
    pub fn checkpoint_before(&self, icount: u64) -> usize {
        self.checkpoint_positions
            .partition_point(|&c| c <= icount)
            .saturating_sub(1)
    }

    /// Moves to `target` (clamped to the recording): restores the last checkpoint at or before it when it
    /// lies behind, or when a checkpoint is nearer than the current position, then runs forward. After a
    /// failed step or restore it always restores: the machine may be anywhere.
    pub fn seek(&mut self, target: u64, out: &mut dyn Write) -> Result<Halt, ReplayError> {
        let target = target.min(self.end);
        self.focus = target;
        // Start from whichever is latest at or before the target: where we are, or a restore point.
        let here = Some(self.icount()).filter(|&i| self.intact && i <= target);
        let (start, from_snapshot) = self.restore_source_before(target);
        if here.is_none_or(|h| h < start) {
            if from_snapshot {
                self.restore_snapshot(target)?;
            } else {
                self.restore_checkpoint(self.checkpoint_before(target))?;
            }
        }
        self.run_to(target, out)
    }
    /// Runs forward until `target` icount or the end of the recording, writing guest output to `out`.
    pub fn run_to(&mut self, target: u64, out: &mut dyn Write) -> Result<Halt, ReplayError> {
        loop {
            if let Some(h) = &self.finished {
                return Ok(h.clone());
            }
            let icount = self.icount();
            if icount >= target {
                return Ok(Halt::Target);
            }
            if self.stepping_within {
                // Free to the target's landmark, then one instruction at a time.
                let before = self.machine.landmarks() < position::decode(target).0;
                self.use_clock(if before { Clock::Landmark } else { Clock::Step })?;
            }
            if icount.is_multiple_of(PROGRESS_EVERY) {
                if let Some(p) = self.progress.as_mut() {
                    p(icount, target.min(self.end));
                }
            }
            self.advance_explained(out)?;
        }
    }

    fn use_clock(&mut self, clock: Clock) -> Result<(), ReplayError> {
        if self.machine.clock() != clock {
            self.machine.set_clock(clock)?;
        }
        Ok(())
    }

    /// Installs a callback that long runs call now and then with (current icount, target icount).
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
        self.advance_explained(out)
    }

    /// [`Replayer::advance`] with divergences explained, keeping track of where the replay stood intact.
    fn advance_explained(&mut self, out: &mut dyn Write) -> Result<(), ReplayError> {
        if self.intact {
            self.last_intact = self.icount();
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
    /// checkpoint that cannot be read), the position that step started from, to [`Replayer::seek`] back
    /// to. (Within a landmark whose instructions a free run did not count, the landmark's start.)
    pub fn last_intact(&self) -> u64 {
        let (landmark, offset) = position::decode(self.last_intact);
        if self.stepping_within && offset == position::UNKNOWN_OFFSET {
            position::encode(landmark, 0)
        } else {
            self.last_intact
        }
    }

    /// Says what a divergence in a landmark trace most likely means, and names positions as landmarks.
    fn explain(&self, mut d: Divergence) -> Divergence {
        if self.positions() == Clock::Landmark {
            d.unit = "landmark";
            if self.machine.clock() == Clock::Landmark && d.host_value_hint {
                d.what.push_str(
                    "; running free, the landmark clock logs RDTSC, RDRAND and RDSEED only where the guest \
                     image has them (the VMM traps them when it loads the image): if the guest reads them in \
                     code it makes at run time or runs in user mode, record it with --clock step \
                     (`retrovisor replay --clock step` on this trace stops at the instruction that differs)",
                );
            }
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
        if self.finished.is_none() && self.icount() < self.end {
            self.maybe_snapshot()?;
        }
        loop {
            let position = self.icount();
            self.verify_checkpoint(position)?;
            if position >= self.end {
                return self.finish_at_end(position);
            }
            // The anchor follows the trace's own positions (landmarks, even when replaying by index).
            if self.anchor.0 != self.machine.position() {
                self.anchor = (self.machine.position(), self.machine.rip());
            }
            // Where the log is: the replay's position, or its landmark when stepping within landmarks.
            let at = self.event_position(position);
            self.host.apply_inputs(&mut self.machine, at)?;
            if let Some(fingerprint) = self.host.kick_here(at) {
                if self.reach_kick(at, &fingerprint)? {
                    self.host.take_kick();
                    self.anchor.1 = self.machine.rip();
                    self.host.apply_inputs(&mut self.machine, at)?;
                } else if self.free_stop.is_some() {
                    return Ok(());
                }
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
            let advance = self.machine.advance(&mut self.host)?;
            if self.machine.landmarks() != landmarks {
                self.offset = 0;
            } else if advance == Advance::Moved {
                self.offset += 1;
            }
            let now = self.event_position(self.icount());
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
            self.printed_upto = self.printed_upto.max(self.icount());
            match advance {
                Advance::Moved => return Ok(()),
                // Only the recorder kicks; a kick here is a signal meant for something else.
                Advance::Kicked => continue,
                // A stop of a free run (see `run_free_with`).
                Advance::Breakpoint => {
                    self.free_stop = self.machine.stop_hit();
                    self.offset = position::UNKNOWN_OFFSET;
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
                    let now = self.icount();
                    match self
                        .host
                        .stop_here(self.event_position(now))
                        .or_else(|| self.host.stop_here(at))
                    {
                        Some(expected) if expected == got => {
                            self.finished = Some(Halt::End(Some(got)));
                            self.check_output()?;
                            return Ok(());
                        }
                        other => {
                            return Err(Divergence::new(
                                self.event_position(now),
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

    /// The position the event log names for replay position `position`: the same, or its landmark when
    /// stepping within landmarks.
    fn event_position(&self, position: u64) -> u64 {
        if self.stepping_within {
            position::decode(position).0
        } else {
            position
        }
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
                self.host.begin_step(position, self.machine.rip());
                let search = self.machine.run_to_fingerprint(fp, &mut self.host)?;
                // Running free, the instructions since the landmark went uncounted.
                self.offset = position::UNKNOWN_OFFSET;
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

    fn finish_at_end(&mut self, icount: u64) -> Result<(), ReplayError> {
        let reason = self.trace.summary().map(|s| s.stop);
        match &reason {
            // The guest stops by itself in the step that reaches `end`; reaching it without stopping is a divergence.
            Some(StopReason::GuestExit { .. } | StopReason::TripleFault) => {
                return Err(Divergence::new(
                    self.event_position(icount),
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

    fn verify_checkpoint(&mut self, icount: u64) -> Result<(), ReplayError> {
        let cps = &self.checkpoint_positions;
        while self.next_verify < cps.len() && cps[self.next_verify] < icount {
            self.next_verify += 1;
        }
        if cps.get(self.next_verify) == Some(&icount) {
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
                    self.event_position(icount),
                    format!("at checkpoint {}: {what}", self.next_verify),
                )
                .into());
            }
            if !self.contents_checked[self.next_verify] {
                self.check_contents(self.next_verify, icount)?;
                self.contents_checked[self.next_verify] = true;
            }
            // Fingerprints digest the pages written since the last checkpoint, as the recorder saw them.
            self.machine.mark_checkpoint()?;
            self.next_verify += 1;
        }
        Ok(())
    }

    /// Tells the user, once per checkpoint, that checkpoint `index` cannot be read, and what that costs.
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
    fn check_contents(&mut self, index: usize, position: u64) -> Result<(), ReplayError> {
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
            position: self.describe(position),
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
                    self.event_position(self.icount()),
                    "the guest's serial output differs from the recording's",
                )
                .into());
            }
        }
        Ok(())
    }
}

/// Page frames where two page maps differ (present in one only, or different pages).
fn map_difference(a: &PageMap, b: &PageMap) -> Vec<u64> {
    let mut out = Vec::new();
    let (mut x, mut y) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (x.peek(), y.peek()) {
            (Some((pa, da)), Some((pb, db))) => {
                if pa == pb {
                    if !Rc::ptr_eq(da, db) && da[..] != db[..] {
                        out.push(**pa);
                    }
                    x.next();
                    y.next();
                } else if pa < pb {
                    out.push(**pa);
                    x.next();
                } else {
                    out.push(**pb);
                    y.next();
                }
            }
            (Some((pa, _)), None) => {
                out.push(**pa);
                x.next();
            }
            (None, Some((pb, _))) => {
                out.push(**pb);
                y.next();
            }
            (None, None) => return out,
        }
    }
}

/// For backward searches ([`search`]), which scan forward from the nearest position a seek reaches without
/// replaying: in-memory snapshots make those scans short near the position the user is looking at.
impl Replayer {
    /// The latest position at or before `icount` that [`Replayer::seek`] restores directly: an in-memory
    /// snapshot or a checkpoint of the trace (0 if there is none).
    pub fn restore_point_before(&self, icount: u64) -> u64 {
        self.restore_source_before(icount).0
    }

    /// The latest restore point at or before `icount`, and whether it is an in-memory snapshot (rather than
    /// a trace checkpoint; a snapshot wins a tie, being cheaper to restore).
    fn restore_source_before(&self, icount: u64) -> (u64, bool) {
        let snapshot = self.cache.before(icount).map(|s| s.icount);
        let checkpoint = self
            .checkpoint_positions
            .get(self.checkpoint_before(icount))
            .copied()
            .filter(|&i| i <= icount)
            .unwrap_or(0);
        match snapshot {
            Some(s) if s >= checkpoint => (s, true),
            _ => (checkpoint, false),
        }
    }
}
