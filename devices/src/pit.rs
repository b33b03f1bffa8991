//! The 8254 programmable interval timer at ports 0x40-0x43, plus the PC's port 0x61 (system control
//! port B) whose bit 0 gates channel 2 and whose bit 5 shows channel 2's output.
//!
//! Nothing ticks: each channel remembers when its count was loaded, and the counter value and the OUT
//! level are computed from the time the caller passes in. That keeps the device a pure function of its
//! state and the inputs, and lets [`Pit::irq0_edges`] and [`Pit::next_irq0_ns`] answer questions about
//! any interval without mutating anything.
//!
//! As in QEMU (what guests are tested against), a count takes effect at once when it is written, without
//! the 8254's one-clock load delay, and rewriting the count of a running channel restarts it. BCD
//! counting (control word bit 0) is recorded and reported in the status byte, but counts are treated as
//! binary: no PC software we target counts in BCD.

use serde::{Deserialize, Serialize};

/// The PIT's input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Counter 0 data port; counters 1 and 2 follow.
const COUNTER0: u16 = 0x40;
/// Counter 2 data port.
const COUNTER2: u16 = 0x42;
/// Control word register (write-only).
const CONTROL: u16 = 0x43;
/// System control port B.
const PORT_B: u16 = 0x61;

/// Port B bit 0: channel 2 gate.
const PORT_B_GATE2: u8 = 0x01;
/// Port B bits 0-3 are read/write (gate, speaker, parity and I/O check enables).
const PORT_B_WRITABLE: u8 = 0x0F;

/// A channel's counting mode (control word bits 3-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Mode {
    /// Mode 0: OUT low until the count reaches zero, then high.
    TerminalCount = 0,
    /// Mode 1: OUT low from the trigger until the count reaches zero.
    OneShot = 1,
    /// Mode 2: periodic; OUT low for one clock at the end of each period.
    RateGenerator = 2,
    /// Mode 3: periodic; OUT high for the first half of each period, low for the second.
    SquareWave = 3,
    /// Mode 4: OUT low for one clock when the count reaches zero.
    SoftwareStrobe = 4,
    /// Mode 5: like mode 4, started by a gate trigger.
    HardwareStrobe = 5,
}

impl Mode {
    /// Decodes control word bits 3-1 (already shifted down); modes 6 and 7 are aliases of 2 and 3.
    fn from_bits(bits: u8) -> Self {
        match bits & 7 {
            0 => Mode::TerminalCount,
            1 => Mode::OneShot,
            2 | 6 => Mode::RateGenerator,
            3 | 7 => Mode::SquareWave,
            4 => Mode::SoftwareStrobe,
            _ => Mode::HardwareStrobe,
        }
    }

    /// The mode number as the status byte reports it.
    fn bits(self) -> u8 {
        self as u8
    }

    /// Modes 1 and 5 restart on a rising gate and ignore a low gate; the others stop counting on it.
    fn gate_triggered(self) -> bool {
        matches!(self, Mode::OneShot | Mode::HardwareStrobe)
    }
}

/// How the 16-bit count is transferred over the 8-bit port (control word bits 5-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Access {
    /// Low byte only.
    Lsb,
    /// High byte only.
    Msb,
    /// Low byte, then high byte.
    LsbMsb,
}

impl Access {
    /// Decodes control word bits 5-4 (already shifted down); 0 is the latch command, not an access mode.
    fn from_bits(bits: u8) -> Option<Self> {
        match bits & 3 {
            1 => Some(Access::Lsb),
            2 => Some(Access::Msb),
            3 => Some(Access::LsbMsb),
            _ => None,
        }
    }

    /// The access field as the status byte reports it.
    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::LsbMsb => 3,
        }
    }
}

/// Whether and since when a channel counts. Ticks are counted from the count load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Run {
    /// No count written since the control word: the channel is idle and OUT holds the mode's initial level.
    Unloaded,
    /// Counting since `since_ns`, after `ticks_before` ticks counted earlier (a low gate can pause modes
    /// 0 and 4 and they resume where they were).
    Running {
        /// When the current stretch of counting started.
        since_ns: u64,
        /// Ticks counted before `since_ns`.
        ticks_before: u64,
    },
    /// Stopped by a low gate after `ticks` ticks.
    Stopped {
        /// Ticks counted so far.
        ticks: u64,
    },
}

