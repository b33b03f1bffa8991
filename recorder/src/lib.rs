//! The record loop: drives the machine with its clock (step or landmark) on host inputs (terminal or
//! file, host clock, host random numbers) and logs every nondeterministic input, tagged with its position
//! and rip, into a trace. Without a trace it is the plain `run`.

mod inputs;
mod schedule;
mod session;

pub use inputs::{SerialInput, TimeSourceKind};
pub use session::{Pass, Session};

use inputs::HostEnv;
use machine::{Clock, Landmarks, Machine, MachineConfig, MachineError};
use session::SessionSetup;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use thiserror::Error;
use traces::{Header, StopReason, TraceWriter};

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
    /// What the landmark clock's landmarks are: exits, or (the pmu clock, on a simulated counter)
    /// retired conditional branches.
    pub landmarks: Landmarks,
    /// With the pmu clock: the host's hardware counter of the guest's branches (None: a simulated one).
    pub hardware_counter: Option<machine::perf::CounterEvent>,
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
pub(crate) fn take_disk_writes(machine: &mut Machine) -> Vec<devices::disk::Overlay> {
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

/// Creates the trace directory `dir` with `header`, the copies of the disks and initrd replay needs, and
/// the image's blocks as backing for checkpoint pages.
fn open_trace(
    dir: &Path,
    header: &Header,
    disks: &[&[u8]],
    image: &[u8],
    initrd: Option<&[u8]>,
) -> Result<TraceWriter, RecordError> {
    let unit = Clock::from_name(&header.clock)
        .unwrap_or(Clock::Step)
        .unit();
    let mut w = TraceWriter::create(dir, header)?;
    // Replay needs the exact images: the trace keeps its own copies (see traces/FORMAT.md).
    for (i, d) in disks.iter().enumerate() {
        w.write_disk(i, d)
            .map_err(|e| trace_stopped(w.dir(), w.replayable_upto(), (unit, 0), e))?;
    }
    // The image is not copied (replay is given it, and checks its hash), but its pages, kernel text
    // above all, are most of what a full checkpoint would otherwise store.
    w.add_backing(image);
    if let Some(initrd) = initrd {
        w.write_initrd(initrd)
            .map_err(|e| trace_stopped(w.dir(), w.replayable_upto(), (unit, 0), e))?;
    }
    Ok(w)
}

/// What a live run branched off a replay starts from (see [`go_live`]).
pub struct LiveStart {
    /// The machine, in the state the replay reached, with the trace's clock and positions.
    pub machine: Machine,
    /// The guest's monotonic time there: the live run's clock goes on from it.
    pub time_ns: u64,
    /// Whether the guest's timers followed the host clocks or the instruction count.
    pub time: TimeSourceKind,
    /// Where serial input comes from from now on.
    pub serial_input: SerialInput,
    /// Between checkpoints, as the original trace had it.
    pub checkpoint_every: u64,
    /// Record the live run into a new trace.
    pub record: Option<LiveRecording>,
}

/// A new trace for a live run: where it goes and what it keeps.
pub struct LiveRecording {
    /// The trace directory to create.
    pub dir: PathBuf,
    /// Its header: the original's, as [`branch_header`] makes it.
    pub header: Header,
    /// The guest image.
    pub image: Vec<u8>,
    /// The disk images the original recording started with.
    pub disks: Vec<Vec<u8>>,
    /// The initrd, if any.
    pub initrd: Option<Vec<u8>>,
}

/// The header of a trace recorded from a live run that branched off `original` at `from`: the same
/// guest and machine, recorded now, here, naming where it branched.
pub fn branch_header(original: &Header, from: traces::BranchPoint) -> Header {
    Header {
        format_version: traces::FORMAT_VERSION,
        tool_version: TOOL_VERSION.to_string(),
        created_unix_secs: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        recorded_on: Some(machine::host_cpu()),
        chaos_seed: None,
        branched_from: Some(from),
        ..original.clone()
    }
}

/// Turns a machine a replay reached into a live run on the host's inputs from here on: serial input
/// from `serial_input`, the host clock going on from the guest's time. Recorded, if asked, into a new
/// trace whose first checkpoint (taken at the run's first pass) holds the state then, so a debugger's
/// writes before it are part of the recording.
pub fn go_live(start: LiveStart) -> Result<Session, RecordError> {
    let writer = match &start.record {
        Some(r) => {
            let disks: Vec<&[u8]> = r.disks.iter().map(Vec::as_slice).collect();
            Some(open_trace(
                &r.dir,
                &r.header,
                &disks,
                &r.image,
                r.initrd.as_deref(),
            )?)
        }
        None => None,
    };
    let mut env = HostEnv::new(start.time, start.serial_input, None);
    env.resume_clock(start.time_ns, start.machine.position());
    Ok(Session::new(
        start.machine,
        SessionSetup {
            writer,
            env,
            checkpoint_every: start.checkpoint_every,
            max_instructions: None,
            progress: None,
            chaos_seed: None,
        },
    ))
}

/// Records (or, without a trace path, just runs) the guest until it stops. Guest serial output goes to `out`.
pub fn record(mut opts: Options, out: &mut dyn Write) -> Result<Outcome, RecordError> {
    if opts.clock == Clock::Landmark {
        if opts.time != TimeSourceKind::Host {
            return Err(RecordError::LandmarkNeedsHostTime);
        }
        if opts.max_instructions.is_some() {
            return Err(RecordError::LandmarkCountsNoInstructions);
        }
    }
    let mut machine = Machine::new(&opts.machine, &opts.image)?;
    machine.set_digest_pages(true);
    machine.set_clock(opts.clock)?;
    machine.set_positions(opts.clock);
    machine.set_landmarks(opts.landmarks)?;
    if let Some(event) = opts.hardware_counter {
        machine.use_hardware_counter(event)?;
    }
    let writer = match &opts.trace {
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
                clock: match opts.landmarks {
                    Landmarks::Branches => Landmarks::PMU_CLOCK,
                    Landmarks::Exits => opts.clock.name(),
                }
                .to_string(),
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
                branched_from: None,
            };
            let disks: Vec<&[u8]> = opts
                .machine
                .disks
                .iter()
                .map(devices::disk::DiskImage::bytes)
                .collect();
            Some(open_trace(
                dir,
                &header,
                &disks,
                &opts.image,
                opts.machine.initrd.as_deref(),
            )?)
        }
        None => None,
    };
    install_stop_handlers();
    let mut session = Session::new(
        machine,
        SessionSetup {
            writer,
            env: HostEnv::new(opts.time, opts.serial_input, opts.serial_input_after),
            checkpoint_every: opts.checkpoint_every,
            max_instructions: opts.max_instructions,
            progress: opts.progress.take(),
            chaos_seed: opts.chaos_seed,
        },
    );
    let stop = loop {
        if let Pass::Stopped(stop) = session.pass(out, false)? {
            break stop;
        }
    };
    session.finish(stop)
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
