//! The record loop: drives the machine with its clock (step or landmark) on host inputs (terminal or
//! file, host clock, host random numbers) and logs every nondeterministic input, tagged with its position
//! and rip, into a trace. Without a trace it is the plain `run`.

mod inputs;
mod schedule;

pub use inputs::{SerialInput, TimeSourceKind};

use inputs::HostEnv;
use machine::{Advance, Clock, Kicker, Machine, MachineConfig, MachineError};
use schedule::Scheduler;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;
use traces::{Checkpoint, Event, EventKind, Header, StopReason, Summary, TraceWriter};

/// Errors that end a recording (or a plain run).
#[derive(Debug, Error)]
pub enum RecordError {
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The trace could not be created.
    #[error("cannot write the trace: {0}")]
    Trace(#[from] traces::WriteError),
    /// Writing the trace failed part-way, so the recording stopped. What was written before stays
    /// a cut-off recording (`kept` says how much of it replays).
    #[error("the recording stopped at {unit} {icount}{why}: {source}; {kept}")]
    TraceStopped {
        /// What positions count: "icount" or "landmark".
        unit: &'static str,
        /// Where the recording stopped.
        icount: u64,
        /// " because the file system is full" and the like when it ran out of space, else empty.
        why: String,
        /// The write that failed.
        source: traces::WriteError,
        /// What the trace keeps.
        kept: String,
    },
    /// The landmark clock counts no instructions, so it cannot keep time by them.
    #[error("--time virtual needs --clock step: virtual time follows the instruction count, which only the step clock counts")]
    LandmarkNeedsHostTime,
    /// The landmark clock counts no instructions, so it cannot stop at a count.
    #[error("--max-instructions needs --clock step: the landmark clock runs free and counts no instructions")]
    LandmarkCountsNoInstructions,
    /// The guest's serial output could not be written.
    #[error("cannot write guest output: {0}")]
    Output(std::io::Error),
}

/// What to record (or run) and how.
pub struct Options {
    /// Guest image path (stored in the header).
    pub image_path: PathBuf,
    /// Guest image contents.
    pub image: Vec<u8>,
    /// Machine shape.
    pub machine: MachineConfig,
    /// Path of the initrd in `machine` (stored in the header), if there is one.
    pub initrd_path: Option<PathBuf>,
    /// Where the trace goes; None for a plain run.
    pub trace: Option<PathBuf>,
    /// Where serial input comes from.
    pub serial_input: SerialInput,
    /// Hold the serial input until the guest's output contains these bytes.
    pub serial_input_after: Option<Vec<u8>>,
    /// Host clock or instruction-count clock for the PIT and RTC.
    pub time: TimeSourceKind,
    /// Between checkpoints: instructions (step clock) or milliseconds of wall time (landmark clock).
    pub checkpoint_every: u64,
    /// Stop after this many instructions (the recording ends with [`StopReason::InstructionLimit`]).
    pub max_instructions: Option<u64>,
    /// How the guest is driven: single-stepped, or free between landmarks.
    pub clock: Clock,
    /// Called now and then with (position so far, events so far).
    pub progress: Option<Box<dyn FnMut(u64, u64)>>,
    /// Chaos mode's seed (see [`schedule`]): None for the normal scheduler.
    pub chaos_seed: Option<u64>,
}

/// How a recording or run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why it ended.
    pub stop: StopReason,
    /// Instructions retired.
    pub icount: u64,
    /// Events logged, by kind.
    pub events_by_kind: BTreeMap<String, u64>,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Trace bytes: (events, checkpoints).
    pub trace_bytes: (u64, u64),
    /// Wall time.
    pub wall: Duration,
    /// What the guest wrote to each disk (the overlays, disk 0 first), for `run --disk-writeback`.
    pub disk_writes: Vec<devices::disk::Overlay>,
}

/// Takes the disks' overlays out of the machine at the end of a run.
fn take_disk_writes(machine: &mut Machine) -> Vec<devices::disk::Overlay> {
    machine
        .devices
        .disks
        .iter_mut()
        .map(|d| d.disk_mut().take_overlay())
        .collect()
}

/// Set by SIGINT/SIGTERM: ends the recording cleanly at the next instruction boundary.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM request a clean stop (see [`stop_requested`]) instead of killing the process:
/// a recording ends at the next instruction boundary, a search where it is.
pub fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, request_stop as *const () as libc::sighandler_t) };
    }
}