/// A count latched by the latch or read-back command, read out byte by byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Latch {
    /// The count at the time of the latch.
    value: u16,
    /// In lsb-then-msb access, the low byte has been read.
    msb_next: bool,
}

/// The rising edges of OUT, as tick numbers since the count load.
enum Edges {
    /// A single edge at this tick.
    Once(u64),
    /// An edge at every positive multiple of this period.
    Every(u64),
}

/// Ticks of the input clock in `[since_ns, t]`, i.e. whole clock periods elapsed.
fn ticks_between(since_ns: u64, t: u64) -> u64 {
    let elapsed = u128::from(t.saturating_sub(since_ns));
    u64::try_from(elapsed * u128::from(PIT_HZ) / NS_PER_SEC).unwrap_or(u64::MAX)
}

/// One counter of the 8254.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Channel {
    mode: Mode,
    access: Access,
    /// Control word bit 0 (BCD), reported back but otherwise ignored.
    bcd: bool,
    /// The count register as written; 0 stands for 65536.
    count: u16,
    run: Run,
    /// The gate input: tied high for channels 0 and 1, port 0x61 bit 0 for channel 2.
    gate: bool,
    /// Low byte written in lsb-then-msb access, waiting for the high byte.
    pending_lsb: Option<u8>,
    /// Unlatched reads in lsb-then-msb access: the next read returns the high byte.
    read_msb_next: bool,
    /// Count latched by a latch or read-back command, not yet fully read.
    count_latch: Option<Latch>,
    /// Status latched by a read-back command, not yet read.
    status_latch: Option<u8>,
}

impl Channel {
    /// A channel at power-on: never programmed, so it neither counts nor interrupts.
    fn new(gate: bool) -> Self {
        Channel {
            mode: Mode::SquareWave,
            access: Access::LsbMsb,
            bcd: false,
            count: 0,
            run: Run::Unloaded,
            gate,
            pending_lsb: None,
            read_msb_next: false,
            count_latch: None,
            status_latch: None,
        }
    }

    /// The count as a number of clocks (0 in the register means 65536).
    fn reload(&self) -> u64 {
        match self.count {
            0 => 0x1_0000,
            n => u64::from(n),
        }
    }

    /// The period of modes 2 and 3. A count of 1 is illegal there on the 8254; we treat it as 2 so
    /// that OUT still has a low phase and every period has exactly one rising edge.
    fn period(&self) -> u64 {
        self.reload().max(2)
    }

    /// Ticks counted by time `t` (only a running channel depends on `t`).
    fn ticks_at(&self, t: u64) -> u64 {
        match self.run {
            Run::Unloaded => 0,
            Run::Stopped { ticks } => ticks,
            Run::Running {
                since_ns,
                ticks_before,
            } => ticks_before.saturating_add(ticks_between(since_ns, t)),
        }
    }

    /// Ticks counted now, asking for the time only if the channel is running.
    fn ticks(&self, now: &mut dyn FnMut() -> u64) -> u64 {
        match self.run {
            Run::Running { .. } => self.ticks_at(now()),
            Run::Unloaded | Run::Stopped { .. } => self.ticks_at(0),
        }
    }

    /// The counter value after `ticks` ticks since the load.
    fn count_after(&self, ticks: u64) -> u16 {
        let value = match self.mode {
            Mode::RateGenerator => self.period() - ticks % self.period(),
            // Counts down by two per clock, reloading each half period; for odd counts this is an
            // approximation (QEMU makes the same one).
            Mode::SquareWave => self.period() - (ticks % self.period()) * 2 % self.period(),
            // One-shot modes keep counting down past zero, wrapping at 16 bits.
            _ => self.reload().wrapping_sub(ticks),
        };
        // Truncation is the hardware's: 65536 reads as 0.
        value as u16
    }

    /// The OUT level after `ticks` ticks of counting.
    fn out_after(&self, ticks: u64) -> bool {
        match self.mode {
            Mode::TerminalCount | Mode::OneShot => ticks >= self.reload(),
            Mode::RateGenerator => ticks % self.period() != self.period() - 1,
            Mode::SquareWave => ticks % self.period() < self.period().div_ceil(2),
            Mode::SoftwareStrobe | Mode::HardwareStrobe => ticks != self.reload(),
        }
    }

