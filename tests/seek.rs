//! Moving around a replay: every way of reaching an icount (running forward, restoring an in-memory
//! snapshot, restoring a trace checkpoint) gives the same machine state, checked by digest.

mod common;
use common::*;
use replayer::{Position, Timeline};

#[test]
fn seeking_backward_and_forward_reaches_identical_states() {
    let dir = scratch("seek");
    let (trace, _) = record(&dir, "timer", &["--checkpoint-every", "30000"]);
    let mut r = Timeline::open(&trace, None).unwrap();
    let end = r.replay().end().count();
    let points: Vec<u64> = (1..=24).map(|i| end * i / 25 + i).collect();
    let mut sink = Vec::new();
    let mut expected = Vec::new();
    for &p in &points {
        r.run_to(Position::at(p), &mut sink).unwrap();
        assert_eq!(r.position(), Position::at(p));
        expected.push((p, r.digest().unwrap(), r.replay().machine().rip()));
    }
    let (snaps, _) = r.snapshot_stats();
    assert!(
        snaps > 5,
        "replaying forward should have cached snapshots, has {snaps}"
    );
    // A fixed shuffle: back and forth, near and far, and single steps back.
    let mut order: Vec<usize> = (0..points.len()).collect();
    for i in 0..order.len() {
        order.swap(i, (i * 7 + 3) % points.len());
    }
    for &i in &order {
        let (p, digest, rip) = expected[i];
        r.seek(Position::at(p), &mut sink).unwrap();
        assert_eq!(r.position(), Position::at(p));
        assert_eq!(
            r.replay().machine().rip(),
            rip,
            "rip differs after seeking to {p}"
        );
        assert_eq!(
            r.digest().unwrap(),
            digest,
            "state differs after seeking to {p}"
        );
        // One instruction back from here, then forward again, lands on the same state.
        r.seek(Position::at(p - 1), &mut sink).unwrap();
        r.seek(Position::at(p), &mut sink).unwrap();
        assert_eq!(
            r.digest().unwrap(),
            digest,
            "state differs after stepping back and forth at {p}"
        );
    }
}
