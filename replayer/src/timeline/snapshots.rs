//! The replayer's in-memory snapshot cache, which keeps reverse execution interactive.
//!
//! A snapshot is the CPU and device state plus a map of every non-zero page. Pages are shared between
//! snapshots (`Rc`), so a new snapshot costs only the pages written since the one before it. Snapshots are
//! dense near the position the user is looking at and thin out exponentially farther away (as rr thins its
//! checkpoints), under a memory cap.

use crate::ResumePoint;
use std::collections::BTreeMap;
use std::rc::Rc;
use vocab::{Clock, Position};

/// Guest RAM as a map of non-zero pages; absent pages are zero.
pub type PageMap = BTreeMap<u64, Rc<[u8]>>;

/// One cached machine state.
pub struct Snap {
    /// Position.
    pub at: Position,
    /// The machine's CPU and device state and the replay's own, to resume there.
    pub resume: ResumePoint,
    /// Every non-zero page.
    pub pages: Rc<PageMap>,
    /// Bytes of page data this snapshot added (pages it does not share with the one it was made from).
    pub own_bytes: usize,
}

impl Snap {
    /// Bytes it holds of its own.
    fn bytes(&self) -> usize {
        self.own_bytes + self.resume.state_bytes()
    }
}

/// Instructions between snapshots near the focus: about 10 ms of replay at this machine's single-step rate.
/// A power of two, so that the spacings (its multiples by powers of two) also fit positions that count
/// landmarks in their upper bits (see [`SnapshotCache::key`]): landmark starts fall on every spacing.
pub const BASE_INTERVAL: u64 = 2_048;
/// How many base intervals around the focus keep full density before spacing starts doubling.
const DENSE_SPAN: u64 = 16;
/// Instructions between snapshots within [`BASE_INTERVAL`] of the focus: about 1 ms of single steps, so that
/// stepping back one instruction at a time (each a restore and a run forward) takes a few milliseconds
/// (measured on the long ledger: 2.5-3.5 ms with 128, 3.5-4 ms with 256, 13-18 ms with none). The first
/// step back from a point takes them on its way there; the next ones restore the nearest.
pub const FINE_INTERVAL: u64 = 128;

/// Bits of a [`SnapshotCache::key`] that count instructions within a landmark.
const OFFSET_BITS: u32 = 32;

/// The cache, ordered by position.
pub struct SnapshotCache {
    snaps: BTreeMap<u64, Snap>,
    bytes: usize,
    cap_bytes: usize,
    /// What the positions count: instructions (step), or landmarks and the instructions since them.
    unit: Clock,
}

impl SnapshotCache {
    /// An empty cache holding at most about `cap_bytes` of snapshot data, for positions counted by
    /// `unit` (the step clock's instructions, or landmarks with the instructions since them).
    pub fn new(cap_bytes: usize, unit: Clock) -> SnapshotCache {
        SnapshotCache {
            snaps: BTreeMap::new(),
            bytes: 0,
            cap_bytes,
            unit,
        }
    }

    /// What its positions count.
    pub fn unit(&self) -> Clock {
        self.unit
    }

    /// A position as one number that orders as positions do and measures the distances that space
    /// snapshots: instructions; within landmarks, a landmark weighs 2^32 instructions, so that snapshots
    /// thin out by landmarks far from the focus and by instructions near it.
    fn key(&self, at: Position) -> u64 {
        match self.unit {
            Clock::Step => at.count(),
            Clock::Landmark => {
                (at.count() << OFFSET_BITS) | at.offset().min((1 << OFFSET_BITS) - 1)
            }
        }
    }

    /// The latest snapshot at or before `at`.
    pub fn before(&self, at: Position) -> Option<&Snap> {
        self.snaps
            .range(..=self.key(at))
            .next_back()
            .map(|(_, s)| s)
    }

    /// Whether a snapshot should be taken at `at` when the user is interested in `focus`: at multiples
    /// of a spacing that doubles with the distance from the focus, and only where none exists yet.
    pub fn wants(&self, at: Position, focus: Position) -> bool {
        let (key, focus) = (self.key(at), self.key(focus));
        key.is_multiple_of(spacing(key, focus)) && !self.snaps.contains_key(&key)
    }

    /// Adds a snapshot, then thins the cache around `focus`.
    pub fn insert(&mut self, snap: Snap, focus: Position) {
        self.bytes += snap.bytes();
        if let Some(old) = self.snaps.insert(self.key(snap.at), snap) {
            self.bytes -= old.bytes();
        }
        self.thin(self.key(focus));
    }

    /// Number of snapshots held.
    pub fn len(&self) -> usize {
        self.snaps.len()
    }

