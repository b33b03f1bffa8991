//! The gdbstub target: a [`Timeline`] that gdb drives forward and backward, with breakpoints and watchpoints
//! checked by the replayer (never written into guest memory), reads by guest-virtual address, refused writes,
//! and `monitor` commands. Also the blocking event loop that runs it and watches the connection for Ctrl-C.

use crate::arch::{in_long_mode, GuestArch};
use crate::console;
use crate::live::{LiveMotion, LiveRun, LiveSetup, LiveStop};
use crate::number::parse_number;
use crate::recover::{recover, Motion};
use crate::wire::{recv_now, Wire};
use boot::symbols::Symbols;
use gdbstub::common::Signal;
use gdbstub::common::Tid;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{self, BlockingEventLoop, WaitForStopReasonError};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadRangeStepping, MultiThreadRangeSteppingOps, MultiThreadResume,
    MultiThreadResumeOps, MultiThreadSchedulerLocking, MultiThreadSchedulerLockingOps,
    MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::reverse_exec::{
    ReplayLogPosition, ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{
    output, outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use machine::Machine;
use replayer::search::{self, Access, Hit, Outcome, SearchError, StopSet, Watch};
use replayer::{Position, Timeline};
use std::collections::BTreeSet;
use std::io::Write;
use std::marker::PhantomData;
use std::net::TcpStream;
use std::path::PathBuf;

/// Largest watched range: every watched byte is compared at every step, so keep that cheap.
const MAX_WATCH_LEN: u64 = 4096;
/// Most changes `monitor history` lists.
const HISTORY_LIMIT: usize = 200;
/// Most calls `monitor calls` lists unless told otherwise.
const CALLS_LIMIT: usize = 100;
/// How often a long monitor command writes something, so that gdb does not time out on it.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_millis(700);

/// The error code a refused write gets: Linux's EROFS, "read-only file system", which is what it means.
/// gdb shows it in "remote failure reply 'E1e'" for registers; for memory it says only "Cannot access
/// memory", so the reason follows on gdb's console (see [`ReplayTarget::refuse_write`]).
const EROFS: u8 = 30;

const MONITOR_HELP: &str = "\
The replay is read-only: it shows what the recording did. gdb runs and steps it both ways (continue,
stepi, next, finish and their reverse- forms), stops it at breakpoints and watchpoints, and reads its
registers and memory; writing to them is refused until `monitor go-live`.
retrovisor monitor commands:
  monitor when        print the current position and the end of the recording: an icount (instructions
                      retired since boot), or in a landmark trace a landmark (an exit the guest made)
                      and the instructions since it, as `landmark 1234 + 56`
  monitor seek P      move to position P (an icount; in a landmark trace 1234 or 1234+56), clamped to
                      the recording. gdb goes on showing the registers and memory it read before until
                      `maint flush register-cache` and `maint flush dcache`: rv-seek does all of it
  monitor rv-seek P   what rv-seek sends: monitor seek without that advice
  monitor history ADDR LEN
                      every change of LEN bytes at ADDR (a number, or &name / name of a variable in the
                      guest image) over the whole recording: position, rip, function, old -> new
  monitor history-page ADDR
                      the checkpoint intervals in which the page holding ADDR was written
  monitor calls FUNCTION [LIMIT]
                      every call of FUNCTION (a name in the guest image, or 0x1234) over the whole
                      recording, in order, at most LIMIT (default 100): position, vCPU, arguments (named
                      from the image's DWARF), return value and where it returned; rv-seek goes to any
                      of those positions. Ctrl-C stops it
  monitor go-live [DIR]
                      from here on, a live run: the guest runs on this host's inputs (--serial-input
                      or the terminal, the host clock), gdb may write its memory and registers, and
                      continue, step, breakpoints and watchpoints work (not reverse execution). With
                      DIR (or replay --go-live-record DIR), the live run is recorded into a new trace
                      that replays on its own; writes are then allowed until its first instruction
  monitor help        this list
The gdb command file whose `source` line retrovisor printed when it started (`retrovisor gdb-script`
prints it too) defines rv-seek P (move and refresh gdb), rv-when and rv-help.";

/// gdbstub's `support_*` methods: each says that the target implements an extension by returning itself.
macro_rules! supports {
    ($($method:ident -> $ops:ty),* $(,)?) => {
        $(
            #[inline(always)]
            fn $method(&mut self) -> Option<$ops> {
                Some(self)
            }
        )*
    };
}

/// What gdb last asked the target to do; carried out by the event loop.
#[derive(Debug, Clone, Copy)]
enum Resume {
    Continue,
    /// One instruction of this vCPU.
    Step(u8),
    /// Step while RIP stays in `start..end`.
    Range(u64, u64),
    /// Back over the last instruction of this vCPU.
    ReverseStep(u8),
    ReverseContinue,
}

/// The replay as gdb sees it.
pub(crate) struct ReplayTarget<A> {
    timeline: Timeline,
    /// Where guest serial output goes.
    out: Box<dyn Write>,
    /// Breakpoints gdb set with `Z0` (`break`) and `Z1` (`hbreak`): both are address compares, kept apart
    /// only so that a stop reports the kind gdb set.
    sw: BTreeSet<u64>,
    hw: BTreeSet<u64>,
    /// Watchpoints gdb set (`Z2`-`Z4`).
    watches: Vec<Watch>,
    /// What the event loop is to do next, if gdb asked for anything.
    resume: Option<Resume>,
    /// The guest image's symbols, to name addresses in `monitor history`.
    symbols: Symbols,
    /// The guest image gdb debugs (the ELF64 build of a 32-bit container), whose DWARF `monitor calls`
    /// reads when asked.
    image: PathBuf,
    /// The session's connection, to notice a Ctrl-C during a long monitor command.
    peer: Option<TcpStream>,
    /// Why writes are refused, for gdb's console at the next chance (see [`ReplayTarget::refuse_write`]).
    refusal: Option<String>,
    /// Whether this session was told why writes are refused: once is enough.
    refusal_explained: bool,
    /// Why the last step stopped before its thread ran, for gdb's console (see [`step_vcpu`]).
    stepped_elsewhere: Option<String>,
    /// The live run `monitor go-live` started, if it did: from then on gdb drives it, not the replay.
    live: Option<LiveRun>,
    /// What going live takes (serial input, where to record).
    live_setup: LiveSetup,
    _arch: PhantomData<A>,
}

impl Resume {
    /// Which way it moves, for putting the replay back after a failure.
    fn motion(self) -> Motion {
        match self {
            Resume::Continue | Resume::Step(_) | Resume::Range(..) => Motion::Forward,
            Resume::ReverseStep(_) | Resume::ReverseContinue => Motion::Backward,
        }
    }

    /// The stop gdb gets when the replay cannot go on this way: "No more reverse-execution history.",
    /// after the reason on its console.
    fn no_further<U>(self, tid: Tid) -> MultiThreadStopReason<U> {
        MultiThreadStopReason::ReplayLog {
            tid: Some(tid),
            pos: match self.motion() {
                Motion::Backward => ReplayLogPosition::Begin,
                Motion::Forward | Motion::Seek => ReplayLogPosition::End,
            },
        }
    }
}

impl<A: GuestArch> ReplayTarget<A> {
    /// `timeline` at its current position, with guest serial output going to `out`.
    pub(crate) fn new(
        timeline: Timeline,
        out: Box<dyn Write>,
        symbols: Symbols,
        image: PathBuf,
        live_setup: LiveSetup,
    ) -> Self {
        ReplayTarget {
            live: None,
            live_setup,
            image,
            timeline,
            out,
            sw: BTreeSet::new(),
            hw: BTreeSet::new(),
            watches: Vec::new(),
            resume: None,
            symbols,
            peer: None,
            refusal: None,
            refusal_explained: false,
            stepped_elsewhere: None,
            _arch: PhantomData,
        }
    }

    /// The current position, as the user reads it ("icount 12345", "landmark 44 + 102"), or where the
    /// live run branched.
    pub(crate) fn position(&self) -> String {
        match &self.live {
            Some(live) => format!("a live run branched at {}", live.from),
            None => self
                .timeline
                .replay()
                .show(self.timeline.position())
                .to_string(),
        }
    }

    /// The machine gdb looks at: the live run's once there is one, else the replay's.
    fn machine(&self) -> &Machine {
        self.live
            .as_ref()
            .and_then(LiveRun::machine)
            .unwrap_or_else(|| self.timeline.replay().machine())
    }

    /// Ends the live run, if one goes on, as if the user stopped it: its trace gets its end, so that it
    /// replays. Called when the server ends.
    pub(crate) fn end_live(&mut self) {
        if let Some(live) = self.live.as_mut().filter(|l| l.running()) {
            match live.end(traces::StopReason::UserStop) {
                Ok(LiveStop::Ended(_, told)) => eprint!("{told}"),
                Ok(_) => {}
                Err(e) => eprintln!("retrovisor: the live run's recording could not be ended: {e}"),
            }
        }
    }

    /// `monitor go-live [DIR]`: a live run from here, recorded into DIR (or --go-live-record's).
    fn go_live(&mut self, dir: Option<&str>, out: &mut ConsoleOutput<'_>) {
        if let Some(live) = &self.live {
            outputln!(out, "already live (branched at {})", live.from);
            return;
        }
        let record = dir
            .map(PathBuf::from)
            .or_else(|| self.live_setup.record.clone());
        let input = self.live_setup.serial_input.take();
        let said_input = match &input {
            Some(recorder::SerialInput::Bytes(b)) => {
                format!("the {} bytes of --serial-input", b.len())
            }
            Some(recorder::SerialInput::Stream(_)) => "the terminal".to_string(),
            _ => "none".to_string(),
        };
        let from = self.position();
        match crate::live::start(
            self.timeline.replay(),
            &self.live_setup.trace,
            input.unwrap_or(recorder::SerialInput::None),
            record.as_deref(),
        ) {
            Ok(session) => {
                let recorded = match &record {
                    Some(dir) => format!(
                         " Writes are allowed until the first continue or step: from there the run is \
                         recorded into {} (its first checkpoint holds what you wrote).",
                        dir.display()
                    ),
                    None => " Writes to registers and memory are allowed.".to_string(),
                };
                outputln!(
                    out,
                     "live from {from}: the guest now runs on this host's inputs (serial input: \
                     {said_input}; its clock goes on from the guest's).{recorded} continue runs it, \
                     Ctrl-C stops it; reverse execution is not available in a live run (the replay \
                     stays as it was: detach and replay again for it)"
                );
                self.live = Some(LiveRun::new(session, from, record));
            }
            Err(e) => outputln!(out, "retrovisor: {e}"),
        }
    }

    /// Carries out `resume` on the live run: the stop gdb gets, and what its console should say.
    fn run_live(
        &mut self,
        resume: Resume,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Option<(MultiThreadStopReason<A::Usize>, String)> {
        let tid = self.running_thread();
        if !self.live.as_ref().is_some_and(LiveRun::running) {
            return Some((
                MultiThreadStopReason::Exited(0),
                "retrovisor: the live run has ended\n".to_string(),
            ));
        }
        let motion = match resume {
            Resume::Continue => LiveMotion::Continue,
            Resume::Step(_) => LiveMotion::Step,
            Resume::Range(start, end) => LiveMotion::Range(start, end),
            Resume::ReverseStep(_) | Resume::ReverseContinue => {
                let told = match self.live.as_ref().and_then(|l| l.record.as_ref()) {
                    Some(dir) => format!(
                        "retrovisor: a live run has no history to go back through: `retrovisor replay {} \
                         --gdb` debugs it backwards once it has ended\n",
                        dir.display()
                    ),
                     None => "retrovisor: a live run has no history to go back through (record it with \
                     `monitor go-live DIR` to debug it backwards)\n"
                        .to_string(),
                };
                return Some((resume.no_further(tid), told));
            }
        };
        let stops = self.stops();
        let live = self.live.as_mut().expect("only called when live");
        Some(
            match live.run(&stops, motion, &mut *self.out, interrupted) {
                Ok(LiveStop::Interrupted) => return None,
                Ok(LiveStop::Breakpoint(addr)) => (
                    self.stop_reason(Outcome::Hit(Hit::Breakpoint(addr))),
                    String::new(),
                ),
                Ok(LiveStop::Watch(w)) => {
                    (self.stop_reason(Outcome::Hit(Hit::Watch(w))), String::new())
                }
                Ok(LiveStop::Stepped) => (self.stop_reason(Outcome::Done), String::new()),
                Ok(LiveStop::Ended(stop, told)) => (
                    MultiThreadStopReason::Exited(recorder::exit_status(&stop) as u8),
                    told,
                ),
                Err(e) => {
                    let told = format!("retrovisor: the live run failed: {e}\n");
                    let _ = live.end(traces::StopReason::UserStop);
                    (
                        MultiThreadStopReason::SignalWithThread {
                            tid,
                            signal: Signal::SIGTRAP,
                        },
                        told,
                    )
                }
            },
        )
    }

    /// Forgets what a previous gdb session set up: a new session inserts its own breakpoints, and a run that
    /// was in progress when the connection dropped is abandoned where it stood.
    pub(crate) fn new_session(&mut self, peer: Option<TcpStream>) {
        self.sw.clear();
        self.hw.clear();
        self.watches.clear();
        self.resume = None;
        self.peer = peer;
        self.refusal = None;
        self.refusal_explained = false;
    }

    /// Drops the target's clone of the session's connection, which would keep it open after the session.
    pub(crate) fn end_session(&mut self) {
        self.peer = None;
    }

    /// `monitor history`: every change of the watched bytes over the recording.
    fn history(
        &mut self,
        what: &str,
        len: &str,
        out: &mut ConsoleOutput<'_>,
    ) -> Result<(), SearchError> {
        let Some((addr, len)) = self.resolve(what, len) else {
            outputln!(
                out,
                "monitor history: {what:?} {len:?} is not an address (0x102100, or &name / name of a \
                 variable in the guest image) and a length in bytes (1 to {MAX_WATCH_LEN})"
            );
            return Ok(());
        };
        let mut alive = Keepalive::new(self.peer.as_ref());
        let (changes, end) = search::history(
            &mut self.timeline,
            (addr, len),
            HISTORY_LIMIT,
            &mut *self.out,
            &mut || alive.interrupted(out),
        )?;
        alive.finish(out);
        outputln!(
            out,
            "{} change(s) of {len} byte(s) at {addr:#x}:",
            changes.len()
        );
        for c in &changes {
            let function = self
                .symbols
                .lookup(c.rip)
                .map(|(name, off)| format!(" {name}+{off}"))
                .unwrap_or_default();
            outputln!(
                out,
                "  {:<24} rip {:#x}{function}: {} -> {}",
                self.timeline.replay().show(c.position),
                c.rip,
                hex_value(&c.old),
                hex_value(&c.new)
            );
        }
        match end {
            search::ListingEnd::Complete => {}
            search::ListingEnd::Limit => {
                outputln!(
                    out,
                    "(stopped after {HISTORY_LIMIT} changes; there may be more)"
                );
            }
            search::ListingEnd::Interrupted => outputln!(out, "(interrupted)"),
        }
        Ok(())
    }

    /// `monitor calls`: every call of a function over the recording.
    fn calls(
        &mut self,
        function: &str,
        limit: Option<&str>,
        out: &mut ConsoleOutput<'_>,
    ) -> Result<(), SearchError> {
        let limit = match limit.map(parse_number) {
            None => CALLS_LIMIT,
            Some(Some(n)) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(_) => {
                outputln!(
                    out,
                    "monitor calls: the limit must be a number of calls, at least 1 (default {CALLS_LIMIT})"
                );
                return Ok(());
            }
        };
        let image = match std::fs::read(&self.image) {
            Ok(image) => image,
            Err(e) => {
                outputln!(
                    out,
                    "monitor calls: cannot read the guest image {}: {e}",
                    self.image.display()
                );
                return Ok(());
            }
        };
        let f = match crate::calls::Function::find(&image, &self.symbols, function) {
            Ok(f) => f,
            Err(e) => {
                outputln!(out, "monitor calls: {e}");
                return Ok(());
            }
        };
        let mut alive = Keepalive::new(self.peer.as_ref());
        let (calls, end) = replayer::timeline::calls::calls(
            &mut self.timeline,
            &f.query(limit),
            &mut *self.out,
            &mut |_| alive.interrupted(out),
        )?;
        alive.finish(out);
        for line in crate::calls::text(&f, self.timeline.replay(), &calls, end, limit) {
            outputln!(out, "{line}");
        }
        Ok(())
    }

    /// An address and length from `monitor history`'s words: a number, or a name from the image's symbols
    /// with or without `&`.
    fn resolve(&self, what: &str, len: &str) -> Option<(u64, u64)> {
        let len = parse_number(len).filter(|&l| (1..=MAX_WATCH_LEN).contains(&l))?;
        let name = what.strip_prefix('&').unwrap_or(what);
        let addr = parse_number(what).or_else(|| self.symbols.find(name).map(|(a, _)| a))?;
        Some((addr, len))
    }

    /// `monitor history-page`: the checkpoint intervals whose checkpoints list the page as written.
    fn history_page(&mut self, page: &str, out: &mut ConsoleOutput<'_>) -> Result<(), SearchError> {
        let Some((addr, _)) = self.resolve(page, "1") else {
            outputln!(
                out,
                "monitor history-page: {page:?} is not an address (0x102000, or &name / name of a variable)"
            );
            return Ok(());
        };
        let Ok(physical) = self.timeline.replay().machine().translate(addr) else {
            outputln!(out, "monitor history-page: {addr:#x} is not mapped here");
            return Ok(());
        };
        let pfn = physical >> 12;
        let bounds = self.timeline.replay().checkpoint_positions().to_vec();
        outputln!(
            out,
            "page {:#x} (physical {:#x}) is written between these checkpoints:",
            addr & !0xfff,
            pfn << 12
        );
        let mut listed = 0;
        for pair in bounds.windows(2) {
            let written = self.timeline.pages_written(pair[0], pair[1]);
            if written.is_some_and(|w| w.contains(&pfn)) {
                outputln!(
                    out,
                    "  {} .. {}",
                    self.timeline.replay().show(pair[0]),
                    self.timeline.replay().show(pair[1])
                );
                listed += 1;
            }
        }
        if let Some(&last) = bounds.last() {
            outputln!(
                out,
                "  ({listed} interval(s); after {} the trace does not say)",
                self.timeline.replay().show(last)
            );
        }
        Ok(())
    }

    /// Refuses a write gdb asked for, described by `what`. gdb reports it as "Cannot access memory" or
    /// "Could not write registers" with no reason it could be given, so the reason goes to its console at
    /// the next chance: the next stop or monitor command.
    fn refuse_write<T>(&mut self, what: String) -> TargetResult<T, Self> {
        eprintln!("retrovisor: gdb: refused {what}: a replay cannot be changed");
        if !self.refusal_explained {
            self.refusal_explained = true;
            self.refusal = Some(
                "retrovisor: the replay is read-only: it shows what the recording did, so writes to its \
                 registers and memory are refused (gdb said \"Could not write registers\" or \"Cannot access \
                 memory\"); `monitor go-live` turns it into a live run you can change, and `monitor \
                 help` lists what else can be done\n"
                    .to_string(),
            );
        }
        Err(TargetError::Errno(EROFS))
    }

    /// Refuses a write to a live run, for `why`: said on gdb's console at the next chance.
    fn refuse_live_write<T>(&mut self, what: &str, why: &'static str) -> TargetResult<T, Self> {
        eprintln!("retrovisor: gdb: refused {what}: {why}");
        self.refusal = Some(format!("retrovisor: refused {what}: {why}\n"));
        Err(TargetError::Errno(EROFS))
    }

    /// What gdb's console should show now that it can: problems the replay worked around, and why a
    /// write was refused. Each piece once.
    fn take_console(&mut self) -> String {
        let mut text: String = self
            .timeline
            .take_notices()
            .into_iter()
            .map(|notice| format!("retrovisor: warning: {notice}\n"))
            .collect();
        text.extend(self.refusal.take());
        text.extend(self.stepped_elsewhere.take());
        text
    }

    /// Puts the replay back after `error` ended a command that started at position `started`, and says
    /// what happened (see [`recover`]); Err if the replay cannot go on.
    fn recover(
        &mut self,
        error: SearchError,
        motion: Motion,
        started: Position,
    ) -> Result<String, SearchError> {
        let told = recover(&mut self.timeline, error, motion, started, &mut *self.out)?;
        Ok(self.take_console() + &told)
    }

    /// Everything a run stops at.
    fn stops(&self) -> StopSet {
        StopSet {
            breakpoints: self.sw.union(&self.hw).copied().collect(),
            watches: self.watches.clone(),
        }
    }

    /// How gdb is told about `outcome`.
    fn stop_reason(&self, outcome: Outcome) -> MultiThreadStopReason<A::Usize> {
        // The vCPU that ran last is the thread that stopped.
        let tid = self.running_thread();
        match outcome {
            Outcome::Hit(Hit::Breakpoint(addr)) if self.sw.contains(&addr) => {
                MultiThreadStopReason::SwBreak(tid)
            }
            Outcome::Hit(Hit::Breakpoint(_)) => MultiThreadStopReason::HwBreak(tid),
            Outcome::Hit(Hit::Watch(w)) => MultiThreadStopReason::Watch {
                tid,
                kind: match w.access {
                    Access::Write => WatchKind::Write,
                    Access::Read => WatchKind::Read,
                    Access::Any => WatchKind::ReadWrite,
                },
                addr: A::to_gdb(w.addr),
            },
            Outcome::End => MultiThreadStopReason::ReplayLog {
                tid: Some(tid),
                pos: ReplayLogPosition::End,
            },
            Outcome::Begin => MultiThreadStopReason::ReplayLog {
                tid: Some(tid),
                pos: ReplayLogPosition::Begin,
            },
            // Interrupted runs are turned into incoming data by the event loop before they get here.
            Outcome::Done | Outcome::Interrupted => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
        }
    }

    /// The vCPU of thread `tid`; a thread the machine does not have means the running vCPU.
    fn cpu_of(&self, tid: Tid) -> u8 {
        let machine = self.machine();
        cpu_of(tid, machine.cpus()).unwrap_or(machine.current_cpu())
    }

    /// The thread of the vCPU that runs now (threads are numbered from 1 in vCPU order, as Linux's gdb
    /// scripts expect: CPU = thread - 1).
    fn running_thread(&self) -> Tid {
        thread_of(self.machine().current_cpu())
    }

    /// Carries out `resume`, asking `interrupted` now and then whether gdb sent something.
    fn run(
        &mut self,
        resume: Resume,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Outcome, SearchError> {
        let stops = self.stops();
        let (r, out) = (&mut self.timeline, &mut *self.out);
        match resume {
            Resume::Continue => search::run_forward(r, &stops, None, out, interrupted),
            Resume::Range(start, end) => {
                search::run_forward(r, &stops, Some(start..end), out, interrupted)
            }
            Resume::Step(cpu) | Resume::ReverseStep(cpu) => {
                let (outcome, said) = step_vcpu(r, &stops, out, cpu, resume.motion(), interrupted)?;
                self.stepped_elsewhere = said;
                Ok(outcome)
            }
            Resume::ReverseContinue => search::run_backward(r, &stops, out, interrupted),
        }
    }

    /// Carries out `monitor cmd`, answering on `out`.
    fn monitor(&mut self, cmd: &str, out: &mut ConsoleOutput<'_>) -> Result<(), SearchError> {
        let pending = self.take_console();
        if !pending.is_empty() {
            output!(out, "{pending}");
        }
        let words: Vec<&str> = cmd.split_whitespace().collect();
        if self.live.is_some() {
            match words.as_slice() {
                ["go-live", ..] | ["when"] => {}
                [] | ["help"] => {}
                _ => {
                    outputln!(
                        out,
                        "{cmd:?} works on the replay, and this session is {} now: detach and replay \
                         again for it",
                        self.position()
                    );
                    return Ok(());
                }
            }
        }
        match words.as_slice() {
            ["go-live"] => self.go_live(None, out),
            ["go-live", dir] => self.go_live(Some(dir), out),
            ["when"] if self.live.is_some() => outputln!(out, "{}", self.position()),
            ["when"] => outputln!(
                out,
                "{} (the recording ends at {})",
                self.timeline.replay().show(self.timeline.position()),
                self.timeline.replay().show(self.timeline.replay().end())
            ),
            ["seek", rest @ ..] => self.monitor_seek(&rest.join(" "), true, out)?,
            ["rv-seek", rest @ ..] => self.monitor_seek(&rest.join(" "), false, out)?,
            ["history", what, len] => self.history(what, len, out)?,
            ["history-page", page] => self.history_page(page, out)?,
            ["calls", function] => self.calls(function, None, out)?,
            ["calls", function, limit] => self.calls(function, Some(limit), out)?,
            [] | ["help"] => outputln!(out, "{MONITOR_HELP}"),
            _ => outputln!(out, "unknown monitor command {cmd:?}\n{MONITOR_HELP}"),
        }
        Ok(())
    }

    /// `monitor seek POSITION` (with `advice` on refreshing gdb) or `monitor rv-seek POSITION` (without:
    /// rv-seek refreshes gdb itself), answering on `out`. Err only if the replay cannot go on.
    fn monitor_seek(
        &mut self,
        position: &str,
        advice: bool,
        out: &mut ConsoleOutput<'_>,
    ) -> Result<(), SearchError> {
        let Some(target) = parse_position(position, &self.timeline) else {
            if self.timeline.replay().steps_within_landmarks() {
                outputln!(
                    out,
                    "monitor seek: {position:?} is not a position of this landmark trace (a landmark such \
                     as 1234, or a landmark and instructions after it such as 1234+56)"
                );
            } else {
                outputln!(
                    out,
                    "monitor seek: {position:?} is not an icount (a number such as 12345 or 0x3039)"
                );
            }
            return Ok(());
        };
        let started = self.timeline.position();
        let outcome = match search::seek(&mut self.timeline, target, &mut *self.out) {
            Ok(outcome) => outcome,
            Err(error) => {
                return match self.recover(error, Motion::Seek, started) {
                    Ok(told) => {
                        output!(out, "{told}");
                        Ok(())
                    }
                    Err(error) => {
                        outputln!(
                            out,
                            "retrovisor: {error}\nretrovisor: the replay cannot go on"
                        );
                        Err(error)
                    }
                }
            }
        };
        output!(out, "{}", self.take_console());
        outputln!(
            out,
            "now at {}",
            self.timeline.replay().show(self.timeline.position())
        );
        if outcome == Outcome::End {
            outputln!(out, "(the end of the recording)");
        }
        if advice {
            outputln!(
                out,
                "gdb goes on showing the registers and memory it read before: run \
                 `maint flush register-cache` and `maint flush dcache`, or move with rv-seek"
            );
        }
        Ok(())
    }
}

/// Whether gdb sent something (a Ctrl-C) while a monitor command runs: peeks, leaving it to be read.
fn peeked(peer: &TcpStream) -> bool {
    // Only an interrupt: gdb also sends a `-` (asking for a packet again) when a monitor command has kept
    // it waiting longer than its remote timeout, which is no request to stop.
    let mut byte = [0];
    matches!(recv_now(peer, &mut byte, libc::MSG_PEEK), Ok(Some(1))) && byte[0] == 0x03
}

/// Bytes as a little-endian hex number (what a variable of that size holds).
fn hex_value(bytes: &[u8]) -> String {
    let digits: String = bytes.iter().rev().map(|b| format!("{b:02x}")).collect();
    format!("0x{digits}")
}

/// A position as `monitor seek` takes it: as `monitor when` prints it, with or without its unit word
/// (`icount 12345`, `0x3039`, and for a landmark trace `landmark 1234`, `1234+56`), if the replay has it.
fn parse_position(s: &str, timeline: &Timeline) -> Option<Position> {
    s.parse().ok().filter(|&p| timeline.replay().can_reach(p))
}

impl<A: GuestArch> Target for ReplayTarget<A> {
    type Arch = A;
    type Error = SearchError;

    #[inline(always)]
    fn base_ops(&mut self) -> BaseOps<'_, A, SearchError> {
        BaseOps::MultiThread(self)
    }

    supports! {
        support_breakpoints -> BreakpointsOps<'_, Self>,
        support_monitor_cmd -> MonitorCmdOps<'_, Self>,
    }
}

/// Most instructions of other vCPUs a step steps over, forward and backward (each backward step
/// restores a snapshot and replays to it), before it stops where it is and says why.
const OTHER_STEPS_FORWARD: usize = 200_000;
const OTHER_STEPS_BACKWARD: usize = 200;

/// Steps one instruction of vCPU `cpu`: the vCPUs run one at a time, so forward the machine steps
/// until `cpu` has executed one, and backward until the instruction stepped back over is one `cpu`
/// executed. (The vCPU that runs after an instruction retired is the one that executed it: the
/// switches logged at a position take effect when the machine moves on from it.) A stop on the way
/// ends it; so does the end of the recording, or a bound on the other vCPUs' instructions, which is
/// then said (for gdb's console).
fn step_vcpu(
    t: &mut Timeline,
    stops: &StopSet,
    out: &mut dyn Write,
    cpu: u8,
    motion: Motion,
    interrupted: &mut dyn FnMut() -> bool,
) -> Result<(Outcome, Option<String>), SearchError> {
    let bound = match motion {
        Motion::Backward => OTHER_STEPS_BACKWARD,
        Motion::Forward | Motion::Seek => OTHER_STEPS_FORWARD,
    };
    for _ in 0..=bound {
        let before = t.replay().machine().current_cpu();
        let (outcome, by) = match motion {
            Motion::Backward => (search::step_backward(t, stops, out)?, before),
            Motion::Forward | Motion::Seek => {
                let outcome = search::step_forward(t, stops, out)?;
                (outcome, t.replay().machine().current_cpu())
            }
        };
        if outcome != Outcome::Done || by == cpu {
            return Ok((outcome, None));
        }
        if interrupted() {
            return Ok((Outcome::Interrupted, None));
        }
    }
    let said = format!(
        "retrovisor: vCPU {cpu} executed none of the {bound} instructions stepped over; stopped \
         where vCPU {} runs\n",
        t.replay().machine().current_cpu()
    );
    Ok((Outcome::Done, Some(said)))
}

/// The gdb thread of vCPU `cpu`.
fn thread_of(cpu: u8) -> Tid {
    Tid::new(usize::from(cpu) + 1).expect("one more than a u8 is not zero")
}

/// The vCPU of gdb thread `tid`, if the machine has it.
fn cpu_of(tid: Tid, cpus: usize) -> Option<u8> {
    let cpu = tid.get() - 1;
    (cpu < cpus).then_some(cpu as u8)
}

impl<A: GuestArch> MultiThreadBase for ReplayTarget<A> {
    fn read_registers(&mut self, regs: &mut A::Registers, tid: Tid) -> TargetResult<(), Self> {
        let machine = self.machine();
        let cpu = cpu_of(tid, machine.cpus()).ok_or(TargetError::NonFatal)?;
        let fpu = machine.cpu_fpu(cpu).map_err(|e| {
            eprintln!("retrovisor: gdb: cannot read vCPU {cpu}'s FPU registers: {e}");
            TargetError::NonFatal
        })?;
        let (r, s) = machine.cpu_regs(cpu);
        *regs = A::registers(r, s, &fpu);
        Ok(())
    }

    fn write_registers(&mut self, regs: &A::Registers, tid: Tid) -> TargetResult<(), Self> {
        let cpu = self.cpu_of(tid);
        let Some(live) = self.live.as_mut() else {
            return self.refuse_write("a register write".to_string());
        };
        let machine = match live.machine_mut() {
            Ok(m) if m.current_cpu() == cpu => m,
            Ok(_) => {
                return self.refuse_live_write(
                    "a register write",
                    "only the registers of the vCPU that runs can be written",
                )
            }
            Err(why) => return self.refuse_live_write("a register write", why),
        };
        let mut kvm = *machine.regs();
        A::set_general(regs, &mut kvm);
        machine.set_general_registers(kvm).map_err(|e| {
            eprintln!("retrovisor: gdb: cannot write the registers: {e}");
            TargetError::NonFatal
        })
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), SearchError> {
        for cpu in 0..self.machine().cpus() as u8 {
            thread_is_active(thread_of(cpu));
        }
        Ok(())
    }

    // Memory is the machine's, whichever thread gdb names; addresses go through the page tables of the
    // vCPU that runs.
    fn read_addrs(
        &mut self,
        start: A::Usize,
        data: &mut [u8],
        _tid: Tid,
    ) -> TargetResult<usize, Self> {
        let machine = self.machine();
        let start = A::from_gdb(start);
        // Without long mode, linear addresses are 32 bits wide: wider ones do not exist (rather than wrap).
        let long_mode = in_long_mode(machine);
        let limit = if long_mode { u64::MAX } else { 1 << 32 };
        // Read page by page so that a range running into an unmapped page gives its readable start.
        let mut done = 0;
        while done < data.len() {
            let addr = start + done as u64;
            let n = ((4096 - (addr & 0xfff)) as usize).min(data.len() - done);
            if addr.checked_add(n as u64).is_none_or(|end| end > limit)
                || machine
                    .read_virtual(addr, &mut data[done..done + n])
                    .is_err()
            {
                break;
            }
            done += n;
        }
        if done == 0 && !data.is_empty() {
            // gdb shows this as "Cannot access memory at address ...".
            return Err(TargetError::NonFatal);
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: A::Usize, data: &[u8], _tid: Tid) -> TargetResult<(), Self> {
        // gdb probes for binary writes (`X`) with an empty one: that changes nothing, so it may succeed.
        if data.is_empty() {
            return Ok(());
        }
        if let Some(live) = self.live.as_mut() {
            return match live.machine_mut() {
                Ok(m) => m
                    .write_virtual(A::from_gdb(start), data)
                    .map_err(|_| TargetError::NonFatal),
                Err(why) => self.refuse_live_write("a memory write", why),
            };
        }
        self.refuse_write(format!(
            "a {}-byte memory write at {:#x}",
            data.len(),
            A::from_gdb(start)
        ))
    }

    supports! {
        support_resume -> MultiThreadResumeOps<'_, Self>,
    }
}

// The vCPUs run one at a time in the recorded order, so there is one execution to move: gdb's resume
// actions say how. A step is one instruction of the thread it names (see `step_vcpu`); continuing and
// range-stepping move the whole machine, and the stop names the thread that ran. A signal gdb asks to
// deliver is ignored: nothing can be delivered into a recording.
impl<A: GuestArch> MultiThreadResume for ReplayTarget<A> {
    fn resume(&mut self) -> Result<(), SearchError> {
        self.resume.get_or_insert(Resume::Continue);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), SearchError> {
        self.resume = None;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        _tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), SearchError> {
        // A step asked for one thread wins over "continue the others".
        self.resume.get_or_insert(Resume::Continue);
        Ok(())
    }

    supports! {
        support_single_step -> MultiThreadSingleStepOps<'_, Self>,
        support_range_step -> MultiThreadRangeSteppingOps<'_, Self>,
        support_reverse_step -> ReverseStepOps<'_, Tid, Self>,
        support_reverse_cont -> ReverseContOps<'_, Tid, Self>,
        support_scheduler_locking -> MultiThreadSchedulerLockingOps<'_, Self>,
    }
}

// gdb steps one thread alone (over a breakpoint, say) by giving the others no action. The recorded
// interleaving decides which vCPU runs, so there is nothing to lock: the step moves the machine.
impl<A: GuestArch> MultiThreadSchedulerLocking for ReplayTarget<A> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), SearchError> {
        Ok(())
    }
}

impl<A: GuestArch> MultiThreadSingleStep for ReplayTarget<A> {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), SearchError> {
        self.resume = Some(Resume::Step(self.cpu_of(tid)));
        Ok(())
    }
}

