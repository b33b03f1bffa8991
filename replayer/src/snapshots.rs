//! The replayer's in-memory snapshot cache, which keeps reverse execution interactive.
//!
//! A snapshot is the CPU and device state plus a map of every non-zero page. Pages are shared between
//! snapshots (`Rc`), so a new snapshot costs only the pages written since the one before it. Snapshots are
//! dense near the position the user is looking at and thin out exponentially farther away (as rr thins its
//! checkpoints), under a memory cap.

use std::collections::BTreeMap;
use std::rc::Rc;

/// Guest RAM as a map of non-zero pages; absent pages are zero.
pub type PageMap = BTreeMap<u64, Rc<[u8]>>;

/// One cached machine state.
pub struct Snap {
    /// Position.
    pub icount: u64,
    /// CPU and device state blob.
    pub state: Vec<u8>,
    /// Every non-zero page.
    pub pages: Rc<PageMap>,
    /// Bytes of page data this snapshot added (pages it does not share with the one it was made from).
    pub own_bytes: usize,
    /// The pages written since the last checkpoint (what fingerprints digest), to put back on restore.
    pub dirty_since_checkpoint: Vec<u64>,
    /// Events consumed from the log.
    pub cursor: usize,
    /// The replay's anchor (trace position and rip) at the snapshot.
    pub anchor: (u64, u64),
}

/// Instructions between snapshots near the focus: about 10 ms of replay at this machine's single-step rate.
/// A power of two, so that the spacings (its multiples by powers of two) also fit positions that count
/// landmarks in their upper bits (see [`crate::position`]): landmark starts fall on every spacing.
pub const BASE_INTERVAL: u64 = 2_048;
/// How many base intervals around the focus keep full density before spacing starts doubling.
const DENSE_SPAN: u64 = 16;

/// The cache, ordered by icount.
pub struct SnapshotCache {
    snaps: BTreeMap<u64, Snap>,
    bytes: usize,
    cap_bytes: usize,
}

impl SnapshotCache {
    /// An empty cache holding at most about `cap_bytes` of snapshot data.
    pub fn new(cap_bytes: usize) -> SnapshotCache {
        SnapshotCache {
            snaps: BTreeMap::new(),
            bytes: 0,
            cap_bytes,
        }
    }

    /// The latest snapshot at or before `icount`.
    pub fn before(&self, icount: u64) -> Option<&Snap> {
        self.snaps.range(..=icount).next_back().map(|(_, s)| s)
    }

    /// Whether a snapshot should be taken at `icount` when the user is interested in `focus`: at multiples
    /// of a spacing that doubles with the distance from the focus, and only where none exists yet.
    pub fn wants(&self, icount: u64, focus: u64) -> bool {
        icount.is_multiple_of(spacing(icount.abs_diff(focus))) && !self.snaps.contains_key(&icount)
    }

    /// Adds a snapshot, then thins the cache around `focus`.
    pub fn insert(&mut self, snap: Snap, focus: u64) {
        self.bytes += snap.own_bytes + snap.state.len();
        if let Some(old) = self.snaps.insert(snap.icount, snap) {
            self.bytes -= old.own_bytes + old.state.len();
        }
        self.thin(focus);
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
                let sp = spacing(ic.abs_diff(focus));
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

    fn remove(&mut self, icount: u64) {
        if let Some(s) = self.snaps.remove(&icount) {
            self.bytes -= s.own_bytes + s.state.len();
        }
    }
}

/// Snapshot spacing at `distance` instructions from the focus: BASE_INTERVAL within DENSE_SPAN intervals,
/// then doubling with each further doubling of the distance.
fn spacing(distance: u64) -> u64 {
    let units = distance / (BASE_INTERVAL * DENSE_SPAN);
    BASE_INTERVAL << (64 - units.leading_zeros()).min(40)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(icount: u64) -> Snap {
        Snap {
            icount,
            state: vec![0; 10],
            pages: Rc::new(PageMap::new()),
            own_bytes: 100,
            dirty_since_checkpoint: Vec::new(),
            cursor: 0,
            anchor: (0, 0),
        }
    }

    #[test]
    fn dense_near_the_focus_and_thin_far_away() {
        let mut c = SnapshotCache::new(usize::MAX);
        for i in 0..500 {
            c.insert(snap(i * BASE_INTERVAL), 499 * BASE_INTERVAL);
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
            c.before(499 * BASE_INTERVAL + 5).unwrap().icount,
            499 * BASE_INTERVAL
        );
        assert!(c.wants(500 * BASE_INTERVAL, 500 * BASE_INTERVAL));
        assert!(
            !c.wants(499 * BASE_INTERVAL, 500 * BASE_INTERVAL),
            "already held"
        );
        assert!(
            !c.wants(BASE_INTERVAL, 500 * BASE_INTERVAL),
            "too far from the focus for this spacing"
        );
    }

    #[test]
    fn memory_cap_drops_the_farthest() {
        let mut c = SnapshotCache::new(550);
        for i in 0..10 {
            c.insert(snap(i * BASE_INTERVAL), 9 * BASE_INTERVAL);
        }
        assert!(c.bytes() <= 550);
        assert_eq!(c.len(), 5);
        assert!(
            c.before(4 * BASE_INTERVAL).is_none()
                || c.before(4 * BASE_INTERVAL).unwrap().icount >= 5 * BASE_INTERVAL
        );
    }
}
