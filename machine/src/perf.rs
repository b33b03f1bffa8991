//! A hardware performance counter of the vCPU thread, opened with `perf_event_open`: the pmu clock's
//! counter on a host that has one (see [`crate::pmu`]).
//!
//! The counter counts the calling thread only, so it is opened on the thread that runs the vCPU. It is
//! a sampling counter from the start (the kernel lets only those change their period later), with a
//! period so distant that it never overflows until [`PerfCounter::interrupt_after`] programs one. An
//! overflow sends the kick signal to the thread (`F_SETOWN_EX` with a thread id, `F_SETSIG`), which
//! ends its KVM_RUN as a kick does: that is how a run to a branch count gets control back near it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};

use perf_event_open_sys::{bindings, ioctls};
use thiserror::Error;

/// The period of a counter that is not meant to interrupt: about 18 minutes of guest branches at a
/// billion a second, well within the 47 bits every x86 counter has.
const DISTANT: u64 = 1 << 40;

/// fcntl commands and the owner record from linux/fcntl.h that the libc crate does not carry.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`: whom a descriptor's signals go to.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterEvent {
    /// `perf_event_attr.type`: a core PMU's type for a raw event, or a generic type.
    pub type_: u32,
    /// `perf_event_attr.config`.
    pub config: u64,
    /// Count only while the CPU runs a guest (`exclude_host`), as the pmu clock needs.
    pub guest_only: bool,
    /// Events before a target at which to program the overflow: more than the counter's skid can
    /// carry it (rr's figures: about 100 branches on Intel, unbounded on AMD Zen, where rr allows 10,000).
    pub margin: u64,
}

impl CounterEvent {
    /// The thread's own CPU time in nanoseconds: a software event every kernel has, so the counter's
    /// plumbing (open, read, overflow signal) can be checked where there is no PMU.
    pub const TASK_CLOCK: CounterEvent = CounterEvent {
        type_: bindings::PERF_TYPE_SOFTWARE,
        config: bindings::PERF_COUNT_SW_TASK_CLOCK as u64,
        guest_only: false,
        margin: 256,
    };
}

impl std::fmt::Display for CounterEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "perf type {} config {:#x}", self.type_, self.config)?;
        if self.guest_only {
            f.write_str(", guest only")?;
        }
        Ok(())
    }
}

/// What went wrong with a counter.
#[derive(Debug, Error)]
pub enum PerfError {
    /// `perf_event_open` refused the counter.
    #[error("perf_event_open of {event} failed: {source}")]
    Open {
        /// The event.
        event: CounterEvent,
        /// Its error (ENOENT: no such PMU or event; EACCES/EPERM: perf_event_paranoid).
        source: io::Error,
    },
    /// Controlling or reading an open counter failed.
    #[error("cannot {action} the counter of {event}: {source}")]
    Control {
        /// What was being done, e.g. "enable".
        action: &'static str,
        /// The event.
        event: CounterEvent,
        /// The operating system's error.
        source: io::Error,
    },
}

/// The pmu clock's hardware counter of the guest's retired conditional branches, as a machine holds it
/// (see `crate::pmu`).
#[derive(Debug)]
pub(crate) struct HardwareCounter {
    pub(crate) event: CounterEvent,
    /// The counter, open on the thread that last entered the guest (a counter counts one thread).
    pub(crate) open: Option<PerfCounter>,
    /// Single-stepping, as the simulated counter always does, rather than running free: only a run to
    /// an overflow or to the next exit runs free, and it steps again when it ends.
    pub(crate) stepping: bool,
}

/// An open counter of one thread.
#[derive(Debug)]
pub struct PerfCounter {
    file: File,
    event: CounterEvent,
    thread: libc::pid_t,
}