impl<A: GuestArch> MultiThreadRangeStepping for ReplayTarget<A> {
    fn set_resume_action_range_step(
        &mut self,
        _tid: Tid,
        start: A::Usize,
        end: A::Usize,
    ) -> Result<(), SearchError> {
        self.resume = Some(Resume::Range(A::from_gdb(start), A::from_gdb(end)));
        Ok(())
    }
}

impl<A: GuestArch> ReverseStep<Tid> for ReplayTarget<A> {
    fn reverse_step(&mut self, tid: Tid) -> Result<(), SearchError> {
        self.resume = Some(Resume::ReverseStep(self.cpu_of(tid)));
        Ok(())
    }
}

impl<A: GuestArch> ReverseCont<Tid> for ReplayTarget<A> {
    fn reverse_cont(&mut self) -> Result<(), SearchError> {
        self.resume = Some(Resume::ReverseContinue);
        Ok(())
    }
}

impl<A: GuestArch> Breakpoints for ReplayTarget<A> {
    supports! {
        support_sw_breakpoint -> SwBreakpointOps<'_, Self>,
        support_hw_breakpoint -> HwBreakpointOps<'_, Self>,
        support_hw_watchpoint -> HwWatchpointOps<'_, Self>,
    }
}

/// gdbstub's breakpoint extension `$ext` (its `$add` and `$remove`) over the set of addresses in the field
/// `$set`: `break` and `hbreak` work alike.
macro_rules! address_breakpoints {
    ($ext:ident: $add:ident, $remove:ident, $set:ident) => {
        impl<A: GuestArch> $ext for ReplayTarget<A> {
            fn $add(&mut self, addr: A::Usize, _kind: usize) -> TargetResult<bool, Self> {
                self.$set.insert(A::from_gdb(addr));
                Ok(true)
            }

            fn $remove(&mut self, addr: A::Usize, _kind: usize) -> TargetResult<bool, Self> {
                Ok(self.$set.remove(&A::from_gdb(addr)))
            }
        }
    };
}

