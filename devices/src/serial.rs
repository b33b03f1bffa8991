//! The 16550A UART at COM1 (0x3F8-0x3FF, IRQ 4), built on vm-superio's `Serial`.
//!
//! vm-superio writes guest output to a `Write` and signals interrupts through a `Trigger`; here the
//! output goes to a buffer and the trigger to a flag, both drained by the machine after each I/O, so
//! the device does nothing behind the machine's back. vm-superio's `Serial` can be neither cloned,
//! compared nor serialized, so [`Uart`] does all three through [`UartState`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Errors restoring a [`Uart`] from a state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UartError {
    /// The state's receive FIFO holds more bytes than the FIFO can.
    #[error("UART state has {len} bytes in its receive FIFO, more than its capacity")]
    RxFifoOverflow {
        /// Bytes in the state's FIFO.
        len: usize,
    },
}

/// Bytes the receive FIFO holds (vm-superio's, which it does not export): the most
/// [`Uart::push_rx`] takes at once.
pub const RX_FIFO_BYTES: usize = 64;

/// The UART's interrupt output, as an edge latch: vm-superio calls [`Trigger::trigger`] when an interrupt
/// condition arises, and the machine collects it with [`Uart::take_irq`]. Several triggers between two
/// collections make one edge, as they would at the edge-triggered PIC input.
///
/// `trigger` takes `&self`, hence the interior mutability; an atomic rather than a `Cell` keeps the
/// device `Sync`.
#[derive(Debug, Default)]
struct IrqLatch(AtomicBool);

impl Trigger for IrqLatch {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// The vm-superio device as we instantiate it: output into a byte buffer.
type Inner = Serial<IrqLatch, NoEvents, Vec<u8>>;

/// Everything that defines a [`Uart`]: vm-superio's register state plus what the machine has not
/// collected yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// vm-superio's registers and receive FIFO (oldest byte first).
    #[serde(with = "SerialStateDef")]
    pub registers: SerialState,
    /// Transmitted bytes not yet taken by [`Uart::take_output`].
    pub output: Vec<u8>,
    /// An interrupt edge not yet taken by [`Uart::take_irq`].
    pub irq_pending: bool,
}

/// serde's description of vm-superio's [`SerialState`], which has no serde support of its own. The fields
/// are serialized in this order, first in a [`UartState`]: checkpoints depend on it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The COM1 16550A.
pub struct Uart {
    serial: Inner,
}

impl Uart {
    /// A UART at reset: 9600 baud 8N1, no interrupts enabled, FIFOs empty.
    pub fn new() -> Self {
        Uart {
            serial: Serial::new(IrqLatch::default(), Vec::new()),
        }
    }

    /// A guest read of register `offset` (0-7 from the base port).
    pub fn io_read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// A guest write of `value` to register `offset` (0-7 from the base port).
    pub fn io_write(&mut self, offset: u8, value: u8) {
        // Cannot fail: writing to a Vec and setting our latch are infallible, and only enqueueing
        // input can report a full FIFO.
        let _ = self.serial.write(offset, value);
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.serial.writer_mut())
    }

    /// Whether the UART raised its interrupt since the last call (one edge for IRQ 4).
    pub fn take_irq(&mut self) -> bool {
        self.serial.interrupt_evt().0.swap(false, Ordering::Relaxed)
    }

    /// Free space in the receive FIFO: how many bytes [`Uart::push_rx`] would accept now.
    pub fn rx_room(&self) -> usize {
        if self.in_loopback() {
            // The receiver is fed from the transmitter, not the line.
            0
        } else {
            self.serial.fifo_capacity()
        }
    }

    /// Offers received bytes to the guest; returns how many fit in the FIFO (the rest are not taken).
    pub fn push_rx(&mut self, bytes: &[u8]) -> usize {
        // The only error is a full FIFO, which took nothing.
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Whether the modem control register's loopback bit is set.
    fn in_loopback(&self) -> bool {
        const MCR_LOOP: u8 = 0x10;
        self.serial.state().modem_control & MCR_LOOP != 0
    }

    /// The complete state, for checkpoints and comparison.
    pub fn state(&self) -> UartState {
        UartState {
            registers: self.serial.state(),
            output: self.serial.writer().clone(),
            irq_pending: self.serial.interrupt_evt().0.load(Ordering::Relaxed),
        }
    }

    /// A UART in `state`; fails if the state's FIFO is larger than a FIFO can be.
    pub fn from_state(state: &UartState) -> Result<Self, UartError> {
        let serial = Serial::from_state(
            &state.registers,
            IrqLatch::default(),
            NoEvents,
            state.output.clone(),
        )
        .map_err(|_| UartError::RxFifoOverflow {
            len: state.registers.in_buffer.len(),
        })?;
        // `from_state` re-triggers interrupts that are pending in the registers, as a restored device
        // would have to signal them anew; but our latch is part of the state, so restore it exactly.
        serial
            .interrupt_evt()
            .0
            .store(state.irq_pending, Ordering::Relaxed);
        Ok(Uart { serial })
    }
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for Uart {
    fn clone(&self) -> Self {
        // A live UART's FIFO never exceeds its capacity, so restoring its own state cannot fail.
        Uart::from_state(&self.state()).expect("a UART's own state is valid")
    }
}

impl PartialEq for Uart {
    fn eq(&self, other: &Self) -> bool {
        self.state() == other.state()
    }
}

impl Eq for Uart {}

impl fmt::Debug for Uart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Uart").field(&self.state()).finish()
    }
}

