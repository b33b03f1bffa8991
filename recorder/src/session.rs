//! A run of the machine on host inputs, one pass at a time: what `record` and `run` loop over to the
//! end, and what a live run branched off a replay (`go-live`) drives in pieces, between gdb's commands.

use crate::inputs::HostEnv;
use crate::schedule::Scheduler;
use crate::{trace_stopped, Outcome, RecordError};
use machine::{Advance, Clock, Kicker, Landmarks, Machine};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use traces::{Checkpoint, Event, EventKind, StopReason, Summary, TraceWriter};

/// How often (in positions or kicks) the loop looks at the wall clock to flush the event stream.
const FLUSH_CHECK_EVERY: u64 = 4096;
/// Every this many checkpoints (at least), one holds all of RAM rather than the pages written since the
/// one before: a restore reads the chain from the last full one.
const FULL_CHECKPOINT_EVERY: u64 = 16;
/// Landmark clock: wall time between full checkpoints at most checkpoint intervals, so that dense
/// checkpoints (the default 25 ms) do not multiply the full ones, which are most of a trace's bytes.
const FULL_CHECKPOINT_MS: u64 = 1600;
/// How often the landmark clock kicks a guest that runs without exits: the resolution of timer and input
/// delivery while it computes.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// Landmark clock: how long the guest must have run since the last point a replay stops at by itself
/// before a delivering kick gets a waypoint. Below this a replay's search costs little (a millisecond
/// of guest time passes a loop's exit a few hundred times at most), and the waypoints' bytes would not.
const WAYPOINT_AFTER: Duration = Duration::from_millis(2);
/// Longest stretch of wall time whose events a crash may lose.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// What one pass of the loop ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The guest moved on.
    Went,
    /// A breakpoint of [`Session::set_breakpoints`] fired: the guest is at this rip, before it.
    Breakpoint(u64),
    /// The guest (or the user, or the instruction limit) ended the run.
    Stopped(StopReason),
}

/// A run in progress: the machine, the host's inputs, and the trace they go into (if recording).
pub struct Session {
    machine: Machine,
    writer: Option<TraceWriter>,
    env: HostEnv,
    /// What positions count, for messages: "icount" or "landmark".
    unit: &'static str,
    counts: BTreeMap<String, u64>,
    output_hash: Sha256,
    output_bytes: u64,
    checkpoints: u64,
    schedule: CheckpointSchedule,
    last_flush: Instant,
    /// Whether the machine stands at a position (where inputs may be delivered and checkpoints taken), as
    /// opposed to a point between landmarks that a kick, a breakpoint or a single step stopped at.
    at_position: bool,
    between: Between,
    scheduler: Scheduler,
    ticks: u64,
    max_instructions: Option<u64>,
    progress: Option<Box<dyn FnMut(u64, u64)>>,
    started: Instant,
    /// Breakpoints a live run stops at (rips), besides the loop exits the recorder arms for itself.
    breakpoints: Vec<u64>,
    /// Passes made so far.
    passes: u64,
    /// When the guest last stood where a replay stops by itself: a landmark or a delivering kick point.
    last_stop: Instant,
    /// The waypoint of the kick point delivered at in this pass, written after its `Kick` event.
    waypoint: Option<machine::Waypoint>,
    _kicker: Option<Kicker>,
}

/// How a session is set up, besides its machine and inputs.
pub(crate) struct SessionSetup {
    pub(crate) writer: Option<TraceWriter>,
    pub(crate) env: HostEnv,
    pub(crate) checkpoint_every: u64,
    pub(crate) max_instructions: Option<u64>,
    pub(crate) progress: Option<Box<dyn FnMut(u64, u64)>>,
    pub(crate) chaos_seed: Option<u64>,
}

