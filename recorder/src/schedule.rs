//! Which vCPU runs, on a machine with several: the recorder's scheduler. The vCPUs run one at a time;
//! the running one keeps the CPU until it has nothing to do (halted, or waiting for its start-up IPI) or
//! its time slice ends, and then the next one that can run takes over. Each switch is logged (a
//! `Switch` event, at a landmark or at a kick point named by its fingerprint), so replay follows the
//! same interleaving without asking the scheduler anything.
//!
//! **Chaos mode** (`record --chaos`) makes the interleavings that expose races likely instead of rare,
//! after rr's chaos mode: slice lengths drawn from ranges of very different sizes (many very short),
//! switches at the kick point itself rather than at the exit of the loop the vCPU is in (so a switch
//! can land between a load and the store that should have gone with it), a random choice of the next
//! vCPU, and windows in which one vCPU starves while the others run. Everything is drawn from the seed,
//! which the trace header keeps; replay never needs it.

use machine::{Clock, Machine};
use std::time::{Duration, Instant};

/// A slice's length: instructions (step clock) or wall time (landmark clock, whose positions come at
/// no regular pace).
#[derive(Debug, Clone, Copy)]
enum Slice {
    Instructions(u64),
    Wall(Duration),
}

/// The slice of the normal scheduler, step clock.
const STEP_SLICE: u64 = 20_000;
/// The slice of the normal scheduler, landmark clock: a few kicks.
const WALL_SLICE: Duration = Duration::from_millis(3);
/// How long a vCPU runs in a spin-wait before it gives up the CPU: instructions (step clock), wall time
/// (landmark clock: one kick).
const SPIN_GRACE: u64 = 1_000;
const SPIN_GRACE_WALL: Duration = Duration::from_millis(1);
/// A slice overdue by this much means the vCPU cannot be stopped where it is (user mode on PVM, where
/// neither kicks nor breakpoints can name a point) and has not exited since: said once, on stderr.
const OVERDUE: Duration = Duration::from_secs(2);

/// The recorder's scheduler.
pub(crate) struct Scheduler {
    clock: Clock,
    /// Where and when the running vCPU's slice began, and how long it is.
    began_at: u64,
    began: Instant,
    slice: Slice,
    chaos: Option<Chaos>,
    warned_overdue: bool,
}

impl Scheduler {
    /// A scheduler for a machine driven by `clock`; in chaos mode with `chaos_seed`.
    pub(crate) fn new(clock: Clock, chaos_seed: Option<u64>) -> Scheduler {
        let mut scheduler = Scheduler {
            clock,
            began_at: 0,
            began: Instant::now(),
            slice: Slice::Instructions(0),
            chaos: chaos_seed.map(Chaos::new),
            warned_overdue: false,
        };
        scheduler.slice = scheduler.draw_slice();
        scheduler
    }

    /// Whether chaos mode is on: switches then happen where a kick lands, not at loop exits.
    pub(crate) fn chaotic(&self) -> bool {
        self.chaos.is_some()
    }

    fn draw_slice(&mut self) -> Slice {
        match (&mut self.chaos, self.clock) {
            (None, Clock::Step) => Slice::Instructions(STEP_SLICE),
            (None, Clock::Landmark) => Slice::Wall(WALL_SLICE),
            (Some(chaos), Clock::Step) => Slice::Instructions(chaos.slice_instructions()),
            (Some(chaos), Clock::Landmark) => Slice::Wall(chaos.slice_wall()),
        }
    }

    /// Whether the running vCPU has had long enough, this slice, to leave a spin-wait whose condition
    /// came true while it was parked: a few loop passes (step clock), or one kick (landmark clock).
    fn spun_a_while(&self, position: u64) -> bool {
        match self.slice {
            Slice::Instructions(_) => position.saturating_sub(self.began_at) >= SPIN_GRACE,
            Slice::Wall(_) => self.began.elapsed() >= SPIN_GRACE_WALL,
        }
    }

    fn slice_over(&self, position: u64) -> bool {
        match self.slice {
            Slice::Instructions(n) => position.saturating_sub(self.began_at) >= n,
            Slice::Wall(d) => self.began.elapsed() >= d,
        }
    }

    /// Whether a switch is wanted now: another vCPU can run, and the running one's slice is over or it
    /// has nothing to do.
    pub(crate) fn switch_due(&mut self, machine: &Machine, position: u64) -> bool {
        if !machine.is_multiprocessor() {
            return false;
        }
        let current = machine.current_cpu();
        let others = (0..machine.cpus() as u8).any(|id| id != current && machine.cpu_can_run(id));
        // A vCPU spinning in a wait loop waits for another one: once it has had a moment to see the
        // change it waits for, it gives up the CPU.
        let due = others
            && (self.slice_over(position)
                || !machine.cpu_can_run(current)
                || (self.spun_a_while(position) && machine.spin_waiting()));
        if due && !self.warned_overdue && self.began.elapsed() > OVERDUE {
            self.warned_overdue = true;
            eprintln!(
                "retrovisor: vCPU {current} has kept the CPU {:.1} s past its slice without an exit \
                 where it could be stopped (on this host a vCPU in user mode gives up the CPU only \
                 at its next exit); the other vCPUs wait",
                self.began.elapsed().as_secs_f64()
            );
        }
        due
    }

