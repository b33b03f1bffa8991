//! The 8259A programmable interrupt controller pair of the PC/AT: a master at ports 0x20/0x21 and a slave
//! at 0xA0/0xA1 whose output is wired to the master's IR2.
//!
//! The model follows the datasheet (and QEMU's i8259, which guests are tested against): edge-triggered
//! inputs latched into the IRR, fully nested priorities with optional rotation, specific and non-specific
//! EOI, automatic EOI, special mask mode, and the OCW3 register-select and poll commands.

use serde::{Deserialize, Serialize};

/// Master command port (ICW1, OCW2, OCW3; reads IRR/ISR).
const MASTER_CMD: u16 = 0x20;
/// Master data port (ICW2-4, OCW1; reads IMR).
const MASTER_DATA: u16 = 0x21;
/// Slave command port.
const SLAVE_CMD: u16 = 0xA0;
/// Slave data port.
const SLAVE_DATA: u16 = 0xA1;
/// Edge/level control registers of the PIIX/ICH south bridges.
const ELCR_MASTER: u16 = 0x4D0;
/// Edge/level control register for IRQ 8-15.
const ELCR_SLAVE: u16 = 0x4D1;

/// Lines of the pair: IRQ 0-7 on the master, 8-15 on the slave.
pub const IRQ_LINES: u8 = 16;
/// The master input the slave's INT output is wired to.
const CASCADE_IR: u8 = 2;
/// The IR line an 8259A reports when a request vanished before the acknowledge cycle.
const SPURIOUS_IR: u8 = 7;

/// Where a chip is in its initialization sequence (ICW1 starts it; ICW2-4 go to the data port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum InitStep {
    /// Initialized: data port writes are OCW1 (the mask).
    Ready,
    /// Waiting for ICW2 (vector base).
    Icw2,
    /// Waiting for ICW3 (cascade wiring).
    Icw3,
    /// Waiting for ICW4 (mode bits).
    Icw4,
}

/// One 8259A.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Chip {
    /// Interrupt request register: requests latched on a rising edge and not yet acknowledged.
    irr: u8,
    /// In-service register: acknowledged interrupts not yet ended by an EOI.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Input line levels as last seen, for edge detection.
    levels: u8,
    /// ICW2: vector of IR0; IRn delivers `vector_base + n`.
    vector_base: u8,
    /// Position in the ICW sequence.
    init: InitStep,
    /// ICW1 IC4: an ICW4 follows.
    icw4_expected: bool,
    /// ICW1 SNGL: no ICW3, the chip is alone.
    single: bool,
    /// ICW4 AEOI: the acknowledge cycle ends the interrupt itself.
    auto_eoi: bool,
    /// OCW2 rotate-in-automatic-EOI mode.
    rotate_on_auto_eoi: bool,
    /// ICW4 SFNM: on the master, a slave request is not blocked by the slave's own in-service IR2.
    special_fully_nested: bool,
    /// OCW3 special mask mode: masked in-service levels no longer block lower priorities.
    special_mask: bool,
    /// OCW3 RIS: command-port reads return the ISR instead of the IRR.
    read_isr: bool,
    /// OCW3 P: the next read is a poll (acknowledges and returns the highest request).
    poll: bool,
    /// The IR line with the highest priority (rotation moves it).
    priority_base: u8,
}