impl Serialize for Uart {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.state().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Uart {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let state = UartState::deserialize(deserializer)?;
        Uart::from_state(&state).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const MCR: u8 = 4;
    const LSR: u8 = 5;
    const SCR: u8 = 7;

    const IER_RX: u8 = 0x01;
    const IER_TX: u8 = 0x02;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;

    /// What a typical guest driver does: 115200 8N1, FIFO on, DTR/RTS/OUT2.
    fn init(uart: &mut Uart) {
        uart.io_write(IER, 0x00);
        uart.io_write(LCR, 0x80);
        uart.io_write(0, 0x01);
        uart.io_write(1, 0x00);
        uart.io_write(LCR, 0x03);
        uart.io_write(2, 0xC7);
        uart.io_write(MCR, 0x0B);
    }

    #[test]
    fn the_receive_fifo_holds_what_its_constant_says() {
        let mut uart = Uart::new();
        assert_eq!(uart.rx_room(), RX_FIFO_BYTES);
        assert_eq!(uart.push_rx(&[b'x'; RX_FIFO_BYTES + 1]), RX_FIFO_BYTES);
    }

    #[test]
    fn transmit_goes_to_output() {
        let mut uart = Uart::new();
        init(&mut uart);
        assert_ne!(uart.io_read(LSR) & LSR_THR_EMPTY, 0);
        for &b in b"hello\n" {
            uart.io_write(DATA, b);
        }
        assert_eq!(uart.take_output(), b"hello\n");
        assert_eq!(uart.take_output(), b"");
        assert!(!uart.take_irq(), "no interrupts enabled");
        // The divisor latch does not transmit.
        uart.io_write(LCR, 0x83);
        assert_eq!(uart.io_read(0), 0x01);
        uart.io_write(DATA, b'x');
        uart.io_write(LCR, 0x03);
        assert_eq!(uart.take_output(), b"");
    }

    #[test]
    fn transmit_interrupt() {
        let mut uart = Uart::new();
        init(&mut uart);
        uart.io_write(IER, IER_TX);
        assert!(
            uart.take_irq(),
            "enabling THRE with an empty THR interrupts at once"
        );
        assert!(!uart.take_irq());
        assert_eq!(uart.io_read(IIR) & 0x0F, 0x02);
        uart.io_write(DATA, b'a');
        assert!(uart.take_irq());
        assert_eq!(uart.take_output(), b"a");
    }