    /// The OUT level now.
    fn out(&self, now: &mut dyn FnMut() -> u64) -> bool {
        match self.run {
            // After a control word OUT goes low in mode 0 and high in all others.
            Run::Unloaded => self.mode != Mode::TerminalCount,
            // A low gate forces OUT high in the periodic modes.
            Run::Stopped { .. } if matches!(self.mode, Mode::RateGenerator | Mode::SquareWave) => {
                true
            }
            Run::Running { .. } | Run::Stopped { .. } => self.out_after(self.ticks(now)),
        }
    }

    /// The counter value now (the count register while no count is loaded).
    fn current_count(&self, now: &mut dyn FnMut() -> u64) -> u16 {
        match self.run {
            Run::Unloaded => self.count,
            Run::Running { .. } | Run::Stopped { .. } => self.count_after(self.ticks(now)),
        }
    }

    /// The read-back status byte: OUT, null count, access, mode, BCD.
    fn status(&self, now: &mut dyn FnMut() -> u64) -> u8 {
        (u8::from(self.out(now)) << 7)
            | (u8::from(self.run == Run::Unloaded) << 6)
            | (self.access.bits() << 4)
            | (self.mode.bits() << 1)
            | u8::from(self.bcd)
    }

    /// Where OUT rises, in ticks since the load.
    fn edges(&self) -> Edges {
        match self.mode {
            Mode::TerminalCount | Mode::OneShot => Edges::Once(self.reload()),
            Mode::RateGenerator | Mode::SquareWave => Edges::Every(self.period()),
            // OUT returns high one clock after the count reached zero.
            Mode::SoftwareStrobe | Mode::HardwareStrobe => Edges::Once(self.reload() + 1),
        }
    }

    /// Rising edges of OUT in the current run at or before `t`.
    fn edges_until(&self, t: u64) -> u64 {
        let Run::Running { ticks_before, .. } = self.run else {
            return 0;
        };
        let ticks = self.ticks_at(t);
        match self.edges() {
            Edges::Once(at) => u64::from(ticks_before < at && at <= ticks),
            Edges::Every(period) => ticks / period - ticks_before / period,
        }
    }

    /// The time of the first rising edge of OUT strictly after `after`.
    fn next_edge(&self, after: u64) -> Option<u64> {
        let Run::Running {
            since_ns,
            ticks_before,
        } = self.run
        else {
            return None;
        };
        // Edges at or before tick `ticks` have happened by `after`.
        let ticks = self.ticks_at(after);
        let edge = match self.edges() {
            Edges::Once(at) if ticks < at => at,
            Edges::Once(_) => return None,
            Edges::Every(period) => (ticks / period).checked_add(1)?.checked_mul(period)?,
        };
        // Tick `edge` happens at the first ns where ticks_between reaches it: round up.
        let clocks = u128::from(edge - ticks_before);
        let delay = (clocks * NS_PER_SEC).div_ceil(u128::from(PIT_HZ));
        u64::try_from(u128::from(since_ns) + delay).ok()
    }

    /// Starts counting the count register (a complete count was written).
    fn load(&mut self, now: &mut dyn FnMut() -> u64) {
        self.run = if self.gate {
            Run::Running {
                since_ns: now(),
                ticks_before: 0,
            }
        } else {
            // Counting waits for the gate.
            Run::Stopped { ticks: 0 }
        };
    }