address_breakpoints!(SwBreakpoint: add_sw_breakpoint, remove_sw_breakpoint, sw);
address_breakpoints!(HwBreakpoint: add_hw_breakpoint, remove_hw_breakpoint, hw);

/// A watchpoint as gdb gives it, as the replayer checks it.
fn watch<A: GuestArch>(addr: A::Usize, len: A::Usize, kind: WatchKind) -> Watch {
    Watch {
        addr: A::from_gdb(addr),
        len: A::from_gdb(len),
        access: match kind {
            WatchKind::Write => Access::Write,
            WatchKind::Read => Access::Read,
            WatchKind::ReadWrite => Access::Any,
        },
    }
}

impl<A: GuestArch> HwWatchpoint for ReplayTarget<A> {
    fn add_hw_watchpoint(
        &mut self,
        addr: A::Usize,
        len: A::Usize,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let w = watch::<A>(addr, len, kind);
        if w.len == 0 || w.len > MAX_WATCH_LEN {
            return Ok(false);
        }
        self.watches.push(w);
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: A::Usize,
        len: A::Usize,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let w = watch::<A>(addr, len, kind);
        let Some(i) = self.watches.iter().position(|x| *x == w) else {
            return Ok(false);
        };
        self.watches.remove(i);
        Ok(true)
    }
}

