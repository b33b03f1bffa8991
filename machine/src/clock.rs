//! The execution clock: how the machine is driven between the points where the outside world may act on
//! it, and how those points are named.
//!
//! Two clocks drive the same machine:
//! - **step** single-steps every instruction, so every instruction boundary is a position (the icount).
//!   Exact on any KVM, and slow: one exit per instruction.
//! - **landmark** runs free. Its positions are *landmarks*: the exits the guest itself causes (port I/O,
//!   MMIO, `hlt`, an instruction the VMM completes). Given the
//!   same state and inputs, the n-th landmark happens at the same instruction, so "after landmark n" names
//!   a point without any counter. Inputs are delivered there. When the guest computes without exits while
//!   an input falls due, a *kick* (a signal that interrupts KVM_RUN) stops it at an arbitrary point; that
//!   point is named by its [`Fingerprint`] (registers and the memory written since the last checkpoint),
//!   and replay finds it again with a hardware breakpoint on its rip ([`Machine::run_to_fingerprint`]).
//!   A matching state has an identical future, so replay is exact even when a loop passes that rip often.
//!
//! Both clocks count landmarks the same way, so a landmark trace can be replayed by the step clock (that is
//! how `replay --clock step` counts a landmark trace's instructions): each exit counts once per element transferred (a string
//! I/O that KVM batches into one exit counts as the exits stepping would see), and `hlt` counts whether KVM
//! reports it or the step clock executes it.
//!
//! KVM's interrupt-window exit is not used: on PVM it is not reported where the window opens (a window
//! that opened after `sti` was reported at the guest's next I/O instead), so it names no point. An
//! interrupt the guest cannot take yet waits for the next landmark or kick at which it can.

use crate::arch::{RFLAGS_IF, RFLAGS_RF};
use crate::exits::Exit;
use crate::vcpu::Queued;
use crate::vm::{Clock, Host, Machine, MachineError, Step, StopReason};
use iced_x86::{FlowControl, Mnemonic};
use kvm_bindings::{
    kvm_guest_debug, KVM_EXIT_IO, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
pub use vocab::Fingerprint;
use vocab::Landmarks;

/// What one [`Machine::advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The guest reached its next position: the next instruction (step clock) or landmark.
    Moved,
    /// Landmark clock: a kick stopped the guest between two landmarks (its position is unchanged).
    Kicked,
    /// Landmark clock: one of the stops of [`Machine::arm`] fired (its position is unchanged; which one:
    /// [`Machine::stop_hit`]); they are all off again.
    Breakpoint,
    /// The guest is halted waiting for an interrupt; nothing ran.
    Idle,
    /// The guest ended.
    Stopped(StopReason),
}

/// How [`Machine::run_to_fingerprint`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// The machine is at the point.
    Found,
    /// The guest reached its next landmark (or stopped) without passing the point.
    Passed,
    /// One of the stops of [`Machine::arm`] fired first (see [`Machine::stop_hit`]).
    Stopped,
    /// The guest passed the point's rip [`MAX_SEARCH_HITS`] times without the state matching: it spins
    /// in a loop without exits that the point is not part of, and would never stop.
    GaveUp,
}

/// Most passes of a kick point's rip a search looks at (about 40 µs each here, so under a minute) before
/// it gives up: a replay must end, with a divergence if it cannot find the point.
pub const MAX_SEARCH_HITS: u64 = 1_000_000;

/// Debug registers for breakpoints: DR0-DR3. Only execution breakpoints are used: PVM never reports a
/// data breakpoint (a probe writing to a watched address ran on unstopped).
pub const DEBUG_REGISTERS: usize = 4;

/// DR7 bits KVM expects set whatever else is (GE and the reserved bit 10).
const DR7_FIXED: u64 = 0x600;

impl Machine {
    /// How the machine is driven.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Drives the machine with `clock` from now on.
    pub fn set_clock(&mut self, clock: Clock) -> Result<(), MachineError> {
        self.clock = clock;
        self.apply_debug(None)
    }

    /// Makes checkpoint state blobs record the landmark count (landmark traces) or the icount as the
    /// position, and [`Machine::position`] report it.
    pub fn set_positions(&mut self, positions: Clock) {
        self.positions = positions;
    }