impl Session {
    /// A session of `machine` (with its clock and positions set) from where it stands.
    pub(crate) fn new(machine: Machine, setup: SessionSetup) -> Session {
        let clock = machine.clock();
        Session {
            unit: clock.unit(),
            writer: setup.writer,
            env: setup.env,
            counts: BTreeMap::new(),
            output_hash: Sha256::new(),
            output_bytes: 0,
            checkpoints: 0,
            schedule: CheckpointSchedule::new(clock, setup.checkpoint_every),
            last_flush: Instant::now(),
            at_position: true,
            between: Between::default(),
            scheduler: Scheduler::new(clock, setup.chaos_seed),
            ticks: 0,
            max_instructions: setup.max_instructions,
            progress: setup.progress,
            started: Instant::now(),
            breakpoints: Vec::new(),
            passes: 0,
            last_stop: Instant::now(),
            waypoint: None,
            // The landmark clock gets control back from a guest that computes without exits by kicking it,
            // as does the pmu clock on a hardware counter (on a simulated one it steps, and stops
            // between branches by itself).
            _kicker: (clock == Clock::Landmark
                && (machine.landmarks_are() == Landmarks::Exits || machine.counts_in_hardware()))
            .then(|| Kicker::start(KICK_INTERVAL)),
            machine,
        }
    }

    /// The machine, where the run stands.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The machine, to change it (a debugger's writes), while that loses nothing: always when the run
    /// is not recorded; when it is, only before its first pass, whose checkpoint then holds the change.
    pub fn machine_mut(&mut self) -> Option<&mut Machine> {
        (self.writer.is_none() || self.passes == 0).then_some(&mut self.machine)
    }

    /// Whether the run is being recorded.
    pub fn recording(&self) -> bool {
        self.writer.is_some()
    }

    /// Stops the run before the instructions at these rips (at most three, with the landmark clock:
    /// the debug registers hold the loop exit the recorder arms too).
    pub fn set_breakpoints(&mut self, rips: &[u64]) {
        self.breakpoints = rips.to_vec();
    }

    /// The error for a trace write that failed at position `at`.
    fn stopped(&self, at: u64, e: traces::WriteError) -> RecordError {
        let w = self.writer.as_ref().expect("only a recording writes");
        trace_stopped(w.dir(), w.replayable_upto(), (self.unit, at), e)
    }