    /// Moves the gate input (channel 2 only; 0 and 1 are tied high).
    fn set_gate(&mut self, high: bool, now: &mut dyn FnMut() -> u64) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        match (self.run, high) {
            (Run::Unloaded, _) => {}
            (Run::Running { .. }, false) if !self.mode.gate_triggered() => {
                self.run = Run::Stopped {
                    ticks: self.ticks(now),
                };
            }
            (Run::Running { .. } | Run::Stopped { .. }, false) => {}
            (Run::Stopped { ticks }, true)
                if matches!(self.mode, Mode::TerminalCount | Mode::SoftwareStrobe) =>
            {
                // Modes 0 and 4 resume where the low gate paused them.
                self.run = Run::Running {
                    since_ns: now(),
                    ticks_before: ticks,
                };
            }
            (Run::Running { .. } | Run::Stopped { .. }, true) => {
                // A rising gate (re)starts modes 1 and 5 and restarts the periodic modes from the count.
                self.run = Run::Running {
                    since_ns: now(),
                    ticks_before: 0,
                };
            }
        }
    }

    /// A write to the channel's data port.
    fn write(&mut self, value: u8, now: &mut dyn FnMut() -> u64) {
        self.count = match self.access {
            Access::Lsb => u16::from(value),
            Access::Msb => u16::from(value) << 8,
            Access::LsbMsb => match self.pending_lsb.take() {
                None => {
                    self.pending_lsb = Some(value);
                    return;
                }
                Some(lsb) => u16::from_le_bytes([lsb, value]),
            },
        };
        self.load(now);
    }

    /// A read of the channel's data port: a latched status, else a latched count, else the live count.
    fn read(&mut self, now: &mut dyn FnMut() -> u64) -> u8 {
        if let Some(status) = self.status_latch.take() {
            return status;
        }
        if let Some(latch) = self.count_latch {
            let [lsb, msb] = latch.value.to_le_bytes();
            let (byte, rest) = match self.access {
                Access::Lsb => (lsb, None),
                Access::Msb => (msb, None),
                Access::LsbMsb if latch.msb_next => (msb, None),
                Access::LsbMsb => (
                    lsb,
                    Some(Latch {
                        msb_next: true,
                        ..latch
                    }),
                ),
            };
            self.count_latch = rest;
            return byte;
        }
        let [lsb, msb] = self.current_count(now).to_le_bytes();
        match self.access {
            Access::Lsb => lsb,
            Access::Msb => msb,
            Access::LsbMsb => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lsb
                } else {
                    msb
                }
            }
        }
    }

    /// The counter latch command: freezes the count for reading unless a latch is already pending.
    fn latch_count(&mut self, now: &mut dyn FnMut() -> u64) {
        if self.count_latch.is_none() {
            self.count_latch = Some(Latch {
                value: self.current_count(now),
                msb_next: false,
            });
        }
    }

    /// Read-back with status: freezes the status byte unless one is already pending.
    fn latch_status(&mut self, now: &mut dyn FnMut() -> u64) {
        if self.status_latch.is_none() {
            self.status_latch = Some(self.status(now));
        }
    }

    /// A control word that programs this channel (access bits non-zero).
    fn program(&mut self, access: Access, control: u8) {
        self.access = access;
        self.mode = Mode::from_bits(control >> 1);
        self.bcd = control & 1 != 0;
        // The channel waits for a count in its new mode; a half-written count is discarded.
        self.run = Run::Unloaded;
        self.pending_lsb = None;
        self.read_msb_next = false;
    }
}