impl Chip {
    /// A chip as ICW1 leaves it: nothing pending, nothing masked, IR0 highest priority.
    /// `levels` is the physical state of the input lines, which a reset does not change.
    fn reset(levels: u8) -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0,
            levels,
            vector_base: 0,
            init: InitStep::Ready,
            icw4_expected: false,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            priority_base: 0,
        }
    }

    /// A chip initialized with ICW4 (8086 mode, normal EOI, cascaded), vector base `base` and mask `imr`.
    fn initialized(base: u8, imr: u8) -> Self {
        Chip {
            vector_base: base & 0xF8,
            imr,
            ..Chip::reset(0)
        }
    }

    /// The IR line that has priority rank `rank` (0 = highest).
    fn line_of_rank(&self, rank: u8) -> u8 {
        rank.wrapping_add(self.priority_base) & 7
    }

    /// The priority rank (0 = highest) of the highest-priority line set in `mask`, or None if empty.
    fn best_rank(&self, mask: u8) -> Option<u8> {
        (0..8).find(|&rank| mask & (1 << self.line_of_rank(rank)) != 0)
    }

    /// The IR line this chip would interrupt with now (its INT output is high iff Some), following
    /// the fully nested mode: a request must beat every in-service level that still blocks.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let request = self.best_rank(self.irr & !self.imr)?;
        let mut blocking = self.isr;
        if self.special_mask {
            blocking &= !self.imr;
        }
        if self.special_fully_nested && is_master {
            // The slave arbitrates its own nesting, so an IRQ from it may interrupt another one.
            blocking &= !(1 << CASCADE_IR);
        }
        match self.best_rank(blocking) {
            Some(in_service) if in_service <= request => None,
            _ => Some(self.line_of_rank(request)),
        }
    }

    /// Drives input `line` (0-7) to `level`; a rising edge latches a request.
    fn set_input(&mut self, line: u8, level: bool) {
        let bit = 1 << (line & 7);
        if level {
            if self.levels & bit == 0 {
                self.irr |= bit;
            }
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }

    /// The acknowledge cycle for `line`: moves it from IRR to ISR (unless AEOI ends it at once).
    fn acknowledge(&mut self, line: u8) {
        let bit = 1 << (line & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_base = line.wrapping_add(1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        self.irr &= !bit;
    }

    /// A write to the command port: ICW1, OCW2 or OCW3.
    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1. LTIM (level-triggered mode, bit 3) is ignored: ISA interrupts are edge-triggered
            // and none of our devices holds a level.
            *self = Chip::reset(self.levels);
            self.init = InitStep::Icw2;
            self.icw4_expected = value & 0x01 != 0;
            self.single = value & 0x02 != 0;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            self.write_ocw2(value);
        }
    }

    /// OCW2: end-of-interrupt and priority rotation commands.
    fn write_ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            // Clear / set rotate in automatic EOI mode.
            0 => self.rotate_on_auto_eoi = false,
            4 => self.rotate_on_auto_eoi = true,
            // Non-specific EOI (5: and rotate): ends the highest-priority in-service level.
            cmd @ (1 | 5) => {
                if let Some(rank) = self.best_rank(self.isr) {
                    let line = self.line_of_rank(rank);
                    self.isr &= !(1 << line);
                    if cmd == 5 {
                        self.priority_base = line.wrapping_add(1) & 7;
                    }
                }
            }
            // Specific EOI.
            3 => self.isr &= !(1 << level),
            // Set priority: `level` becomes the lowest.
            6 => self.priority_base = level.wrapping_add(1) & 7,
            // Rotate on specific EOI.
            7 => {
                self.isr &= !(1 << level);
                self.priority_base = level.wrapping_add(1) & 7;
            }
            // 2: no operation.
            _ => {}
        }
    }

    /// A write to the data port: the next ICW during initialization, OCW1 (the mask) otherwise.
    fn write_data(&mut self, value: u8) {
        match self.init {
            InitStep::Ready => self.imr = value,
            InitStep::Icw2 => {
                // In 8086 mode the low three bits come from the IR number.
                self.vector_base = value & 0xF8;
                self.init = match (self.single, self.icw4_expected) {
                    (false, _) => InitStep::Icw3,
                    (true, true) => InitStep::Icw4,
                    (true, false) => InitStep::Ready,
                };
            }
            InitStep::Icw3 => {
                // The cascade wiring is fixed on a PC (slave on master IR2), so ICW3 carries no
                // information we need.
                self.init = if self.icw4_expected {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init = InitStep::Ready;
            }
        }
    }

    /// A read of the command port (`data_port` false) or data port: a poll if one was requested,
    /// else IRR/ISR (command) or IMR (data).
    fn read(&mut self, data_port: bool, is_master: bool) -> u8 {
        if self.poll {
            // The poll command is one-shot and acts as the acknowledge cycle.
            self.poll = false;
            return match self.pending(is_master) {
                Some(line) => {
                    self.acknowledge(line);
                    0x80 | line
                }
                None => 0,
            };
        }
        match (data_port, self.read_isr) {
            (true, _) => self.imr,
            (false, true) => self.isr,
            (false, false) => self.irr,
        }
    }
}