    /// One pass: a checkpoint if one is due, the inputs due delivered (and logged), and the guest run
    /// to its next position, kick or breakpoint (one instruction with `step`).
    pub fn pass(&mut self, out: &mut dyn Write, step: bool) -> Result<Pass, RecordError> {
        self.passes += 1;
        let position = self.machine.position();
        if self.at_position && self.writer.is_some() && self.schedule.due(position) {
            self.checkpoint(position)?;
        }
        self.ticks += 1;
        if self.ticks.is_multiple_of(FLUSH_CHECK_EVERY) {
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                if let Some(w) = self.writer.as_mut() {
                    let flushed = w.flush(position);
                    flushed.map_err(|e| self.stopped(position, e))?;
                }
                self.last_flush = Instant::now();
            }
            let events = self.counts.values().sum();
            if let Some(p) = self.progress.as_mut() {
                p(position, events);
            }
        }
        if crate::STOP_REQUESTED.load(Ordering::SeqCst) {
            return Ok(Pass::Stopped(StopReason::UserStop));
        }
        if self.max_instructions.is_some_and(|m| position >= m) {
            return Ok(Pass::Stopped(StopReason::InstructionLimit));
        }
        let machine = &mut self.machine;
        let env = &mut self.env;
        let recording = self.writer.is_some();
        let anchor = env.set_position(position, machine.rip());
        let deliver = if self.at_position {
            self.between.reset(machine, &self.breakpoints)?
        } else if step {
            // A single step between landmarks delivers nothing: the next free run decides where.
            false
        } else {
            let switch = self.scheduler.switch_due(machine, position);
            // A spin-wait's loop exit comes only once the other vCPU has run: switch where it spins.
            let chaotic = switch && (self.scheduler.chaotic() || machine.spin_waiting());
            self.between.deliver_here(
                machine,
                env,
                recording,
                (switch, chaotic),
                &self.breakpoints,
            )?
        };
        if !self.at_position && !deliver {
            // A kick (or loop-exit stop) that delivered nothing leaves no event, so replay never stops
            // there: values the guest asks for later are tagged, as replay will see them, with the rip of
            // the last landmark or delivering kick.
            env.set_position(position, anchor);
        }
        if deliver && !self.at_position {
            // The state at the kick point, before the inputs change it. A replay finds the point by a
            // breakpoint search that stops at every pass of its rip since the last stop: worth a
            // waypoint once the guest ran a while (see `machine::waypoint`). Only where the recording
            // and its replays drop KVM's cached translations at checkpoints alike, as restoring one
            // drops them.
            if recording
                && machine.cold_checkpoints()
                && machine.landmarks_are() == Landmarks::Exits
                && self.last_stop.elapsed() >= WAYPOINT_AFTER
            {
                self.waypoint = machine.take_waypoint()?;
            }
            self.last_stop = Instant::now();
        }
        if deliver {
            if let Some(cpu) = self.scheduler.pick(machine, position) {
                machine.switch_to(cpu)?;
                env.log(EventKind::Switch { cpu });
                // What the new vCPU's next step asks for is tagged with its rip.
                env.set_position(position, machine.rip());
            }
            env.deliver_inputs(machine)?;
            if machine.interrupt_ready() {
                if let Some(vector) = machine.inject_interrupt()? {
                    env.log(EventKind::Interrupt { vector });
                }
            }
        }
        let clock = machine.clock();
        let free = clock == Clock::Landmark && !step;
        if free && !self.breakpoints.is_empty() && self.between.armed.is_none() {
            machine.arm(&self.breakpoints)?;
        }
        if step && clock == Clock::Landmark {
            machine.set_clock(Clock::Step)?;
        }
        let advance = machine.advance(env);
        if step && clock == Clock::Landmark {
            machine.set_clock(clock)?;
        }
        let advance = advance?;
        let output = machine.take_output();
        if !output.is_empty() {
            env.saw_output(&output);
            out.write_all(&output)
                .and_then(|_| out.flush())
                .map_err(RecordError::Output)?;
            self.output_hash.update(&output);
            self.output_bytes += output.len() as u64;
        }
        // A single step with the landmark clock stands at a position only if it made one.
        let stepped_within = step && clock == Clock::Landmark && machine.position() == position;
        // Where landmarks are branches, a halted guest stands between two: it is woken at a kick point.
        let halted_between =
            advance == Advance::Idle && machine.landmarks_are() == Landmarks::Branches;
        self.at_position = !(matches!(advance, Advance::Kicked | Advance::Breakpoint)
            || stepped_within
            || halted_between);
        if self.at_position {
            self.last_stop = Instant::now();
        }
        let user_stop = match advance {
            Advance::Breakpoint => {
                let hit = machine.stop_hit();
                let user = hit.is_some_and(|i| i < self.breakpoints.len());
                self.between.at_breakpoint = !user;
                if user {
                    // The machine disarmed every stop, the loop exit's too.
                    self.between.armed = None;
                }
                user
            }
            _ => {
                self.between.at_breakpoint = false;
                // The step clock stops at a breakpoint by looking at every instruction.
                clock == Clock::Step && self.breakpoints.contains(&machine.rip())
            }
        };
        let reason = match advance {
            Advance::Moved | Advance::Kicked | Advance::Breakpoint => None,
            // Another vCPU can run: the next pass switches to it.
            Advance::Idle if machine.any_cpu_can_run() => None,
            Advance::Idle => {
                if env.wait_for_wakeup(machine)? {
                    None
                } else {
                    Some(StopReason::Halted)
                }
            }
            Advance::Stopped(stop) => Some(stop),
        };
        for event in env.take_events() {
            *self
                .counts
                .entry(event.kind.name().to_string())
                .or_default() += 1;
            if let Some(w) = self.writer.as_mut() {
                let kick = match &event.kind {
                    EventKind::Kick { fingerprint } => Some(fingerprint.rip),
                    _ => None,
                };
                let mut written = w.push(event);
                if let (Ok(()), Some(rip), Some(waypoint)) = (&written, kick, self.waypoint.take())
                {
                    written = w.write_waypoint(&traces::Waypoint {
                        kick: w.events_pushed() - 1,
                        rip,
                        state: waypoint.state,
                        pages: waypoint.pages,
                    });
                }
                if let Err(e) = written {
                    return Err(self.stopped(self.machine.position(), e));
                }
            }
        }
        Ok(match reason {
            Some(reason) => Pass::Stopped(reason),
            None if user_stop => Pass::Breakpoint(self.machine.rip()),
            None => Pass::Went,
        })
    }

    /// Writes a checkpoint at `position`. A full checkpoint now and then bounds the chain a restore
    /// reads: restoring checkpoint k reads the checkpoints from the last full one up to k.
    fn checkpoint(&mut self, position: u64) -> Result<(), RecordError> {
        let full = self.checkpoints.is_multiple_of(self.schedule.full_every());
        let snap = self.machine.snapshot(full)?;
        let w = self
            .writer
            .as_mut()
            .expect("only a recording takes checkpoints");
        let written = w
            .write_checkpoint(&Checkpoint {
                at: position,
                rip: snap.rip,
                full,
                digest: snap.digest,
                state: snap.state,
                pages: snap.pages,
            })
            .and_then(|_| {
                if full {
                    w.write_pages_written(position, &snap.written)
                } else {
                    Ok(())
                }
            });
        written.map_err(|e| self.stopped(position, e))?;
        self.checkpoints += 1;
        self.schedule.taken(position);
        Ok(())
    }

    /// Ends the run, which stopped for `stop`: the trace gets its stop event and summary.
    pub fn finish(mut self, stop: StopReason) -> Result<Outcome, RecordError> {
        let position = self.machine.position();
        let mut trace_bytes = (0, 0);
        if let Some(mut w) = self.writer.take() {
            let unit = self.unit;
            let fail = |w: &TraceWriter, e| {
                trace_stopped(w.dir(), w.replayable_upto(), (unit, position), e)
            };
            let pushed = w.push(Event {
                at: position,
                rip: self.machine.rip(),
                kind: EventKind::Stop { reason: stop },
            });
            pushed.map_err(|e| fail(&w, e))?;
            *self.counts.entry("stop".to_string()).or_default() += 1;
            // Flushed here rather than inside finish(), which consumes the writer, so that a failure
            // past this point can still say how much the trace keeps.
            let flushed = w.flush(position);
            flushed.map_err(|e| fail(&w, e))?;
            trace_bytes = w.bytes_written();
            let (dir, replayable) = (w.dir().to_owned(), w.replayable_upto());
            w.finish(&Summary {
                end: position,
                stop,
                events_by_kind: self.counts.clone(),
                checkpoints: self.checkpoints,
                output_bytes: self.output_bytes,
                output_sha256: traces::hex(&self.output_hash.finalize_reset()),
                wall_secs: self.started.elapsed().as_secs_f64(),
            })
            .map_err(|e| trace_stopped(&dir, replayable, (unit, position), e))?;
        }
        Ok(Outcome {
            stop,
            icount: position,
            events_by_kind: self.counts,
            checkpoints: self.checkpoints,
            trace_bytes,
            wall: self.started.elapsed(),
            disk_writes: crate::take_disk_writes(&mut self.machine),
        })
    }
}

