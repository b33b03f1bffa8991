//! Positions of a landmark trace replayed without an index: a landmark and the instructions since it,
//! in one `u64` that orders as the execution does, so the searches that compare and step through icount
//! positions work on them unchanged.

/// Bits of a position that count instructions since the landmark (the rest count landmarks).
const OFFSET_BITS: u32 = 32;

/// The offset of a point a free run stopped at, until it is located: past every position of its landmark,
/// so that moving to one of them restores and replays rather than counting on where the machine is.
pub const UNKNOWN_OFFSET: u64 = (1 << OFFSET_BITS) - 1;

/// The position `offset` instructions after landmark `landmark`.
pub fn encode(landmark: u64, offset: u64) -> u64 {
    (landmark << OFFSET_BITS) | (offset & ((1 << OFFSET_BITS) - 1))
}

/// (landmark, instructions since it) of a position made by [`encode`].
pub fn decode(position: u64) -> (u64, u64) {
    (position >> OFFSET_BITS, position & ((1 << OFFSET_BITS) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_as_the_execution_does() {
        assert_eq!(decode(encode(7, 12)), (7, 12));
        assert!(encode(7, 12) < encode(7, 13));
        assert!(encode(7, 4_000_000) < encode(8, 0));
        assert_eq!(encode(8, 0) - 1, encode(7, (1 << OFFSET_BITS) - 1));
    }
}