    /// At a point where the machine may switch: the vCPU to run next if it is not the running one. A
    /// new slice begins when the choice changes the vCPU, or when the running one keeps the CPU for
    /// want of another.
    pub(crate) fn pick(&mut self, machine: &Machine, position: u64) -> Option<u8> {
        if !self.switch_due(machine, position) {
            if machine.is_multiprocessor() && self.slice_over(position) {
                self.restart(position);
            }
            return None;
        }
        let (current, cpus) = (machine.current_cpu(), machine.cpus() as u8);
        // Round-robin order after the running vCPU.
        let candidates: Vec<u8> = (1..cpus)
            .map(|k| (current + k) % cpus)
            .filter(|&id| machine.cpu_can_run(id))
            .collect();
        let next = match &mut self.chaos {
            None => candidates.first().copied(),
            Some(chaos) => chaos.choose(&candidates, position, self.clock),
        }?;
        self.restart(position);
        Some(next)
    }

    fn restart(&mut self, position: u64) {
        self.began_at = position;
        self.began = Instant::now();
        self.warned_overdue = false;
        self.slice = self.draw_slice();
    }
}

/// Chaos mode's random draws (splitmix64: tiny, and the same sequence for a seed on every host).
struct Chaos {
    state: u64,
    /// A vCPU kept from running until this position (step) or instant (landmark), while others can.
    starving: Option<(u8, u64, Instant)>,
}

/// Chance, in percent, that a choice of the next vCPU starts a starvation window for one of them.
const STARVE_PERCENT: u64 = 5;
/// A starvation window's length: instructions (step clock) or wall time.
const STARVE_INSTRUCTIONS: u64 = 200_000;
const STARVE_WALL: Duration = Duration::from_millis(60);

impl Chaos {
    fn new(seed: u64) -> Chaos {
        Chaos {
            state: seed,
            starving: None,
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Slice lengths of three very different sizes, as rr draws them: a third very short (a few
    /// instructions: a switch inside the next critical section), a third short, a third long.
    fn slice_instructions(&mut self) -> u64 {
        match self.next() % 3 {
            0 => self.between(1, 50),
            1 => self.between(51, 2_000),
            _ => self.between(2_001, 50_000),
        }
    }

    /// The landmark clock's slices: at the next kick (1 ms), a few kicks, or tens of them.
    fn slice_wall(&mut self) -> Duration {
        Duration::from_micros(match self.next() % 3 {
            0 => 0,
            1 => self.between(1_000, 3_000),
            _ => self.between(5_000, 40_000),
        })
    }

    /// The next vCPU among `candidates` (in round-robin order), at random, passing over a starving one
    /// while another can run.
    fn choose(&mut self, candidates: &[u8], position: u64, clock: Clock) -> Option<u8> {
        if candidates.is_empty() {
            return None;
        }
        let starved = self.starving.and_then(|(id, until, deadline)| {
            let over = match clock {
                Clock::Step => position >= until,
                Clock::Landmark => Instant::now() >= deadline,
            };
            (!over).then_some(id)
        });
        if starved.is_none() {
            self.starving = None;
            if self.next() % 100 < STARVE_PERCENT {
                let id = candidates[(self.next() % candidates.len() as u64) as usize];
                self.starving = Some((
                    id,
                    position + STARVE_INSTRUCTIONS,
                    Instant::now() + STARVE_WALL,
                ));
            }
        }
        let starved = self.starving.map(|(id, ..)| id);
        let fed: Vec<u8> = candidates
            .iter()
            .copied()
            .filter(|&id| Some(id) != starved)
            .collect();
        let pool = if fed.is_empty() { candidates } else { &fed };
        Some(pool[(self.next() % pool.len() as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_slices_every_time_and_many_are_very_short() {
        let draw = |seed| {
            let mut chaos = Chaos::new(seed);
            (0..300)
                .map(|_| chaos.slice_instructions())
                .collect::<Vec<_>>()
        };
        let slices = draw(7);
        assert_eq!(slices, draw(7));
        assert_ne!(slices, draw(8));
        let very_short = slices.iter().filter(|&&n| n <= 50).count();
        assert!(
            (60..=140).contains(&very_short),
            "{very_short} of 300 at most 50"
        );
        assert!(slices.iter().all(|&n| (1..=50_000).contains(&n)));
    }

    #[test]
    fn a_starving_vcpu_runs_only_when_no_other_can() {
        let mut chaos = Chaos::new(1);
        chaos.starving = Some((1, 1_000, Instant::now() + Duration::from_secs(60)));
        for _ in 0..50 {
            assert_eq!(chaos.choose(&[1, 2], 10, Clock::Step), Some(2));
        }
        assert_eq!(chaos.choose(&[1], 10, Clock::Step), Some(1));
    }
}
