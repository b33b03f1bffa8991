//! The record loop: runs the machine instruction by instruction on host inputs (terminal or file, host
//! clock, host random numbers) and logs every nondeterministic input, tagged with icount and rip, into a
//! trace. Without a trace it is the plain single-stepped `run`.

mod free;
mod inputs;

pub use inputs::{SerialInput, TimeSourceKind};

use inputs::HostEnv;
use machine::{Machine, MachineConfig, MachineError, Step, Stop};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
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
    /// The trace could not be written.
    #[error("cannot write the trace: {0}")]
    Trace(#[from] traces::WriteError),
    /// Free running cannot count instructions, so it cannot record, keep virtual time or stop at a count.
    #[error("the free-running clock only does plain runs with host time: recording, --time virtual and --max-instructions need the step clock")]
    FreeRunUnsupported,
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
    /// Where the trace goes; None for a plain run.
    pub trace: Option<PathBuf>,
    /// Where serial input comes from.
    pub serial_input: SerialInput,
    /// Host clock or instruction-count clock for the PIT and RTC.
    pub time: TimeSourceKind,
    /// Instructions between checkpoints.
    pub checkpoint_every: u64,
    /// Stop after this many instructions (the recording ends as a user stop).
    pub max_instructions: Option<u64>,
    /// Run free instead of single-stepping (plain runs with host time only: nothing is counted).
    pub free_run: bool,
    /// Called now and then during a stepped run with (instructions so far, events so far).
    pub progress: Option<Box<dyn FnMut(u64, u64)>>,
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
    pub disk_writes: Vec<machine::disk::Overlay>,
}

/// Takes the disks' overlays out of the machine at the end of a run.
fn take_disk_writes(machine: &mut Machine) -> Vec<machine::disk::Overlay> {
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

fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, request_stop as *const () as libc::sighandler_t) };
    }
}

/// Version of this tool, stored in trace headers.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Lowercase hex SHA-256 of the guest image, as the header stores it.
pub fn image_sha256(image: &[u8]) -> String {
    traces::sha256_hex(image)
}

