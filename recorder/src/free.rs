//! Free running: the plain `run` at near the host's emulation speed. The vCPU runs until it exits by itself;
//! a kicker thread interrupts it every millisecond so timer interrupts are delivered on time. Nothing is
//! counted or logged, so this is for plain runs only (and the speed baseline of the benchmarks).

use crate::inputs::HostEnv;
use crate::{forward_output, RecordError, STOP_REQUESTED};
use machine::{Machine, Step, Stop};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use traces::StopReason;

/// How often the kicker interrupts KVM_RUN: the resolution of timer interrupt delivery.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Interrupts the calling thread's KVM_RUN with SIGUSR1 every [`KICK_INTERVAL`] until dropped.
struct Kicker {
    done: Arc<AtomicBool>,
}

impl Kicker {
    fn start() -> Kicker {
        // SAFETY: a handler that does nothing is async-signal-safe; without SA_RESTART the signal makes
        // KVM_RUN return EINTR, which is the point.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(KICK_INTERVAL);
                // SAFETY: `target` is the thread that owns this Kicker; it outlives this loop because it sets
                // `done` (in Drop) before going away, and a signal to a live thread is harmless.
                unsafe { libc::pthread_kill(target, libc::SIGUSR1) };
            }
        });
        Kicker { done }
    }
}

/// SIGUSR1 blocked in this thread while it lives, so no kick can interrupt the KVM_RUN it covers.
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
            libc::sigaddset(&mut set, libc::SIGUSR1);
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

impl Drop for Kicker {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Runs the guest free until it stops.
pub fn run(
    machine: &mut Machine,
    mut env: HostEnv,
    out: &mut dyn Write,
) -> Result<StopReason, RecordError> {
    machine.set_single_step(false)?;
    let _kicker = Kicker::start();
    loop {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            return Ok(StopReason::UserStop);
        }
        env.deliver_inputs(machine);
        let step = if machine.interrupt_ready() && machine.inject_interrupt()?.is_some() {
            // PVM quirk (seen here, about once in a hundred disk-guest runs): when a signal interrupts
            // the KVM_RUN that should deliver a freshly queued interrupt, the vector stays latched and is
            // delivered again at every later entry, forever. So no kick may interrupt the delivering run;
            // it ends at the guest's next exit, normally the handler's EOI a few instructions in. (Toggling
            // single-step to bound it instead leaves a stray #DB in the guest on this host.)
            let _held = KicksHeld::new();
            machine.run_free(&mut env)?
        } else {
            // If the guest cannot take the pending interrupt yet, have KVM exit the moment it can.
            machine.request_interrupt_window(machine.devices.pic.has_interrupt());
            machine.run_free(&mut env)?
        };
        env.take_events();
        forward_output(machine, out)?;
        match step {
            Step::Retired => {}
            Step::Idle => {
                if !env.wait_for_wakeup(machine) {
                    return Ok(StopReason::Halted);
                }
            }
            Step::Stopped(Stop::GuestExit(status)) => return Ok(StopReason::GuestExit { status }),
            Step::Stopped(Stop::TripleFault) => return Ok(StopReason::TripleFault),
            Step::Stopped(Stop::Halted) => return Ok(StopReason::Halted),
        }
    }
}