    /// The current position as the trace counts it: the icount or the landmark count.
    pub fn position(&self) -> u64 {
        match self.positions {
            Clock::Step => self.icount,
            Clock::Landmark => self.landmarks,
        }
    }

    /// Landmarks so far: exits the guest caused.
    pub fn landmarks(&self) -> u64 {
        self.landmarks
    }

    /// Programs KVM's guest debugging for the clock and the armed stops, plus `extra`, one more
    /// execution breakpoint at a linear address (a kick search's), in the last register.
    pub(crate) fn apply_debug(&mut self, extra: Option<u64>) -> Result<(), MachineError> {
        let mut debug = kvm_guest_debug::default();
        match self.clock {
            Clock::Step => debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
            // The simulated counter counts the branches it steps over: the pmu clock steps, unless a
            // hardware counter counts while it runs free.
            Clock::Landmark
                if self.counting == Landmarks::Branches
                    && self.hardware.as_ref().is_none_or(|h| h.stepping) =>
            {
                debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
            }
            Clock::Landmark if self.breakpoints.is_empty() && extra.is_none() => {}
            Clock::Landmark => {
                debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
                let mut dr7 = DR7_FIXED;
                let extra = extra.map(|linear| (DEBUG_REGISTERS - 1, linear));
                let armed = self.breakpoints.iter().enumerate();
                let armed = armed.map(|(i, &rip)| (i, self.cpu.sregs.cs.base.wrapping_add(rip)));
                // An execution breakpoint: enabled (L bit), RW = LEN = 0.
                for (slot, linear) in armed.chain(extra) {
                    debug.arch.debugreg[slot] = linear;
                    dr7 |= 1 << (2 * slot);
                }
                debug.arch.debugreg[7] = dr7;
            }
        }
        self.cpu
            .fd
            .set_guest_debug(&debug)
            .map_err(|source| MachineError::Kvm {
                what: "KVM_SET_GUEST_DEBUG",
                source,
            })
    }

