//! The userspace PC devices: 8259A PIC pair, 8254 PIT, MC146818 RTC/CMOS, 16550A UART on COM1 and
//! QEMU's isa-debug-exit, at their standard ports, and up to four virtio-mmio block devices. A machine
//! with several vCPUs adds a local APIC ([`lapic`]) per vCPU and an IOAPIC ([`ioapic`]).
//!
//! Every device is a deterministic function of its state and its inputs. They never read a clock: the
//! time comes from the caller through a [`TimeSource`], which is asked only when an access really
//! depends on it, because every reading may be an event in the trace.

pub mod debug_exit;
pub mod disk;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod serial;
pub mod virtio_blk;

use crate::disk::{Disk, DiskImage};
use memory::GuestMemory;
use serde::{Deserialize, Serialize};

pub use debug_exit::DebugExit;
pub use pic::Pic;
pub use pit::Pit;
pub use rtc::Rtc;
pub use serial::{Uart, UartError, UartState};
pub use virtio_blk::VirtioBlk;

/// Guest physical address of disk 0's virtio-mmio window; disk i is at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE`, [`virtio_blk::MMIO_SIZE`] bytes long.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between the disks' MMIO windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// The IRQ line of each disk (8259 inputs that nothing else on our PC uses).
pub const VIRTIO_BLK_IRQS: [u8; MAX_DISKS] = [5, 10, 11, 9];
/// The most disks a machine has.
pub const MAX_DISKS: usize = 4;

/// Where device reads get the time: the recorder reads (and logs) the host clock, the replayer returns
/// logged values, virtual time derives it from the instruction count.
pub trait TimeSource {
    /// Monotonic nanoseconds since machine start (drives the PIT).
    fn monotonic_ns(&mut self) -> u64;
    /// Nanoseconds since the Unix epoch (drives the RTC).
    fn wall_ns(&mut self) -> u64;
}

/// COM1's first register.
const COM1_BASE: u16 = 0x3F8;
/// COM1's last register.
const COM1_LAST: u16 = 0x3FF;
/// COM1's interrupt line.
const COM1_IRQ: u8 = 4;
/// isa-debug-exit as configured with `iobase=0xf4,iosize=0x04`.
const DEBUG_EXIT_BASE: u16 = 0xF4;
/// The last port of isa-debug-exit.
const DEBUG_EXIT_LAST: u16 = 0xF7;

/// The time readings of one I/O access: each is taken from the source at most once, and only if a
/// device asks for it, so a multi-byte access costs at most one reading of each clock.
struct AccessTime<'a> {
    source: &'a mut dyn TimeSource,
    monotonic: Option<u64>,
    wall: Option<u64>,
}

impl<'a> AccessTime<'a> {
    fn new(source: &'a mut dyn TimeSource) -> Self {
        AccessTime {
            source,
            monotonic: None,
            wall: None,
        }
    }

    fn monotonic(&mut self) -> u64 {
        *self
            .monotonic
            .get_or_insert_with(|| self.source.monotonic_ns())
    }

    fn wall(&mut self) -> u64 {
        *self.wall.get_or_insert_with(|| self.source.wall_ns())
    }
}

/// All devices of the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// Interrupt controllers.
    pub pic: Pic,
    /// Interval timer (channel 0 drives IRQ 0 through the machine).
    pub pit: Pit,
    /// Real-time clock and CMOS RAM.
    pub rtc: Rtc,
    /// COM1.
    pub uart: Uart,
    /// The exit port.
    pub debug_exit: DebugExit,
    /// The virtio block devices, disk 0 first (their overlays are part of the state; the images are not).
    pub disks: Vec<VirtioBlk>,
}

impl Devices {
    /// The devices of a machine with `ram_bytes` of RAM (recorded in CMOS), as a BIOS would leave them.
    pub fn new(ram_bytes: u64) -> Self {
        Devices {
            pic: Pic::new(),
            pit: Pit::new(),
            rtc: Rtc::new(ram_bytes),
            uart: Uart::new(),
            debug_exit: DebugExit::new(),
            disks: Vec::new(),
        }
    }

    /// The devices with a virtio block device for each image (at most [`MAX_DISKS`]; extra images are
    /// not attached, so callers check the count first).
    pub fn with_disks(ram_bytes: u64, images: &[DiskImage]) -> Self {
        let mut devices = Devices::new(ram_bytes);
        devices.disks = (0..MAX_DISKS as u8)
            .zip(images)
            .map(|(i, image)| VirtioBlk::new(i, Disk::new(image.clone())))
            .collect();
        devices
    }