/// How often (in instructions) the loop looks at the wall clock to flush the event stream.
const FLUSH_CHECK_EVERY: u64 = 4096;
/// Longest stretch of wall time whose events a crash may lose.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Records (or, without a trace path, just runs) the guest until it stops. Guest serial output goes to `out`.
pub fn record(mut opts: Options, out: &mut dyn Write) -> Result<Outcome, RecordError> {
    let started = Instant::now();
    let mut machine = Machine::new(&opts.machine, &opts.image)?;
    if opts.free_run {
        if opts.trace.is_some()
            || opts.time != TimeSourceKind::Host
            || opts.max_instructions.is_some()
        {
            return Err(RecordError::FreeRunUnsupported);
        }
        let stop = free::run(
            &mut machine,
            HostEnv::new(opts.time, opts.serial_input),
            out,
        )?;
        let none = BTreeMap::new();
        return Ok(Outcome {
            stop,
            icount: 0,
            events_by_kind: none,
            checkpoints: 0,
            trace_bytes: (0, 0),
            wall: started.elapsed(),
            disk_writes: take_disk_writes(&mut machine),
        });
    }
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
                },
                clock: "step".to_string(),
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
            };
            let mut w = TraceWriter::create(dir, &header)?;
            // Replay needs the exact images: the trace keeps its own copies (see traces/FORMAT.md).
            for (i, d) in opts.machine.disks.iter().enumerate() {
                w.write_disk(i, d.bytes())?;
            }
            Some(w)
        }
        None => None,
    };
    install_stop_handlers();
    let mut env = HostEnv::new(opts.time, opts.serial_input);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut output_hash = Sha256::new();
    let mut output_bytes = 0u64;
    let mut checkpoints = 0u64;
    let mut next_checkpoint = 0u64;
    let mut last_flush = Instant::now();

    let stop = loop {
        let icount = machine.icount();
        if let Some(w) = writer.as_mut() {
            if icount >= next_checkpoint {
                let snap = machine.snapshot(checkpoints == 0)?;
                w.write_checkpoint(&Checkpoint {
                    icount,
                    rip: snap.rip,
                    full: checkpoints == 0,
                    digest: snap.digest,
                    state: snap.state,
                    pages: snap.pages,
                })?;
                checkpoints += 1;
                next_checkpoint = icount + opts.checkpoint_every.max(1);
            }
            if icount.is_multiple_of(FLUSH_CHECK_EVERY) && last_flush.elapsed() >= FLUSH_INTERVAL {
                w.flush(icount)?;
                last_flush = Instant::now();
            }
        }
        if icount.is_multiple_of(FLUSH_CHECK_EVERY) {
            if let Some(p) = opts.progress.as_mut() {
                p(icount, counts.values().sum());
            }
        }
        if STOP_REQUESTED.load(Ordering::SeqCst)
            || opts.max_instructions.is_some_and(|m| icount >= m)
        {
            break StopReason::UserStop;
        }
        env.set_position(icount, machine.rip());
        env.deliver_inputs(&mut machine);
        if machine.interrupt_ready() {
            if let Some(vector) = machine.inject_interrupt()? {
                env.log(EventKind::Interrupt { vector });
            }
        }
        let step = machine.step(&mut env)?;
        let output = machine.take_output();
        if !output.is_empty() {
            out.write_all(&output)
                .and_then(|_| out.flush())
                .map_err(RecordError::Output)?;
            output_hash.update(&output);
            output_bytes += output.len() as u64;
        }
        let reason = match step {
            Step::Retired => None,
            Step::Idle => {
                if env.wait_for_wakeup(&mut machine) {
                    None
                } else {
                    Some(StopReason::Halted)
                }
            }
            Step::Stopped(Stop::GuestExit(status)) => Some(StopReason::GuestExit { status }),
            Step::Stopped(Stop::TripleFault) => Some(StopReason::TripleFault),
            Step::Stopped(Stop::Halted) => Some(StopReason::Halted),
        };
        for event in env.take_events() {
            *counts.entry(event.kind.name().to_string()).or_default() += 1;
            if let Some(w) = writer.as_mut() {
                w.push(event)?;
            }
        }
        if let Some(reason) = reason {
            break reason;
        }
    };

    let icount = machine.icount();
    let mut trace_bytes = (0, 0);
    if let Some(mut w) = writer {
        w.push(Event {
            icount,
            rip: machine.rip(),
            kind: EventKind::Stop {
                reason: stop.clone(),
            },
        })?;
        *counts.entry("stop".to_string()).or_default() += 1;
        trace_bytes = w.bytes_written();
        w.finish(&Summary {
            end_icount: icount,
            stop: stop.clone(),
            events_by_kind: counts.clone(),
            checkpoints,
            output_bytes,
            output_sha256: traces::hex(&output_hash.finalize()),
            wall_secs: started.elapsed().as_secs_f64(),
        })?;
    }
    Ok(Outcome {
        stop,
        icount,
        events_by_kind: counts,
        checkpoints,
        trace_bytes,
        wall: started.elapsed(),
        disk_writes: take_disk_writes(&mut machine),
    })
}

/// Exit status of the retrovisor process for a guest that ended this way: the guest's own status for
/// isa-debug-exit (odd numbers), 0 for a guest halted for good, and documented even numbers otherwise.
pub fn exit_status(stop: &StopReason) -> i32 {
    match stop {
        StopReason::GuestExit { status } => (*status & 0xff) as i32,
        StopReason::Halted => 0,
        StopReason::TripleFault => 6,
        StopReason::UserStop => 130,
    }
}

/// Passes the guest's new serial output to `out`, returning it.
fn forward_output(machine: &mut Machine, out: &mut dyn Write) -> Result<Vec<u8>, RecordError> {
    let output = machine.take_output();
    if !output.is_empty() {
        out.write_all(&output)
            .and_then(|_| out.flush())
            .map_err(RecordError::Output)?;
    }
    Ok(output)
}
