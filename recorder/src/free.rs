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
        if machine.interrupt_ready() {
            machine.inject_interrupt()?;
        }
        // If the guest cannot take the pending interrupt yet, have KVM exit the moment it can.
        machine.request_interrupt_window(machine.devices.pic.has_interrupt());
        let step = machine.run_free(&mut env)?;
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