    /// Single-steps with guest debugging, whatever the clock (a breakpoint search stepping over a hit).
    fn single_step_debug(&mut self) -> Result<(), MachineError> {
        let debug = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
            ..Default::default()
        };
        self.cpu
            .fd
            .set_guest_debug(&debug)
            .map_err(|source| MachineError::Kvm {
                what: "KVM_SET_GUEST_DEBUG",
                source,
            })
    }

    /// Landmark clock: runs free with breakpoints before the instructions at these rips (CS-relative) in
    /// the debug registers (at most [`DEBUG_REGISTERS`]; one fewer while a kick search needs a register),
    /// until one fires ([`Advance::Breakpoint`]) or [`Machine::disarm`].
    pub fn arm(&mut self, rips: &[u64]) -> Result<(), MachineError> {
        debug_assert!(rips.len() <= DEBUG_REGISTERS);
        self.breakpoints = rips.to_vec();
        self.stop_fired = None;
        self.apply_debug(None)
    }

    /// Whether stops of [`Machine::arm`] are armed.
    pub fn armed(&self) -> bool {
        !self.breakpoints.is_empty()
    }

    /// Removes the breakpoints of [`Machine::arm`].
    pub fn disarm(&mut self) -> Result<(), MachineError> {
        self.breakpoints.clear();
        self.apply_debug(None)
    }

    /// Which of the stops armed last fired at the last [`Advance::Breakpoint`] or [`Search::Stopped`]
    /// (its index in the list given to [`Machine::arm`]).
    pub fn stop_hit(&self) -> Option<usize> {
        self.stop_fired
    }

    /// The armed stop DR6 says fired, if any (bits 0-3 name the debug registers that matched).
    fn fired_stop(&self) -> Option<usize> {
        (0..self.breakpoints.len()).find(|&i| self.cpu.last_dr6 & (1 << i) != 0)
    }

    /// The landmarks an exit makes (see the module documentation): none where landmarks are branches.
    pub(crate) fn landmarks_in(&mut self, exit: &Exit) -> u64 {
        if self.counting == Landmarks::Branches {
            return 0;
        }
        match exit {
            Exit::Io => {
                let run = self.cpu.fd.get_kvm_run();
                if run.exit_reason == KVM_EXIT_IO {
                    // SAFETY: for KVM_EXIT_IO the `io` member of the exit union is the one KVM filled in.
                    u64::from(unsafe { run.__bindgen_anon_1.io.count }).max(1)
                } else {
                    1
                }
            }
            Exit::Hlt | Exit::EmulationFailed | Exit::Shutdown => 1,
            Exit::Ran | Exit::Interrupted => 0,
        }
    }

    /// Runs the guest to its next position: one instruction (step clock), or the next landmark or kick
    /// (landmark clock).
    pub fn advance(&mut self, host: &mut dyn Host) -> Result<Advance, MachineError> {
        match self.clock {
            Clock::Step => Ok(match self.step(host)? {
                Step::Retired => Advance::Moved,
                Step::Idle => Advance::Idle,
                Step::Stopped(stop) => Advance::Stopped(stop),
            }),
            Clock::Landmark if self.counting == Landmarks::Branches => self.run_to_branch(host),
            Clock::Landmark => self.run_to_landmark(host),
        }
    }

    /// Runs free until the guest's next exit, or until a kick interrupts it.
    pub(crate) fn run_to_landmark(&mut self, host: &mut dyn Host) -> Result<Advance, MachineError> {
        if self.cpu.halted {
            return Ok(Advance::Idle);
        }
        if self.cpu.stale_shadow {
            self.clear_interrupt_shadow()?;
        }
        // PVM quirk (seen here, about once in a hundred disk-guest runs): when a signal interrupts the
        // KVM_RUN that should deliver a freshly queued interrupt, the vector stays latched and is delivered
        // again at every later entry, forever. So no kick may interrupt the delivering run; it ends at the
        // guest's next exit, normally the handler's EOI a few instructions in. (Toggling single-step to
        // bound it instead leaves a stray #DB in the guest on this host.) A run delivering an exception
        // may be kicked: it lasts to the guest's next exit, which after an `int3` can be far away, and
        // held kicks would starve the timer all that while.
        let _held = (self.cpu.queued == Some(Queued::Interrupt)).then(KicksHeld::new);
        let exit = self.enter(host)?;
        match exit {
            Exit::Interrupted => {
                self.after_exit(None)?;
                return Ok(Advance::Kicked);
            }
            Exit::Ran => {
                // Only an armed stop makes a debug exit while running free. Disarm them: on PVM, resuming
                // onto an armed breakpoint triggers it again forever.
                self.after_exit(None)?;
                self.stop_fired = self.fired_stop();
                self.disarm()?;
                return Ok(Advance::Breakpoint);
            }
            _ => {}
        }
        let stop = self.finish_exit(exit, host)?;
        Ok(match stop {
            Some(stop) => Advance::Stopped(stop),
            None if self.cpu.halted
                && self.cpu.regs.rflags & RFLAGS_IF == 0
                && !self.is_multiprocessor() =>
            {
                Advance::Stopped(StopReason::Halted)
            }
            None => Advance::Moved,
        })
    }

    /// Where to deliver an interrupt that falls due while the guest computes in a loop, so that replay
    /// finds the point cheaply: the instruction after the innermost loop around RIP, which runs once per
    /// pass of the loop rather than once per iteration (replay's breakpoint search stops at every pass of
    /// the point's rip). Found by decoding forward from RIP to the first backward branch whose target is
    /// at or before RIP; None if there is none nearby (straight-line code, a loop left by a return or an
    /// indirect jump). A repeated string instruction at RIP gives the instruction after it: the middle of
    /// a `rep` is no point a breakpoint can find.
    pub fn loop_exit(&self) -> Option<u64> {
        self.loop_around_rip().and_then(|(exit, _)| exit)
    }

    /// Whether the guest spins in a wait loop: the innermost loop around RIP (see
    /// [`Machine::loop_exit`]) holds a `pause`, as every spin-wait of a kernel does. On a machine that
    /// runs its vCPUs one at a time, such a vCPU waits for another one, which cannot run until it
    /// gives up the CPU (what pause-loop exiting tells a hypervisor on hardware).
    pub fn spin_waiting(&self) -> bool {
        self.loop_around_rip().is_some_and(|(_, pause)| pause)
    }

    /// The innermost loop around RIP: its exit (None for a loop closed by a jump back, whose exit is
    /// elsewhere) and whether its body holds a `pause`. None if no loop is found nearby.
    fn loop_around_rip(&self) -> Option<(Option<u64>, bool)> {
        /// How far to decode: loops whose latch lies farther away are not worth waiting for.
        const MAX_INSNS: usize = 64;
        let start = self.cpu.regs.rip;
        let mut ip = start;
        let mut pause = false;
        for _ in 0..MAX_INSNS {
            let insn = self.decode_at(ip)?;
            if ip == start && (insn.has_rep_prefix() || insn.has_repne_prefix()) {
                return Some((Some(insn.next_ip()), false));
            }
            pause |= insn.mnemonic() == Mnemonic::Pause;
            match insn.flow_control() {
                FlowControl::ConditionalBranch if insn.near_branch_target() <= start => {
                    return Some((Some(insn.next_ip()), pause));
                }
                FlowControl::UnconditionalBranch => {
                    let target = insn.near_branch_target();
                    // A jump back closes a loop whose exit is elsewhere (a pause in it still spins);
                    // one forward stays in the body.
                    if target <= start {
                        return pause.then_some((None, true));
                    }
                    ip = target;
                    continue;
                }
                FlowControl::Next
                | FlowControl::Call
                | FlowControl::IndirectCall
                | FlowControl::ConditionalBranch => {}
                _ => return None,
            }
            ip = insn.next_ip();
        }
        None
    }

    /// Whether replay can find the current point again by its fingerprint, with a breakpoint on its rip.
    /// Not in user mode: PVM runs ring 3 natively and honours neither single-step nor breakpoints there
    /// (PLATFORM.md). Not at a repeated string instruction: a kick may stop one between two iterations,
    /// and a breakpoint fires only before the first.
    pub fn kick_point_findable(&self) -> bool {
        let user_mode = self.cpu.sregs.cs.selector & 3 != 0;
        let in_rep = self.decode_at(self.cpu.regs.rip).is_some_and(|i| {
            i.is_string_instruction() && (i.has_rep_prefix() || i.has_repne_prefix())
        });
        !user_mode && !in_rep
    }

    /// The fingerprint of the current point (see [`Fingerprint`]).
    pub fn fingerprint(&mut self) -> Result<Fingerprint, MachineError> {
        let mut fp = self.register_fingerprint();
        fp.memory = self.memory_digest()?;
        Ok(fp)
    }

    /// The fingerprint without the memory digest (which costs a dirty-log read).
    fn register_fingerprint(&self) -> Fingerprint {
        let (r, s) = (&self.cpu.regs, &self.cpu.sregs);
        let rflags = r.rflags & !RFLAGS_RF;
        let words = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.cs.base, s.ds.base, s.es.base, s.fs.base, s.gs.base, s.ss.base,
        ];
        let selectors = [
            s.cs.selector,
            s.ds.selector,
            s.es.selector,
            s.fs.selector,
            s.gs.selector,
            s.ss.selector,
        ];
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for w in words {
            h.update(&w.to_le_bytes());
        }
        for sel in selectors {
            h.update(&sel.to_le_bytes());
        }
        Fingerprint {
            rip: r.rip,
            rsp: r.rsp,
            rflags,
            regs: h.digest(),
            memory: 0,
        }
    }

    /// xxh3-64 of the pages written since the last checkpoint mark, with their frame numbers.
    fn memory_digest(&mut self) -> Result<u64, MachineError> {
        self.collect_dirty()?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (i, &word) in self.dirty_since_mark.iter().enumerate() {
            for bit in (0..64).filter(|b| word & (1 << b) != 0) {
                let pfn = i as u64 * 64 + bit;
                h.update(&pfn.to_le_bytes());
                h.update(self.mem.page(pfn as usize));
            }
        }
        Ok(h.digest())
    }

    /// Whether the current point has fingerprint `fp` (registers first: the memory digest is dearer).
    pub fn matches(&mut self, fp: &Fingerprint) -> Result<bool, MachineError> {
        let here = self.register_fingerprint();
        if (here.rip, here.rsp, here.rflags, here.regs) != (fp.rip, fp.rsp, fp.rflags, fp.regs) {
            return Ok(false);
        }
        Ok(self.memory_digest()? == fp.memory)
    }

    /// Landmark clock: runs free from here to the first point with fingerprint `fp` before the next
    /// landmark, with a hardware breakpoint on its rip. At each hit whose state differs the breakpoint is
    /// stepped over with itself disabled (on PVM, resuming onto an armed breakpoint re-triggers it forever).
    /// The stops of [`Machine::arm`] stay armed (at most three then): if one fires first, the search ends
    /// there with [`Search::Stopped`].
    pub fn run_to_fingerprint(
        &mut self,
        fp: &Fingerprint,
        host: &mut dyn Host,
    ) -> Result<Search, MachineError> {
        if self.matches(fp)? {
            return Ok(Search::Found);
        }
        if self.counting == Landmarks::Branches {
            return self.refine_to_fingerprint(fp, host);
        }
        let linear = self.cpu.sregs.cs.base.wrapping_add(fp.rip);
        let result = self.search_with_breakpoint(fp, linear, host);
        // Back to plain free running with the stops, whatever happened (a stop that fired is off).
        if result.as_ref().is_ok_and(|&r| r == Search::Stopped) {
            self.breakpoints.clear();
        }
        self.apply_debug(None)?;
        result
    }

    fn search_with_breakpoint(
        &mut self,
        fp: &Fingerprint,
        linear: u64,
        host: &mut dyn Host,
    ) -> Result<Search, MachineError> {
        let mut armed = false;
        let mut hits = 0u64;
        loop {
            if !armed {
                self.apply_debug(Some(linear))?;
                armed = true;
            }
            match self.enter(host)? {
                Exit::Interrupted => continue,
                Exit::Ran => {
                    self.after_exit(None)?;
                    if self.cpu.regs.rip == fp.rip && self.matches(fp)? {
                        return Ok(Search::Found);
                    }
                    if let Some(stop) = self.fired_stop() {
                        self.stop_fired = Some(stop);
                        return Ok(Search::Stopped);
                    }
                    hits += 1;
                    if hits >= MAX_SEARCH_HITS {
                        return Ok(Search::GaveUp);
                    }
                    // Step over the breakpoint's instruction with the breakpoint off.
                    self.single_step_debug()?;
                    armed = false;
                    let exit = loop {
                        match self.enter(host)? {
                            Exit::Interrupted => continue,
                            exit => break exit,
                        }
                    };
                    if !matches!(exit, Exit::Ran) {
                        self.finish_exit(exit, host)?;
                        return Ok(Search::Passed);
                    }
                    self.after_exit(None)?;
                    if self.matches(fp)? {
                        return Ok(Search::Found);
                    }
                }
                exit => {
                    self.finish_exit(exit, host)?;
                    return Ok(Search::Passed);
                }
            }
        }
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// The signal a [`Kicker`] sends, and a hardware counter's overflow.
pub(crate) const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Makes the kick signal end the thread's KVM_RUN (EINTR) and nothing else.
pub(crate) fn catch_kicks() {
    // SAFETY: a handler that does nothing is async-signal-safe; without SA_RESTART the signal makes
    // KVM_RUN return EINTR, which is the point.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
        libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut());
    }
}

/// Interrupts the creating thread's KVM_RUN with a signal every `interval` until dropped, so that the
/// landmark clock gets control back from a guest that computes without exits.
pub struct Kicker {
    done: Arc<AtomicBool>,
}

impl Kicker {
    /// Starts kicking the calling thread (the one that runs the vCPU).
    pub fn start(interval: Duration) -> Kicker {
        catch_kicks();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(interval);
                // SAFETY: `target` is the thread that owns this Kicker; it outlives this loop because it
                // sets `done` (in Drop) before going away, and a signal to a live thread is harmless.
                unsafe { libc::pthread_kill(target, KICK_SIGNAL) };
            }
        });
        Kicker { done }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// The kick signal blocked in this thread while it lives, so no kick can interrupt the KVM_RUN it covers.
struct KicksHeld {
    old: libc::sigset_t,
}

impl KicksHeld {
    fn new() -> KicksHeld {
        // SAFETY: the sets are plain values we own, initialized by sigemptyset before use;
        // pthread_sigmask only changes this thread's signal mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, KICK_SIGNAL);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            KicksHeld { old }
        }
    }
}

impl Drop for KicksHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`; a kick that arrived meanwhile is delivered now,
        // harmlessly, outside KVM_RUN.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}
