//! Reverse execution: a [`Timeline`] owns every way back to an earlier position of a replay and every
//! search over the recording, in the spirit of rr's ReplayTimeline.
//!
//! The [`Replayer`] it drives only goes forward, checking the machine against the log. Going back means
//! restoring a *restore point* at or before the target and replaying forward from it: a checkpoint of
//! the trace, or one of the in-memory snapshots the timeline takes as the replay passes positions
//! (dense near the position the user is looking at, thinned farther away: see `timeline/snapshots.rs`). The
//! searches ([`search`]: reverse-continue, reverse-step, watchpoints, `monitor history`) are built on
//! [`Timeline::seek`] and [`Timeline::step`] alone, and know which intervals they may skip from what
//! the trace's checkpoints list as written and what earlier free runs found clear.

pub mod calls;
pub mod search;
mod snapshots;
mod workers;

use crate::{Halt, ReplayError, Replayer};
use snapshots::{PageMap, Snap, SnapshotCache};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use vocab::{Clock, Position};

/// Default memory cap of the snapshot cache.
pub const DEFAULT_SNAPSHOT_MEMORY: u64 = 512 << 20;

/// A replay that moves to any position of its recording, backward as well as forward.
pub struct Timeline {
    replay: Replayer,
    /// In-memory snapshots taken while replaying, for fast moves backward.
    cache: SnapshotCache,
    /// Guest RAM as of the last restore or snapshot: the base the next snapshot's dirty pages apply to.
    base_pages: Rc<PageMap>,
    /// The position the user is looking at: snapshots are densest around it.
    focus: Position,
    /// Ranges of positions a free run passed through with breakpoints armed that did not fire: (the
    /// breakpoint rips, first position, end position exclusive).
    clear_runs: Vec<(Vec<u64>, Position, Position)>,
    /// The pages each checkpoint lists, by checkpoint index, read when a search first needs them (None:
    /// the checkpoint cannot be read).
    page_sets: HashMap<usize, Option<Rc<BTreeSet<u64>>>>,
    /// Replays a search may run at once, each on a core of its own (see [`Timeline::set_workers`]).
    workers: usize,
}

/// Memory cap of the snapshot cache of a search's worker: it replays whole checkpoint intervals
/// forward, so it needs few snapshots.
const WORKER_SNAPSHOT_MEMORY: usize = 32 << 20;

/// What opens another replay of the same recording, replayed the same way: for a search's workers,
/// each a replay of its own on a core of its own (a timeline holds a KVM machine and stays on its
/// thread).
#[derive(Debug, Clone)]
pub struct Recipe {
    dir: PathBuf,
    image: Option<PathBuf>,
    /// A landmark trace replayed by single steps throughout (`--clock step`).
    step_only: bool,
    /// Positions within landmarks.
    within: bool,
    /// A pmu trace: the host's hardware branch counter, where the replay counts with it.
    hardware: Option<machine::perf::CounterEvent>,
}

impl Recipe {
    /// Opens the replay, at its first checkpoint.
    pub fn open(&self) -> Result<Timeline, ReplayError> {
        let mut t = Timeline::open(&self.dir, self.image.as_deref())?;
        t.set_snapshot_memory(WORKER_SNAPSHOT_MEMORY);
        if self.step_only {
            t.set_clock(Clock::Step)?;
        }
        if self.within {
            t.step_within_landmarks()?;
        }
        if let Some(event) = self.hardware {
            t.use_hardware_counter(event)?;
        }
        t.workers = 1;
        Ok(t)
    }
}

impl Timeline {
    /// Opens a trace (with `image`, or the guest image the trace names) at its first checkpoint.
    pub fn open(dir: &Path, image: Option<&Path>) -> Result<Timeline, ReplayError> {
        let mut timeline = Timeline {
            replay: Replayer::load(dir, image)?,
            cache: SnapshotCache::new(DEFAULT_SNAPSHOT_MEMORY as usize, Clock::Step),
            base_pages: Rc::new(PageMap::new()),
            focus: Position::START,
            clear_runs: Vec::new(),
            page_sets: HashMap::new(),
            workers: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        };
        timeline.restore_checkpoint(0)?;
        Ok(timeline)
    }

