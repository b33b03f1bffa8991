//! An 82093AA-style I/O APIC with 24 input pins, at the address every PC OS expects (0xFEC00000).
//!
//! The guest programs it through two MMIO registers: IOREGSEL (offset 0x00) selects an indirect
//! register and IOWIN (0x10) reads or writes it. The indirect registers are the ID, the version, the
//! arbitration ID and the redirection table, two 32-bit halves per pin, which says for each pin which
//! vector to send, how and to which local APIC(s).
//!
//! The machine drives the input pins with [`Ioapic::set_irq`] (the level on the wire: wires start
//! low, and an active-low pin is asserted while its wire is low, so the machine keeps an idle
//! active-low line high). An edge-triggered pin sends its interrupt on an asserting edge while
//! unmasked; a level-triggered pin sends while asserted and unmasked, then sets remote IRR and stays
//! quiet until the local APIC's EOI broadcast ([`Ioapic::end_of_interrupt`]). SMI, NMI, INIT and
//! ExtINT always act edge-triggered, as the datasheet has them. What is sent is queued as
//! [`Delivery`] messages for the machine to take with [`Ioapic::take_deliveries`] and hand to its
//! local APICs: picking the destination APIC(s), lowest-priority arbitration included, is their
//! business, not the IOAPIC's.
//!
//! Left out or simplified, as no guest we run depends on it:
//! - the EOI register at 0x40 of version 0x20 parts: an OS only writes it when its local APICs
//!   suppress the EOI broadcast, and ours will not offer that;
//! - the delivery status bit always reads 0: messages are handed over at once, so none ever waits
//!   for the APIC bus, which is what the bit shows on hardware;
//! - the APIC bus itself: the ID and arbitration ID are stored and read back but used for nothing;
//! - the two reserved delivery mode encodings send nothing (no local APIC would accept them);
//! - reserved bits of the redirection entries are not stored and read as 0.

use serde::{Deserialize, Serialize};

/// Guest physical address of the register window.
pub const BASE: u64 = 0xFEC0_0000;
/// Bytes of the window the IOAPIC decodes (IOREGSEL at 0x00, IOWIN at 0x10).
pub const MMIO_SIZE: u64 = 0x20;
/// Input pins, i.e. redirection table entries.
pub const PINS: u8 = 24;

/// Offset of IOREGSEL, the indirect register select.
const IOREGSEL: u64 = 0x00;
/// Offset of IOWIN, the window onto the selected register.
const IOWIN: u64 = 0x10;

/// Indirect register: IOAPIC ID in bits 24-27.
const REG_ID: u8 = 0x00;
/// Indirect register: version and highest redirection entry index.
const REG_VERSION: u8 = 0x01;
/// Indirect register: arbitration ID in bits 24-27.
const REG_ARBITRATION: u8 = 0x02;
/// Indirect register of pin 0's low half; pin n's halves are at `REG_TABLE + 2n` and `+ 2n + 1`.
const REG_TABLE: u8 = 0x10;

/// The version register: version 0x20 with the highest entry index (23) in bits 16-23.
const VERSION: u32 = 0x20 | ((PINS as u32 - 1) << 16);

// Flags of an entry's low half (bit 12, delivery status, is not stored: see the module doc).
/// Bit 11: logical destination mode.
const DEST_LOGICAL: u32 = 1 << 11;
/// Bit 13: active-low polarity.
const ACTIVE_LOW: u32 = 1 << 13;
/// Bit 14: remote IRR (read-only).
const REMOTE_IRR: u32 = 1 << 14;
/// Bit 15: level-triggered.
const LEVEL: u32 = 1 << 15;
/// Bit 16: masked.
const MASKED: u32 = 1 << 16;

/// How a local APIC is to take an interrupt (the entry's bits 8-10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// The vector, to every destination APIC (0b000).
    Fixed,
    /// The vector, to the destination APIC running at the lowest priority (0b001).
    LowestPriority,
    /// A system management interrupt (0b010).
    Smi,
    /// A non-maskable interrupt (0b100).
    Nmi,
    /// An INIT (0b101).
    Init,
    /// An external interrupt: the CPU takes the vector from an 8259 acknowledge cycle (0b111).
    ExtInt,
}

