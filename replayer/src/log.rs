//! The replay side of the machine's environment: every time reading, random number and input comes from
//! the trace, and must be asked for at exactly the position and rip it was recorded at. Positions here
//! are the trace's own counts (instructions, or landmarks), as its events name them.

use devices::TimeSource;
use machine::{Host, HostInsn, Machine};
use std::rc::Rc;
use thiserror::Error;
use traces::{ClockKind, Event, EventKind, StopReason};
use vocab::{Clock, Position};

/// Replay and recording disagree: the replayed guest did something the recording did not.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("replay diverged from the recording at {}: {what}", at.show(*clock))]
pub struct Divergence {
    /// Position where it was noticed (the trace's own: at an event, the landmark it names).
    pub at: Position,
    /// What the trace's positions count.
    pub clock: Clock,
    /// What differed.
    pub what: String,
    /// Whether a host value the landmark clock could not see (an RDTSC in code made at run time) may
    /// explain it: the replay reached another state than the recording. Not when the message already
    /// names the cause.
    pub host_value_hint: bool,
}

impl Divergence {
    /// A divergence at trace position `at` (an instruction count until the replayer says otherwise).
    pub fn new(at: u64, what: impl Into<String>) -> Divergence {
        Divergence {
            at: Position::at(at),
            clock: Clock::Step,
            what: what.into(),
            host_value_hint: true,
        }
    }

    /// The recording delivered an interrupt where the replayed guest cannot take it.
    fn blocked(at: u64, vector: u8, blocker: machine::Blocker) -> Divergence {
        Divergence {
            host_value_hint: false,
            ..Divergence::new(
                at,
                format!(
                    "the recording injected vector {vector:#x} here but the guest cannot take an \
                     interrupt: {blocker}"
                ),
            )
        }
    }
}

/// Inputs applied at an instruction boundary, before the step (the rest are consumed during a step).
fn is_boundary_input(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::SerialRx { .. }
            | EventKind::Irq { .. }
            | EventKind::Interrupt { .. }
            | EventKind::Switch { .. }
            | EventKind::ApicTimer { .. }
    )
}

/// Reads logged values in order, checking each is asked for where it was recorded.
pub struct LogHost {
    events: Rc<[Event]>,
    cursor: usize,
    /// The position and rip the current step is tagged with (see [`LogHost::begin_step`]).
    at: u64,
    rip: u64,
    /// The first disagreement seen during a step (the machine's callbacks cannot return errors).
    error: Option<Divergence>,
    /// Events the current step has consumed so far.
    step_used: usize,
}

impl LogHost {
    /// A log reader at the start of the event stream.
    pub fn new(events: Rc<[Event]>) -> LogHost {
        LogHost {
            events,
            cursor: 0,
            at: 0,
            rip: 0,
            error: None,
            step_used: 0,
        }
    }

    /// Moves to the first event at or after `position` (after restoring a checkpoint there).
    pub fn seek_to(&mut self, position: u64) {
        self.cursor = self.events.partition_point(|e| e.at < position);
        self.error = None;
    }

    /// How many events have been consumed.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Sets how many events have been consumed (restoring a snapshot taken between two positions).
    pub fn set_cursor(&mut self, cursor: usize) {
        self.cursor = cursor;
        self.error = None;
    }

    /// Applies the boundary inputs logged at `at` (the machine's position), in order, checking rip
    /// and that the guest can take each interrupt. Stops at a kick (see [`LogHost::kick_here`]).
    pub fn apply_inputs(&mut self, machine: &mut Machine, at: u64) -> Result<(), Divergence> {
        if let Some(e) = self.events.get(self.cursor).filter(|e| e.at < at) {
            return Err(Divergence::new(
                at,
                format!(
                    "the replay passed position {} without reaching the recorded {} event there (rip {:#x})",
                    e.at,
                    e.kind.name(),
                    e.rip
                ),
            ));
        }
        while let Some(e) = self.events.get(self.cursor) {
            if e.at != at || !is_boundary_input(&e.kind) {
                break;
            }
            if e.rip != machine.rip() {
                return Err(Divergence::new(
                    at,
                    format!(
                        "rip is {:#x} but the recorded {} event was at rip {:#x}",
                        machine.rip(),
                        e.kind.name(),
                        e.rip
                    ),
                ));
            }
            match &e.kind {
                EventKind::SerialRx { bytes } => {
                    let taken = machine
                        .push_serial_rx(bytes)
                        .map_err(|e| Divergence::new(at, e.to_string()))?;
                    if taken != bytes.len() {
                        return Err(Divergence::new(
                            at,
                            format!(
                                "the UART took {taken} of {} recorded input bytes",
                                bytes.len()
                            ),
                        ));
                    }
                }
                EventKind::Irq { line } => machine
                    .pulse_irq(*line)
                    .map_err(|e| Divergence::new(at, e.to_string()))?,
                EventKind::Switch { cpu } => machine
                    .switch_to(*cpu)
                    .map_err(|e| Divergence::new(at, e.to_string()))?,
                EventKind::ApicTimer { cpu, ns } => {
                    let fired = machine
                        .fire_apic_timer(*cpu, *ns)
                        .map_err(|e| Divergence::new(at, e.to_string()))?;
                    if !fired {
                        return Err(Divergence::new(
                            at,
                            format!(
                                "the recording fired vCPU {cpu}'s APIC timer here ({ns} ns) but it \
                                 had not expired"
                            ),
                        ));
                    }
                }
                EventKind::Interrupt { vector } => {
                    if let Some(blocker) = machine.interrupt_blocker() {
                        return Err(Divergence::blocked(at, *vector, blocker));
                    }
                    if !machine.interrupt_ready() {
                        return Err(Divergence::new(at, format!("the recording injected vector {vector:#x} here but no interrupt controller holds one for vCPU {}", machine.current_cpu())));
                    }
                    let got = machine
                        .inject_interrupt()
                        .map_err(|e| Divergence::new(at, e.to_string()))?;
                    if got != Some(*vector) {
                        return Err(Divergence::new(at, format!("the PIC delivers {got:?} but the recording injected vector {vector:#x}")));
                    }
                }
                _ => unreachable!("filtered by is_boundary_input"),
            }
            self.cursor += 1;
        }
        Ok(())
    }