    /// The replay, at the current position.
    pub fn replay(&self) -> &Replayer {
        &self.replay
    }

    /// The current position.
    pub fn position(&self) -> Position {
        self.replay.position()
    }

    /// The machine's digest at the current position (as a checkpoint there would record it).
    pub fn digest(&mut self) -> Result<[u8; 32], ReplayError> {
        self.replay.digest()
    }

    /// Replays with `clock` from now on (see [`Replayer::set_clock`]).
    pub fn set_clock(&mut self, clock: Clock) -> Result<(), ReplayError> {
        self.replay.set_clock(clock)
    }

    /// A pmu trace: the simulated counter's skid (see [`Replayer::set_counter_skid`]). Search workers
    /// keep the default: the answers are the same whatever the skid.
    pub fn set_counter_skid(&mut self, skid: u64) {
        self.replay.set_counter_skid(skid);
    }

    /// A pmu trace: counts with the host's hardware counter of `event` (see
    /// [`Replayer::use_hardware_counter`]), and so do search workers.
    pub fn use_hardware_counter(
        &mut self,
        event: machine::perf::CounterEvent,
    ) -> Result<(), ReplayError> {
        self.replay.use_hardware_counter(event)
    }

    /// Messages about problems the replay worked around, oldest first; each is returned once.
    pub fn take_notices(&mut self) -> Vec<String> {
        self.replay.take_notices()
    }

    /// Positions a landmark trace by instructions within its landmarks from now on (see
    /// [`Replayer::step_within_landmarks`]), and starts again at the first checkpoint.
    pub fn step_within_landmarks(&mut self) -> Result<(), ReplayError> {
        self.replay.step_within_landmarks()?;
        self.cache = SnapshotCache::new(self.cache.cap_bytes(), Clock::Landmark);
        self.restore_checkpoint(0)?;
        Ok(())
    }

    /// Lets searches that split into independent pieces run up to `n` replays at once (default: one per
    /// core); 1 keeps them on this replay alone. The answers are the same either way.
    pub fn set_workers(&mut self, n: usize) {
        self.workers = n.max(1);
    }

    /// How many replays a search may run at once.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// What opens another replay like this one, for a worker.
    pub fn recipe(&self) -> Recipe {
        let r = &self.replay;
        let within = r.steps_within_landmarks();
        Recipe {
            dir: r.trace().dir().to_path_buf(),
            image: r.image_path().map(Path::to_path_buf),
            step_only: !within
                && r.positions() == Clock::Landmark
                && r.machine().clock() == Clock::Step,
            within,
            hardware: r.machine().hardware_counter(),
        }
    }

    /// Sets the memory cap of the in-memory snapshot cache.
    pub fn set_snapshot_memory(&mut self, bytes: usize) {
        self.cache = SnapshotCache::new(bytes, self.cache.unit());
    }

    /// Number of in-memory snapshots and the bytes they hold.
    pub fn snapshot_stats(&self) -> (usize, usize) {
        (self.cache.len(), self.cache.bytes())
    }

    /// Restores checkpoint `index` (or the latest good one before it, see
    /// [`Replayer::restore_checkpoint`]); returns the index restored.
    pub fn restore_checkpoint(&mut self, index: usize) -> Result<usize, ReplayError> {
        let (index, pages) = self.replay.restore_checkpoint_pages(index)?;
        self.base_pages = Rc::new(
            pages
                .into_iter()
                .map(|(pfn, data)| (pfn, Rc::from(data)))
                .collect(),
        );
        Ok(index)
    }