/// Whether SIGINT or SIGTERM arrived since [`install_stop_handlers`].
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Version of this tool, stored in trace headers.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Lowercase hex SHA-256 of the guest image, as the header stores it.
pub fn image_sha256(image: &[u8]) -> String {
    traces::sha256_hex(image)
}

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
/// Longest stretch of wall time whose events a crash may lose.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// The error for a write to the trace in `dir` that failed at position `icount`: it ends the
/// recording. `replayable` is what the trace keeps ([`TraceWriter::replayable_upto`]); the writer
/// stops writing after a failure, so that is final.
fn trace_stopped(
    dir: &Path,
    replayable: Option<u64>,
    (unit, icount): (&'static str, u64),
    source: traces::WriteError,
) -> RecordError {
    let dir = dir.display();
    let why = source
        .out_of_space()
        .map(|why| format!(" because {why}"))
        .unwrap_or_default();
    let kept = match replayable {
        Some(upto) => format!("{dir} keeps a cut-off recording, replayable up to {unit} {upto}"),
        None => format!("{dir} holds nothing replayable (no checkpoint was written)"),
    };
    RecordError::TraceStopped {
        unit,
        icount,
        why,
        source,
        kept,
    }
}

/// Records (or, without a trace path, just runs) the guest until it stops. Guest serial output goes to `out`.
pub fn record(mut opts: Options, out: &mut dyn Write) -> Result<Outcome, RecordError> {
    let started = Instant::now();
    if opts.clock == Clock::Landmark {
        if opts.time != TimeSourceKind::Host {
            return Err(RecordError::LandmarkNeedsHostTime);
        }
        if opts.max_instructions.is_some() {
            return Err(RecordError::LandmarkCountsNoInstructions);
        }
    }
    let unit = opts.clock.unit();
    let mut machine = Machine::new(&opts.machine, &opts.image)?;
    machine.set_digest_pages(true);
    machine.set_clock(opts.clock)?;
    machine.set_positions(opts.clock);
    let mut writer = match &opts.trace {
        Some(dir) => {
            let header = Header {
                format_version: traces::FORMAT_VERSION,
                tool_version: TOOL_VERSION.to_string(),
                image_path: opts.image_path.display().to_string(),
                image_sha256: image_sha256(&opts.image),
                image_size: opts.image.len() as u64,
                machine: traces::MachineConfig {
                    ram_bytes: machine.ram_bytes(),
                    cmdline: opts.machine.cmdline.clone(),
                    memory_map: memory::pc_memory_map(machine.ram_bytes()).to_vec(),
                },
                clock: opts.clock.name().to_string(),
                time_mode: opts.time.mode(),
                checkpoint_every: opts.checkpoint_every,
                created_unix_secs: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                disks: opts
                    .machine
                    .disks
                    .iter()
                    .map(|d| traces::DiskInfo {
                        path: d.path().display().to_string(),
                        size: d.len(),
                        sha256: traces::sha256_hex(d.bytes()),
                    })
                    .collect(),
                digest: traces::DigestKind::Pages,
                host_traps: opts.machine.trap_host_insns,
                page_backing: true,
                cpuid: machine.cpuid_table().to_vec(),
                cpu_model: opts.machine.cpu.name().to_string(),
                vmm_cpuid: opts.machine.answer_cpuid,
                recorded_on: Some(machine::host_cpu()),
                initrd: opts
                    .initrd_path
                    .as_ref()
                    .zip(opts.machine.initrd.as_ref())
                    .map(|(path, bytes)| traces::DiskInfo {
                        path: path.display().to_string(),
                        size: bytes.len() as u64,
                        sha256: traces::sha256_hex(bytes),
                    }),
                cpus: opts.machine.cpus,
                chaos_seed: opts.chaos_seed,
                cold_checkpoints: opts.machine.cold_checkpoints,
            };
            let mut w = TraceWriter::create(dir, &header)?;
            // Replay needs the exact images: the trace keeps its own copies (see traces/FORMAT.md).
            for (i, d) in opts.machine.disks.iter().enumerate() {
                w.write_disk(i, d.bytes())
                    .map_err(|e| trace_stopped(w.dir(), w.replayable_upto(), (unit, 0), e))?;
            }
            // The image is not copied (replay is given it, and checks its hash), but its pages, kernel
            // text above all, are most of what a full checkpoint would otherwise store.
            w.add_backing(&opts.image);
            if let Some(initrd) = &opts.machine.initrd {
                w.write_initrd(initrd)
                    .map_err(|e| trace_stopped(w.dir(), w.replayable_upto(), (unit, 0), e))?;
            }
            Some(w)
        }
        None => None,
    };
    install_stop_handlers();
    // The landmark clock gets control back from a guest that computes without exits by kicking it.
    let _kicker = (opts.clock == Clock::Landmark).then(|| Kicker::start(KICK_INTERVAL));
    let mut env = HostEnv::new(opts.time, opts.serial_input, opts.serial_input_after);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut output_hash = Sha256::new();
    let mut output_bytes = 0u64;
    let mut checkpoints = 0u64;
    let mut schedule = CheckpointSchedule::new(opts.clock, opts.checkpoint_every);
    let mut last_flush = Instant::now();
    // Whether the machine stands at a position (where inputs may be delivered and checkpoints taken), as
    // opposed to a point between landmarks that a kick or a breakpoint stopped at.
    let mut at_position = true;
    let mut between = Between::default();
    let mut scheduler = Scheduler::new(opts.clock, opts.chaos_seed);
    let mut ticks = 0u64;

    let stop = loop {
        let position = machine.position();
        if at_position {
            if let Some(w) = writer.as_mut() {
                if schedule.due(position) {
                    // A full checkpoint now and then bounds the chain a restore reads: restoring
                    // checkpoint k reads the checkpoints from the last full one up to k.
                    let full = checkpoints.is_multiple_of(schedule.full_every());
                    let snap = machine.snapshot(full)?;
                    w.write_checkpoint(&Checkpoint {
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
                    })
                    .map_err(|e| {
                        trace_stopped(w.dir(), w.replayable_upto(), (unit, position), e)
                    })?;
                    checkpoints += 1;
                    schedule.taken(position);
                }
            }
        }
        ticks += 1;
        if ticks.is_multiple_of(FLUSH_CHECK_EVERY) {
            if let Some(w) = writer.as_mut() {
                if last_flush.elapsed() >= FLUSH_INTERVAL {
                    w.flush(position).map_err(|e| {
                        trace_stopped(w.dir(), w.replayable_upto(), (unit, position), e)
                    })?;
                    last_flush = Instant::now();
                }
            }
            if let Some(p) = opts.progress.as_mut() {
                p(position, counts.values().sum());
            }
        }
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            break StopReason::UserStop;
        }
        if opts.max_instructions.is_some_and(|m| position >= m) {
            break StopReason::InstructionLimit;
        }
        let anchor = env.set_position(position, machine.rip());
        let deliver = if at_position {
            between.reset(&mut machine)?
        } else {
            let switch = scheduler.switch_due(&machine, position);
            // A spin-wait's loop exit comes only once the other vCPU has run: switch where it spins.
            let chaotic = switch && (scheduler.chaotic() || machine.spin_waiting());
            between.deliver_here(&mut machine, &mut env, writer.is_some(), switch, chaotic)?
        };
        if !at_position && !deliver {
            // A kick (or loop-exit stop) that delivered nothing leaves no event, so replay never stops
            // there: values the guest asks for later are tagged, as replay will see them, with the rip of
            // the last landmark or delivering kick.
            env.set_position(position, anchor);
        }
        if deliver {
            if let Some(cpu) = scheduler.pick(&machine, position) {
                machine.switch_to(cpu)?;
                env.log(EventKind::Switch { cpu });
                // What the new vCPU's next step asks for is tagged with its rip.
                env.set_position(position, machine.rip());
            }
            env.deliver_inputs(&mut machine)?;
            if machine.interrupt_ready() {
                if let Some(vector) = machine.inject_interrupt()? {
                    env.log(EventKind::Interrupt { vector });
                }
            }
        }
        let advance = machine.advance(&mut env)?;
        let output = machine.take_output();
        if !output.is_empty() {
            env.saw_output(&output);
            out.write_all(&output)
                .and_then(|_| out.flush())
                .map_err(RecordError::Output)?;
            output_hash.update(&output);
            output_bytes += output.len() as u64;
        }
        at_position = !matches!(advance, Advance::Kicked | Advance::Breakpoint);
        between.at_breakpoint = advance == Advance::Breakpoint;
        let reason = match advance {
            Advance::Moved | Advance::Kicked | Advance::Breakpoint => None,
            // Another vCPU can run: the next pass switches to it.
            Advance::Idle if machine.any_cpu_can_run() => None,
            Advance::Idle => {
                if env.wait_for_wakeup(&mut machine)? {
                    None
                } else {
                    Some(StopReason::Halted)
                }
            }
            Advance::Stopped(stop) => Some(stop),
        };
        for event in env.take_events() {
            *counts.entry(event.kind.name().to_string()).or_default() += 1;
            if let Some(w) = writer.as_mut() {
                w.push(event).map_err(|e| {
                    trace_stopped(w.dir(), w.replayable_upto(), (unit, machine.position()), e)
                })?;
            }
        }
        if let Some(reason) = reason {
            break reason;
        }
    };

    let position = machine.position();
    let mut trace_bytes = (0, 0);
    if let Some(mut w) = writer {
        w.push(Event {
            at: position,
            rip: machine.rip(),
            kind: EventKind::Stop { reason: stop },
        })
        .map_err(|e| trace_stopped(w.dir(), w.replayable_upto(), (unit, position), e))?;
        *counts.entry("stop".to_string()).or_default() += 1;
        // Flushed here rather than inside finish(), which consumes the writer, so that a failure
        // past this point can still say how much the trace keeps.
        w.flush(position)
            .map_err(|e| trace_stopped(w.dir(), w.replayable_upto(), (unit, position), e))?;
        trace_bytes = w.bytes_written();
        let (dir, replayable) = (w.dir().to_owned(), w.replayable_upto());
        w.finish(&Summary {
            end: position,
            stop,
            events_by_kind: counts.clone(),
            checkpoints,
            output_bytes,
            output_sha256: traces::hex(&output_hash.finalize()),
            wall_secs: started.elapsed().as_secs_f64(),
        })
        .map_err(|e| trace_stopped(&dir, replayable, (unit, position), e))?;
    }
    Ok(Outcome {
        stop,
        icount: position,
        events_by_kind: counts,
        checkpoints,
        trace_bytes,
        wall: started.elapsed(),
        disk_writes: take_disk_writes(&mut machine),
    })
}