    /// `saved` (device state decoded from a checkpoint) made live: it takes this machine's disk images
    /// (which checkpoints do not hold) and is checked against them.
    pub fn restored(&self, mut saved: Devices) -> Result<Devices, String> {
        if saved.disks.len() != self.disks.len() {
            return Err(format!(
                "the checkpoint has {} disks but the machine has {}",
                saved.disks.len(),
                self.disks.len()
            ));
        }
        for (new, live) in saved.disks.iter_mut().zip(&self.disks) {
            new.adopt_image(live)?;
        }
        Ok(saved)
    }

    /// The disk whose MMIO window holds `[addr, addr + len)`, and the offset into the window.
    fn disk_at(&self, addr: u64, len: usize) -> Option<(usize, u64)> {
        let rel = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let index = usize::try_from(rel / VIRTIO_MMIO_STRIDE).ok()?;
        let offset = rel % VIRTIO_MMIO_STRIDE;
        (index < self.disks.len() && offset + len as u64 <= virtio_blk::MMIO_SIZE)
            .then_some((index, offset))
    }

    /// A guest MMIO read. Addresses no device decodes read as all ones (like an empty bus).
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.disk_at(addr, data.len()) {
            Some((i, offset)) => self.disks[i].mmio_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write; a virtio QueueNotify moves data between the disk and guest RAM (`mem`).
    /// Writes no device decodes are dropped.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8], mem: &mut GuestMemory) {
        if let Some((i, offset)) = self.disk_at(addr, data.len()) {
            self.disks[i].mmio_write(offset, data, mem);
        }
    }

    /// A guest `in` of `data.len()` bytes from `port`.
    ///
    /// Byte devices see a multi-byte access as consecutive byte accesses at `port`, `port + 1`, ...
    /// Unmapped ports read as 0xFF (a floating ISA bus); nothing is recorded about them, since a guest
    /// probing for hardware it may not have is normal.
    pub fn io_in(&mut self, port: u16, data: &mut [u8], time: &mut dyn TimeSource) {
        let mut time = AccessTime::new(time);
        for (i, byte) in (0..).zip(data.iter_mut()) {
            // An access at the top of the port space wraps around rather than overflowing.
            let port = port.wrapping_add(i);
            *byte = match port {
                0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1 => self.pic.io_read(port),
                0x40..=0x43 | 0x61 => self.pit.io_read_with(port, &mut || time.monotonic()),
                0x70 | 0x71 => self.rtc.io_read_with(port, &mut || time.wall()),
                COM1_BASE..=COM1_LAST => self.uart.io_read((port - COM1_BASE) as u8),
                // QEMU's isa-debug-exit reads as zero.
                DEBUG_EXIT_BASE..=DEBUG_EXIT_LAST => 0,
                _ => 0xFF,
            };
        }
    }

    /// A guest `out` of `data` (little-endian, 1, 2 or 4 bytes) to `port`.
    ///
    /// Byte devices see a multi-byte access as consecutive byte writes; isa-debug-exit takes the whole
    /// value. Writes to unmapped ports are dropped (nothing is recorded, as for reads).
    pub fn io_out(&mut self, port: u16, data: &[u8], time: &mut dyn TimeSource) {
        if (DEBUG_EXIT_BASE..=DEBUG_EXIT_LAST).contains(&port) {
            let mut value = [0u8; 4];
            for (dst, src) in value.iter_mut().zip(data) {
                *dst = *src;
            }
            self.debug_exit.write(u32::from_le_bytes(value));
            return;
        }
        let mut time = AccessTime::new(time);
        for (i, &byte) in (0..).zip(data) {
            let port = port.wrapping_add(i);
            match port {
                0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1 => self.pic.io_write(port, byte),
                0x40..=0x43 | 0x61 => self.pit.io_write_with(port, byte, &mut || time.monotonic()),
                0x70 | 0x71 => self.rtc.io_write_with(port, byte, &mut || time.wall()),
                COM1_BASE..=COM1_LAST => self.uart.io_write((port - COM1_BASE) as u8, byte),
                _ => {}
            }
        }
    }

    /// Whether delivering these inputs (a timer edge on IRQ 0, bytes into the UART) would leave an
    /// interrupt pending at the PIC, worked out on copies: the devices are not changed.
    pub fn interrupt_after(&self, timer_edge: bool, serial: &[u8]) -> bool {
        let mut pic = self.pic.clone();
        if timer_edge {
            pic.pulse_irq(0);
        }
        if !serial.is_empty() {
            let mut uart = self.uart.clone();
            uart.push_rx(serial);
            if uart.take_irq() {
                pic.pulse_irq(COM1_IRQ);
            }
        }
        pic.has_interrupt()
    }