/// The 8254 with its three channels and port 0x61.
///
/// Channel 0 drives IRQ0: the machine asks [`Pit::irq0_edges`] or [`Pit::next_irq0_ns`] and pulses the
/// line itself. Those answers describe the current programming only, so the machine must account for the
/// edges up to the time of any PIT write before performing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written.
    port_b: u8,
    /// Port 0x61 bit 4, the DRAM refresh indicator; it toggles on every read, as in QEMU, so delay loops
    /// that wait for it to change make progress without consulting the clock.
    refresh: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT at power-on: no channel programmed, channel 2's gate low.
    pub fn new() -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port_b: 0,
            refresh: false,
        }
    }

    /// A guest read of `port` (0x40-0x43, 0x61) at `now_ns`.
    pub fn io_read(&mut self, port: u16, now_ns: u64) -> u8 {
        self.io_read_with(port, &mut || now_ns)
    }

    /// A guest write of `value` to `port` (0x40-0x43, 0x61) at `now_ns`.
    pub fn io_write(&mut self, port: u16, value: u8, now_ns: u64) {
        self.io_write_with(port, value, &mut || now_ns);
    }

    /// Like [`Pit::io_read`], but calls `now` for the time only if the result depends on it (a live
    /// count or status of a counting channel, or channel 2's OUT); `now` may be called more than once
    /// and must then give the same answer.
    pub fn io_read_with(&mut self, port: u16, now: &mut dyn FnMut() -> u64) -> u8 {
        match port {
            COUNTER0..=COUNTER2 => self.channels[usize::from(port - COUNTER0)].read(now),
            PORT_B => {
                let value = self.port_b
                    | (u8::from(self.refresh) << 4)
                    | (u8::from(self.channels[2].out(now)) << 5);
                self.refresh = !self.refresh;
                value
            }
            // The control register is write-only.
            _ => 0xFF,
        }
    }

    /// Like [`Pit::io_write`], but calls `now` only if the write depends on the time (a count load, a
    /// latch of a counting channel, a gate change of a loaded channel 2); `now` may be called more than
    /// once and must then give the same answer.
    pub fn io_write_with(&mut self, port: u16, value: u8, now: &mut dyn FnMut() -> u64) {
        match port {
            COUNTER0..=COUNTER2 => self.channels[usize::from(port - COUNTER0)].write(value, now),
            CONTROL => self.write_control(value, now),
            PORT_B => {
                self.port_b = value & PORT_B_WRITABLE;
                self.channels[2].set_gate(value & PORT_B_GATE2 != 0, now);
            }
            _ => {}
        }
    }

    /// A control word: read-back (select 3), counter latch (access 0) or channel programming.
    fn write_control(&mut self, value: u8, now: &mut dyn FnMut() -> u64) {
        let select = usize::from(value >> 6);
        let Some(channel) = self.channels.get_mut(select) else {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status, bits 1-3 pick channels.
            for (i, channel) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x20 == 0 {
                    channel.latch_count(now);
                }
                if value & 0x10 == 0 {
                    channel.latch_status(now);
                }
            }
            return;
        };
        match Access::from_bits(value >> 4) {
            None => channel.latch_count(now),
            Some(access) => channel.program(access, value),
        }
    }

    /// Rising edges of channel 0's OUT (IRQ0) in the interval `(from_ns, to_ns]`, under the current
    /// programming.
    pub fn irq0_edges(&self, from_ns: u64, to_ns: u64) -> u64 {
        if to_ns <= from_ns {
            return 0;
        }
        let channel = &self.channels[0];
        channel.edges_until(to_ns) - channel.edges_until(from_ns)
    }

    /// The time of the first rising edge of channel 0's OUT strictly after `after_ns`; None if there is
    /// none (not programmed, or a one-shot that has already fired).
    pub fn next_irq0_ns(&self, after_ns: u64) -> Option<u64> {
        self.channels[0].next_edge(after_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    /// The first ns at which `ticks` ticks have elapsed since a load at 0.
    fn at_tick(ticks: u64) -> u64 {
        (ticks * SEC).div_ceil(PIT_HZ)
    }

    /// Programs channel 0 in `mode` with lsb-then-msb access and `count`, loaded at `t`.
    fn program(pit: &mut Pit, mode: u8, count: u16, t: u64) {
        pit.io_write(0x43, 0x30 | (mode << 1), t);
        let [lsb, msb] = count.to_le_bytes();
        pit.io_write(0x40, lsb, t);
        pit.io_write(0x40, msb, t);
    }

    fn read_count(pit: &mut Pit, port: u16, t: u64) -> u16 {
        let lsb = pit.io_read(port, t);
        let msb = pit.io_read(port, t);
        u16::from_le_bytes([lsb, msb])
    }

    /// The reference: the edge times found by walking tick by tick.
    fn edge_times_by_walking(pit: &Pit, until_ticks: u64) -> Vec<u64> {
        let ch = &pit.channels[0];
        let Run::Running {
            since_ns,
            ticks_before,
        } = ch.run
        else {
            return vec![];
        };
        let mut times = vec![];
        let mut prev = ch.out_after(ticks_before);
        for tick in ticks_before + 1..=until_ticks {
            let out = ch.out_after(tick);
            if out && !prev {
                // First ns at which `tick` ticks have elapsed.
                let mut t = since_ns + (tick - ticks_before) * SEC / PIT_HZ;
                while ch.ticks_at(t) < tick {
                    t += 1;
                }
                times.push(t);
            }
            prev = out;
        }
        times
    }

    #[test]
    fn mode2_periodic_edges() {
        let mut pit = Pit::new();
        assert_eq!(pit.next_irq0_ns(0), None);
        assert_eq!(pit.irq0_edges(0, 10 * SEC), 0);
        // Linux's HZ=1000 programming: 0x34, LATCH = 1193.
        program(&mut pit, 2, 1193, 5 * MS);
        assert_eq!(pit.irq0_edges(0, 5 * MS + SEC), 1000);
        assert_eq!(pit.irq0_edges(5 * MS, 5 * MS + SEC), 1000);
        assert_eq!(pit.irq0_edges(0, 5 * MS), 0);

        let first = pit.next_irq0_ns(0).unwrap();
        assert_eq!(first, 5 * MS + (1193 * SEC).div_ceil(PIT_HZ));
        assert_eq!(pit.irq0_edges(0, first), 1);
        assert_eq!(pit.irq0_edges(0, first - 1), 0);
        let second = pit.next_irq0_ns(first).unwrap();
        assert_eq!(pit.irq0_edges(first, second), 1);
        assert_eq!(pit.irq0_edges(first, second - 1), 0);

        let reference = edge_times_by_walking(&pit, 1193 * 50);
        assert_eq!(reference.len(), 50);
        let mut t = 0;
        for &expected in &reference {
            t = pit.next_irq0_ns(t).unwrap();
            assert_eq!(t, expected);
        }
    }

    #[test]
    fn edges_are_additive() {
        let mut pit = Pit::new();
        program(&mut pit, 3, 0, 123);
        let whole = pit.irq0_edges(0, 7 * SEC);
        assert_eq!(whole, 7 * PIT_HZ / 65536);
        let mut sum = 0;
        let mut from = 0;
        let mut step = 1;
        while from < 7 * SEC {
            let to = (from + step).min(7 * SEC);
            sum += pit.irq0_edges(from, to);
            from = to;
            step = step * 7 % 100_000_007 + 13;
        }
        assert_eq!(sum, whole);
    }

    #[test]
    fn mode3_square_wave() {
        let mut pit = Pit::new();
        program(&mut pit, 3, 1000, 0);
        assert_eq!(pit.irq0_edges(0, SEC), PIT_HZ / 1000);
        let reference = edge_times_by_walking(&pit, 1000 * 20);
        let mut t = 0;
        for &expected in &reference {
            t = pit.next_irq0_ns(t).unwrap();
            assert_eq!(t, expected);
        }
        // OUT high for the first half period, low for the second; the count drops by two per clock.
        let half = 500 * SEC / PIT_HZ;
        pit.io_write(0x43, 0xE2, 10); // read-back status of channel 0
        assert_eq!(pit.io_read(0x40, 999) & 0x80, 0x80);
        pit.io_write(0x43, 0xE2, half + 10_000);
        assert_eq!(pit.io_read(0x40, 0) & 0x80, 0);
        let one_tick = SEC.div_ceil(PIT_HZ);
        assert_eq!(read_count(&mut pit, 0x40, one_tick), 998);
        // Modes 6 and 7 are aliases: status shows 2 and 3.
        pit.io_write(0x43, 0x3C, 0);
        pit.io_write(0x43, 0xE2, 0);
        assert_eq!(pit.io_read(0x40, 0) & 0x0E, 2 << 1);
        pit.io_write(0x43, 0x3E, 0);
        pit.io_write(0x43, 0xE2, 0);
        assert_eq!(pit.io_read(0x40, 0) & 0x0E, 3 << 1);
    }

    #[test]
    fn mode0_single_edge() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 11932, SEC);
        let fire = pit.next_irq0_ns(0).unwrap();
        assert_eq!(fire, SEC + (11932 * SEC).div_ceil(PIT_HZ));
        assert_eq!(pit.irq0_edges(0, 100 * SEC), 1);
        assert_eq!(pit.irq0_edges(fire, 100 * SEC), 0);
        assert_eq!(pit.irq0_edges(fire - 1, fire), 1);
        assert_eq!(pit.next_irq0_ns(fire), None);
        // The counter keeps counting down past zero.
        assert_eq!(
            read_count(&mut pit, 0x40, SEC + at_tick(11932 + 10)),
            0xFFF6
        );
        // Reprogramming re-arms it.
        program(&mut pit, 0, 100, 2 * SEC);
        assert_eq!(pit.irq0_edges(2 * SEC, 3 * SEC), 1);
    }

    #[test]
    fn control_word_stops_channel_until_count() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 100, 0);
        pit.io_write(0x43, 0x34, SEC);
        assert_eq!(pit.next_irq0_ns(SEC), None);
        assert_eq!(pit.irq0_edges(SEC, 2 * SEC), 0);
        pit.io_write(0x40, 100, 2 * SEC);
        assert_eq!(
            pit.irq0_edges(2 * SEC, 2 * SEC + MS),
            0,
            "lsb alone loads nothing"
        );
        pit.io_write(0x40, 0, 2 * SEC + MS);
        assert_eq!(pit.irq0_edges(2 * SEC + MS, 3 * SEC + MS), PIT_HZ / 100);
    }

    #[test]
    fn other_modes_do_not_crash() {
        for mode in [1u8, 4, 5] {
            let mut pit = Pit::new();
            program(&mut pit, mode, 10, 0);
            let expected = if mode == 1 { 10 } else { 11 };
            let fire = pit.next_irq0_ns(0).unwrap();
            assert_eq!(fire, (expected * SEC).div_ceil(PIT_HZ), "mode {mode}");
            assert_eq!(pit.irq0_edges(0, SEC), 1);
            assert_eq!(pit.next_irq0_ns(fire), None);
            read_count(&mut pit, 0x40, SEC);
        }
    }

    #[test]
    fn latch_is_stable() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 0, 0);
        pit.io_write(0x43, 0x00, 10 * MS); // latch channel 0
        let latched = (65536 - 10 * MS * PIT_HZ / SEC) as u16;
        // A second latch command before the read does not replace the first.
        pit.io_write(0x43, 0x00, 20 * MS);
        assert_eq!(pit.io_read(0x40, 30 * MS), latched.to_le_bytes()[0]);
        assert_eq!(pit.io_read(0x40, 40 * MS), latched.to_le_bytes()[1]);
        // The next read is live again.
        let live = (65536 - 50 * MS * PIT_HZ / SEC) as u16;
        assert_eq!(read_count(&mut pit, 0x40, 50 * MS), live);
    }

    #[test]
    fn latched_read_needs_no_time() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 1000, 0);
        pit.io_write(0x43, 0x00, 5_000);
        let mut no_clock = || -> u64 { panic!("the clock was read") };
        let lsb = pit.io_read_with(0x40, &mut no_clock);
        let msb = pit.io_read_with(0x40, &mut no_clock);
        assert_eq!(u16::from_le_bytes([lsb, msb]), 1000 - 5);
        // A control word and writes that do not complete a count need no time either.
        pit.io_write_with(0x43, 0x34, &mut no_clock);
        pit.io_write_with(0x40, 0x10, &mut no_clock);
        pit.io_write_with(0x61, 0x02, &mut no_clock);
        assert_eq!(
            pit.io_read_with(0x40, &mut no_clock),
            0xE8,
            "an unloaded channel reads its count register"
        );
    }

    #[test]
    fn read_back_status_and_count() {
        let mut pit = Pit::new();
        // Channel 2: lsb only, mode 0, then channel 1: msb only, mode 2.
        pit.io_write(0x43, 0x90, 0);
        pit.io_write(0x43, 0x64, 0);
        // Null count set: no count loaded yet; OUT low in mode 0.
        pit.io_write(0x43, 0xE8, 0);
        assert_eq!(pit.io_read(0x42, 0), 0b0101_0000);
        pit.io_write(0x42, 200, 0);
        pit.io_write(0x41, 0x01, 0);
        // Latch count and status of channels 1 and 2 at once.
        let t = 100 * SEC / PIT_HZ + 1;
        pit.io_write(0x43, 0xCC, t);
        // Channel 2's gate is low: it has not counted. Status comes first, then the count.
        assert_eq!(pit.io_read(0x42, 0), 0b0001_0000);
        assert_eq!(pit.io_read(0x42, 0), 200);
        assert_eq!(pit.io_read(0x41, 0), 0b1010_0100);
        assert_eq!(
            pit.io_read(0x41, 0),
            0x00,
            "256 - 100 = 156 = 0x009C: msb only"
        );
        // Status latch without count latch.
        pit.io_write(0x43, 0xE4, t);
        assert_eq!(pit.io_read(0x41, 0), 0b1010_0100);
        assert_eq!(pit.io_read(0x41, 2 * t), 0x00);
    }

    #[test]
    fn access_modes() {
        let mut pit = Pit::new();
        // lsb only: the high byte is zero.
        pit.io_write(0x43, 0x14, 0);
        pit.io_write(0x40, 50, 0);
        assert_eq!(pit.irq0_edges(0, SEC), PIT_HZ / 50);
        assert_eq!(pit.io_read(0x40, 0), 50);
        // msb only: the low byte is zero.
        pit.io_write(0x43, 0x24, 0);
        pit.io_write(0x40, 0x10, 0);
        assert_eq!(pit.irq0_edges(0, SEC), PIT_HZ / 0x1000);
        assert_eq!(pit.io_read(0x40, 0), 0x10);
        // lsb then msb, read back in the same order.
        program(&mut pit, 2, 0x1234, 0);
        assert_eq!(pit.io_read(0x40, 0), 0x34);
        assert_eq!(pit.io_read(0x40, 0), 0x12);
        assert_eq!(pit.io_read(0x40, 0), 0x34);
        // A control word resets the byte order (the next read would have been the msb).
        pit.io_write(0x43, 0x34, 0);
        pit.io_write(0x40, 0x78, 0);
        pit.io_write(0x40, 0x56, 0);
        assert_eq!(read_count(&mut pit, 0x40, 0), 0x5678);
    }

    #[test]
    fn channel2_gate_and_port61() {
        let mut pit = Pit::new();
        assert_eq!(
            pit.io_read(0x61, 0) & 0x23,
            0x20,
            "unprogrammed mode 3: OUT high"
        );
        // Linux's PIT TSC calibration: gate high, speaker off, mode 0, poll OUT.
        pit.io_write(0x61, 0x01, 0);
        pit.io_write(0x43, 0xB0, 0);
        pit.io_write(0x42, 0x2E, MS);
        pit.io_write(0x42, 0x9B, MS); // 0x9B2E = 39726 ticks, about 33.3 ms
        let fire = MS + (39726 * SEC).div_ceil(PIT_HZ);
        assert_eq!(pit.io_read(0x61, fire - 1) & 0x21, 0x01);
        assert_eq!(pit.io_read(0x61, fire) & 0x21, 0x21);

        // Mode 0 pauses while the gate is low.
        pit.io_write(0x42, 0x00, 0);
        pit.io_write(0x42, 0x10, 0); // 4096
        pit.io_write(0x61, 0x00, at_tick(1000));
        assert_eq!(read_count(&mut pit, 0x42, 5 * SEC), 4096 - 1000);
        pit.io_write(0x61, 0x01, 6 * SEC);
        assert_eq!(read_count(&mut pit, 0x42, 6 * SEC + at_tick(96)), 3000);

        // Mode 2 restarts on a rising gate.
        pit.io_write(0x43, 0xB4, 0);
        pit.io_write(0x42, 100, 0);
        pit.io_write(0x42, 0, 0);
        pit.io_write(0x61, 0x00, SEC);
        assert_eq!(
            pit.io_read(0x61, 2 * SEC) & 0x20,
            0x20,
            "low gate forces OUT high"
        );
        pit.io_write(0x61, 0x01, 3 * SEC);
        assert_eq!(read_count(&mut pit, 0x42, 3 * SEC), 100);

        // Refresh toggles on every read; bits 0-3 read back.
        pit.io_write(0x61, 0x0F, 3 * SEC);
        let a = pit.io_read(0x61, 3 * SEC);
        let b = pit.io_read(0x61, 3 * SEC);
        assert_eq!((a ^ b) & 0x10, 0x10);
        assert_eq!(a & 0x0F, 0x0F);
    }

    #[test]
    fn any_port_io_is_safe() {
        let mut pit = Pit::new();
        let mut t = 0;
        for port in [0x40u16, 0x41, 0x42, 0x43, 0x61, 0x44] {
            for value in 0..=255u8 {
                t += 12_345;
                pit.io_write(port, value, t);
                pit.io_read(port, t);
                pit.io_read(0x40, u64::MAX);
                pit.irq0_edges(0, u64::MAX);
                pit.next_irq0_ns(u64::MAX - 1);
            }
        }
        // Extreme times: loads near the end of time produce no edges rather than overflow.
        program(&mut pit, 2, 1, u64::MAX - 10);
        assert_eq!(pit.next_irq0_ns(u64::MAX - 10), None);
        assert_eq!(pit.irq0_edges(0, u64::MAX), 0);
    }
}
