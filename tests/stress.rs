//! Replays stay exact on an overloaded machine: record and replay while busy threads keep every core
//! (and more) occupied, so the vCPU thread is preempted and migrated at every moment. Any divergence of
//! an unmodified trace is a false one. (bench/soak.py runs the same for hundreds of rounds.)

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Busy threads, two per core, until dropped.
struct Hogs(Arc<AtomicBool>);

impl Hogs {
    fn start() -> Hogs {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        for _ in 0..2 * cores {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            });
        }
        Hogs(stop)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn recordings_replay_exactly_under_overload() {
    let dir = scratch("stress");
    let input = dir.join("input.txt");
    std::fs::write(&input, "one\ntwo\nthree\nquit\n").unwrap();
    let image = dir.join("disk.img");
    std::fs::write(
        &image,
        (0..32768u32).map(|i| (i * 13) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let cases: [(&str, Vec<&str>); 3] = [
        ("timer", vec![]),
        ("echo", vec!["--serial-input", input.to_str().unwrap()]),
        ("disk", vec!["--disk", image.to_str().unwrap()]),
    ];
    let _hogs = Hogs::start();
    for (name, extra) in &cases {
        // Checkpoints close together, so that replays check many of them.
        for (clock, every, value) in [
            ("step", "--checkpoint-every", "3000"),
            ("landmark", "--checkpoint-ms", "5"),
        ] {
            let sub = dir.join(format!("{name}-{clock}"));
            std::fs::create_dir_all(&sub).unwrap();
            let mut args = vec!["--clock", clock, every, value];
            args.extend_from_slice(extra);
            let (trace, rec) = record(&sub, name, &args);
            for _ in 0..2 {
                assert_replays(&trace, &rec);
            }
        }
    }
}