impl PerfCounter {
    /// Opens a counter of `event` on the calling thread, disabled, whose overflows send `signal` to this
    /// thread once [`PerfCounter::interrupt_after`] programs one.
    pub fn open(event: CounterEvent, signal: libc::c_int) -> Result<PerfCounter, PerfError> {
        let mut attr = bindings::perf_event_attr {
            type_: event.type_,
            size: size_of::<bindings::perf_event_attr>() as u32,
            config: event.config,
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = DISTANT;
        // Each overflow wakes the descriptor's owner: the signal.
        attr.__bindgen_anon_2.wakeup_events = 1;
        attr.set_disabled(1);
        // Never time-shared with other perf users: a counter that is, silently misses events.
        attr.set_pinned(1);
        attr.set_exclude_host(u64::from(event.guest_only));
        // SAFETY: `attr` is a live, initialised perf_event_attr whose `size` is its own; pid 0 and cpu -1
        // count this thread on any CPU; group -1 asks for no group; CLOEXEC keeps it from children.
        let fd = unsafe {
            perf_event_open_sys::perf_event_open(
                &mut attr,
                0,
                -1,
                -1,
                bindings::PERF_FLAG_FD_CLOEXEC.into(),
            )
        };
        if fd < 0 {
            return Err(PerfError::Open {
                event,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is the descriptor perf_event_open just returned; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: gettid has no preconditions.
        let thread = unsafe { libc::gettid() };
        let counter = PerfCounter {
            file,
            event,
            thread,
        };
        counter.signal_overflows_to_this_thread(signal)?;
        Ok(counter)
    }

    /// The thread it counts.
    pub fn thread(&self) -> libc::pid_t {
        self.thread
    }

    /// Makes every overflow send `signal` to the counted thread, not to the process: a kick of its KVM_RUN.
    fn signal_overflows_to_this_thread(&self, signal: libc::c_int) -> Result<(), PerfError> {
        let owner = OwnerEx {
            kind: F_OWNER_TID,
            pid: self.thread,
        };
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntls on our own live descriptor; F_SETOWN_EX reads the struct f_owner_ex we pass
        // (OwnerEx has its layout), which lives across the call.
        let failed = unsafe {
            libc::fcntl(fd, F_SETOWN_EX, &owner as *const OwnerEx) < 0
                || libc::fcntl(fd, libc::F_SETFL, libc::O_ASYNC) < 0
                || libc::fcntl(fd, F_SETSIG, signal) < 0
        };
        if failed {
            return Err(self.control_error("route the overflow signal of"));
        }
        Ok(())
    }

    fn control_error(&self, action: &'static str) -> PerfError {
        PerfError::Control {
            action,
            event: self.event,
            source: io::Error::last_os_error(),
        }
    }

    /// Starts counting.
    pub fn enable(&self) -> Result<(), PerfError> {
        // SAFETY: an argument-less perf ioctl on our own live descriptor.
        if unsafe { ioctls::ENABLE(self.file.as_raw_fd(), 0) } < 0 {
            return Err(self.control_error("enable"));
        }
        Ok(())
    }

    /// Stops counting.
    pub fn disable(&self) -> Result<(), PerfError> {
        // SAFETY: an argument-less perf ioctl on our own live descriptor.
        if unsafe { ioctls::DISABLE(self.file.as_raw_fd(), 0) } < 0 {
            return Err(self.control_error("disable"));
        }
        Ok(())
    }

    /// The count since the counter was opened or last programmed.
    pub fn read(&self) -> Result<u64, PerfError> {
        let mut bytes = [0u8; 8];
        match (&self.file).read(&mut bytes) {
            Ok(8) => Ok(u64::from_ne_bytes(bytes)),
            Ok(n) => Err(PerfError::Control {
                action: "read",
                event: self.event,
                source: io::Error::other(format!("{n} bytes instead of 8")),
            }),
            Err(source) => Err(PerfError::Control {
                action: "read",
                event: self.event,
                source,
            }),
        }
    }

    /// Counts from zero again, with an overflow (and its signal) after `events` more, or none when
    /// `None`. An overflow lands late by the counter's skid.
    pub fn interrupt_after(&self, events: Option<u64>) -> Result<(), PerfError> {
        let fd = self.file.as_raw_fd();
        let period = events.unwrap_or(DISTANT).max(1);
        // SAFETY: perf ioctls on our own live descriptor. PERIOD reads a u64 through the pointer passed
        // as its argument (the binding types the argument as the integer that carries it); `period`
        // lives across the call. Setting the period also restarts the countdown to the overflow.
        let failed = unsafe {
            ioctls::RESET(fd, 0) < 0 || ioctls::PERIOD(fd, &period as *const u64 as u64) < 0
        };
        if failed {
            return Err(self.control_error("program"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// This thread's CPU time, which the task clock counts, by another clock than the counter's.
    fn cpu_time() -> Duration {
        // SAFETY: clock_gettime fills in the timespec we pass, which lives across the call.
        unsafe {
            let mut t: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t);
            Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        }
    }

    /// Spins until this thread has run for `time` more (on a busy host that takes longer by the clock
    /// on the wall).
    fn spin(time: Duration) {
        let end = cpu_time() + time;
        while cpu_time() < end {
            std::hint::spin_loop();
        }
    }

    /// Whether `signal` is pending for this thread (it is blocked here, so it stays pending).
    fn pending(signal: libc::c_int) -> bool {
        // SAFETY: a zeroed sigset_t is a valid argument for sigpending to fill in.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigpending(&mut set);
            libc::sigismember(&set, signal) == 1
        }
    }

    #[test]
    fn an_overflow_signals_the_counting_thread_after_the_events_programmed() {
        // A thread of its own, with the signal blocked so that it stays pending where we can see it.
        std::thread::spawn(|| {
            let signal = libc::SIGUSR2;
            // SAFETY: plain sigset values we own, initialised by sigemptyset; only this thread's mask
            // changes.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let counter = PerfCounter::open(CounterEvent::TASK_CLOCK, signal).unwrap();
            assert_eq!(counter.read().unwrap(), 0, "a disabled counter counted");
            counter.enable().unwrap();
            spin(Duration::from_millis(20));
            let counted = counter.read().unwrap();
            assert!(
                counted >= 19_000_000,
                "20 ms of spinning counted {counted} ns"
            );
            assert!(!pending(signal), "a counter without an overflow signalled");

            // An overflow 50 ms of CPU time from now: not after 10 ms, surely soon after 50 ms.
            counter.interrupt_after(Some(50_000_000)).unwrap();
            assert!(
                counter.read().unwrap() < 5_000_000,
                "programming did not restart the count"
            );
            spin(Duration::from_millis(10));
            assert!(!pending(signal), "the overflow came early");
            let start = Instant::now();
            while !pending(signal) && start.elapsed() < Duration::from_secs(10) {
                spin(Duration::from_millis(1));
            }
            assert!(
                pending(signal),
                "no overflow signal reached the counting thread"
            );
            counter.disable().unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_missing_event_is_an_open_error_that_names_it() {
        let event = CounterEvent {
            type_: bindings::PERF_TYPE_SOFTWARE,
            config: 0xffff,
            guest_only: false,
            margin: 256,
        };
        let err = PerfCounter::open(event, libc::SIGUSR2).unwrap_err();
        assert!(matches!(err, PerfError::Open { .. }), "{err}");
        assert!(err.to_string().contains("config 0xffff"), "{err}");
    }
}
