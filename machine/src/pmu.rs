//! The pmu clock: positions are conditional branches the guest retired, as a hardware performance counter
//! counts them (rr's clock), and a point between two is named by its [`Fingerprint`] as a landmark kick's.
//!
//! With a PMU ([`Machine::use_hardware_counter`]), a run to branch N programs the counter to interrupt a
//! margin before N, runs free until it does (the interrupt lands late, by the counter's *skid*), then
//! reaches N exactly by single steps, reading the counter after each, and the point by its fingerprint.
//! A recording runs free and reads the counter after every exit and kick, then steps on to the next
//! branch, where inputs are delivered. The project's own hosts have no PMU, so there the counter is a
//! simulated one: the machine single-steps and counts the conditional branches it steps over (decoded
//! before each step), and its "overflow" lands a random number of instructions late, up to the skid it
//! was given. The whole path (program, overflow, skid, refine) runs as it would on a counter, at the
//! speed of stepping.

use crate::clock::{Advance, Fingerprint, Search};
use crate::counter::{SimulatedCounter, MAX_SKID};
use crate::perf::{CounterEvent, HardwareCounter, PerfCounter};
use crate::vm::{Host, Machine, MachineError, Step};

/// Branches before the target at which the simulated counter is programmed to interrupt: more than a
/// skid of up to [`MAX_SKID`] instructions can retire, so the interrupt never lands past the target. A
/// hardware counter's is its event's ([`CounterEvent::margin`]).
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
        self.hardware = None;
    }

    /// Makes the pmu clock count with the host's hardware counter of `event` (a guest-only counter of
    /// retired conditional branches, as `retrovisor doctor` finds it) instead of a simulated one. It is
    /// opened on the thread that runs the vCPU, at its first entry.
    pub fn use_hardware_counter(&mut self, event: CounterEvent) -> Result<(), MachineError> {
        self.hardware = Some(HardwareCounter {
            event,
            open: None,
            stepping: true,
        });
        self.apply_debug(None)
    }

    /// Whether a hardware counter counts the branches (else the simulated counter does, by stepping).
    pub fn counts_in_hardware(&self) -> bool {
        self.hardware.is_some()
    }

    /// The hardware counter's event, if one counts the branches.
    pub fn hardware_counter(&self) -> Option<CounterEvent> {
        self.hardware.as_ref().map(|h| h.event)
    }

    /// The hardware counter, open on this thread.
    fn open_counter(&mut self) -> Result<Option<&mut HardwareCounter>, MachineError> {
        let Some(hw) = self.hardware.as_mut() else {
            return Ok(None);
        };
        // SAFETY: gettid has no preconditions.
        let thread = unsafe { libc::gettid() };
        if hw.open.as_ref().is_none_or(|c| c.thread() != thread) {
            crate::clock::catch_kicks();
            let counter = PerfCounter::open(hw.event, crate::clock::KICK_SIGNAL)?;
            counter.enable()?;
            hw.open = Some(counter);
        }
        Ok(Some(hw))
    }

    /// The hardware counter, open on this thread, if there is one.
    fn open_perf_counter(&mut self) -> Result<Option<&PerfCounter>, MachineError> {
        Ok(self.open_counter()?.and_then(|hw| hw.open.as_ref()))
    }

    /// Before KVM_RUN: the hardware counter's count (none without one), read just before it so that
    /// only this machine's run counts (another machine may have run on the thread since).
    pub(crate) fn hardware_entry(&mut self) -> Result<Option<u64>, MachineError> {
        match self.open_perf_counter()? {
            Some(counter) => Ok(Some(counter.read()?)),
            None => Ok(None),
        }
    }

    /// After KVM_RUN: the branches the hardware counter counted in it, from its count `before`.
    pub(crate) fn hardware_exit(&mut self, before: Option<u64>) -> Result<u64, MachineError> {
        let counter = self.hardware.as_ref().and_then(|hw| hw.open.as_ref());
        match (before, counter) {
            (Some(before), Some(counter)) => Ok(counter.read()?.saturating_sub(before)),
            _ => Ok(0),
        }
    }

    /// Programs the hardware counter's overflow `branches` from now (none: `None`).
    fn program_overflow(&mut self, branches: Option<u64>) -> Result<(), MachineError> {
        if let Some(counter) = self.open_perf_counter()? {
            counter.interrupt_after(branches)?;
        }
        Ok(())
    }

    /// With a hardware counter, single-steps (`true`) or runs free from now on; nothing otherwise. If
    /// KVM refuses the change, the machine stays as it was, and single-steps if it cannot run free.
    fn hardware_stepping(&mut self, stepping: bool) -> Result<(), MachineError> {
        let Some(hw) = self.hardware.as_mut().filter(|hw| hw.stepping != stepping) else {
            return Ok(());
        };
        hw.stepping = stepping;
        let applied = self.apply_debug(None);
        if applied.is_err() {
            if let Some(hw) = self.hardware.as_mut() {
                hw.stepping = !stepping;
            }
        }
        applied
    }

    /// The hardware counter's free run towards branch `overflow`, with the counter programmed to
    /// interrupt there (its signal ends KVM_RUN, late by the skid); exits on the way are handled as
    /// they come. The stops of [`Machine::arm`] are off meanwhile: a run to a count passes them.
    /// Returns an end met on the way (the guest halts or stops).
    fn run_free_to_overflow(
        &mut self,
        overflow: u64,
        host: &mut dyn Host,
    ) -> Result<Option<Advance>, MachineError> {
        let armed = std::mem::take(&mut self.breakpoints);
        let run = self
            .hardware_stepping(false)
            .and_then(|()| self.program_overflow(Some(overflow - self.landmarks)))
            .and_then(|()| loop {
                if self.landmarks >= overflow {
                    break Ok(None);
                }
                match self.run_to_landmark(host)? {
                    Advance::Moved | Advance::Kicked => {}
                    end => break Ok(Some(end)),
                }
            });
        // Put everything back whatever happened, then say the first thing that failed.
        let cancelled = self.program_overflow(None);
        self.breakpoints = armed;
        let stepping = self.hardware_stepping(true);
        let rearmed = self.apply_debug(None);
        let end = run?;
        cancelled.and(stepping).and(rearmed)?;
        Ok(end)
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
    ///
    /// With a hardware counter it first runs free to the guest's next exit or kick, then steps on to
    /// the next branch from there.
    pub(crate) fn run_to_branch(&mut self, host: &mut dyn Host) -> Result<Advance, MachineError> {
        if self.hardware.is_some() {
            self.hardware_stepping(false)?;
            let free = self.run_to_landmark(host);
            self.hardware_stepping(true)?;
            match free? {
                Advance::Moved | Advance::Kicked => {}
                end => return Ok(end),
            }
        }
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
        let margin = self.hardware.as_ref().map_or(MARGIN, |hw| hw.event.margin);
        let overflow = target.saturating_sub(margin);
        if self.landmarks < overflow {
            self.counter.overflows += 1;
            let end = if self.hardware.is_some() {
                self.run_free_to_overflow(overflow, host)?
            } else {
                self.step_to_simulated_overflow(overflow, host)?
            };
            if let Some(end) = end {
                return Ok(end);
            }
        }
        if self.landmarks > target {
            return Err(MachineError::CounterOvershot {
                target,
                counted: self.landmarks,
            });
        }
        // Refine: the skid never carries past the target (the margin is larger), so step up to it.
        while self.landmarks < target {
            if let Some(end) = self.step_counted(host)? {
                return Ok(end);
            }
        }
        Ok(Advance::Moved)
    }

    /// The simulated counter's run towards branch `overflow`: counted to it by stepping, as a free run
    /// with the counter programmed would go, then on by a random skid, as the interrupt lands late.
    /// Returns an end met on the way (the guest halts or stops).
    fn step_to_simulated_overflow(
        &mut self,
        overflow: u64,
        host: &mut dyn Host,
    ) -> Result<Option<Advance>, MachineError> {
        while self.landmarks < overflow {
            if let Some(end) = self.step_counted(host)? {
                return Ok(Some(end));
            }
        }
        for _ in 0..self.counter.next_skid() {
            if let Some(end) = self.step_counted(host)? {
                return Ok(Some(end));
            }
        }
        Ok(None)
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