impl DeliveryMode {
    /// The mode encoded in the 3-bit field `bits`; None for the reserved encodings 0b011 and 0b110.
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }

    /// Whether the mode can be level-triggered: only vectored interrupts end with an EOI, and the
    /// datasheet treats NMI and INIT as edge-triggered whatever the trigger bit says (SMI and ExtINT
    /// must be programmed edge-triggered), so the others could never clear remote IRR.
    fn can_be_level(self) -> bool {
        matches!(self, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
    }
}

/// How an entry's destination field is read (bit 11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestinationMode {
    /// The destination is one local APIC ID.
    Physical,
    /// The destination is a set of local APICs, matched against their logical destination registers.
    Logical,
}

/// One redirection table entry: how a pin's interrupt is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectionEntry {
    /// Bits 0-7: the vector.
    pub vector: u8,
    /// Bits 8-10 as written; [`DeliveryMode::from_bits`] decodes them. Kept raw so that the register
    /// reads back what the guest wrote, reserved encodings included.
    pub delivery_mode: u8,
    /// Bit 11: physical or logical destination.
    pub dest_mode: DestinationMode,
    /// Bit 13: the pin is asserted when its wire is low.
    pub active_low: bool,
    /// Bit 14 (read-only): a level-triggered interrupt was sent and its EOI has not come yet.
    pub remote_irr: bool,
    /// Bit 15: level-triggered rather than edge-triggered.
    pub level_triggered: bool,
    /// Bit 16: masked; the pin sends nothing.
    pub masked: bool,
    /// Bits 56-63: the destination APIC ID (physical) or set of APICs (logical).
    pub dest: u8,
}

impl RedirectionEntry {
    /// The entry at reset: masked, everything else zero.
    const RESET: RedirectionEntry = RedirectionEntry {
        vector: 0,
        delivery_mode: 0,
        dest_mode: DestinationMode::Physical,
        active_low: false,
        remote_irr: false,
        level_triggered: false,
        masked: true,
        dest: 0,
    };

    /// The low half as the guest reads it.
    fn low(&self) -> u32 {
        let flag = |set: bool, bit: u32| if set { bit } else { 0 };
        u32::from(self.vector)
            | u32::from(self.delivery_mode) << 8
            | flag(self.dest_mode == DestinationMode::Logical, DEST_LOGICAL)
            | flag(self.active_low, ACTIVE_LOW)
            | flag(self.remote_irr, REMOTE_IRR)
            | flag(self.level_triggered, LEVEL)
            | flag(self.masked, MASKED)
    }

    /// The high half as the guest reads it.
    fn high(&self) -> u32 {
        u32::from(self.dest) << 24
    }

    /// A guest write of the low half; delivery status and remote IRR are read-only.
    fn write_low(&mut self, value: u32) {
        self.vector = value as u8;
        self.delivery_mode = (value >> 8) as u8 & 7;
        self.dest_mode = if value & DEST_LOGICAL != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        };
        self.active_low = value & ACTIVE_LOW != 0;
        self.level_triggered = value & LEVEL != 0;
        self.masked = value & MASKED != 0;
        // No EOI comes for a pin that is not level-triggered, so a bit left over from level mode
        // would block the pin for good once it is made level-triggered again.
        if !self.is_level() {
            self.remote_irr = false;
        }
    }

    /// Whether the pin really behaves as level-triggered (see [`DeliveryMode::can_be_level`]).
    fn is_level(&self) -> bool {
        self.level_triggered
            && DeliveryMode::from_bits(self.delivery_mode).is_some_and(DeliveryMode::can_be_level)
    }
}

/// An interrupt message sent to the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The vector (meaningless for SMI, NMI, INIT and ExtINT).
    pub vector: u8,
    /// How the destination APIC(s) take it.
    pub mode: DeliveryMode,
    /// How `dest` is read.
    pub dest_mode: DestinationMode,
    /// The destination APIC ID or set of APICs.
    pub dest: u8,
    /// Level-triggered: the accepting local APIC sets the vector's TMR bit, so that its EOI is
    /// broadcast back to [`Ioapic::end_of_interrupt`], which clears the pin's remote IRR.
    pub level_triggered: bool,
    /// The pin that sent it.
    pub pin: u8,
}