impl<A: GuestArch> MonitorCmd for ReplayTarget<A> {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), SearchError> {
        match std::str::from_utf8(cmd) {
            Ok(cmd) => self.monitor(cmd, &mut out),
            Err(_) => {
                outputln!(out, "monitor commands are text; see `monitor help`");
                Ok(())
            }
        }
    }
}

/// gdbstub's blocking event loop over a gdb's connection, for one register layout.
pub(crate) struct EventLoop<'w, A>(PhantomData<(&'w mut Wire, A)>);

impl<'w, A: GuestArch> BlockingEventLoop for EventLoop<'w, A> {
    type Target = ReplayTarget<A>;
    type Connection = &'w mut Wire;
    type StopReason = MultiThreadStopReason<A::Usize>;

    #[allow(clippy::type_complexity)] // the signature is gdbstub's
    fn wait_for_stop_reason(
        target: &mut ReplayTarget<A>,
        conn: &mut &'w mut Wire,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        WaitForStopReasonError<SearchError, <&'w mut Wire as Connection>::Error>,
    > {
        // gdbstub only waits after a resume; should it ever ask otherwise, there is nothing to run.
        let Some(resume) = target.resume else {
            return Ok(run_blocking::Event::TargetStopped(
                target.stop_reason(Outcome::Done),
            ));
        };
        if target.live.is_some() {
            let ran = target.run_live(resume, &mut || conn.peek().map_or(true, |b| b.is_some()));
            let Some((stop, told)) = ran else {
                // As for a replay: the byte (normally Ctrl-C) decides.
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(run_blocking::Event::IncomingData(byte));
            };
            target.resume = None;
            let told = target.take_console() + &told;
            if !told.is_empty() {
                console::send(conn.stream(), &told).map_err(WaitForStopReasonError::Connection)?;
            }
            return Ok(run_blocking::Event::TargetStopped(stop));
        }
        let started = target.timeline.position();
        // Anything from gdb while running (normally the Ctrl-C byte) interrupts the run; a broken connection
        // counts as data too, so that the read below reports it.
        let ran = target.run(resume, &mut || conn.peek().map_or(true, |b| b.is_some()));
        let stop = match ran {
            Ok(Outcome::Interrupted) => {
                // The run stays requested: unless the byte is Ctrl-C, the next call carries on with it.
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(run_blocking::Event::IncomingData(byte));
            }
            Ok(outcome) => target.stop_reason(outcome),
            // A failure ends the command, not the session: gdb stops where the replay could be put back.
            Err(error) => match target.recover(error, resume.motion(), started) {
                Ok(told) => {
                    target.resume = None;
                    console::send(conn.stream(), &told)
                        .map_err(WaitForStopReasonError::Connection)?;
                    return Ok(run_blocking::Event::TargetStopped(
                        resume.no_further(target.running_thread()),
                    ));
                }
                Err(error) => {
                    // The session ends; gdb shows why before "Remote connection closed".
                    let _ = console::send(
                        conn.stream(),
                        &format!("retrovisor: {error}\nretrovisor: the replay cannot go on\n"),
                    );
                    return Err(WaitForStopReasonError::Target(error));
                }
            },
        };
        target.resume = None;
        let told = target.take_console();
        if !told.is_empty() {
            console::send(conn.stream(), &told).map_err(WaitForStopReasonError::Connection)?;
        }
        Ok(run_blocking::Event::TargetStopped(stop))
    }

    fn on_interrupt(target: &mut ReplayTarget<A>) -> Result<Option<Self::StopReason>, SearchError> {
        target.resume = None;
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: target.running_thread(),
            signal: Signal::SIGINT,
        }))
    }
}

/// What keeps gdb waiting through a long monitor command: gdb gives up on one that stays silent for its
/// remote timeout (2 s by default), so a dot now and then tells it the search goes on; and a Ctrl-C from
/// gdb (a byte on the connection) stops the search.
struct Keepalive {
    peer: Option<TcpStream>,
    last_word: std::time::Instant,
    dots: bool,
}

impl Keepalive {
    fn new(peer: Option<&TcpStream>) -> Self {
        Keepalive {
            peer: peer.and_then(|p| p.try_clone().ok()),
            last_word: std::time::Instant::now(),
            dots: false,
        }
    }

    /// Called now and then by the search: a dot if gdb has heard nothing for a while; whether to stop.
    fn interrupted(&mut self, out: &mut ConsoleOutput<'_>) -> bool {
        if self.last_word.elapsed() >= KEEPALIVE {
            output!(out, ".");
            out.flush();
            self.last_word = std::time::Instant::now();
            self.dots = true;
        }
        self.peer.as_ref().is_some_and(peeked)
    }

    /// Ends the line of dots, if any.
    fn finish(self, out: &mut ConsoleOutput<'_>) {
        if self.dots {
            outputln!(out);
        }
    }
}