/// The master/slave 8259A pair.
///
/// IRQ lines 0-7 go to the master, 8-15 to the slave. All inputs are edge-triggered: a rising level
/// latches a request, which stays latched until acknowledged (or until the chip is re-initialized).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    /// The master, at 0x20/0x21, connected to the CPU.
    master: Chip,
    /// The slave, at 0xA0/0xA1, cascaded on master IR2.
    slave: Chip,
    /// The master's INT output has been high since the last acknowledge: the CPU may have started an
    /// acknowledge cycle, which the 8259A answers even if the request vanished in the meantime.
    intr_latched: bool,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// The pair as a PC BIOS leaves it: we boot the guest without a BIOS, yet images expect its setup
    /// (this is what SeaBIOS programs under QEMU): master vectors 0x08-0x0F, slave 0x70-0x77, and every
    /// line masked except the cascade, since no BIOS interrupt handlers exist to take them.
    pub fn new() -> Self {
        Pic {
            master: Chip::initialized(0x08, !(1 << CASCADE_IR)),
            slave: Chip::initialized(0x70, 0xFF),
            intr_latched: false,
        }
    }

    /// A guest read of `port` (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1; anything else reads 0xFF).
    pub fn io_read(&mut self, port: u16) -> u8 {
        let value = match port {
            MASTER_CMD | MASTER_DATA => self.master.read(port == MASTER_DATA, true),
            SLAVE_CMD | SLAVE_DATA => self.slave.read(port == SLAVE_DATA, false),
            // Every line is edge-triggered, and the ELCR says so.
            ELCR_MASTER | ELCR_SLAVE => 0,
            _ => 0xFF,
        };
        // A poll read acknowledges, which can change the outputs.
        self.update();
        value
    }

    /// A guest write of `value` to `port`. ELCR writes are ignored: all lines stay edge-triggered.
    pub fn io_write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => {
                if value & 0x10 != 0 {
                    // Re-initializing the master withdraws whatever it was signalling to the CPU.
                    self.intr_latched = false;
                }
                self.master.write_command(value);
            }
            MASTER_DATA => self.master.write_data(value),
            SLAVE_CMD => self.slave.write_command(value),
            SLAVE_DATA => self.slave.write_data(value),
            _ => {}
        }
        self.update();
    }

    /// Drives IRQ `line` (0-15) to `level`; a rising edge requests an interrupt. Line 2 is routed to
    /// IRQ 9 as on the PC/AT bus, because master IR2 is taken by the slave. Other lines are ignored.
    pub fn set_irq(&mut self, line: u8, level: bool) {
        match line {
            CASCADE_IR => self.slave.set_input(1, level),
            0..=7 => self.master.set_input(line, level),
            8..=15 => self.slave.set_input(line - 8, level),
            _ => return,
        }
        self.update();
    }

    /// Raises then lowers IRQ `line`: one edge, as a pulse-driven source (timer tick, UART) produces.
    pub fn pulse_irq(&mut self, line: u8) {
        self.set_irq(line, true);
        self.set_irq(line, false);
    }

    /// The master's INT output: an unmasked request beats everything in service.
    pub fn has_interrupt(&self) -> bool {
        self.master.pending(true).is_some()
    }

    /// The CPU's interrupt-acknowledge cycle: returns the vector and moves the request to in-service.
    ///
    /// If INT was raised since the last acknowledge but the request has gone since (masked, or the
    /// chip's priorities changed), the answer is a spurious IR7: master base + 7 without setting its
    /// ISR, or for a slave request slave base + 7 with master IR2 in service, as real hardware does.
    /// None if INT has not been raised at all since the last acknowledge.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = match self.master.pending(true) {
            Some(CASCADE_IR) => {
                let vector = match self.slave.pending(false) {
                    Some(line) => {
                        self.slave.acknowledge(line);
                        self.slave.vector_base.wrapping_add(line)
                    }
                    None => self.slave.vector_base.wrapping_add(SPURIOUS_IR),
                };
                self.master.acknowledge(CASCADE_IR);
                vector
            }
            Some(line) => {
                self.master.acknowledge(line);
                self.master.vector_base.wrapping_add(line)
            }
            None if self.intr_latched => self.master.vector_base.wrapping_add(SPURIOUS_IR),
            None => return None,
        };
        self.intr_latched = false;
        self.update();
        Some(vector)
    }

    /// Propagates the slave's INT output to master IR2 and notes a raised master INT.
    fn update(&mut self) {
        let slave_int = self.slave.pending(false).is_some();
        self.master.set_input(CASCADE_IR, slave_int);
        if self.has_interrupt() {
            self.intr_latched = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence Linux's init_8259A and most hobby kernels use, remapping to 0x20/0x28.
    fn linux_init(pic: &mut Pic, auto_eoi: bool) {
        pic.io_write(0x21, 0xFF);
        pic.io_write(0xA1, 0xFF);
        pic.io_write(0x20, 0x11); // ICW1: edge, cascade, ICW4 follows
        pic.io_write(0x21, 0x20); // ICW2: vectors 0x20-0x27
        pic.io_write(0x21, 0x04); // ICW3: slave on IR2
        pic.io_write(0x21, if auto_eoi { 0x03 } else { 0x01 }); // ICW4: 8086 mode
        pic.io_write(0xA0, 0x11);
        pic.io_write(0xA1, 0x28);
        pic.io_write(0xA1, 0x02); // ICW3: slave identity 2
        pic.io_write(0xA1, 0x01);
        pic.io_write(0x21, 0x00);
        pic.io_write(0xA1, 0x00);
    }

    fn initialized() -> Pic {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic
    }

    fn read_isr(pic: &mut Pic, cmd: u16) -> u8 {
        pic.io_write(cmd, 0x0B);
        let isr = pic.io_read(cmd);
        pic.io_write(cmd, 0x0A);
        isr
    }

    #[test]
    fn new_is_bios_state() {
        let mut pic = Pic::new();
        assert_eq!(pic.io_read(0x21), 0xFB);
        assert_eq!(pic.io_read(0xA1), 0xFF);
        pic.pulse_irq(4);
        assert!(!pic.has_interrupt(), "masked by the BIOS setup");
        assert_eq!(pic.acknowledge(), None);
        pic.io_write(0x21, 0xEB);
        assert_eq!(pic.acknowledge(), Some(0x0C));
    }

    #[test]
    fn init_sequence_remaps_and_masks() {
        let mut pic = initialized();
        assert_eq!(pic.io_read(0x21), 0);
        assert!(!pic.has_interrupt());
        assert_eq!(pic.acknowledge(), None);

        pic.pulse_irq(0);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert!(!pic.has_interrupt());

        // Linux probe: the mask reads back.
        pic.io_write(0x21, 0xFF);
        assert_eq!(pic.io_read(0x21), 0xFF);
        pic.io_write(0x20, 0x20);
        pic.pulse_irq(1);
        assert!(!pic.has_interrupt(), "masked lines stay latched but silent");
        assert_eq!(pic.io_read(0x20), 0x02, "IRR shows the latched request");
        pic.io_write(0x21, 0x00);
        assert!(pic.has_interrupt(), "unmasking releases it");
        assert_eq!(pic.acknowledge(), Some(0x21));
    }

    #[test]
    fn single_mode_without_icw3() {
        let mut pic = Pic::new();
        pic.io_write(0x20, 0x13); // single, ICW4
        pic.io_write(0x21, 0x40);
        pic.io_write(0x21, 0x01); // ICW4, not ICW3
        pic.io_write(0x21, 0xFE); // OCW1
        assert_eq!(pic.io_read(0x21), 0xFE);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x40));

        pic.io_write(0x20, 0x12); // single, no ICW4
        pic.io_write(0x21, 0x50);
        pic.io_write(0x21, 0x00); // OCW1 at once
        pic.pulse_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x53));
    }

    #[test]
    fn eoi_and_nesting() {
        let mut pic = initialized();
        pic.pulse_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        assert_eq!(read_isr(&mut pic, 0x20), 0x08);

        // A lower priority waits for the EOI, a higher one nests.
        pic.pulse_irq(5);
        assert!(!pic.has_interrupt());
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        assert_eq!(read_isr(&mut pic, 0x20), 0x0A);

        // Non-specific EOI ends the highest in service (IR1).
        pic.io_write(0x20, 0x20);
        assert_eq!(read_isr(&mut pic, 0x20), 0x08);
        assert!(!pic.has_interrupt());
        // Specific EOI for IR3.
        pic.io_write(0x20, 0x63);
        assert_eq!(read_isr(&mut pic, 0x20), 0x00);
        assert_eq!(pic.acknowledge(), Some(0x25));
        pic.io_write(0x20, 0x20);
        assert_eq!(read_isr(&mut pic, 0x20), 0x00);
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn edge_detection() {
        let mut pic = initialized();
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
        pic.io_write(0x20, 0x20);
        pic.set_irq(4, true);
        assert!(!pic.has_interrupt(), "a held level is not a new edge");
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
    }

    #[test]
    fn cascade_through_slave() {
        let mut pic = initialized();
        pic.pulse_irq(12);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x2C));
        assert_eq!(read_isr(&mut pic, 0x20), 0x04, "master IR2 in service");
        assert_eq!(read_isr(&mut pic, 0xA0), 0x10, "slave IR4 in service");

        // Another slave request waits until both EOIs, as Linux sends them.
        pic.pulse_irq(14);
        assert!(!pic.has_interrupt());
        pic.io_write(0xA0, 0x64);
        pic.io_write(0x20, 0x62);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x2E));
        pic.io_write(0xA0, 0x20);
        pic.io_write(0x20, 0x20);
        assert_eq!(read_isr(&mut pic, 0x20), 0);
        assert_eq!(read_isr(&mut pic, 0xA0), 0);

        // IRQ 8-15 outrank master IR3-7 but not IR0-1.
        pic.pulse_irq(3);
        pic.pulse_irq(8);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert!(!pic.has_interrupt(), "IR0 in service blocks all");
        pic.io_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x28));
        pic.io_write(0xA0, 0x20);
        pic.io_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.io_write(0x20, 0x20);

        // Masking the cascade line silences the slave.
        pic.io_write(0x21, 0x04);
        pic.pulse_irq(9);
        pic.io_write(0x20, 0x20);
        assert!(!pic.has_interrupt());
        pic.io_write(0x21, 0x00);
        assert_eq!(pic.acknowledge(), Some(0x29));
        // IRQ 2 on the bus arrives as IRQ 9.
        pic.io_write(0xA0, 0x20);
        pic.io_write(0x20, 0x20);
        pic.pulse_irq(2);
        assert_eq!(pic.acknowledge(), Some(0x29));
    }

    #[test]
    fn spurious_master_irq7() {
        let mut pic = initialized();
        pic.pulse_irq(5);
        assert!(pic.has_interrupt());
        // The request vanishes (masked) before the CPU acknowledges.
        pic.io_write(0x21, 0x20);
        assert!(!pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x27));
        assert_eq!(
            read_isr(&mut pic, 0x20),
            0,
            "a spurious IR7 is not in service"
        );
        assert_eq!(
            pic.acknowledge(),
            None,
            "only one acknowledge per raised INT"
        );
        pic.io_write(0x21, 0x00);
        assert_eq!(
            pic.acknowledge(),
            Some(0x25),
            "the request is still latched"
        );
    }

    #[test]
    fn spurious_slave_irq15() {
        let mut pic = initialized();
        pic.pulse_irq(11);
        pic.io_write(0xA1, 0x08);
        assert!(pic.has_interrupt(), "master IR2 latched the slave's edge");
        assert_eq!(pic.acknowledge(), Some(0x2F));
        assert_eq!(read_isr(&mut pic, 0x20), 0x04, "master IR2 in service");
        assert_eq!(read_isr(&mut pic, 0xA0), 0x00);
    }

    #[test]
    fn reinit_withdraws_latched_int() {
        let mut pic = initialized();
        pic.pulse_irq(5);
        linux_init(&mut pic, false);
        assert!(!pic.has_interrupt());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn auto_eoi() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        pic.pulse_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        assert_eq!(read_isr(&mut pic, 0x20), 0);
        pic.pulse_irq(4);
        assert_eq!(pic.acknowledge(), Some(0x24), "no EOI needed");
    }

    #[test]
    fn poll_mode() {
        let mut pic = initialized();
        pic.io_write(0x20, 0x0C);
        assert_eq!(pic.io_read(0x20), 0x00, "nothing pending");
        pic.pulse_irq(6);
        pic.io_write(0x20, 0x0C);
        assert_eq!(pic.io_read(0x20), 0x86);
        assert_eq!(read_isr(&mut pic, 0x20), 0x40);
        assert!(!pic.has_interrupt());
        // The poll is one-shot: the next read is the IRR again.
        assert_eq!(pic.io_read(0x20), 0x00);
    }

    #[test]
    fn rotation_commands() {
        let mut pic = initialized();
        // Set priority: IR4 lowest, so IR5 is highest.
        pic.io_write(0x20, 0xC4);
        pic.pulse_irq(1);
        pic.pulse_irq(6);
        assert_eq!(pic.acknowledge(), Some(0x26));
        // Rotate on non-specific EOI: IR6 becomes lowest, IR7 highest, then IR0, IR1...
        pic.io_write(0x20, 0xA0);
        assert_eq!(pic.acknowledge(), Some(0x21));
        // Rotate on specific EOI, rotate in AEOI set/clear, no-op: accepted.
        for cmd in [0xE1, 0x80, 0x00, 0x40] {
            pic.io_write(0x20, cmd);
        }
        assert_eq!(read_isr(&mut pic, 0x20), 0);
    }

    #[test]
    fn special_mask_mode() {
        let mut pic = initialized();
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        pic.pulse_irq(4);
        assert!(!pic.has_interrupt());
        // Masking the in-service IR1 under special mask mode lets lower priorities through.
        pic.io_write(0x20, 0x68);
        pic.io_write(0x21, 0x02);
        assert_eq!(pic.acknowledge(), Some(0x24));
        pic.io_write(0x20, 0x48);
    }

    #[test]
    fn any_port_io_is_safe() {
        let mut pic = initialized();
        for port in [0x20u16, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x22] {
            for value in 0..=255u8 {
                pic.io_write(port, value);
                pic.io_read(port);
                pic.set_irq(value % 20, value & 1 != 0);
                pic.acknowledge();
            }
        }
        assert_eq!(pic.io_read(0x4D0), 0);
    }
}