/// Landmark clock: what to do about inputs that fall due while the guest computes without exits.
///
/// At a kick, if the guest could be interrupted now, the recorder does not deliver at once: it arms a
/// breakpoint on the exit of the loop the guest is in ([`Machine::loop_exit`]) and delivers there, a point
/// the guest passes once per loop rather than once per iteration, which replay's breakpoint search finds in
/// a few stops instead of thousands. A loop that does not end by itself soon (one waiting for this very
/// interrupt) gets its input at a later kick. A live run's own breakpoints stay armed beside it.
#[derive(Default)]
struct Between {
    /// Kicks since the loop-exit breakpoint was armed, while it is.
    armed: Option<u32>,
    /// The last advance stopped at the armed loop exit.
    at_breakpoint: bool,
}

/// Kicks (milliseconds) to wait for a loop to end before delivering where the guest is.
const LOOP_EXIT_PATIENCE: u32 = 8;

impl Between {
    /// At a position: inputs are delivered there; a loop exit still armed is not needed any more.
    fn reset(&mut self, machine: &mut Machine, breakpoints: &[u64]) -> Result<bool, RecordError> {
        if self.armed.take().is_some() {
            rearm(machine, breakpoints)?;
        }
        Ok(true)
    }

    /// At a point a kick or the breakpoint stopped at: whether to deliver here. A recording names the point
    /// by its fingerprint first, in a `Kick` event.
    ///
    /// `switch` says the scheduler wants another vCPU to run (which needs no interrupt window), and
    /// `chaotic` that it wants it here, not at the loop's exit.
    fn deliver_here(
        &mut self,
        machine: &mut Machine,
        env: &mut HostEnv,
        recording: bool,
        (switch, chaotic): (bool, bool),
        breakpoints: &[u64],
    ) -> Result<bool, RecordError> {
        if self.at_breakpoint {
            // The breakpoint disarmed itself.
            self.armed = None;
        }
        // Only where replay can find the point again: a guest computing in user mode takes its interrupt
        // at its next exit, system call or fault, which are landmarks; one inside a `rep` at a later kick.
        let wanted = machine.kick_point_findable()
            && (switch
                || (machine.interrupts_enabled()
                    && (machine.interrupt_ready() || env.interrupt_due(machine))));
        if !wanted {
            return Ok(false);
        }
        // The pmu clock reaches any point by counting: no loop exit to wait for.
        let counted = machine.landmarks_are() == Landmarks::Branches;
        if recording && !self.at_breakpoint && !chaotic && !counted {
            match self.armed {
                None => {
                    if let Some(exit) = machine.loop_exit().filter(|&x| x != machine.rip()) {
                        let mut stops = breakpoints.to_vec();
                        stops.push(exit);
                        machine.arm(&stops)?;
                        self.armed = Some(0);
                        return Ok(false);
                    }
                }
                Some(kicks) if kicks + 1 < LOOP_EXIT_PATIENCE => {
                    self.armed = Some(kicks + 1);
                    return Ok(false);
                }
                Some(_) => {
                    rearm(machine, breakpoints)?;
                    self.armed = None;
                }
            }
        }
        if recording {
            let fp = machine.fingerprint()?;
            env.log(EventKind::Kick { fingerprint: fp });
        }
        Ok(true)
    }
}