    #[test]
    fn receive_with_interrupt() {
        let mut uart = Uart::new();
        init(&mut uart);
        assert_eq!(uart.push_rx(b"ab"), 2);
        assert!(!uart.take_irq(), "receive interrupt not enabled");
        assert_ne!(uart.io_read(LSR) & LSR_DATA_READY, 0);
        uart.io_write(IER, IER_RX);
        assert!(uart.take_irq(), "enabling with data waiting interrupts");
        assert_eq!(uart.io_read(IIR) & 0x0F, 0x04);
        assert_eq!(uart.io_read(DATA), b'a');
        assert_eq!(uart.io_read(DATA), b'b');
        assert_eq!(uart.io_read(LSR) & LSR_DATA_READY, 0);

        assert_eq!(uart.push_rx(b"c"), 1);
        assert!(uart.take_irq());
        assert!(!uart.take_irq(), "one edge per condition");
        assert_eq!(uart.io_read(DATA), b'c');
        assert_eq!(uart.push_rx(b""), 0);
        assert!(!uart.take_irq());
    }

    #[test]
    fn fifo_capacity_and_no_loss() {
        let mut uart = Uart::new();
        init(&mut uart);
        assert_eq!(uart.rx_room(), 64);
        let input: Vec<u8> = (0..200u8).collect();
        let mut sent = 0;
        let mut received = vec![];
        while sent < input.len() {
            let room = uart.rx_room();
            let n = uart.push_rx(&input[sent..(sent + room).min(input.len())]);
            assert_eq!(n, room.min(input.len() - sent));
            sent += n;
            if sent < input.len() {
                // The FIFO is full: offering more takes nothing.
                assert_eq!(uart.rx_room(), 0);
                assert_eq!(uart.push_rx(&input[sent..]), 0);
            }
            for _ in 0..50 {
                if uart.io_read(LSR) & LSR_DATA_READY != 0 {
                    received.push(uart.io_read(DATA));
                }
            }
        }
        while uart.io_read(LSR) & LSR_DATA_READY != 0 {
            received.push(uart.io_read(DATA));
        }
        assert_eq!(received, input);
    }

    #[test]
    fn loopback_takes_no_line_input() {
        let mut uart = Uart::new();
        init(&mut uart);
        uart.io_write(MCR, 0x1B);
        assert_eq!(uart.rx_room(), 0);
        assert_eq!(uart.push_rx(b"zz"), 0);
        uart.io_write(DATA, b'q');
        assert_eq!(uart.take_output(), b"");
        assert_eq!(uart.io_read(DATA), b'q');
    }

    #[test]
    fn state_round_trip() {
        let mut uart = Uart::new();
        init(&mut uart);
        uart.io_write(SCR, 0x5A);
        uart.io_write(IER, IER_RX | IER_TX);
        uart.io_write(DATA, b'o');
        uart.push_rx(b"input");
        uart.io_read(DATA);

        let bytes = postcard::to_allocvec(&uart).unwrap();
        let mut back: Uart = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, uart);
        assert_eq!(back.state(), uart.state());
        let mut clone = uart.clone();
        assert_eq!(clone, uart);

        // All three behave identically from here on.
        for u in [&mut uart, &mut back, &mut clone] {
            assert!(u.take_irq());
            assert_eq!(u.take_output(), b"o");
            let mut seen = vec![u.io_read(IIR)];
            seen.extend((0..5).map(|_| u.io_read(DATA)));
            u.io_write(DATA, b'!');
            seen.push(u8::from(u.take_irq()));
            seen.extend(u.take_output());
            seen.push(u.io_read(SCR));
            assert_eq!(seen, [0xC2, b'n', b'p', b'u', b't', 0, 1, b'!', 0x5A]);
        }
        assert_eq!(back, uart);
        assert_eq!(clone, uart);
    }

    #[test]
    fn oversized_state_is_rejected() {
        let mut state = Uart::new().state();
        state.registers.in_buffer = vec![0; 65];
        assert_eq!(
            Uart::from_state(&state).unwrap_err(),
            UartError::RxFifoOverflow { len: 65 }
        );
        let bytes = postcard::to_allocvec(&state).unwrap();
        assert!(postcard::from_bytes::<Uart>(&bytes).is_err());
    }

    #[test]
    fn any_register_io_is_safe() {
        let mut uart = Uart::new();
        for offset in 0..=255u8 {
            for value in 0..=255u8 {
                uart.io_write(offset, value);
                uart.io_read(offset);
            }
            uart.push_rx(&[offset; 100]);
        }
        uart.take_output();
        uart.take_irq();
    }
}
