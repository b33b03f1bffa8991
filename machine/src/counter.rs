//! The simulated branch counter of the pmu clock (see [`crate::pmu`]): where its overflow lands.

/// The largest skid (instructions) a simulated counter takes.
pub const MAX_SKID: u64 = 128;

/// The skid a replay gives the simulated counter unless told otherwise (`replay --skid`).
pub const DEFAULT_SKID: u64 = 64;

/// A simulated branch counter's overflow: where it is programmed to interrupt, and how late it lands.
#[derive(Debug, Clone)]
pub struct SimulatedCounter {
    skid: u64,
    /// Overflows programmed so far.
    pub(crate) overflows: u64,
    /// xorshift64 state: the skid of each overflow.
    state: u64,
}

impl SimulatedCounter {
    /// A counter whose overflow lands up to `skid` instructions (at most [`MAX_SKID`]) late.
    pub fn new(skid: u64) -> SimulatedCounter {
        SimulatedCounter {
            skid: skid.min(MAX_SKID),
            overflows: 0,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// How late the next overflow lands: 0 to the skid, instructions.
    pub(crate) fn next_skid(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % (self.skid + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skids_stay_within_what_was_asked_and_vary() {
        let mut c = SimulatedCounter::new(100);
        let skids: Vec<u64> = (0..1000).map(|_| c.next_skid()).collect();
        assert!(skids.iter().all(|&s| s <= 100));
        assert!(skids.iter().any(|&s| s > 90) && skids.iter().any(|&s| s < 10));
        let mut none = SimulatedCounter::new(0);
        assert!((0..100).all(|_| none.next_skid() == 0));
        assert_eq!(SimulatedCounter::new(10_000).skid, MAX_SKID);
    }
}