    /// Whether a boundary input is still logged at `at` (one that can wake a halted guest).
    pub fn has_inputs_at(&self, at: u64) -> bool {
        self.events
            .get(self.cursor)
            .is_some_and(|e| e.at == at && is_boundary_input(&e.kind))
    }

    /// The fingerprint of the point a kick stopped the recording at, if the next event is a kick at
    /// `position`: the events after it apply there.
    pub fn kick_here(&self, position: u64) -> Option<traces::Fingerprint> {
        match self.events.get(self.cursor) {
            Some(Event {
                at,
                kind: EventKind::Kick { fingerprint },
                ..
            }) if *at == position => Some(*fingerprint),
            _ => None,
        }
    }

    /// The position of the next event not consumed yet, if any.
    pub fn next_event_at(&self) -> Option<u64> {
        self.events.get(self.cursor).map(|e| e.at)
    }

    /// Consumes the kick [`LogHost::kick_here`] returned: the machine is at its point.
    pub fn take_kick(&mut self) {
        self.cursor += 1;
    }

    /// The stop logged at `at`, if the next event is one.
    pub fn stop_here(&self, at: u64) -> Option<StopReason> {
        match self.events.get(self.cursor) {
            Some(Event {
                at: i,
                kind: EventKind::Stop { reason },
                ..
            }) if *i == at => Some(*reason),
            _ => None,
        }
    }

    /// Prepares for a step at (at, rip): the values it may ask for are the events logged there.
    pub fn begin_step(&mut self, at: u64, rip: u64) {
        self.at = at;
        self.rip = rip;
        self.error = None;
        self.step_used = 0;
    }

    /// Consumes the values the step asked for; any the recording had at this position but the replay did
    /// not ask for by the time it moved on (to `now`), or asked for differently, is a divergence.
    pub fn end_step(&mut self, now: u64) -> Result<(), Divergence> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.cursor += self.step_used;
        if let Some(e) = self
            .events
            .get(self.cursor)
            .filter(|e| e.at == self.at && now > self.at && !is_boundary_input(&e.kind))
        {
            if !matches!(e.kind, EventKind::Stop { .. } | EventKind::Kick { .. }) {
                return Err(Divergence::new(self.at, format!("the recording has a {} event here that the replayed instruction did not ask for", e.kind.name())));
            }
        }
        Ok(())
    }

    fn next_value(
        &mut self,
        what: &str,
        matches: impl Fn(&EventKind) -> Option<(u64, u64)>,
    ) -> (u64, u64) {
        let index = self.cursor + self.step_used;
        let found = self.events.get(index).filter(|e| e.at == self.at);
        match found.and_then(|e| matches(&e.kind).map(|v| (v, e.rip))) {
            Some((v, rip)) if rip == self.rip => {
                self.step_used += 1;
                v
            }
            Some((_, rip)) => {
                self.fail(format!(
                    "{what} asked for at rip {:#x}, recorded at rip {rip:#x}",
                    self.rip
                ));
                (0, 0)
            }
            None => {
                let recorded = found.map(|e| e.kind.name()).unwrap_or("nothing");
                self.fail(format!(
                    "the guest asked for {what} but the recording has {recorded} here"
                ));
                (0, 0)
            }
        }
    }

    fn fail(&mut self, what: String) {
        if self.error.is_none() {
            self.error = Some(Divergence::new(self.at, what));
        }
    }
}

impl TimeSource for LogHost {
    fn monotonic_ns(&mut self) -> u64 {
        self.next_value("the monotonic clock", |k| match k {
            EventKind::Clock {
                kind: ClockKind::Monotonic,
                ns,
            } => Some((*ns, 0)),
            _ => None,
        })
        .0
    }

    fn wall_ns(&mut self) -> u64 {
        self.next_value("the wall clock", |k| match k {
            EventKind::Clock {
                kind: ClockKind::Wall,
                ns,
            } => Some((*ns, 0)),
            _ => None,
        })
        .0
    }
}

impl Host for LogHost {
    fn host_value(&mut self, insn: HostInsn) -> (u64, u64) {
        self.next_value(&format!("a {insn:?} result"), |k| match k {
            EventKind::HostValue {
                insn: logged,
                value,
                aux,
            } if *logged == insn => Some((*value, *aux)),
            _ => None,
        })
    }
}