    /// Moves to `target` (clamped to the recording): restores the latest restore point at or before it
    /// when it lies behind, or when a restore point is nearer than the current position, then runs
    /// forward. After a failed step or restore it always restores: the machine may be anywhere.
    pub fn seek(&mut self, target: Position, out: &mut dyn Write) -> Result<Halt, ReplayError> {
        let target = target.min(self.replay.end());
        self.focus = target;
        // Start from whichever is latest at or before the target: where we are, or a restore point.
        let here = Some(self.position()).filter(|&p| self.replay.is_intact() && p <= target);
        let (start, from_snapshot) = self.restore_source_before(target);
        if here.is_none_or(|h| h < start) {
            if from_snapshot {
                self.restore_snapshot(target)?;
                match self.run_to(target, out) {
                    Err(ReplayError::Divergence(d)) => {
                        // An in-memory snapshot lies between checkpoints: restored, it starts with no
                        // translations cached in KVM where the recording had them, and PVM's filling
                        // them can write a page the recording's kick fingerprint did not count (see
                        // `cold_checkpoints`). A checkpoint starts exactly as the recording did there.
                        self.replay.notice(format!(
                            "the replay from an in-memory snapshot at {} diverged ({d}); it started again \
                             from the checkpoint before it",
                            self.replay.show(start)
                        ));
                        self.restore_checkpoint(self.replay.checkpoint_before(target))?;
                    }
                    done => return done,
                }
            } else {
                self.restore_checkpoint(self.replay.checkpoint_before(target))?;
            }
        }
        self.run_to(target, out)
    }

    /// Runs forward until `target` or the end of the recording, taking snapshots on the way.
    pub fn run_to(&mut self, target: Position, out: &mut dyn Write) -> Result<Halt, ReplayError> {
        loop {
            if let Some(halt) = self.replay.reached(target) {
                return Ok(halt);
            }
            self.maybe_snapshot()?;
            self.replay.advance_toward(target, out)?;
        }
    }

    /// Advances to the next position (see [`Replayer::step`]).
    pub fn step(&mut self, out: &mut dyn Write) -> Result<(), ReplayError> {
        self.maybe_snapshot()?;
        self.replay.step(out)
    }

    /// Runs free to the next landmark with `breakpoints` armed (see [`Replayer::run_free_with`]).
    pub fn run_free_with(
        &mut self,
        breakpoints: &[u64],
        out: &mut dyn Write,
    ) -> Result<Option<usize>, ReplayError> {
        self.maybe_snapshot()?;
        self.replay.run_free_with(breakpoints, out)
    }

    /// After a free run stopped between landmarks ([`Timeline::run_free_with`]): finds the position of
    /// the point the machine is at, by stepping from its landmark to the first point with the same
    /// fingerprint (which has the same future), and leaves the replay there.
    pub fn locate(&mut self, out: &mut dyn Write) -> Result<Position, ReplayError> {
        let fingerprint = self.replay.fingerprint()?;
        let landmark = self.replay.machine().landmarks();
        self.seek(Position::at(landmark), out)?;
        while !self.replay.matches(&fingerprint)? {
            if self.replay.finished() || self.replay.machine().landmarks() != landmark {
                return Err(crate::Divergence {
                    clock: Clock::Landmark,
                    ..crate::Divergence::new(
                        landmark,
                        format!(
                            "a free run stopped at rip {:#x} after landmark {landmark}, but stepping from \
                             the landmark never reached that state",
                            fingerprint.rip
                        ),
                    )
                }
                .into());
            }
            self.step(out)?;
        }
        Ok(self.position())
    }

    /// The position just before `position` (> the start): one instruction earlier. At the start of a
    /// landmark that is the last position of the landmark before, found by stepping through it.
    pub fn previous(
        &mut self,
        position: Position,
        out: &mut dyn Write,
    ) -> Result<Position, ReplayError> {
        if !self.replay.steps_within_landmarks() {
            return Ok(Position::at(position.count() - 1));
        }
        if position.offset() > 0 {
            return Ok(Position::within(position.count(), position.offset() - 1));
        }
        // Step through the landmark before from its start until the step that makes this one.
        let landmark = position.count();
        self.seek(Position::at(landmark - 1), out)?;
        let mut last = self.position();
        while self.replay.machine().landmarks() < landmark && !self.replay.finished() {
            last = self.position();
            self.step(out)?;
        }
        Ok(last)
    }

