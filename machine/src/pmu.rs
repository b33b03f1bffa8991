//! The pmu clock: positions are conditional branches the guest retired, as a hardware performance counter
//! counts them (rr's clock), and a point between two is named by its [`Fingerprint`] as a landmark kick's.
//!
//! With a PMU, a run to branch N programs the counter to interrupt a margin before N, runs free until it
//! does (the interrupt lands late, by the counter's *skid*), then reaches N exactly by single steps and
//! the point by its fingerprint. This host has no PMU, so the counter here is a simulated one: the
//! machine single-steps and counts the conditional branches it steps over (decoded before each step),
//! and its "overflow" lands a random number of instructions late, up to the skid it was given. The whole
//! path (program, overflow, skid, refine) runs as it would on a counter, at the speed of stepping.

use crate::clock::{Advance, Fingerprint, Search};
use crate::counter::{SimulatedCounter, MAX_SKID};
use crate::vm::{Host, Machine, MachineError, Step};

/// Branches before the target at which the counter is programmed to interrupt: more than a skid of up
/// to [`MAX_SKID`] instructions can retire, so the interrupt never lands past the target.
pub const MARGIN: u64 = 2 * MAX_SKID;

/// Instructions the pmu clock steps without retiring a branch before it stops between two, as a timer
/// kick would stop a counted run, so that inputs reach a guest that loops without conditional branches.
const STEPS_PER_KICK: u32 = 4096;

impl Machine {
    /// Sets what landmarks are (exits, or with the pmu clock retired conditional branches).
    pub fn set_landmarks(&mut self, landmarks: vocab::Landmarks) -> Result<(), MachineError> {
        self.counting = landmarks;
        self.apply_debug(None)
    }

    /// What landmarks are here.
    pub fn landmarks_are(&self) -> vocab::Landmarks {
        self.counting
    }

    /// Gives the pmu clock a simulated counter whose overflow lands up to `skid` instructions late.
    pub fn set_counter_skid(&mut self, skid: u64) {
        self.counter = SimulatedCounter::new(skid);
    }

    /// How many runs went through the simulated counter's overflow (and its skid) so far.
    pub fn counter_overflows(&self) -> u64 {
        self.counter.overflows
    }

    /// One step, with [`Advance`]'s meaning for the pmu clock.
    fn step_counted(&mut self, host: &mut dyn Host) -> Result<Option<Advance>, MachineError> {
        Ok(match self.step(host)? {
            Step::Retired => None,
            Step::Idle => Some(Advance::Idle),
            Step::Stopped(stop) => Some(Advance::Stopped(stop)),
        })
    }

    /// The pmu clock's run to its next position: steps until a conditional branch retires
    /// ([`Advance::Moved`]), an armed stop is reached ([`Advance::Breakpoint`]), the guest halts or
    /// stops, or [`STEPS_PER_KICK`] steps retire none ([`Advance::Kicked`]).
    pub(crate) fn run_to_branch(&mut self, host: &mut dyn Host) -> Result<Advance, MachineError> {
        let from = self.landmarks;
        for _ in 0..STEPS_PER_KICK {
            if let Some(end) = self.step_counted(host)? {
                return Ok(end);
            }
            if self.landmarks != from {
                return Ok(Advance::Moved);
            }
            if let Some(i) = self
                .breakpoints
                .iter()
                .position(|&b| b == self.cpu.regs.rip)
            {
                self.stop_fired = Some(i);
                self.breakpoints.clear();
                return Ok(Advance::Breakpoint);
            }
        }
        Ok(Advance::Kicked)
    }

    /// The pmu clock: runs to branch `target` (beyond the current count) as a counter would: programmed
    /// to overflow [`MARGIN`] branches before it, run until the overflow lands (late by the counter's
    /// skid), then stepped to the first point with `target` branches retired ([`Advance::Moved`]). An
    /// end on the way (the guest halts or stops) is returned as it happens; nothing else may: the caller
    /// runs to the next branch where the recording has an event.
    pub fn run_to_count(
        &mut self,
        target: u64,
        host: &mut dyn Host,
    ) -> Result<Advance, MachineError> {
        let overflow = target.saturating_sub(MARGIN);
        if self.landmarks < overflow {
            self.counter.overflows += 1;
            // Counting to the overflow: what a free run with the counter programmed does.
            while self.landmarks < overflow {
                if let Some(end) = self.step_counted(host)? {
                    return Ok(end);
                }
            }
            // The interrupt lands late.
            for _ in 0..self.counter.next_skid() {
                if let Some(end) = self.step_counted(host)? {
                    return Ok(end);
                }
            }
        }
        // Refine: the skid never carries past the target (the margin is larger), so step up to it.
        while self.landmarks < target {
            if let Some(end) = self.step_counted(host)? {
                return Ok(end);
            }
        }
        Ok(Advance::Moved)
    }

    /// The pmu clock's way to a point between two branches: step from here (at its branch) until the
    /// state matches, passing no other branch.
    pub(crate) fn refine_to_fingerprint(
        &mut self,
        fp: &Fingerprint,
        host: &mut dyn Host,
    ) -> Result<Search, MachineError> {
        let from = self.landmarks;
        loop {
            if self.step_counted(host)?.is_some() || self.landmarks != from {
                return Ok(Search::Passed);
            }
            if self.matches(fp)? {
                return Ok(Search::Found);
            }
        }
    }
}