    /// Moves interrupt edges raised by devices into the PIC; the machine calls it after every I/O and
    /// after feeding the UART.
    /// Returns the lines it pulsed (bit n for IRQ n), for a machine that also has an IOAPIC.
    pub fn sync_irqs(&mut self) -> u16 {
        let mut lines = 0;
        if self.uart.take_irq() {
            self.pic.pulse_irq(COM1_IRQ);
            lines |= 1 << COM1_IRQ;
        }
        for (disk, irq) in self.disks.iter_mut().zip(VIRTIO_BLK_IRQS) {
            if disk.take_irq() {
                self.pic.pulse_irq(irq);
                lines |= 1 << irq;
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that counts how often it is read.
    #[derive(Default)]
    struct CountingTime {
        now: u64,
        wall: u64,
        monotonic_reads: u32,
        wall_reads: u32,
    }

    impl TimeSource for CountingTime {
        fn monotonic_ns(&mut self) -> u64 {
            self.monotonic_reads += 1;
            self.now
        }
        fn wall_ns(&mut self) -> u64 {
            self.wall_reads += 1;
            self.wall
        }
    }

    impl CountingTime {
        fn reads(&self) -> (u32, u32) {
            (self.monotonic_reads, self.wall_reads)
        }
    }

    fn inb(dev: &mut Devices, port: u16, time: &mut CountingTime) -> u8 {
        let mut data = [0u8];
        dev.io_in(port, &mut data, time);
        data[0]
    }

    fn outb(dev: &mut Devices, port: u16, value: u8, time: &mut CountingTime) {
        dev.io_out(port, &[value], time);
    }

    #[test]
    fn uart_access_does_not_read_the_clock() {
        let mut dev = Devices::new(64 << 20);
        let mut time = CountingTime::default();
        for offset in 0..8 {
            inb(&mut dev, 0x3F8 + offset, &mut time);
        }
        outb(&mut dev, 0x3F8, b'A', &mut time);
        outb(&mut dev, 0x3F9, 0x01, &mut time);
        assert_eq!(time.reads(), (0, 0));
        assert_eq!(dev.uart.take_output(), b"A");
    }

    #[test]
    fn clock_is_read_only_when_needed() {
        let mut dev = Devices::new(64 << 20);
        let mut time = CountingTime {
            now: 1_000_000,
            wall: 1_795_527_907_000_000_000,
            ..Default::default()
        };

        // PIC, unmapped ports, CMOS RAM and control words: no time.
        outb(&mut dev, 0x21, 0xFE, &mut time);
        inb(&mut dev, 0x20, &mut time);
        inb(&mut dev, 0x80, &mut time);
        outb(&mut dev, 0x80, 0x00, &mut time);
        outb(&mut dev, 0x70, 0x15, &mut time);
        inb(&mut dev, 0x71, &mut time);
        outb(&mut dev, 0x43, 0x34, &mut time);
        outb(&mut dev, 0x40, 0x9C, &mut time);
        assert_eq!(time.reads(), (0, 0));

        // The count load reads the monotonic clock once.
        outb(&mut dev, 0x40, 0x2E, &mut time);
        assert_eq!(time.reads(), (1, 0));
        // Port 0x61 shows channel 2's OUT; unprogrammed, it does not depend on the time.
        inb(&mut dev, 0x61, &mut time);
        assert_eq!(time.reads(), (1, 0));
        // A 16-bit read spanning two counting channels reads the clock once for both bytes.
        dev.io_out(0x43, &[0x54], &mut time);
        dev.io_out(0x41, &[0x12], &mut time);
        assert_eq!(time.reads(), (2, 0));
        let mut word = [0u8; 2];
        dev.io_in(0x40, &mut word, &mut time);
        assert_eq!(time.reads(), (3, 0));
        // Latched counts need no time: read-back latches channels 0 and 1 with one reading.
        outb(&mut dev, 0x43, 0xD6, &mut time);
        assert_eq!(time.reads(), (4, 0));
        dev.io_in(0x40, &mut word, &mut time);
        assert_eq!(time.reads(), (4, 0));

        // An RTC clock register reads the wall clock.
        outb(&mut dev, 0x70, 0x00, &mut time);
        assert_eq!(time.reads(), (4, 0));
        assert_eq!(inb(&mut dev, 0x71, &mut time), 0x07);
        assert_eq!(time.reads(), (4, 1));
        // `outw 0x70` goes byte by byte: index, then a clock write, which needs the time.
        dev.io_out(0x70, &[0x09, 0x55], &mut time);
        assert_eq!(time.reads(), (4, 2));
        assert_eq!(inb(&mut dev, 0x71, &mut time), 0x55);
    }

    #[test]
    fn port_dispatch() {
        let mut dev = Devices::new(32 << 20);
        let mut time = CountingTime::default();

        // Unmapped: reads float high, writes vanish.
        let mut data = [0u8; 4];
        dev.io_in(0x1234, &mut data, &mut time);
        assert_eq!(data, [0xFF; 4]);
        dev.io_out(0x1234, &[1, 2, 3, 4], &mut time);

        // PIC mask, CMOS memory size, PIT status.
        outb(&mut dev, 0xA1, 0x5A, &mut time);
        assert_eq!(inb(&mut dev, 0xA1, &mut time), 0x5A);
        outb(&mut dev, 0x70, 0x34, &mut time);
        assert_eq!(inb(&mut dev, 0x71, &mut time), 0x00);
        outb(&mut dev, 0x70, 0x35, &mut time);
        assert_eq!(inb(&mut dev, 0x71, &mut time), 0x01);
        outb(&mut dev, 0x43, 0xE2, &mut time);
        assert_eq!(inb(&mut dev, 0x40, &mut time), 0xF6);

        // UART scratch register at COM1 + 7; a 16-bit access spans two registers.
        dev.io_out(0x3FE, &[0x11, 0x22], &mut time);
        assert_eq!(inb(&mut dev, 0x3FF, &mut time), 0x22);

        // isa-debug-exit takes the whole value at any of its ports and reads as zero.
        assert_eq!(dev.debug_exit.take_exit(), None);
        dev.io_out(0xF4, &[0x10, 0, 0, 0], &mut time);
        assert_eq!(dev.debug_exit.take_exit(), Some(0x21));
        dev.io_out(0xF4, &[0x34, 0x12], &mut time);
        assert_eq!(dev.debug_exit.take_exit(), Some(0x2469));
        outb(&mut dev, 0xF4, 0x01, &mut time);
        assert_eq!(dev.debug_exit.take_exit(), Some(3));
        dev.io_in(0xF4, &mut data, &mut time);
        assert_eq!(data, [0; 4]);

        // An access at the top of the port space does not overflow.
        dev.io_in(0xFFFF, &mut data, &mut time);
        dev.io_out(0xFFFF, &[1, 2, 3, 4], &mut time);
        assert_eq!(time.reads(), (0, 0));
    }

    #[test]
    fn uart_interrupt_reaches_pic() {
        let mut dev = Devices::new(32 << 20);
        let mut time = CountingTime::default();
        // Remap as a guest does and unmask IRQ 4.
        for (port, value) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xEF),
        ] {
            outb(&mut dev, port, value, &mut time);
        }
        outb(&mut dev, 0x3F9, 0x01, &mut time);
        dev.sync_irqs();
        assert!(!dev.pic.has_interrupt());
        assert_eq!(dev.uart.push_rx(b"k"), 1);
        dev.sync_irqs();
        assert!(dev.pic.has_interrupt());
        assert_eq!(dev.pic.acknowledge(), Some(0x24));
        assert_eq!(inb(&mut dev, 0x3FA, &mut time) & 0x0F, 0x04);
        assert_eq!(inb(&mut dev, 0x3F8, &mut time), b'k');
        outb(&mut dev, 0x20, 0x20, &mut time);

        // A second byte after the EOI interrupts again.
        dev.uart.push_rx(b"j");
        dev.sync_irqs();
        assert_eq!(dev.pic.acknowledge(), Some(0x24));
    }

    #[test]
    fn checkpoint_round_trip() {
        let mut dev = Devices::new(128 << 20);
        let mut time = CountingTime {
            now: 5_000_000,
            wall: 1_000_000_000_000_000_000,
            ..Default::default()
        };
        for (port, value) in [
            (0x43, 0x34),
            (0x40, 0xA9),
            (0x40, 0x04),
            (0x3F9, 0x03),
            (0x3F8, b'x'),
            (0x70, 0x0B),
        ] {
            outb(&mut dev, port, value, &mut time);
        }
        outb(&mut dev, 0x71, 0x86, &mut time);
        dev.uart.push_rx(b"in");
        let bytes = postcard::to_allocvec(&dev).unwrap();
        let mut back: Devices = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, dev);

        // Identical behaviour afterwards.
        let run = |dev: &mut Devices| {
            let mut time = CountingTime {
                now: 9_000_000,
                wall: 1_000_000_007_000_000_000,
                ..Default::default()
            };
            let mut out = vec![];
            for port in [0x40, 0x40, 0x71, 0x3F8, 0x3FA, 0x3FD] {
                out.push(inb(dev, port, &mut time));
            }
            dev.sync_irqs();
            out.extend(dev.uart.take_output());
            out.push(u8::from(dev.pic.has_interrupt()));
            out.extend(dev.pit.irq0_edges(0, 20_000_000).to_le_bytes());
            (out, time.reads())
        };
        let original = run(&mut dev);
        assert_eq!(original.1, (2, 0));
        assert_eq!(original.0.len(), 16);
        assert_eq!(run(&mut back), original);
        assert_eq!(back, dev);
    }
}