    /// Approximate bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The memory cap it was made with.
    pub fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }

    /// Keeps at most one snapshot per spacing-sized bucket (spacing growing with distance from `focus`),
    /// then drops the farthest ones while over the memory cap.
    fn thin(&mut self, focus: u64) {
        let mut seen = std::collections::HashSet::new();
        let doomed: Vec<u64> = self
            .snaps
            .keys()
            .copied()
            .filter(|&ic| {
                let sp = spacing(ic, focus);
                !seen.insert((sp, ic / sp))
            })
            .collect();
        for ic in doomed {
            self.remove(ic);
        }
        while self.bytes > self.cap_bytes && self.snaps.len() > 1 {
            let far = *self
                .snaps
                .keys()
                .max_by_key(|&&ic| ic.abs_diff(focus))
                .expect("non-empty");
            self.remove(far);
        }
    }

    fn remove(&mut self, key: u64) {
        if let Some(s) = self.snaps.remove(&key) {
            self.bytes -= s.bytes();
        }
    }
}

/// Snapshot spacing at key `key` for a focus at key `focus`: FINE_INTERVAL within one BASE_INTERVAL before
/// the focus (where steps back land; a forward run, whose focus is where it stands, takes none),
/// BASE_INTERVAL within DENSE_SPAN intervals, then doubling with each further doubling of the distance.
fn spacing(key: u64, focus: u64) -> u64 {
    let distance = key.abs_diff(focus);
    if key < focus && distance < BASE_INTERVAL {
        return FINE_INTERVAL;
    }
    let units = distance / (BASE_INTERVAL * DENSE_SPAN);
    BASE_INTERVAL << (64 - units.leading_zeros()).min(40)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(icount: u64) -> Snap {
        Snap {
            at: Position::at(icount),
            resume: ResumePoint::for_test(Position::at(icount), vec![0; 10]),
            pages: Rc::new(PageMap::new()),
            own_bytes: 100,
        }
    }

    fn at(icount: u64) -> Position {
        Position::at(icount)
    }

    #[test]
    fn dense_near_the_focus_and_thin_far_away() {
        let mut c = SnapshotCache::new(usize::MAX, Clock::Step);
        for i in 0..500 {
            c.insert(snap(i * BASE_INTERVAL), at(499 * BASE_INTERVAL));
        }
        let near = c
            .snaps
            .range((499 - DENSE_SPAN + 1) * BASE_INTERVAL..)
            .count();
        let far = c.snaps.range(..100 * BASE_INTERVAL).count();
        assert_eq!(
            near as u64, DENSE_SPAN,
            "every snapshot within the dense span is kept"
        );
        assert!(far <= 4, "far away only a few remain, found {far}");
        assert!(c.len() < 60, "{} snapshots kept", c.len());
        assert_eq!(
            c.before(at(499 * BASE_INTERVAL + 5)).unwrap().at,
            at(499 * BASE_INTERVAL)
        );
        assert!(c.wants(at(500 * BASE_INTERVAL), at(500 * BASE_INTERVAL)));
        assert!(
            !c.wants(at(499 * BASE_INTERVAL), at(500 * BASE_INTERVAL)),
            "already held"
        );
        assert!(
            !c.wants(at(BASE_INTERVAL), at(500 * BASE_INTERVAL)),
            "too far from the focus for this spacing"
        );
    }

    #[test]
    fn finest_right_at_the_focus() {
        let focus = 100 * BASE_INTERVAL + 1000;
        let c = SnapshotCache::new(usize::MAX, Clock::Step);
        assert!(c.wants(at(focus - 1000 + FINE_INTERVAL), at(focus)));
        assert!(!c.wants(at(focus - 1000 + FINE_INTERVAL / 2), at(focus)));
        assert!(
            !c.wants(at(focus - 4 * BASE_INTERVAL + FINE_INTERVAL), at(focus)),
            "beyond one base interval the spacing is the base interval"
        );
        // Not at or after it: a forward run's focus is where it stands, and it takes none.
        assert!(!c.wants(
            at(focus - 1000 + 9 * FINE_INTERVAL),
            at(focus - 1000 + 9 * FINE_INTERVAL)
        ));
        // Within a landmark too: offsets are the low bits of the key.
        let c = SnapshotCache::new(usize::MAX, Clock::Landmark);
        assert!(c.wants(
            Position::within(7, 3 * FINE_INTERVAL),
            Position::within(7, 1000)
        ));
    }

    #[test]
    fn memory_cap_drops_the_farthest() {
        let mut c = SnapshotCache::new(550, Clock::Step);
        for i in 0..10 {
            c.insert(snap(i * BASE_INTERVAL), at(9 * BASE_INTERVAL));
        }
        assert!(c.bytes() <= 550);
        assert_eq!(c.len(), 5);
        assert!(
            c.before(at(4 * BASE_INTERVAL)).is_none()
                || c.before(at(4 * BASE_INTERVAL)).unwrap().at >= at(5 * BASE_INTERVAL)
        );
    }
}