/// Leaves only a live run's own breakpoints armed (none when recording or running plainly).
fn rearm(machine: &mut Machine, breakpoints: &[u64]) -> Result<(), RecordError> {
    if breakpoints.is_empty() {
        machine.disarm()?;
    } else {
        machine.arm(breakpoints)?;
    }
    Ok(())
}

/// When checkpoints fall due: every `every` instructions with the step clock; with the landmark clock,
/// whose positions come at no regular pace, every `every` milliseconds of wall time (at the first landmark
/// after that).
struct CheckpointSchedule {
    clock: Clock,
    every: u64,
    next: u64,
    last: Option<Instant>,
}

impl CheckpointSchedule {
    fn new(clock: Clock, every: u64) -> CheckpointSchedule {
        CheckpointSchedule {
            clock,
            every: every.max(1),
            next: 0,
            last: None,
        }
    }

    /// Every how many checkpoints one is full.
    fn full_every(&self) -> u64 {
        match self.clock {
            Clock::Step => FULL_CHECKPOINT_EVERY,
            Clock::Landmark => (FULL_CHECKPOINT_MS / self.every).max(FULL_CHECKPOINT_EVERY),
        }
    }

    fn due(&self, position: u64) -> bool {
        match (self.clock, self.last) {
            (_, None) => true,
            (Clock::Step, _) => position >= self.next,
            (Clock::Landmark, Some(last)) => {
                position >= self.next && last.elapsed() >= Duration::from_millis(self.every)
            }
        }
    }

    fn taken(&mut self, position: u64) {
        // A landmark trace holds at most one checkpoint per landmark.
        self.next = match self.clock {
            Clock::Step => position + self.every,
            Clock::Landmark => position + 1,
        };
        self.last = Some(Instant::now());
    }
}