/// The I/O APIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ioapic {
    /// IOREGSEL: the indirect register IOWIN shows.
    select: u8,
    /// The 4-bit IOAPIC ID.
    id: u8,
    /// The redirection table, pin 0 first.
    table: [RedirectionEntry; PINS as usize],
    /// Wire levels as last driven (bit n is pin n), before polarity.
    wires: u32,
    /// Messages sent and not yet taken by the machine.
    deliveries: Vec<Delivery>,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// The IOAPIC after reset: ID 0, every pin masked, every wire low.
    pub fn new() -> Self {
        Ioapic {
            select: 0,
            id: 0,
            table: [RedirectionEntry::RESET; PINS as usize],
            wires: 0,
            deliveries: Vec::new(),
        }
    }

    /// A guest read of `data.len()` bytes at `offset` into the window. Reading has no side effects, so
    /// each byte simply reads its lane: IOREGSEL in byte 0x00, the selected register in 0x10-0x13, and
    /// 0 everywhere else (reserved bytes, and offsets outside the window).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = match offset.checked_add(i) {
                Some(IOREGSEL) => self.select,
                Some(at @ IOWIN..=0x13) => {
                    self.read_register().to_le_bytes()[(at - IOWIN) as usize]
                }
                _ => 0,
            };
        }
    }

    /// A guest write of `data` at `offset` into the window. IOREGSEL is an 8-bit register, so any
    /// write starting at 0x00 sets it from its first byte. IOWIN takes only whole aligned dwords (a
    /// qword write reaches it as its low dword); other writes are dropped, as the data register
    /// ignores partial accesses.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (IOREGSEL, [select, ..]) => self.select = *select,
            (IOWIN, [a, b, c, d]) | (IOWIN, [a, b, c, d, _, _, _, _]) => {
                self.write_register(u32::from_le_bytes([*a, *b, *c, *d]));
            }
            _ => {}
        }
    }

    /// Drives pin `pin`'s wire to `level` (true = high); an active-low pin is asserted while low.
    /// Pins beyond the 24th do not exist and are ignored.
    pub fn set_irq(&mut self, pin: u8, level: bool) {
        let Some(&entry) = self.table.get(usize::from(pin)) else {
            return;
        };
        let was_asserted = self.asserted(pin);
        self.wires = self.wires & !(1 << pin) | u32::from(level) << pin;
        if entry.is_level() {
            self.service_level(pin);
        } else if !was_asserted && self.asserted(pin) && !entry.masked {
            // An edge that arrives while the pin is masked is lost, as on hardware.
            self.send(pin);
        }
    }

    /// Raises then lowers `pin`'s wire: one pulse, as a pulse-driven source such as the PIT produces
    /// from a wire that idles low. An edge-triggered pin sees one asserting edge whatever its polarity
    /// (an active-low one on the falling edge).
    pub fn pulse_irq(&mut self, pin: u8) {
        self.set_irq(pin, true);
        self.set_irq(pin, false);
    }

    /// A local APIC's EOI broadcast for `vector`: every pin with that vector and remote IRR set is
    /// released, and sends again at once if its line is still asserted and unmasked.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..PINS {
            let entry = &mut self.table[usize::from(pin)];
            if entry.remote_irr && entry.vector == vector {
                entry.remote_irr = false;
                self.service_level(pin);
            }
        }
    }

    /// The messages sent since the last call, oldest first.
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.deliveries)
    }

    /// Pin `pin`'s redirection entry, None beyond the last pin.
    pub fn entry(&self, pin: u8) -> Option<&RedirectionEntry> {
        self.table.get(usize::from(pin))
    }

    /// Whether `pin` (a valid pin) is asserted: its wire level seen through its polarity.
    fn asserted(&self, pin: u8) -> bool {
        ((self.wires >> pin) & 1 != 0) != self.table[usize::from(pin)].active_low
    }

    /// Sends a level-triggered pin's interrupt if it is asserted, unmasked and not awaiting an EOI.
    /// Hardware keeps evaluating this condition, so it is checked whenever one of its inputs changes.
    fn service_level(&mut self, pin: u8) {
        let entry = &self.table[usize::from(pin)];
        if entry.is_level() && !entry.masked && !entry.remote_irr && self.asserted(pin) {
            self.send(pin);
        }
    }

    /// Queues `pin`'s message; a level-triggered one sets remote IRR until its EOI.
    fn send(&mut self, pin: u8) {
        let entry = &mut self.table[usize::from(pin)];
        let Some(mode) = DeliveryMode::from_bits(entry.delivery_mode) else {
            return;
        };
        let level_triggered = entry.is_level();
        entry.remote_irr |= level_triggered;
        self.deliveries.push(Delivery {
            vector: entry.vector,
            mode,
            dest_mode: entry.dest_mode,
            dest: entry.dest,
            level_triggered,
            pin,
        });
    }

    /// The pin and half (true = high) of redirection register `select`, None if it is not one.
    fn table_register(select: u8) -> Option<(u8, bool)> {
        let index = select.checked_sub(REG_TABLE)?;
        (index / 2 < PINS).then_some((index / 2, index & 1 != 0))
    }

    /// The indirect register IOREGSEL selects; unimplemented ones read as 0.
    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << 24,
            REG_VERSION => VERSION,
            select => match Self::table_register(select) {
                Some((pin, false)) => self.table[usize::from(pin)].low(),
                Some((pin, true)) => self.table[usize::from(pin)].high(),
                None => 0,
            },
        }
    }

    /// A write to the indirect register IOREGSEL selects; read-only and unimplemented ones ignore it.
    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = (value >> 24) as u8 & 0x0F,
            select => match Self::table_register(select) {
                Some((pin, false)) => {
                    self.table[usize::from(pin)].write_low(value);
                    // Unmasking (or re-polarising) an asserted level-triggered pin sends at once.
                    self.service_level(pin);
                }
                Some((pin, true)) => self.table[usize::from(pin)].dest = (value >> 24) as u8,
                None => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_reg(io: &mut Ioapic, reg: u8, value: u32) {
        io.write(IOREGSEL, &[reg]);
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, reg: u8) -> u32 {
        io.write(IOREGSEL, &[reg]);
        let mut data = [0; 4];
        io.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    /// The redirection register of `pin`'s low half.
    fn lo(pin: u8) -> u8 {
        REG_TABLE + 2 * pin
    }

    /// Programs `pin` as a guest does: destination (high half) first, then the low half.
    fn program(io: &mut Ioapic, pin: u8, low: u32, dest: u8) {
        write_reg(io, lo(pin) + 1, u32::from(dest) << 24);
        write_reg(io, lo(pin), low);
    }

    fn fixed(pin: u8, vector: u8, dest: u8, level_triggered: bool) -> Delivery {
        let (mode, dest_mode) = (DeliveryMode::Fixed, DestinationMode::Physical);
        Delivery {
            vector,
            mode,
            dest_mode,
            dest,
            level_triggered,
            pin,
        }
    }

    #[test]
    fn reset_state_and_registers() {
        let mut io = Ioapic::new();
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        assert_eq!(read_reg(&mut io, REG_ID), 0);
        for pin in 0..PINS {
            assert_eq!(read_reg(&mut io, lo(pin)), MASKED, "pin {pin}");
            assert_eq!(read_reg(&mut io, lo(pin) + 1), 0);
            io.pulse_irq(pin);
            io.set_irq(pin, true);
        }
        assert_eq!(io.take_deliveries(), [], "every pin is masked");
        let mut data = [0xAA; 4];
        io.read(IOREGSEL, &mut data);
        assert_eq!(data, [lo(23) + 1, 0, 0, 0], "IOREGSEL reads back");

        // Only ID bits 24-27 are writable; arbitration reads the ID; version is read-only.
        write_reg(&mut io, REG_ID, u32::MAX);
        write_reg(&mut io, REG_VERSION, 0);
        write_reg(&mut io, REG_ARBITRATION, 0);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0F00_0000);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0F00_0000);
        assert_eq!(read_reg(&mut io, REG_VERSION), VERSION);

        // Pin 5: vector 0x31, lowest priority, logical, active low, level, masked, reserved bits set.
        write_reg(&mut io, lo(5) + 1, 0xA5FF_FFFF);
        write_reg(&mut io, lo(5), 0xFFFF_A931);
        assert_eq!(read_reg(&mut io, lo(5) + 1), 0xA500_0000);
        assert_eq!(read_reg(&mut io, lo(5)), 0x0001_A931);
        let e = *io.entry(5).unwrap();
        assert_eq!([e.vector, e.delivery_mode, e.dest], [0x31, 1, 0xA5]);
        assert_eq!(e.dest_mode, DestinationMode::Logical);
        assert!(e.active_low && e.level_triggered && e.masked && !e.remote_irr);
        assert_eq!(io.entry(4), Some(&RedirectionEntry::RESET), "its neighbour");
    }

    #[test]
    fn read_only_bits() {
        let mut io = Ioapic::new();
        program(&mut io, 3, LEVEL | 0x40 | 1 << 12 | REMOTE_IRR, 1);
        assert_eq!(read_reg(&mut io, lo(3)), LEVEL | 0x40, "not settable");
        io.set_irq(3, true);
        assert_eq!(io.take_deliveries(), [fixed(3, 0x40, 1, true)]);
        write_reg(&mut io, lo(3), LEVEL | 0x40);
        // ... nor clearable.
        assert_eq!(read_reg(&mut io, lo(3)), LEVEL | REMOTE_IRR | 0x40);
        assert_eq!(io.take_deliveries(), []);
        // Switching to edge drops remote IRR; back to level, the asserted line sends again.
        write_reg(&mut io, lo(3), 0x40);
        assert_eq!(read_reg(&mut io, lo(3)), 0x40);
        write_reg(&mut io, lo(3), LEVEL | 0x40);
        assert_eq!(io.take_deliveries(), [fixed(3, 0x40, 1, true)]);
    }

    #[test]
    fn edge_pins_send_on_rising_edges_while_unmasked() {
        let mut io = Ioapic::new();
        program(&mut io, 2, 0x30, 0);
        io.set_irq(2, true);
        assert_eq!(io.take_deliveries(), [fixed(2, 0x30, 0, false)]);
        io.set_irq(2, true);
        io.set_irq(2, false);
        assert_eq!(io.take_deliveries(), [], "held level, falling edge");
        for _ in 0..3 {
            io.pulse_irq(2);
        }
        assert_eq!(io.take_deliveries(), [fixed(2, 0x30, 0, false); 3]);
        assert_eq!(read_reg(&mut io, lo(2)), 0x30, "no remote IRR");

        // An edge while masked is lost: unmasking the raised line sends nothing.
        write_reg(&mut io, lo(2), MASKED | 0x30);
        io.pulse_irq(2);
        io.set_irq(2, true);
        write_reg(&mut io, lo(2), 0x30);
        assert_eq!(io.take_deliveries(), []);
        io.set_irq(2, false);
        io.set_irq(2, true);
        assert_eq!(io.take_deliveries(), [fixed(2, 0x30, 0, false)]);

        // The message carries the entry's routing.
        program(&mut io, 7, DEST_LOGICAL | 1 << 8 | 0x47, 0x0C);
        io.pulse_irq(7);
        let mut expected = fixed(7, 0x47, 0x0C, false);
        expected.mode = DeliveryMode::LowestPriority;
        expected.dest_mode = DestinationMode::Logical;
        assert_eq!(io.take_deliveries(), [expected]);
    }

    #[test]
    fn level_pins_wait_for_eoi() {
        let mut io = Ioapic::new();
        program(&mut io, 9, LEVEL | 0x51, 2);
        program(&mut io, 10, LEVEL | 0x51, 3);
        io.set_irq(9, true);
        assert_eq!(io.take_deliveries(), [fixed(9, 0x51, 2, true)]);
        io.set_irq(9, true);
        io.set_irq(9, false);
        io.set_irq(9, true);
        assert_eq!(io.take_deliveries(), [], "remote IRR holds the pin");
        io.end_of_interrupt(0x52);
        assert!(io.entry(9).unwrap().remote_irr, "another vector's EOI");
        io.end_of_interrupt(0x51);
        // Still asserted: the EOI lets it send again.
        assert_eq!(io.take_deliveries(), [fixed(9, 0x51, 2, true)]);
        assert_eq!(read_reg(&mut io, lo(9)), LEVEL | REMOTE_IRR | 0x51);
        io.set_irq(9, false);
        io.end_of_interrupt(0x51);
        assert_eq!(io.take_deliveries(), []);
        assert_eq!(read_reg(&mut io, lo(9)), LEVEL | 0x51);
        io.set_irq(9, true);
        assert_eq!(io.take_deliveries(), [fixed(9, 0x51, 2, true)]);

        // One EOI releases every pin with the vector; only the asserted one sends again.
        io.set_irq(10, true);
        assert_eq!(io.take_deliveries(), [fixed(10, 0x51, 3, true)]);
        io.set_irq(9, false);
        io.end_of_interrupt(0x51);
        assert_eq!(io.take_deliveries(), [fixed(10, 0x51, 3, true)]);
        assert_eq!(read_reg(&mut io, lo(9)), LEVEL | 0x51);
        assert_eq!(read_reg(&mut io, lo(10)), LEVEL | REMOTE_IRR | 0x51);
    }

    #[test]
    fn polarity_inverts_the_wire() {
        let mut io = Ioapic::new();
        // Active-low edge pin: the wire's falling edge asserts it; programming is no edge.
        program(&mut io, 4, ACTIVE_LOW | 0x24, 0);
        io.set_irq(4, true);
        assert_eq!(io.take_deliveries(), []);
        io.set_irq(4, false);
        assert_eq!(io.take_deliveries(), [fixed(4, 0x24, 0, false)]);
        io.pulse_irq(4);
        assert_eq!(io.take_deliveries(), [fixed(4, 0x24, 0, false)]);

        // Active-low level pin: idle while the wire is high, asserted while it is low.
        program(&mut io, 12, MASKED | LEVEL | ACTIVE_LOW | 0x3C, 1);
        io.set_irq(12, true);
        write_reg(&mut io, lo(12), LEVEL | ACTIVE_LOW | 0x3C);
        assert_eq!(io.take_deliveries(), []);
        io.set_irq(12, false);
        assert_eq!(io.take_deliveries(), [fixed(12, 0x3C, 1, true)]);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_sends() {
        let mut io = Ioapic::new();
        program(&mut io, 16, MASKED | LEVEL | 0x60, 0);
        io.set_irq(16, true);
        assert_eq!(io.take_deliveries(), []);
        write_reg(&mut io, lo(16), LEVEL | 0x60);
        assert_eq!(io.take_deliveries(), [fixed(16, 0x60, 0, true)]);
        // Masked at EOI time: released but silent until unmasked.
        write_reg(&mut io, lo(16), MASKED | LEVEL | 0x60);
        io.end_of_interrupt(0x60);
        assert_eq!(io.take_deliveries(), []);
        assert!(!io.entry(16).unwrap().remote_irr);
        write_reg(&mut io, lo(16), LEVEL | 0x60);
        assert_eq!(io.take_deliveries(), [fixed(16, 0x60, 0, true)]);
    }

    #[test]
    fn non_vectored_modes_are_edge_triggered() {
        let mut io = Ioapic::new();
        program(&mut io, 0, LEVEL | 4 << 8, 0);
        io.set_irq(0, true);
        let sent = io.take_deliveries();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].mode, DeliveryMode::Nmi);
        assert!(!sent[0].level_triggered);
        assert_eq!(read_reg(&mut io, lo(0)), LEVEL | 4 << 8, "no remote IRR");
        program(&mut io, 1, 7 << 8, 0);
        io.pulse_irq(1);
        assert_eq!(io.take_deliveries()[0].mode, DeliveryMode::ExtInt);
        // Reserved encodings read back but send nothing.
        program(&mut io, 1, 3 << 8 | 0x21, 0);
        io.pulse_irq(1);
        assert_eq!(io.take_deliveries(), []);
        assert_eq!(read_reg(&mut io, lo(1)), 3 << 8 | 0x21);
        assert_eq!((0..8).filter_map(DeliveryMode::from_bits).count(), 6);
    }

    #[test]
    fn out_of_range_pins_registers_and_offsets_are_harmless() {
        let mut io = Ioapic::new();
        program(&mut io, 23, LEVEL | 0x77, 9);
        io.set_irq(23, true);
        let before = io.clone();
        for pin in PINS..=u8::MAX {
            io.set_irq(pin, true);
            io.pulse_irq(pin);
            assert_eq!(io.entry(pin), None);
        }
        for reg in (0x03..REG_TABLE).chain(lo(PINS)..=u8::MAX) {
            write_reg(&mut io, reg, u32::MAX);
            assert_eq!(read_reg(&mut io, reg), 0, "register {reg:#x}");
        }
        for offset in [1, 4, 8, 0x14, 0x1F, 0x20, 0x40, 1 << 40, !3, !0] {
            io.write(offset, &[0xFF; 8]);
            let mut data = [0xAA; 8];
            io.read(offset, &mut data);
            assert_eq!(data, [0; 8], "offset {offset:#x}");
        }
        io.select = before.select;
        assert_eq!(io, before);
    }

    #[test]
    fn odd_sizes() {
        let mut io = Ioapic::new();
        io.write(IOREGSEL, &[REG_VERSION, 0x22]);
        io.write(0x01, &[0x10]);
        let mut data = [0xAA; 8];
        io.read(IOREGSEL, &mut data[..2]);
        // A word write selects by its low byte; a byte at 0x01 selects nothing.
        assert_eq!(data[..2], [REG_VERSION, 0]);
        io.read(0x12, &mut data[..1]);
        assert_eq!(data[0], 0x17, "IOWIN reads by byte lane");
        io.read(0x0C, &mut data);
        assert_eq!(data, [0, 0, 0, 0, 0x20, 0, 0x17, 0]);

        // IOWIN takes whole aligned dwords only; a qword gives it its low dword.
        io.write(IOREGSEL, &[lo(0)]);
        for len in [0, 1, 2, 3, 5, 6, 7] {
            io.write(IOWIN, &[0x30, 0, 0, 0, 0, 0, 0][..len]);
        }
        for offset in [0x11, 0x12, 0x13] {
            io.write(offset, &[0x30, 0, 0, 0]);
        }
        io.write(IOREGSEL, &[]);
        io.read(IOWIN, &mut []);
        assert_eq!(io.entry(0), Some(&RedirectionEntry::RESET));
        io.write(IOWIN, &[0x30, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(read_reg(&mut io, lo(0)), 0x30);
    }

    #[test]
    fn checkpoint_round_trip() {
        let mut io = Ioapic::new();
        write_reg(&mut io, REG_ID, 0x0200_0000);
        program(&mut io, 2, 0x30, 0);
        program(&mut io, 9, LEVEL | 0x51, 1);
        io.set_irq(9, true);
        io.pulse_irq(2);
        io.write(IOREGSEL, &[lo(9)]);
        let bytes = postcard::to_allocvec(&io).unwrap();
        let mut back: Ioapic = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, io);

        // The same behaviour afterwards: selected register, queued messages, remote IRR, wires.
        let run = |io: &mut Ioapic| {
            let mut data = [0; 4];
            io.read(IOWIN, &mut data);
            let mut sent = io.take_deliveries();
            io.end_of_interrupt(0x51);
            io.pulse_irq(2);
            sent.extend(io.take_deliveries());
            (data, sent)
        };
        let original = run(&mut io);
        assert_eq!(original.0, (LEVEL | REMOTE_IRR | 0x51).to_le_bytes());
        assert_eq!(original.1.len(), 4);
        assert_eq!(run(&mut back), original);
        assert_eq!(back, io);
    }
}
