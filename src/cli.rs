//! The command line: argument parsing, friendly errors and exit statuses.

use crate::clock_arg::ClockArg;
use crate::words::{describe_stop, say};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use machine::perf::CounterEvent;
use machine::Landmarks;
use recorder::{Options, SerialInput, TimeSourceKind};
use replayer::{Halt, Position, ReplayError, Replayer, Shown, Timeline};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

use crate::words;

/// Exit status for a failure of retrovisor itself (bad input, KVM errors).
const EXIT_ERROR: i32 = 2;
/// Exit status when replay diverges from the recording.
const EXIT_DIVERGENCE: i32 = 4;

#[derive(Parser)]
#[command(
    name = "retrovisor",
    version,
    about = "Record-and-replay time-travel debugger for KVM virtual machines",
    long_about = "Record-and-replay time-travel debugger for KVM virtual machines.\n\n\
        `record` runs a Multiboot guest under KVM and logs every nondeterministic input (serial input, \
        clock readings, interrupts, RDTSC/RDRAND results) with periodic checkpoints; `replay` re-executes \
        it instruction for instruction from the trace alone and reports any divergence with its position.",
    after_help = "Exit status: the guest's isa-debug-exit status ((v<<1)|1) when it exits that way; 0 when it halts \
        for good; 6 after a triple fault; 8 at the --max-instructions limit; 130 when stopped by Ctrl-C; 2 on an \
        error; 4 when replay diverges."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest without recording (serial on the terminal).
    Run(RunArgs),
    /// Record a guest into a trace directory.
    Record(RecordArgs),
    /// Replay a trace: prints exactly the recorded serial output and exits with the guest's status.
    Replay(ReplayArgs),
    /// Describe a trace: instructions, events by kind, checkpoints, sizes, clock, guest image.
    Info(InfoArgs),
    /// List a trace's events (and checkpoints) with their positions, rips, kinds and values.
    Events(EventsArgs),
    /// Draw a trace as an SVG timeline: a lane per kind of input, checkpoints, the guest's output lines
    /// and any divergence (found by replaying it), over the trace's positions.
    Timeline(crate::timeline::TimelineArgs),
    /// Every call of a function over the whole recording, in order: position, vCPU, arguments (by the
    /// ABI of the guest's mode, named from the image's DWARF), return value and where it returned. The
    /// answer `monitor calls` gives in gdb, for scripts (--json). Ctrl-C stops the search and prints
    /// what it found.
    Calls(crate::calls::CallsArgs),
    /// Where two recordings of the same guest part: the first position where their guests differ, the
    /// first input that differs in each (or, when none does, that the interleaving or an interrupt's
    /// position differs), and the registers, devices and pages (with the symbols they hold) that differ
    /// just after. Takes a few replays of each, from their checkpoints. Exits 0 when they do not part,
    /// 1 when they do.
    Diff(crate::diff::DiffArgs),
    /// Records a guest in chaos mode with one seed after another (`--seeds A..B`), several at once (one
    /// per core), until one fails (an exit status, or output containing a text); keeps the failing
    /// recordings and a few passing ones (for `diff`) and reports the failure rate. A range of seeds is
    /// a shard of a larger hunt, for a cluster's batch system to fan out. Exits 1 when a recording
    /// failed, 0 when none did.
    Hunt(crate::hunt::HuntArgs),
    /// Check this host: KVM usable and which kind, PMU, capabilities, measured step and free-run rates,
    /// clocks, quirks. Exits 2 with one line when retrovisor cannot run here.
    Doctor,
    /// Print the gdb command file that `replay --gdb` installs and prints a `source` line for: rv-seek
    /// POS (move the replay and make gdb re-read registers and memory), rv-when and rv-help. To keep it,
    /// or to use it with a gdb on another machine: `retrovisor gdb-script > retrovisor.gdb`.
    GdbScript,
}

#[derive(Args)]
struct EventsArgs {
    /// Trace directory written by `record`.
    trace: PathBuf,
    /// Only events of this kind (serial_rx, clock, irq, interrupt, host_value, stop, kick, switch, apic_timer, checkpoint).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Only events at or after this position: an instruction count (step traces) or a landmark
    /// (landmark traces), as the listing shows them.
    #[arg(long, value_name = "POSITION")]
    from: Option<Position>,
    /// Only events at or before this position.
    #[arg(long, value_name = "POSITION")]
    to: Option<Position>,
}

#[derive(Clone, Copy, ValueEnum)]
enum TimeArg {
    /// PIT, RTC and TSC follow the host clocks (timer interrupts land wherever they land, and are logged).
    Host,
    /// PIT, RTC and TSC follow the instruction count: reproducible even without recording.
    Virtual,
}