/// Landmark clock: what to do about inputs that fall due while the guest computes without exits.
///
/// At a kick, if the guest could be interrupted now, the recorder does not deliver at once: it arms a
/// breakpoint on the exit of the loop the guest is in ([`Machine::loop_exit`]) and delivers there, a point
/// the guest passes once per loop rather than once per iteration, which replay's breakpoint search finds in
/// a few stops instead of thousands. A loop that does not end by itself soon (one waiting for this very
/// interrupt) gets its input at a later kick.
#[derive(Default)]
struct Between {
    /// Kicks since the loop-exit breakpoint was armed, while it is.
    armed: Option<u32>,
    /// The last advance stopped at the armed breakpoint.
    at_breakpoint: bool,
}

/// Kicks (milliseconds) to wait for a loop to end before delivering where the guest is.
const LOOP_EXIT_PATIENCE: u32 = 8;

impl Between {
    /// At a position: inputs are delivered there; a breakpoint still armed is not needed any more.
    fn reset(&mut self, machine: &mut Machine) -> Result<bool, RecordError> {
        if self.armed.take().is_some() {
            machine.disarm()?;
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
        switch: bool,
        chaotic: bool,
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
        if recording && !self.at_breakpoint && !chaotic {
            match self.armed {
                None => {
                    if let Some(exit) = machine.loop_exit().filter(|&x| x != machine.rip()) {
                        machine.arm(&[exit])?;
                        self.armed = Some(0);
                        return Ok(false);
                    }
                }
                Some(kicks) if kicks + 1 < LOOP_EXIT_PATIENCE => {
                    self.armed = Some(kicks + 1);
                    return Ok(false);
                }
                Some(_) => {
                    machine.disarm()?;
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

/// Exit status of the retrovisor process for a guest that ended this way: the guest's own status for
/// isa-debug-exit (odd numbers), 0 for a guest halted for good, and documented even numbers otherwise
/// (130 is the shell's status for a process ended by SIGINT).
pub fn exit_status(stop: &StopReason) -> i32 {
    match stop {
        StopReason::GuestExit { status } => (*status & 0xff) as i32,
        StopReason::Halted => 0,
        StopReason::TripleFault => 6,
        StopReason::InstructionLimit => 8,
        StopReason::UserStop => 130,
    }
}
