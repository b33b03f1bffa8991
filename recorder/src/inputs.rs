//! The host side of a recording: where time, serial input and random numbers come from, and the log of
//! every value handed to the guest.

use devices::TimeSource;
use machine::{Host, HostInsn, Machine, MachineError};
use std::collections::VecDeque;
use std::io::Read;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use traces::{ClockKind, Event, EventKind, TimeMode};

/// Where guest serial input comes from.
pub enum SerialInput {
    /// No input: the UART never receives anything.
    None,
    /// These bytes, offered as fast as the guest takes them (a file given with `--serial-input`).
    Bytes(Vec<u8>),
    /// A stream read by a background thread (the terminal, or `--serial-input -` for standard input).
    Stream(Box<dyn Read + Send>),
}

/// What the PIT, RTC and TSC follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSourceKind {
    /// The host clocks: timer interrupts land wherever they land (and are logged).
    Host,
    /// A clock derived from the instruction count: the same run every time, even unrecorded.
    Virtual,
}

impl TimeSourceKind {
    /// The header's name for this mode.
    pub fn mode(self) -> TimeMode {
        match self {
            TimeSourceKind::Host => TimeMode::Host,
            TimeSourceKind::Virtual => TimeMode::Virtual,
        }
    }
}

/// Virtual time runs at this many nanoseconds per instruction (a 100 MIPS machine).
const VIRTUAL_NS_PER_INSN: u64 = 10;
/// Virtual wall-clock time starts here: 2026-01-01T00:00:00Z, so virtual runs agree on the date too.
const VIRTUAL_EPOCH_NS: u64 = 1_767_225_600 * 1_000_000_000;
/// Virtual TSC frequency: 2 GHz, i.e. 2 ticks per nanosecond.
const VIRTUAL_TSC_PER_NS: u64 = 2;
/// Longest sleep while the guest idles, so Ctrl-C and new input are noticed quickly.
const IDLE_SLICE: Duration = Duration::from_millis(5);

/// The recorder's answer to everything the machine asks the outside world.
pub struct HostEnv {
    time: TimeSourceKind,
    start: Instant,
    /// Host time: the monotonic time at `start` (0 for a run from boot).
    base_ns: u64,
    /// Virtual time spent idle (halted), added to instruction time.
    idle_ns: u64,
    /// Time up to which PIT edges have been delivered.
    pit_polled_ns: u64,
    icount: u64,
    rip: u64,
    pending_input: VecDeque<u8>,
    stream: Option<Receiver<Vec<u8>>>,
    /// Serial input is held until the guest's output contains these bytes; None once it has.
    input_after: Option<Vec<u8>>,
    /// The end of the output seen so far, as long as `input_after` less one byte: a match may straddle
    /// two pieces of output.
    output_tail: Vec<u8>,
    events: Vec<Event>,
}