    /// The guest-physical pages written between positions `from` and `to` (by the guest or a device), as a
    /// superset: the union of what the trace's checkpoints list for the checkpoint intervals that overlap
    /// the range. None where the trace cannot tell (after its last checkpoint, or where a checkpoint's list
    /// cannot be read: that is in [`Timeline::take_notices`]).
    pub fn pages_written(&mut self, from: Position, to: Position) -> Option<Rc<BTreeSet<u64>>> {
        let positions = self.replay.checkpoint_positions();
        let first = self.replay.checkpoint_before(from);
        let last = positions.partition_point(|&c| c < to);
        if last >= positions.len() {
            return None;
        }
        let mut union = BTreeSet::new();
        for next in first + 1..=last {
            let pages = match self.page_sets.get(&next) {
                Some(pages) => pages.clone()?,
                None => {
                    let pages = self.replay.pages_written_before(next);
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

    /// Notes that positions `from..to` hold no hit of the breakpoints at `rips`: a free run passed through
    /// them with those armed. (Positions are the recording's: this holds whatever the replay does later.)
    pub fn note_clear(&mut self, rips: &[u64], from: Position, to: Position) {
        if from < to {
            self.clear_runs.push((rips.to_vec(), from, to));
        }
    }

    /// Whether positions `from..to` are known to hold no hit of the breakpoint at `rip`.
    pub fn known_clear(&self, rip: u64, from: Position, to: Position) -> bool {
        self.clear_runs
            .iter()
            .any(|(rips, a, b)| rips.contains(&rip) && *a <= from && to <= *b)
    }

    /// Whether any of the page frames `pfns` was written since the last call (see
    /// [`machine::Machine::wrote_since_probe`]).
    pub fn wrote_since_probe(&mut self, pfns: &[u64]) -> Result<bool, ReplayError> {
        self.replay.wrote_since_probe(pfns)
    }

    /// The latest position at or before `position` that [`Timeline::seek`] restores directly: an
    /// in-memory snapshot or a checkpoint of the trace (the start if there is none).
    pub fn restore_point_before(&self, position: Position) -> Position {
        self.restore_source_before(position).0
    }

    /// The latest restore point at or before `position`, and whether it is an in-memory snapshot
    /// (rather than a trace checkpoint; a snapshot wins a tie, being cheaper to restore).
    fn restore_source_before(&self, position: Position) -> (Position, bool) {
        let snapshot = self.cache.before(position).map(|s| s.at);
        let checkpoint = self
            .replay
            .checkpoint_positions()
            .get(self.replay.checkpoint_before(position))
            .copied()
            .filter(|&p| p <= position)
            .unwrap_or(Position::START);
        match snapshot {
            Some(s) if s >= checkpoint => (s, true),
            _ => (checkpoint, false),
        }
    }

    /// Restores the in-memory snapshot at or before `target`, rewriting only the pages that differ from
    /// RAM as it is: those the guest wrote since the last restore or snapshot, and those where the two
    /// page maps differ.
    fn restore_snapshot(&mut self, target: Position) -> Result<(), ReplayError> {
        let snap = self
            .cache
            .before(target)
            .expect("caller checked a snapshot exists");
        let pages = snap.pages.clone();
        let mut pfns: BTreeSet<u64> = self.replay.take_dirty_pages()?.into_iter().collect();
        pfns.extend(map_difference(&self.base_pages, &pages));
        self.replay.restore_snapshot(
            pfns.into_iter()
                .map(|pfn| (pfn, pages.get(&pfn).map(|p| &p[..]))),
            &snap.resume,
        )?;
        self.base_pages = pages;
        Ok(())
    }

    /// Takes an in-memory snapshot here if the cache wants one (called before each step forward).
    fn maybe_snapshot(&mut self) -> Result<(), ReplayError> {
        if self.replay.finished() || self.position() >= self.replay.end() {
            return Ok(());
        }
        let at = self.position();
        self.focus = self.focus.max(at);
        if !self.cache.wants(at, self.focus) {
            return Ok(());
        }
        let dirty = self.replay.take_dirty_pages()?;
        let mut pages = (*self.base_pages).clone();
        for &pfn in &dirty {
            let data = self.replay.machine().memory().page(pfn as usize);
            if data.iter().all(|&b| b == 0) {
                pages.remove(&pfn);
            } else {
                pages.insert(pfn, Rc::from(data));
            }
        }
        self.base_pages = Rc::new(pages);
        let snap = Snap {
            at,
            resume: self.replay.resume_point()?,
            pages: self.base_pages.clone(),
            own_bytes: dirty.len() * memory::PAGE_SIZE,
        };
        self.cache.insert(snap, self.focus);
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