#[derive(Args)]
struct GuestArgs {
    /// Kernel to boot: a Multiboot v1 ELF, or an ELF with a PVH entry note (Linux's vmlinux built with
    /// CONFIG_PVH).
    #[arg(long, value_name = "ELF")]
    kernel: PathBuf,
    /// Kernel command line.
    #[arg(long, visible_alias = "append", default_value = "")]
    cmdline: String,
    /// Initial ramdisk for a PVH kernel (Linux: an initramfs cpio, compressed or not), loaded at the top
    /// of guest RAM. A recording keeps a copy, so replay needs only the trace and the kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(2..=3072))]
    ram: u64,
    /// Serial input: a file whose bytes the guest receives as fast as it takes them, or `-` for standard
    /// input. Without it, input comes from the terminal when standard input is one.
    #[arg(long, value_name = "FILE")]
    serial_input: Option<PathBuf>,
    /// Hold the serial input until the guest has printed TEXT (for example a shell prompt, or Linux's
    /// "Run /init"): a kernel's serial driver discards what arrives while it sets the port up.
    #[arg(long, value_name = "TEXT", requires = "serial_input")]
    serial_input_after: Option<String>,
    /// What the guest's timers follow.
    #[arg(long, value_enum, default_value = "host")]
    time: TimeArg,
    /// Stop after this many instructions (the run then exits with status 8; needs the step clock).
    #[arg(long, value_name = "N")]
    max_instructions: Option<u64>,
    /// Disk image for a virtio-mmio block device; repeat for up to 4 disks. Disk i is at MMIO
    /// 0xd0000000 + i*0x1000 with IRQ 5, 10, 11, 9 (Linux: virtio_mmio.device=512@0xd0000000:5). The
    /// image is never written: guest writes go to an in-memory copy-on-write overlay.
    #[arg(long = "disk", value_name = "IMAGE")]
    disks: Vec<PathBuf>,
    /// The CPU the guest sees. `portable` (the default) is the same on every host, Intel or AMD: a
    /// GenuineIntel x86-64 baseline CPU (SSE2, CMPXCHG16B; no SSE3, XSAVE, RDRAND or hypervisor
    /// leaves), so a trace replays on any x86-64 host and the guest picks the same code paths
    /// everywhere. `host` passes this host's CPUID through: the trace then replays only on hosts with
    /// every feature it had.
    #[arg(long, value_enum, default_value = "portable")]
    cpu: CpuArg,
    /// vCPUs (1 to 8). With more than one, the machine has a local APIC per vCPU (xAPIC, at 0xFEE00000)
    /// and an IOAPIC (0xFEC00000), application processors wait for INIT and STARTUP IPIs, and the vCPUs
    /// run one at a time on one host thread, switching when one halts or its time slice ends: the
    /// interleaving is recorded, so races replay exactly. With one, the PC has no APIC, as before.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=machine::MAX_CPUS as i64))]
    cpus: u8,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CpuArg {
    /// The same x86-64-v2 CPU on every host.
    Portable,
    /// This host's CPUID.
    Host,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// How the guest is driven: `landmark` runs free at the host's speed; `step` single-steps every
    /// instruction, as `record --clock step` does, without writing a trace.
    #[arg(long, value_enum, default_value = "landmark")]
    clock: ClockArg,
    /// Write what the guest wrote to its disks back into the image files when the run ends (the guest
    /// exits, halts, triple-faults or is stopped with Ctrl-C). Without it, images are never modified.
    #[arg(long)]
    disk_writeback: bool,
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Trace directory to create (must not exist).
    #[arg(short, long, value_name = "TRACE")]
    output: PathBuf,
    /// Instructions between checkpoints (step clock; default 100000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1000..))]
    checkpoint_every: Option<u64>,
    /// Milliseconds of wall time between checkpoints (landmark clock, which counts no instructions:
    /// taken at the first landmark after; default 25). Denser checkpoints make gdb's searches faster
    /// (they replay whole intervals) and the trace larger.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_ms: Option<u64>,
    /// How the guest is driven while recording. `landmark` (the default) runs free at the host's speed
    /// and names positions by the guest's own exits: no PMU needed, but RDTSC results cannot be
    /// recorded (replay then reports a divergence). `step` single-steps every instruction: exact
    /// instruction counts and every RDTSC/RDRAND logged, about 10x slower here. `pmu` counts the guest's
    /// retired conditional branches, as rr does: it needs a PMU that counts a guest's (`retrovisor
    /// doctor` says whether this host has one), or --simulated-counter. Without --clock, record uses
    /// pmu where the host has such a counter and landmark elsewhere, and says which and why.
    #[arg(long, value_enum)]
    clock: Option<ClockArg>,
    /// Once the guest has ended, replay the new trace from boot to its end (checkpoints, output and
    /// end all compared) and say "verified: replays exactly" or what diverged. A recording that does
    /// not replay exits with status 4. Costs about as long again as the recording.
    #[arg(long)]
    verify: bool,
    /// Chaos mode, for hunting races on a machine with several vCPUs: time slices of widely varying
    /// length (many very short), switches wherever a kick stops a vCPU rather than where a loop ends,
    /// a random next vCPU, and windows in which one vCPU starves. Drawn from --seed (random if not
    /// given, and printed); the seed is kept in the trace, but replay does not need it.
    #[arg(long)]
    chaos: bool,
    /// With --clock pmu: count the guest's retired conditional branches on a simulated counter (the
    /// machine single-steps and counts the branches it steps over) rather than a hardware one. Its trace
    /// replays as a pmu trace: every run to a branch count goes through the counter's overflow, skid and
    /// single-step refinement, as with a PMU.
    #[arg(long, requires = "clock")]
    simulated_counter: bool,
    /// Chaos mode's seed: the same seed draws the same slices and choices.
    #[arg(long, value_name = "S", requires = "chaos")]
    seed: Option<u64>,
}

/// Default checkpoint interval, from measurement (README): a checkpoint costs ~4 ms, i.e. <2% at ~220k
/// instructions/s, and bounds a replay from the nearest checkpoint to ~0.45 s.
const DEFAULT_CHECKPOINT_EVERY: u64 = 100_000;
/// Default checkpoint interval of the landmark clock. gdb's searches replay every interval that wrote a
/// watched page, whole: on the long ledger guest, 25 ms took `watch` + reverse-continue from 2.6-3.3 s
/// (100 ms) to 1.0 s and `monitor history` from 2.5 s to 0.9 s, for 2.7x the trace bytes and no
/// measurable recording time (README, measurements).
const DEFAULT_CHECKPOINT_MS: u64 = 25;

#[derive(Args)]
struct ReplayArgs {
    /// Trace directory written by `record`.
    trace: PathBuf,
    /// Guest image to use instead of the path stored in the trace (its hash must match).
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
    /// Start from the last checkpoint at or before this position instead of from boot; at most the end
    /// of the recording. Positions are the trace's own, as `info`, `events` and divergences show them:
    /// an instruction count (step traces: `12345`) or a landmark (landmark traces: `44`); with --gdb on
    /// a landmark trace also a landmark and the instructions after it (`44+102`).
    #[arg(long, value_name = "POSITION")]
    from: Option<Position>,
    /// Stop at this position instead of the end of the recording; after the checkpoint the replay
    /// starts from.
    #[arg(long, value_name = "POSITION")]
    to: Option<Position>,
    /// Instead of running to the end, wait for gdb on ADDR (HOST:PORT, :PORT or PORT; default
    /// 127.0.0.1:1234) and let it drive the replay forward and backward. Exits 0 when gdb detaches or kills.
    /// The gdb command line it prints also sources retrovisor's gdb commands (rv-seek, rv-when, rv-help;
    /// see `gdb-script`), installed in $XDG_RUNTIME_DIR/retrovisor/, or without it in retrovisor-UID/ in $TMPDIR or /tmp.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = gdb::DEFAULT_ADDR, conflicts_with = "to")]
    gdb: Option<String>,
    /// Let --gdb listen on an address other machines can reach (anyone who connects can read guest memory).
    #[arg(long, requires = "gdb")]
    gdb_allow_remote: bool,
    /// Register layout gdb gets: auto is x86-64 when the image is an ELF64 or the guest ends in long mode.
    #[arg(long, value_enum, default_value = "auto", requires = "gdb")]
    gdb_arch: GdbArchArg,
    /// Replay a landmark trace with another clock: `step` single-steps to every recorded point (slow; the
    /// same result, which is the check that both clocks agree). Default: the clock that recorded it.
    #[arg(long, value_enum)]
    clock: Option<ClockArg>,
    /// Memory (MiB) for the in-memory snapshots that keep reverse execution fast; farther-away snapshots
    /// are dropped first when it is full.
    #[arg(long, value_name = "MIB", default_value_t = replayer::DEFAULT_SNAPSHOT_MEMORY >> 20, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    snapshot_memory: u64,
    /// With --gdb: replays a search may run at once, each on a core of its own (default: one per
    /// core). `monitor history` splits the recording into checkpoint intervals and scans them at once;
    /// the answer is the same with 1, which keeps every search on the one replay.
    #[arg(long, value_name = "N", requires = "gdb", value_parser = clap::value_parser!(u64).range(1..=256))]
    search_workers: Option<u64>,
    /// Execute every stretch between a landmark and a kick point rather than jumping over it by its
    /// waypoint (the machine as the recording saw it there, which landmark recordings save where the guest
    /// ran a while without exits). Slower, as slow as the recording's breakpoint searches make it; it checks
    /// that those stretches replay too, which a jump takes on trust until the next kick's fingerprint.
    #[arg(long, conflicts_with = "gdb")]
    no_waypoints: bool,
    /// A pmu trace, replayed on the simulated counter: how many instructions late its overflow
    /// interrupt lands, at most, as a hardware counter's skid (each lands a random 0 to N late; the run
    /// then single-steps to the exact branch). Without it, a pmu trace is replayed with this host's
    /// counter of a guest's branches where it has one, and on the simulated counter with a skid of 64
    /// where it has none (single steps: slow, exact), which replay says.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=machine::counter::MAX_SKID))]
    skid: Option<u64>,
    /// Go live at --to (or where the recording stops, if the user or the instruction limit stopped it):
    /// from there the guest runs on this host's inputs (--serial-input or the terminal, the host clock
    /// going on from the guest's) instead of the recording's, to see what it does then. The trace is
    /// not changed. Under gdb, `monitor go-live` does it at the position gdb stands at.
    #[arg(long, conflicts_with = "gdb")]
    go_live: bool,
    /// Record the live run into this new trace directory (implies --go-live without --gdb; with --gdb,
    /// where `monitor go-live` records): it starts from the state at the branch point, with whatever gdb
    /// wrote before the live run's first instruction, replays on its own, and `info` names the trace and
    /// position it branched from.
    #[arg(long, value_name = "DIR")]
    go_live_record: Option<PathBuf>,
    /// Serial input of the live run: a file whose bytes the guest receives as fast as it takes them, or
    /// `-` for standard input. Without it, input comes from the terminal when standard input is one.
    #[arg(long, value_name = "FILE")]
    serial_input: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum GdbArchArg {
    /// From the guest image and the CPU mode at the end of the recording.
    Auto,
    /// 32-bit registers.
    I386,
    /// 64-bit registers.
    #[value(name = "x86-64")]
    X86_64,
}

#[derive(Args)]
struct InfoArgs {
    /// Trace directory written by `record`.
    trace: PathBuf,
    /// Also check everything a replay checks, with the code replay uses, without running the guest:
    /// the guest image against the recorded hash, every checkpoint read in full (CRC,
    /// decompression, pages, the chain's page references), every disk copy (SHA-256), the recorded
    /// machine built (RAM, memory map, clock, command line, CPUID: needs KVM), and every checkpoint
    /// restored into it with what it stores hashed against the digest it records. Lists each
    /// problem with its file and exits with status 2 if there is any. Without it, info reads only
    /// the header, the event stream (every event checked) and the checkpoints' headers.
    #[arg(long)]
    verify: bool,
    /// Guest image for --verify instead of the path stored in the trace (its hash must match).
    #[arg(long, value_name = "ELF", requires = "verify")]
    kernel: Option<PathBuf>,
}

/// What can go wrong in a command, for the one-line error message.
#[derive(Debug, Error)]
enum CliError {
    #[error("cannot read kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read serial input {path}: {source}")]
    SerialInput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] devices::disk::DiskError),
    #[error("--disk given {0} times; a machine has at most {max} disks", max = devices::MAX_DISKS)]
    TooManyDisks(usize),
    #[error("cannot open disk image {path} for --disk-writeback: {source}")]
    WritebackOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {0} is given twice; with --disk-writeback each image may be given once")]
    WritebackTwice(PathBuf),
    #[error(transparent)]
    Record(#[from] recorder::RecordError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("not verified: {dir} was recorded but does not replay: {source}")]
    NotVerified { dir: PathBuf, source: ReplayError },
    #[error(transparent)]
    Trace(#[from] traces::ReadError),
    #[error(transparent)]
    Gdb(#[from] gdb::GdbError),
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
    #[error("the pmu clock needs a counter of the guest's retired conditional branches, and {why}; `record --clock pmu --simulated-counter` records with a simulated one (it single-steps: about as slow as --clock step)")]
    NoBranchCounter { why: String },
    #[error("--clock pmu applies to `record` and to replaying a pmu trace; {what}")]
    PmuNotHere { what: &'static str },
    #[error("{given} does not apply to the {clock} clock: use {instead}")]
    CheckpointUnit {
        given: &'static str,
        clock: &'static str,
        instead: &'static str,
    },
    #[error("{dir} failed verification: {count} problem{s} (listed above)", s = if *count == 1 { "" } else { "s" })]
    Verify { dir: PathBuf, count: usize },
    #[error(transparent)]
    Timeline(#[from] crate::timeline::TimelineError),
    #[error(transparent)]
    Doctor(#[from] crate::doctor::DoctorError),
    #[error(transparent)]
    Calls(#[from] crate::calls::CallsCliError),
    #[error(transparent)]
    Diff(#[from] crate::diff::DiffCliError),
    #[error(transparent)]
    Hunt(#[from] crate::hunt::HuntError),
    #[error(transparent)]
    Live(#[from] gdb::live::LiveError),
    #[error("--serial-input is the input of a live run: give it with --go-live, --go-live-record or --gdb (a replay's input is the recording's)")]
    SerialInputWithoutLive,
    #[error("cannot go live at {at}: the guest had already stopped there ({stop:?})")]
    GuestEnded { at: Shown, stop: traces::StopReason },
    #[error("--to {to} is before --from {from}: a replay runs forward, so --to must be at or after --from")]
    BackwardRange { from: Position, to: Position },
    #[error("--from {from} is past the end of the recording, which runs from {start} to {end}: give --from at most {last}")]
    FromPastEnd {
        from: Position,
        start: Shown,
        end: Shown,
        last: Position,
    },
    #[error("--to {to} replays nothing: the replay starts at {start}, {starts}, so --to must be after {start_at} (the recording ends at {end})")]
    EmptyReplay {
        to: Position,
        starts: String,
        start: Shown,
        start_at: Position,
        end: Shown,
    },
    #[error("{flag} {position} is not a position of this replay: {why}")]
    NotAPosition {
        flag: &'static str,
        position: Position,
        why: &'static str,
    },
    #[error("--kind {kind} is not a kind of event: use one of {}, {CHECKPOINT_KIND}", traces::EVENT_KINDS.join(", "))]
    UnknownKind { kind: String },
    #[error("--to {to} is before --from {from}: events are listed in position order, so --to must be at or after --from")]
    BackwardEvents { from: Position, to: Position },
}

/// What `events` calls checkpoints, listed among the events and selected with `--kind` like them.
const CHECKPOINT_KIND: &str = "checkpoint";

/// Parses arguments, runs the command and returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) if a.clock == ClockArg::Pmu => Err(CliError::PmuNotHere {
            what: "`run` names no positions: use --clock landmark or step",
        }),
        Command::Run(a) => {
            // Virtual time and instruction limits need instruction counts, which only stepping gives.
            let step = a.clock == ClockArg::Step
                || matches!(a.guest.time, TimeArg::Virtual)
                || a.guest.max_instructions.is_some();
            let clock = if step {
                machine::Clock::Step
            } else {
                machine::Clock::Landmark
            };
            record(
                a.guest,
                None,
                (clock, Landmarks::Exits, None),
                a.disk_writeback,
                None,
            )
        }
        Command::Record(a) => {
            // The pmu clock is the default where the host counts a guest's branches, the landmark clock
            // elsewhere; the summary line says which clock recorded, and why.
            let hardware = matches!(
                (a.clock, a.simulated_counter),
                (None, _) | (Some(ClockArg::Pmu), false)
            )
            .then(crate::doctor::branch_counter);
            let (chosen, why_clock) = match (a.clock, &hardware) {
                (None, Some(Ok((_, event)))) => (
                    ClockArg::Pmu,
                    Some(format!(
                        "with the pmu clock (this host counts a guest's branches: {event})"
                    )),
                ),
                (None, Some(Err(why))) => (
                    ClockArg::Landmark,
                    Some(format!(
                        "with the landmark clock (no pmu clock here: {why})"
                    )),
                ),
                (chosen, _) => (chosen.unwrap_or(ClockArg::Landmark), None),
            };
            let clock = chosen.clock();
            let landmarks = match (chosen, hardware) {
                (ClockArg::Pmu, _) if a.simulated_counter => Ok((Landmarks::Branches, None)),
                (ClockArg::Pmu, Some(Ok((counter, _)))) => Ok((Landmarks::Branches, Some(counter))),
                (ClockArg::Pmu, Some(Err(why))) => Err(CliError::NoBranchCounter {
                    why: format!("this host has none usable: {why}"),
                }),
                _ => Ok((Landmarks::Exits, None)),
            };
            match (clock, a.checkpoint_every, a.checkpoint_ms) {
                (machine::Clock::Landmark, Some(_), _) => Err(CliError::CheckpointUnit {
                    given: "--checkpoint-every",
                    clock: "landmark",
                    instead: "--checkpoint-ms",
                }),
                (machine::Clock::Step, _, Some(_)) => Err(CliError::CheckpointUnit {
                    given: "--checkpoint-ms",
                    clock: "step",
                    instead: "--checkpoint-every",
                }),
                (machine::Clock::Step, every, None) => {
                    Ok(every.unwrap_or(DEFAULT_CHECKPOINT_EVERY))
                }
                (machine::Clock::Landmark, None, ms) => Ok(ms.unwrap_or(DEFAULT_CHECKPOINT_MS)),
            }
            .and_then(|every| Ok((every, landmarks?)))
            .and_then(|(every, (landmarks, hardware))| {
                let seed = a.chaos.then(|| a.seed.unwrap_or_else(chaos_seed));
                let trace = Some((a.output.clone(), every, why_clock));
                record(a.guest, trace, (clock, landmarks, hardware), false, seed)
            })
            .and_then(|status| match a.verify {
                true => verify_recording(&a.output).map(|()| status),
                false => Ok(status),
            })
        }
        Command::Replay(a) => replay(&a),
        Command::Info(a) => info(&a),
        Command::Events(a) => events(&a),
        Command::Timeline(a) => crate::timeline::run(&a).map_err(CliError::from),
        Command::Calls(a) => crate::calls::run(&a).map_err(CliError::from),
        Command::Diff(a) => crate::diff::run(&a).map_err(CliError::from),
        Command::Hunt(a) => crate::hunt::run(&a).map_err(CliError::from),
        Command::Doctor => crate::doctor::run().map_err(CliError::from),
        Command::GdbScript => std::io::stdout()
            .write_all(gdb::script::SCRIPT.as_bytes())
            .map(|()| 0)
            .map_err(CliError::Output),
    };
    match result {
        Ok(status) => status,
        Err(e) => {
            say(format_args!("retrovisor: error: {e}"));
            match e {
                CliError::Replay(ReplayError::Divergence(_))
                | CliError::NotVerified {
                    source: ReplayError::Divergence(_),
                    ..
                } => EXIT_DIVERGENCE,
                CliError::Gdb(gdb::GdbError::Replay(replayer::search::SearchError::Replay(
                    ReplayError::Divergence(_),
                ))) => EXIT_DIVERGENCE,
                CliError::Calls(crate::calls::CallsCliError::Replay(ReplayError::Divergence(
                    _,
                )))
                | CliError::Calls(crate::calls::CallsCliError::Search(
                    replayer::search::SearchError::Replay(ReplayError::Divergence(_)),
                )) => EXIT_DIVERGENCE,
                CliError::Diff(crate::diff::DiffCliError::Diff(
                    replayer::diff::DiffError::Replay {
                        source: ReplayError::Divergence(_),
                        ..
                    },
                )) => EXIT_DIVERGENCE,
                _ => EXIT_ERROR,
            }
        }
    }
}

/// Reads the disk images (before the guest starts, so a bad one is a clean error) and, for
/// `--disk-writeback`, opens each for writing now, so a read-only image fails before the run.
fn open_disks(
    paths: &[PathBuf],
    writeback: bool,
) -> Result<(Vec<devices::disk::DiskImage>, Vec<std::fs::File>), CliError> {
    if paths.len() > devices::MAX_DISKS {
        return Err(CliError::TooManyDisks(paths.len()));
    }
    let mut images = Vec::new();
    let mut files = Vec::new();
    for p in paths {
        let path = std::fs::canonicalize(p).unwrap_or(p.clone());
        images.push(devices::disk::DiskImage::open(&path)?);
        if writeback {
            if images[..images.len() - 1].iter().any(|d| d.path() == path) {
                return Err(CliError::WritebackTwice(path));
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| CliError::WritebackOpen {
                    path: path.clone(),
                    source,
                })?;
            files.push(file);
        }
    }
    Ok((images, files))
}

fn serial_input(arg: Option<&Path>) -> Result<SerialInput, CliError> {
    Ok(match arg {
        Some(p) if p == Path::new("-") => SerialInput::Stream(Box::new(std::io::stdin())),
        Some(p) => {
            SerialInput::Bytes(std::fs::read(p).map_err(|source| CliError::SerialInput {
                path: p.into(),
                source,
            })?)
        }
        None if std::io::stdin().is_terminal() => SerialInput::Stream(Box::new(std::io::stdin())),
        None => SerialInput::None,
    })
}

/// A chaos seed drawn from the host's randomness, said on stderr so a run can be drawn again.
fn chaos_seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    eprintln!("retrovisor: chaos seed {seed}");
    seed
}

fn record(
    g: GuestArgs,
    trace: Option<(PathBuf, u64, Option<String>)>,
    (clock, landmarks, hardware_counter): (machine::Clock, Landmarks, Option<CounterEvent>),
    disk_writeback: bool,
    chaos_seed: Option<u64>,
) -> Result<i32, CliError> {
    // The simulated counter single-steps: the guest gets what the step clock gives it.
    let runs_free =
        clock.runs_free() && (landmarks == Landmarks::Exits || hardware_counter.is_some());
    // Only a regular file: a FIFO would block and a device would read forever.
    let image =
        traces::read_regular_file(&g.kernel, traces::MAX_IMAGE_BYTES).map_err(|source| {
            CliError::Kernel {
                path: g.kernel.clone(),
                source,
            }
        })?;
    let (disks, writeback) = open_disks(&g.disks, disk_writeback)?;
    let initrd = g
        .initrd
        .as_ref()
        .map(|path| {
            traces::read_regular_file(path, traces::MAX_IMAGE_BYTES).map_err(|source| {
                CliError::Initrd {
                    path: path.clone(),
                    source,
                }
            })
        })
        .transpose()?;
    let recording = trace.is_some();
    let (trace, checkpoint_every, why_clock) = trace
        .map(|(p, n, why)| (Some(p), n, why))
        .unwrap_or((None, DEFAULT_CHECKPOINT_EVERY, None));
    let mut opts = Options {
        image_path: std::fs::canonicalize(&g.kernel).unwrap_or(g.kernel.clone()),
        image,
        initrd_path: g
            .initrd
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or(p.clone())),
        machine: machine::MachineConfig {
            ram_bytes: g.ram << 20,
            cmdline: g.cmdline,
            initrd,
            disks: disks.clone(),
            hide_host_values: runs_free,
            trap_host_insns: runs_free,
            cpuid: None,
            cpu: match g.cpu {
                CpuArg::Portable => machine::CpuModel::Portable,
                CpuArg::Host => machine::CpuModel::Host,
            },
            // Only the VMM can show this host's guests a CPU other than the host's (see answer_cpuid).
            answer_cpuid: g.cpu == CpuArg::Portable,
            cpus: usize::from(g.cpus),
            cold_checkpoints: true,
        },
        trace: trace.clone(),
        serial_input: serial_input(g.serial_input.as_deref())?,
        serial_input_after: g.serial_input_after.map(String::into_bytes),
        time: match g.time {
            TimeArg::Host => TimeSourceKind::Host,
            TimeArg::Virtual => TimeSourceKind::Virtual,
        },
        checkpoint_every,
        max_instructions: g.max_instructions,
        clock,
        landmarks,
        hardware_counter,
        progress: None,
        chaos_seed,
    };
    let bar = progress_bar(g.max_instructions, "recording");
    if clock == machine::Clock::Step {
        let b = bar.clone();
        opts.progress = Some(Box::new(move |icount, events| {
            b.set_position(icount);
            b.set_message(format!("recording ({events} events)"));
        }));
    }
    let mut stdout = std::io::stdout().lock();
    let outcome = recorder::record(opts, &mut stdout);
    bar.finish_and_clear();
    let outcome = outcome?;
    if recording {
        let secs = outcome.wall.as_secs_f64();
        say(format_args!(
            "retrovisor: recorded {} {}{} in {:.2}s ({:.0}/s), {} events, {} checkpoints, into {}; guest {}",
            outcome.icount,
            match landmarks {
                Landmarks::Branches => "branches",
                Landmarks::Exits => words::counted(Some(clock)),
            },
            why_clock.map_or(String::new(), |why| format!(" {why}")),
            secs,
            outcome.icount as f64 / secs.max(1e-9),
            outcome.events_by_kind.values().sum::<u64>(),
            outcome.checkpoints,
            trace.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
            describe_stop(&outcome.stop),
        ));
    }
    for ((overlay, file), disk) in outcome.disk_writes.iter().zip(&writeback).zip(&disks) {
        overlay.write_back(file, disk.len(), disk.path())?;
    }
    Ok(recorder::exit_status(&outcome.stop))
}

/// A progress bar on stderr for a long run of `len` instructions (unknown: a counter). Shown only when stderr
/// is a terminal and the guest's output is not going to a terminal too, where the two would interleave.
fn progress_bar(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() || std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (
            ProgressBar::new(n),
            "{msg} [{bar:40}] {human_pos}/{human_len} instructions, {elapsed} (eta {eta})",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {msg}: {human_pos} instructions, {elapsed}",
        ),
    };
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

fn replay(a: &ReplayArgs) -> Result<i32, CliError> {
    if a.clock == Some(ClockArg::Pmu) {
        let header = traces::TraceReader::open(&a.trace)?.header().clock.clone();
        if header != Landmarks::PMU_CLOCK {
            return Err(CliError::PmuNotHere {
                what: "this trace was recorded with another clock, whose positions a branch count does not name",
            });
        }
    }
    let live = a.go_live || a.go_live_record.is_some();
    if a.serial_input.is_some() && !live && a.gdb.is_none() {
        return Err(CliError::SerialInputWithoutLive);
    }
    if let Some(addr) = &a.gdb {
        return replay_under_gdb(a, addr);
    }
    let mut r = Replayer::open(&a.trace, a.kernel.as_deref())?;
    if let Some(clock) = a.clock {
        r.set_clock(clock.clock())?;
    }
    r.set_waypoints(!a.no_waypoints);
    let hardware = match pmu_counter(a.skid, &r) {
        Some(event) => Some(r.use_hardware_counter(event)?),
        None => {
            r.set_counter_skid(a.skid.unwrap_or(machine::counter::DEFAULT_SKID));
            None
        }
    };
    check_range(a, &r)?;
    warn_if_cut_off(&r);
    if let Some(from) = a.from {
        let index = r.checkpoint_before(from);
        r.restore_checkpoint(index)?;
        warn_notices(r.take_notices());
    }
    let bar = progress_bar(Some(r.end().count()), "replaying");
    let b = bar.clone();
    r.set_progress(Some(Box::new(move |at, target| {
        b.set_length(target.count());
        b.set_position(at.count());
    })));
    let mut stdout = std::io::stdout().lock();
    let halt = r.run_to(a.to.unwrap_or(Position::END), &mut stdout);
    bar.finish_and_clear();
    warn_notices(r.take_notices());
    let halt = halt?;
    stdout.flush().ok();
    if live {
        return go_live(a, &r, &halt);
    }
    // From boot to the clean end, the replayer has checked the checkpoints it passed and the whole output.
    if let (None, Halt::End(Some(_)), Some(s)) = (a.from, &halt, r.trace().summary()) {
        // A landmark trace replayed by stepping has counted its instructions on the way.
        let stepped = if r.positions() == machine::Clock::Landmark
            && r.machine().clock() == machine::Clock::Step
        {
            format!(
                " ({} instructions, counted by stepping)",
                r.machine().icount()
            )
        } else {
            String::new()
        };
        let jumps = match (r.waypoint_jumps(), r.machine().counter_overflows()) {
            (0, 0) => String::new(),
            (n, 0) => format!(", {n} kick points reached by their waypoints"),
            (_, n) if hardware.is_some() => format!(
                ", {n} runs to a branch count through the hardware counter's overflow and single steps"
            ),
            (_, n) => format!(
                ", {n} runs to a branch count through the simulated counter's overflow (skid up to {} \
                 instructions) and single steps",
                a.skid.unwrap_or(machine::counter::DEFAULT_SKID)
            ),
        };
        say(format_args!(
            "retrovisor: replay matched the recording: {} {}{stepped}{jumps}, output identical ({} bytes, sha256 {})",
            r.end().count(),
            words::counted_by(&r.trace().header().clock),
            s.output_bytes,
            s.output_sha256
        ));
    }
    Ok(match halt {
        Halt::End(Some(stop)) => recorder::exit_status(&stop),
        Halt::End(None) | Halt::Target => 0,
    })
}

/// `replay --go-live`: from where the replay stopped (`halt`), runs the guest live to its end, recorded
/// into --go-live-record if given; exits with the guest's status.
fn go_live(a: &ReplayArgs, r: &Replayer, halt: &Halt) -> Result<i32, CliError> {
    if let Halt::End(Some(stop)) = halt {
        if !matches!(
            stop,
            traces::StopReason::UserStop | traces::StopReason::InstructionLimit
        ) {
            return Err(CliError::GuestEnded {
                at: r.show(r.position()),
                stop: *stop,
            });
        }
    }
    let input = serial_input(a.serial_input.as_deref())?;
    let from = r.show(r.position());
    let mut session = gdb::live::start(r, &a.trace, input, a.go_live_record.as_deref())?;
    say(format_args!(
        "retrovisor: live from {from}: the guest runs on this host's inputs from here{}",
        match &a.go_live_record {
            Some(dir) => format!(", recorded into {}", dir.display()),
            None => String::new(),
        }
    ));
    recorder::install_stop_handlers();
    let mut stdout = std::io::stdout().lock();
    let stop = loop {
        if let recorder::Pass::Stopped(stop) = session.pass(&mut stdout, false)? {
            break stop;
        }
    };
    let outcome = session.finish(stop)?;
    stdout.flush().ok();
    say(format_args!(
        "retrovisor: the live run ended: {}{}",
        describe_stop(&outcome.stop),
        match &a.go_live_record {
            Some(dir) => format!(
                "; recorded into {} ({} checkpoints): `retrovisor replay {}` replays it",
                dir.display(),
                outcome.checkpoints,
                dir.display()
            ),
            None => String::new(),
        }
    ));
    Ok(recorder::exit_status(&outcome.stop))
}

/// `replay --gdb ADDR`: serves the replay to gdb on `addr`, which moves it backward as well as forward.
fn replay_under_gdb(a: &ReplayArgs, addr: &str) -> Result<i32, CliError> {
    let mut t = Timeline::open(&a.trace, a.kernel.as_deref())?;
    if let Some(clock) = a.clock {
        t.set_clock(clock.clock())?;
    }
    t.set_snapshot_memory((a.snapshot_memory << 20) as usize);
    match pmu_counter(a.skid, t.replay()) {
        Some(event) => t.use_hardware_counter(event)?,
        None => t.set_counter_skid(a.skid.unwrap_or(machine::counter::DEFAULT_SKID)),
    }
    if let Some(n) = a.search_workers {
        t.set_workers(n as usize);
    }
    if t.replay().positions() == machine::Clock::Landmark {
        // gdb moves by single instructions, backwards too: positions within landmarks.
        t.step_within_landmarks()?;
    }
    check_range(a, t.replay())?;
    warn_if_cut_off(t.replay());
    if let Some(from) = a.from {
        let index = t.replay().checkpoint_before(from);
        t.restore_checkpoint(index)?;
        warn_notices(t.take_notices());
    }
    let opts = gdb::GdbOptions {
        addr: addr.to_string(),
        allow_remote: a.gdb_allow_remote,
        arch: match a.gdb_arch {
            GdbArchArg::Auto => gdb::ArchChoice::Auto,
            GdbArchArg::I386 => gdb::ArchChoice::I386,
            GdbArchArg::X86_64 => gdb::ArchChoice::X86_64,
        },
        trace: a.trace.clone(),
        image: a.kernel.clone(),
        live: gdb::live::LiveSetup {
            serial_input: Some(serial_input(a.serial_input.as_deref())?),
            record: a.go_live_record.clone(),
            trace: a.trace.clone(),
        },
    };
    gdb::serve(t, opts, Box::new(std::io::stdout()))?;
    Ok(0)
}

/// How a replay of `r`'s trace counts: a pmu trace recorded on a hardware counter, with this host's
/// (its event), unless a `skid` asks for the simulated counter or the host has none; anything else on
/// the simulated counter (None), which for a pmu trace is said, with why. A trace recorded on the
/// simulated counter replays on it: a hardware counter counts what the CPU retires, which a step that
/// delivers an event or an instruction KVM emulates can make differ from what the decoder counts.
fn pmu_counter(skid: Option<u64>, r: &Replayer) -> Option<CounterEvent> {
    if r.machine().landmarks_are() != Landmarks::Branches || skid.is_some() {
        return None;
    }
    // A hardware counter's recording ran free, so its VMM trapped the host's instructions.
    if !r.trace().header().host_traps {
        say(format_args!(
            "retrovisor: a pmu trace recorded on the simulated counter, replayed on it: it single-steps, \
             so slowly, and exactly"
        ));
        return None;
    }
    match crate::doctor::branch_counter() {
        Ok((event, _)) => Some(event),
        Err(why) => {
            say(format_args!(
                "retrovisor: a pmu trace recorded on a hardware counter, replayed on the simulated counter \
                 (no pmu clock here: {why}): it single-steps, so slowly, and counts the branches it \
                 decodes, which agree with the recording's where the CPU's event counts the same ones"
            ));
            None
        }
    }
}

/// Warns that a trace cut off by a crash replays only as far as it goes.
fn warn_if_cut_off(r: &Replayer) {
    if r.trace().cut_off() {
        say(format_args!(
            "retrovisor: warning: the recording was cut off (no clean end); replaying up to {}",
            r.show(r.end())
        ));
    }
}

/// Refuses a `--from` or `--to` the replay could not honour: one it has no such position for (within a
/// landmark, unless gdb drives a landmark trace), a range that runs backward, a start past the end of
/// the recording (a replay would start at the last checkpoint and run to the end, as if asked for
/// that), and an end at or before the checkpoint the replay starts from (it would run nothing).
/// Positions are the trace's own, as `info` and `events` show them.
fn check_range(a: &ReplayArgs, r: &Replayer) -> Result<(), CliError> {
    for (flag, position) in [("--from", a.from), ("--to", a.to)] {
        if let Some(position) = position.filter(|&p| !r.can_reach(p)) {
            return Err(CliError::NotAPosition {
                flag,
                position,
                why: if r.positions() == machine::Clock::Step {
                    "a step trace's positions are instruction counts, with nothing after the `+`"
                } else {
                    "instructions within a landmark are counted only when gdb drives the replay \
                     (--gdb); give a landmark"
                },
            });
        }
    }
    if let (Some(from), Some(to)) = (a.from, a.to) {
        if to < from {
            return Err(CliError::BackwardRange { from, to });
        }
    }
    let end = r.end();
    if let Some(from) = a.from.filter(|&f| f > end) {
        return Err(CliError::FromPastEnd {
            from,
            start: r.show(Position::START),
            end: r.show(end),
            last: end,
        });
    }
    if let Some(to) = a.to {
        let start =
            r.checkpoint_positions()[r.checkpoint_before(a.from.unwrap_or(Position::START))];
        if to <= start {
            return Err(CliError::EmptyReplay {
                to,
                starts: match a.from {
                    Some(from) => format!("the last checkpoint at or before --from {from}"),
                    None => "the first checkpoint".to_string(),
                },
                start: r.show(start),
                start_at: start,
                end: r.show(end),
            });
        }
    }
    Ok(())
}

/// `record --verify`: replays the trace just written from boot to its end, which checks every checkpoint,
/// the output and the end against the recording, and says so.
fn verify_recording(dir: &Path) -> Result<(), CliError> {
    say(format_args!(
        "retrovisor: verifying {}: replaying it from boot to its end",
        dir.display()
    ));
    let mut r = Replayer::open(dir, None)?;
    if let Some(event) = pmu_counter(None, &r) {
        r.use_hardware_counter(event)?;
    }
    let bar = progress_bar(Some(r.end().count()), "verifying");
    let b = bar.clone();
    r.set_progress(Some(Box::new(move |at, target| {
        b.set_length(target.count());
        b.set_position(at.count());
    })));
    let halt = r.run_to(Position::END, &mut std::io::sink());
    bar.finish_and_clear();
    warn_notices(r.take_notices());
    halt.map_err(|source| CliError::NotVerified {
        dir: dir.to_owned(),
        source,
    })?;
    let checkpoints = r.trace().checkpoints().len();
    say(format_args!(
        "retrovisor: verified: {} replays exactly ({} {}, {checkpoints} checkpoints matched, output identical)",
        dir.display(),
        r.end().count(),
        words::counted_by(&r.trace().header().clock),
    ));
    Ok(())
}

/// Prints what the replay worked around (a corrupt checkpoint) as warnings.
fn warn_notices(notices: Vec<String>) {
    for notice in notices {
        eprintln!("retrovisor: warning: {notice}");
    }
}

fn info(a: &InfoArgs) -> Result<i32, CliError> {
    let dir = a.trace.as_path();
    let t = traces::TraceReader::open(dir)?;
    let h = t.header();
    let (event_bytes, checkpoint_bytes) = t.sizes();
    let end = t
        .summary()
        .map(|s| s.end)
        .unwrap_or_else(|| t.complete_upto());
    println!("trace:         {}", dir.display());
    println!(
        "format:        version {} (written by retrovisor {})",
        h.format_version, h.tool_version
    );
    println!(
        "guest image:   {} ({} bytes, sha256 {})",
        h.image_path, h.image_size, h.image_sha256
    );
    println!(
        "machine:       {} MiB RAM, {}, cmdline {:?}",
        h.machine.ram_bytes >> 20,
        match h.cpus {
            1 => "1 vCPU (no APIC)".to_string(),
            n => format!("{n} vCPUs (a local APIC each, and an IOAPIC; run one at a time)"),
        },
        h.machine.cmdline
    );
    if let Some(b) = &h.branched_from {
        println!(
            "branched from: {} (recorded {}) at {}, by going live there: it starts from that replay's \
             state, not from boot",
            b.trace,
            words::utc(b.trace_created_unix_secs),
            b.position
        );
    }
    if let Some(seed) = h.chaos_seed {
        println!("chaos:         recorded in chaos mode with seed {seed} (`record --chaos --seed {seed}`)");
    }
    if !h.machine.memory_map.is_empty() {
        let ranges: Vec<String> = h
            .machine
            .memory_map
            .iter()
            .map(|&(base, len, kind)| {
                let what = if kind == 1 { "RAM" } else { "reserved" };
                format!("{base:#x}-{:#x} {what}", base + len.saturating_sub(1))
            })
            .collect();
        println!("memory map:    {}", ranges.join(", "));
    }
    println!(
        "cpu:           {}",
        match (h.cpu_model.as_str(), h.vmm_cpuid) {
            ("portable", true) => {
                "portable model (the same x86-64 CPU on every host; the VMM answered CPUID)"
            }
            (_, true) => "a model the VMM answered CPUID for",
            _ if h.cpuid.is_empty() => "the recording host's (not kept in the trace)",
            _ => "host model (the recording host's CPUID, kept in the trace)",
        }
    );
    if let Some(c) = &h.recorded_on {
        println!(
            "recorded on:   {} family {} model {} stepping {}{}",
            c.vendor,
            c.family,
            c.model,
            c.stepping,
            if c.brand.is_empty() {
                String::new()
            } else {
                format!(", {}", c.brand)
            }
        );
    }
    let clock = words::clock_of(h);
    let (unit, counted) = (words::unit(clock), words::counted_by(&h.clock));
    println!(
        "clock:         {} ({})",
        h.clock,
        words::clock_meaning(&h.clock)
    );
    println!(
        "time:          {} ({})",
        words::time_mode(&h.time_mode),
        words::time_meaning(&h.time_mode)
    );
    for (i, d) in h.disks.iter().enumerate() {
        println!(
            "disk {i}:        {} ({} bytes, sha256 {}); the trace holds a copy",
            d.path, d.size, d.sha256
        );
    }
    if let Some(i) = &h.initrd {
        println!(
            "initrd:        {} ({} bytes, sha256 {}); the trace holds a copy",
            i.path, i.size, i.sha256
        );
    }
    if !h.disks.is_empty() {
        println!(
            "disk copies:   {} bytes in {}/",
            t.disk_copy_bytes(),
            traces::DISKS_DIR
        );
    }
    println!("{:<15}{end}", format!("{counted}:"));
    match t.summary() {
        Some(s) => println!(
            "ended:         guest {} ({:.2}s wall, {} bytes of serial output)",
            describe_stop(&s.stop),
            s.wall_secs,
            s.output_bytes
        ),
        None => match t.replayable_upto() {
            Some(upto) => {
                println!("ended:         cut off (no clean end); replayable up to {unit} {upto}");
            }
            None => println!(
                "ended:         cut off (no clean end) before its first checkpoint: nothing replayable"
            ),
        },
    }
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    for e in t.events() {
        *counts.entry(e.kind.name()).or_default() += 1;
    }
    println!("events:        {}", t.events().len());
    for (kind, n) in counts {
        println!("  {kind:<12} {n:<8} {}", words::event_meaning(kind));
    }
    let full = t.checkpoints().iter().filter(|c| c.full).count();
    println!(
        "checkpoints:   {} ({} full), {}, {} bytes ({:.1}% of guest RAM each on average)",
        t.checkpoints().len(),
        full,
        words::checkpoint_interval(h),
        checkpoint_bytes,
        100.0 * checkpoint_bytes as f64
            / (t.checkpoints().len().max(1) as f64 * h.machine.ram_bytes as f64),
    );
    if t.ignored_checkpoints() > 0 {
        println!(
            "               {} more past {unit} {end} ignored: the event stream is not complete up to them",
            t.ignored_checkpoints()
        );
    }
    let (waypoints, waypoint_bytes, waypoint_problem) = t.waypoint_summary();
    if waypoint_bytes > 0 {
        println!(
            "waypoints:     {waypoints}, {waypoint_bytes} bytes (kick points a replay jumps to instead of \
             running the guest there)"
        );
    }
    if let Some(problem) = waypoint_problem {
        println!("               the rest cannot be read ({problem}): replay finds those kick points by running the guest");
    }
    let per_m = |b: u64| b as f64 * 1e6 / end.max(1) as f64;
    println!(
        "event stream:  {event_bytes} bytes ({:.1} bytes per million {counted})",
        per_m(event_bytes)
    );
    let total = event_bytes + checkpoint_bytes + waypoint_bytes;
    println!(
        "total:         {total} bytes ({:.1} bytes per million {counted})",
        per_m(total)
    );
    if a.verify {
        let mut t = t;
        let problems = replayer::verify::verify(&mut t, a.kernel.as_deref())?;
        if !problems.is_empty() {
            let s = if problems.len() == 1 { "" } else { "s" };
            println!("verify:        {} problem{s}:", problems.len());
            for p in &problems {
                println!("  {p}");
            }
            return Err(CliError::Verify {
                dir: dir.to_owned(),
                count: problems.len(),
            });
        }
        println!(
            "verify:        ok: the guest image matches, the recorded machine builds, every event, checkpoint and disk copy \
             was read and checked, and every checkpoint restored into the machine matches its digest ({} checkpoints, {} disk copies)",
            t.checkpoints().len(),
            t.header().disks.len()
        );
    }
    Ok(0)
}

/// One line per event and checkpoint, in position order.
fn events(a: &EventsArgs) -> Result<i32, CliError> {
    if let Some(kind) = a
        .kind
        .as_ref()
        .filter(|k| !traces::EVENT_KINDS.contains(&k.as_str()) && *k != CHECKPOINT_KIND)
    {
        return Err(CliError::UnknownKind { kind: kind.clone() });
    }
    let t = traces::TraceReader::open(&a.trace)?;
    let clock = machine::Clock::from_name(&t.header().clock).unwrap_or(machine::Clock::Step);
    let (from, to) = (
        a.from.unwrap_or(Position::START),
        a.to.unwrap_or(Position::END),
    );
    if to < from {
        return Err(CliError::BackwardEvents { from, to });
    }
    let unit = clock.unit();
    let wanted = |kind: &str| a.kind.as_deref().is_none_or(|k| k == kind);
    let mut checkpoints = t.checkpoints().iter().peekable();
    let mut out = std::io::stdout().lock();
    let mut line = |position: u64, rip: u64, kind: &str, what: String| {
        if (from..=to).contains(&Position::at(position)) && wanted(kind) {
            writeln!(
                out,
                "{unit} {position:>12}  rip {rip:#010x}  {kind:<11} {what}"
            )
        } else {
            Ok(())
        }
    };
    let io = |e: std::io::Error| CliError::Output(e);
    for e in t.events() {
        while let Some(c) = checkpoints.next_if(|c| c.at <= e.at) {
            line(c.at, c.rip, CHECKPOINT_KIND, String::new()).map_err(io)?;
        }
        let what = match &e.kind {
            traces::EventKind::SerialRx { bytes } => {
                format!("{:?}", String::from_utf8_lossy(bytes))
            }
            traces::EventKind::Clock { kind, ns } => format!("{kind:?} {ns} ns"),
            traces::EventKind::Irq { line } => format!("line {line}"),
            traces::EventKind::Interrupt { vector } => format!("vector {vector:#x}"),
            traces::EventKind::HostValue { insn, value, aux } => {
                format!("{insn:?} {value:#x} aux {aux:#x}")
            }
            traces::EventKind::Stop { reason } => format!("{reason:?}"),
            traces::EventKind::Switch { cpu } => format!("vCPU {cpu} runs"),
            traces::EventKind::ApicTimer { cpu, ns } => format!("vCPU {cpu} at {ns} ns"),
            traces::EventKind::Kick { fingerprint: f } => format!(
                "at rip {:#x} rsp {:#x} rflags {:#x} regs {:016x} memory {:016x}",
                f.rip, f.rsp, f.rflags, f.regs, f.memory
            ),
        };
        line(e.at, e.rip, e.kind.name(), what).map_err(io)?;
    }
    for c in checkpoints {
        line(c.at, c.rip, CHECKPOINT_KIND, String::new()).map_err(io)?;
    }
    Ok(0)
}