impl HostEnv {
    /// A new environment; starts the input thread for a stream. With `input_after`, serial input is held
    /// until the guest's output contains those bytes.
    pub fn new(time: TimeSourceKind, input: SerialInput, input_after: Option<Vec<u8>>) -> HostEnv {
        let (pending_input, stream) = match input {
            SerialInput::None => (VecDeque::new(), None),
            SerialInput::Bytes(b) => (b.into(), None),
            SerialInput::Stream(mut reader) => {
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    // Ends at EOF or error, which drops `tx` and tells the loop no more input will come.
                    while let Ok(n @ 1..) = reader.read(&mut buf) {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                });
                (VecDeque::new(), Some(rx))
            }
        };
        HostEnv {
            time,
            start: Instant::now(),
            base_ns: 0,
            idle_ns: 0,
            pit_polled_ns: 0,
            icount: 0,
            rip: 0,
            pending_input,
            stream,
            input_after: input_after.filter(|t| !t.is_empty()),
            output_tail: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Makes the clocks go on from `ns` of monotonic time at instruction `icount` (a live run branched
    /// off a replay, whose devices hold times of the recording): host time from `ns` on; virtual time
    /// from `ns` as if idle had made up the difference.
    pub fn resume_clock(&mut self, ns: u64, icount: u64) {
        self.icount = icount;
        match self.time {
            TimeSourceKind::Host => self.base_ns = ns,
            TimeSourceKind::Virtual => {
                self.idle_ns = ns.saturating_sub(icount * VIRTUAL_NS_PER_INSN);
            }
        }
        self.pit_polled_ns = ns;
    }

    /// Notes what the guest printed, to release held serial input once the awaited text appears.
    pub fn saw_output(&mut self, output: &[u8]) {
        let Some(wanted) = &self.input_after else {
            return;
        };
        self.output_tail.extend_from_slice(output);
        if self
            .output_tail
            .windows(wanted.len())
            .any(|w| w == wanted.as_slice())
        {
            self.input_after = None;
            self.output_tail = Vec::new();
            return;
        }
        let keep = wanted.len() - 1;
        let cut = self.output_tail.len().saturating_sub(keep);
        self.output_tail.drain(..cut);
    }

    /// Serial input bytes the guest may be given now: none while they are held.
    fn input_ready(&self) -> usize {
        if self.input_after.is_some() {
            0
        } else {
            self.pending_input.len()
        }
    }

    /// Where the guest is: events logged from now on are tagged with this position. Returns the rip of
    /// the position it replaces.
    pub fn set_position(&mut self, icount: u64, rip: u64) -> u64 {
        self.icount = icount;
        std::mem::replace(&mut self.rip, rip)
    }

    /// Logs an event at the current position.
    pub fn log(&mut self, kind: EventKind) {
        self.events.push(Event {
            at: self.icount,
            rip: self.rip,
            kind,
        });
    }

    /// Events logged since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn now_ns(&self) -> u64 {
        match self.time {
            TimeSourceKind::Host => self.base_ns + self.start.elapsed().as_nanos() as u64,
            TimeSourceKind::Virtual => self.icount * VIRTUAL_NS_PER_INSN + self.idle_ns,
        }
    }

    fn drain_stream(&mut self) {
        if let Some(rx) = &self.stream {
            loop {
                match rx.try_recv() {
                    Ok(bytes) => self.pending_input.extend(bytes),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.stream = None;
                        break;
                    }
                }
            }
        }
    }

    /// Delivers what is due at this instruction boundary: timer edges and serial input, each logged.
    pub fn deliver_inputs(&mut self, machine: &mut Machine) -> Result<(), MachineError> {
        let now = self.now_ns();
        if now > self.pit_polled_ns {
            // Several edges missed while one instruction ran still make one edge: the PIC latches one request.
            if machine.devices.pit.irq0_edges(self.pit_polled_ns, now) > 0 {
                machine.pulse_irq(0)?;
                self.log(EventKind::Irq { line: 0 });
            }
            self.pit_polled_ns = now;
        }
        // The local APIC timers of a machine with several vCPUs, each as it expires.
        while let Some((due, cpu)) = machine.next_apic_timer().filter(|&(t, _)| t <= now) {
            if !machine.fire_apic_timer(cpu, now)? {
                // Expired while masked or already dealt with: nothing to log, and nothing more due.
                debug_assert!(machine.next_apic_timer().is_none_or(|(t, _)| t > due));
            }
            self.log(EventKind::ApicTimer { cpu, ns: now });
        }
        self.drain_stream();
        let room = machine.serial_rx_room();
        if room > 0 && self.input_ready() > 0 {
            let n = room.min(self.input_ready());
            let bytes: Vec<u8> = self.pending_input.range(..n).copied().collect();
            let taken = machine.push_serial_rx(&bytes)?;
            self.pending_input.drain(..taken);
            if taken > 0 {
                self.log(EventKind::SerialRx {
                    bytes: bytes[..taken].to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Whether delivering the inputs due now would interrupt the guest (a timer edge or serial bytes that
    /// raise an interrupt the PIC passes on). Nothing is delivered or logged.
    pub fn interrupt_due(&mut self, machine: &Machine) -> bool {
        let now = self.now_ns();
        let edge =
            now > self.pit_polled_ns && machine.devices.pit.irq0_edges(self.pit_polled_ns, now) > 0;
        if machine
            .next_apic_timer()
            .is_some_and(|(t, cpu)| t <= now && cpu == machine.current_cpu())
        {
            return true;
        }
        self.drain_stream();
        let n = machine.serial_rx_room().min(self.input_ready());
        let bytes: Vec<u8> = self.pending_input.range(..n).copied().collect();
        (edge || !bytes.is_empty()) && machine.interrupt_after(edge, &bytes)
    }

    /// The guest is halted: wait (host time) or skip ahead (virtual time) until something can wake it, and
    /// deliver it. Returns false if nothing ever can (no timer armed, no more input): the guest is dead.
    pub fn wait_for_wakeup(&mut self, machine: &mut Machine) -> Result<bool, MachineError> {
        loop {
            // An interrupt may already be waiting (a device raised it while the guest had interrupts off,
            // as in `cli; notify; sti; hlt`): then nothing else is needed to wake the guest.
            self.deliver_inputs(machine)?;
            if machine.interrupt_ready() || machine.any_cpu_can_run() {
                return Ok(true);
            }
            self.drain_stream();
            // Input held for output the guest has not printed cannot wake it either.
            let input_possible = self.input_after.is_none()
                && (!self.pending_input.is_empty() || self.stream.is_some());
            let pit = machine.devices.pit.next_irq0_ns(self.pit_polled_ns);
            let apic = machine.next_apic_timer().map(|(t, _)| t);
            let next_tick = pit.into_iter().chain(apic).min();
            if next_tick.is_none() && !input_possible {
                return Ok(false);
            }
            match self.time {
                TimeSourceKind::Virtual => {
                    if self.input_ready() == 0 {
                        match next_tick {
                            Some(t) => self.idle_ns += t.saturating_sub(self.now_ns()),
                            // Only a live stream can wake it: wait for it in real time.
                            None => std::thread::sleep(IDLE_SLICE),
                        }
                    }
                }
                TimeSourceKind::Host => {
                    let now = self.now_ns();
                    let until = next_tick.map(|t| t.saturating_sub(now)).unwrap_or(u64::MAX);
                    if until > 0 && self.input_ready() == 0 {
                        std::thread::sleep(IDLE_SLICE.min(Duration::from_nanos(until)));
                    }
                }
            }
            if super::STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(true);
            }
        }
    }
}

impl TimeSource for HostEnv {
    fn monotonic_ns(&mut self) -> u64 {
        let ns = self.now_ns();
        self.log(EventKind::Clock {
            kind: ClockKind::Monotonic,
            ns,
        });
        ns
    }

    fn wall_ns(&mut self) -> u64 {
        let ns = match self.time {
            TimeSourceKind::Host => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            TimeSourceKind::Virtual => VIRTUAL_EPOCH_NS + self.now_ns(),
        };
        self.log(EventKind::Clock {
            kind: ClockKind::Wall,
            ns,
        });
        ns
    }
}

fn host_random() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // The kernel's CSPRNG is always available after boot; fall back to the clock rather than fail the run.
        return SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

impl Host for HostEnv {
    fn host_value(&mut self, insn: HostInsn) -> (u64, u64) {
        let (value, aux) = match insn {
            HostInsn::Rdtsc | HostInsn::Rdtscp => {
                let tsc = match self.time {
                    // SAFETY: RDTSC has no preconditions on x86_64.
                    TimeSourceKind::Host => unsafe { core::arch::x86_64::_rdtsc() },
                    TimeSourceKind::Virtual => self.now_ns() * VIRTUAL_TSC_PER_NS,
                };
                (tsc, 0)
            }
            HostInsn::Rdrand | HostInsn::Rdseed => (host_random(), 0),
        };
        self.log(EventKind::HostValue { insn, value, aux });
        (value, aux)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_input_is_released_by_text_split_across_outputs() {
        let input = SerialInput::Bytes(b"ls\n".to_vec());
        let mut env = HostEnv::new(TimeSourceKind::Virtual, input, Some(b"$ ".to_vec()));
        assert_eq!(env.input_ready(), 0);
        env.saw_output(b"booting... ");
        env.saw_output(b"$");
        assert_eq!(env.input_ready(), 0, "half the text releases nothing");
        env.saw_output(b" ");
        assert_eq!(env.input_ready(), 3);
    }
}
