//! A local APIC in xAPIC mode: the per-CPU interrupt controller behind the 4 KiB register page at
//! [`APIC_BASE`], one per vCPU.
//!
//! Like the other devices it is a deterministic function of its state and its inputs. Time comes from
//! the caller in nanoseconds, and the timer never ticks: it remembers when its count was loaded, and the
//! current count and the expiry times are computed from that, so a multi-vCPU machine that runs its
//! vCPUs one at a time can deliver timer interrupts at exactly the positions it recorded.
//!
//! What it models:
//! - the register page (ID, version, TPR, APR, PPR, EOI, LDR, DFR, spurious vector, ISR/TMR/IRR, the
//!   error status register, ICR, the six LVT entries and the timer registers);
//! - accepting fixed interrupts into the IRR, the priority rules (TPR, PPR, priority classes) that decide
//!   which one the CPU takes, acknowledging it into the ISR, and EOI, which reports level-triggered
//!   vectors so an I/O APIC can clear its remote IRR;
//! - the ICR, which turns into an [`Ipi`] the machine routes, asking each APIC
//!   [`LocalApic::matches_destination`] (physical, logical flat and cluster, and the shorthands);
//! - the timer in one-shot and periodic mode with its divider, clocked by a nominal bus of
//!   [`BUS_CYCLE_NS`] per cycle;
//! - LINT0 in ExtINT mode (how the 8259 reaches the CPU) and LINT1 in NMI mode, reported to the caller.
//!
//! What it leaves out: x2APIC (MSR access), the TSC-deadline timer mode (selecting it stops the timer),
//! the IA32_APIC_BASE MSR (relocation and hardware disable are the machine's business), SMI and
//! reserved delivery modes (dropped), EOI-broadcast suppression, focus-processor checks, the remote-read
//! register, and thermal and performance-counter interrupts (their LVT entries hold what is written but
//! always read as masked, since nothing here can raise them).

use serde::{Deserialize, Serialize};

/// Guest physical address of the register page (the architectural default of IA32_APIC_BASE).
pub const APIC_BASE: u64 = 0xFEE0_0000;
/// Size of the register page.
pub const APIC_SIZE: u64 = 0x1000;
/// Nanoseconds per cycle of the timer's input clock, before the divider: a nominal 1 GHz bus. It is the
/// frequency KVM's in-kernel APIC uses too, so guests calibrate alike under both, and every count
/// converts to a whole number of nanoseconds without rounding.
pub const BUS_CYCLE_NS: u64 = 1;
/// The version register: an integrated APIC (version 0x14) with six LVT entries (highest index 5) and
/// no EOI-broadcast suppression.
pub const VERSION: u32 = 0x0005_0014;

const ID: u64 = 0x20;
const VER: u64 = 0x30;
const TPR: u64 = 0x80;
const APR: u64 = 0x90;
const PPR: u64 = 0xA0;
const EOI: u64 = 0xB0;
const LDR: u64 = 0xD0;
const DFR: u64 = 0xE0;
const SVR: u64 = 0xF0;
/// The ISR, TMR and IRR are eight 32-bit registers each, vectors 0-31 first.
const ISR: u64 = 0x100;
const ISR_LAST: u64 = 0x170;
const TMR: u64 = 0x180;
const TMR_LAST: u64 = 0x1F0;
const IRR: u64 = 0x200;
const IRR_LAST: u64 = 0x270;
const ESR: u64 = 0x280;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
/// The LVT entries: timer, thermal, performance counters, LINT0, LINT1, error, in this order.
const LVT_FIRST: u64 = 0x320;
const LVT_LAST: u64 = 0x370;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3E0;

const LVT_TIMER: usize = 0;
const LVT_THERMAL: usize = 1;
const LVT_PERF: usize = 2;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
/// Bits software may set in each LVT entry. The delivery-status bit (12) always reads idle and LINT
/// remote IRR (14) stays clear, since delivery here is instantaneous and no level LINT input exists.
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00FF, // vector, mask, timer mode
    0x0001_07FF, // vector, delivery mode, mask
    0x0001_07FF,
    0x0001_A7FF, // vector, delivery mode, polarity, trigger mode, mask
    0x0001_A7FF,
    0x0001_00FF, // vector, mask
];
const LVT_MASKED: u32 = 1 << 16;
const MODE_NMI: u32 = 0b100;
const MODE_EXTINT: u32 = 0b111;

/// Spurious-vector register: vector (7:0), software enable (8), focus check disable (9).
const SVR_WRITABLE: u32 = 0x3FF;
const SVR_ENABLE: u32 = 1 << 8;

/// ICR low: vector, delivery mode, destination mode, level, trigger mode, shorthand.
const ICR_WRITABLE: u32 = 0x000C_CFFF;
const ICR_LOGICAL: u32 = 1 << 11;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_LEVEL: u32 = 1 << 15;

/// Error status: an IPI with a vector below 16 was sent.
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
/// Error status: an interrupt with a vector below 16 was received or generated locally.
const ESR_RECEIVE_ILLEGAL: u32 = 1 << 6;

/// Vectors 0-15 are the CPU's exceptions; the APIC refuses them as interrupt vectors.
const FIRST_LEGAL_VECTOR: u8 = 16;
/// Destination 0xFF reaches every APIC, in physical and in logical mode.
const BROADCAST: u8 = 0xFF;

/// How an IPI is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// The vector goes to the IRR of every destination APIC ([`LocalApic::accept`]).
    Fixed(u8),
    /// The vector goes to one destination APIC, the one with the lowest
    /// [`LocalApic::arbitration_priority`].
    LowestPriority(u8),
    /// A non-maskable interrupt for every destination CPU.
    Nmi,
    /// INIT: every destination CPU resets and waits for a STARTUP ([`LocalApic::init`] resets its APIC).
    Init,
    /// STARTUP: a waiting CPU starts in real mode at `vector << 12` (CS = `vector << 8`, IP = 0).
    Startup(u8),
}

/// Which APICs an IPI is for. The shorthands that depend on the sender carry the sender's APIC ID, so
/// [`LocalApic::matches_destination`] can answer on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Destination {
    /// The APIC with this ID, or all of them for 0xFF.
    Physical(u8),
    /// The APICs whose logical ID (LDR and DFR) matches this destination, or all of them for 0xFF.
    Logical(u8),
    /// The sender alone (it has this ID).
    SelfOnly(u8),
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender (it has this ID).
    AllExcludingSelf(u8),
}

/// An interprocessor interrupt requested by a write to the ICR, for the machine to route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipi {
    /// What to deliver.
    pub delivery: Delivery,
    /// To whom.
    pub destination: Destination,
    /// The ICR's trigger mode: a level-triggered fixed IPI sets the receiver's TMR bit.
    pub level_triggered: bool,
}

/// What a register write asks of the rest of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Route this IPI.
    Ipi(Ipi),
    /// An EOI ended this level-triggered vector: the I/O APIC clears the remote IRR of its entries with it.
    LevelEoi(u8),
}

/// The timer's mode as LVT timer bits 18:17 select it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    /// TSC-deadline (unsupported) or the reserved encoding: the timer does not run.
    Stopped,
}

/// A running timer. Ticks are decrements of the counter, counted from the load of the initial count;
/// a change of divider restarts the counting stretch at the tick reached, so the count never jumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TimerRun {
    /// When the current stretch of counting started.
    since_ns: u64,
    /// Ticks counted before `since_ns`.
    ticks_before: u64,
}

fn bit(bits: &[u32; 8], vector: u8) -> bool {
    bits[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

fn set_bit(bits: &mut [u32; 8], vector: u8, on: bool) {
    let (word, mask) = (&mut bits[usize::from(vector >> 5)], 1 << (vector & 31));
    *word = (*word & !mask) | if on { mask } else { 0 };
}

/// Which LVT entry the register at `offset` (0x320-0x370) is.
fn lvt_index(offset: u64) -> usize {
    ((offset - LVT_FIRST) >> 4) as usize
}

/// The highest vector set, if any.
fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0u8..8)
        .rev()
        .find(|&i| bits[usize::from(i)] != 0)
        .map(|i| i * 32 + (31 - bits[usize::from(i)].leading_zeros()) as u8)
}

/// The priority class of a vector or priority: its upper four bits.
fn class(priority: u8) -> u8 {
    priority >> 4
}

/// One CPU's local APIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalApic {
    /// APIC ID (ID register bits 31:24).
    id: u8,
    /// Task priority.
    tpr: u8,
    /// Logical APIC ID (LDR bits 31:24).
    ldr: u8,
    /// Destination model (DFR bits 31:28): 0xF flat, 0x0 cluster.
    dfr_model: u8,
    /// Spurious-interrupt vector register.
    svr: u32,
    /// In service: taken by the CPU, not yet ended by an EOI.
    isr: [u32; 8],
    /// Trigger mode of each accepted vector: set for level.
    tmr: [u32; 8],
    /// Requested, not yet taken.
    irr: [u32; 8],
    /// Error status as software reads it: the errors up to the last ESR write.
    esr: u32,
    /// Errors detected since the last ESR write.
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    /// None while the timer is stopped (initial count 0, or an unsupported mode).
    timer: Option<TimerRun>,
    /// Timer expiries at or before this time have been dealt with (raised, or dropped while masked).
    timer_settled_ns: u64,
}

impl LocalApic {
    /// The APIC with this ID at power-on: software-disabled, every LVT entry masked, flat logical model.
    pub fn new(apic_id: u8) -> Self {
        LocalApic {
            id: apic_id,
            tpr: 0,
            ldr: 0,
            dfr_model: 0xF,
            svr: 0xFF,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer: None,
            timer_settled_ns: 0,
        }
    }

    /// What a PC BIOS leaves on the boot CPU, which guests booted without one still expect (SeaBIOS does
    /// the same): the APIC software-enabled with spurious vector 0xFF, LINT0 in ExtINT mode so the 8259
    /// reaches the CPU (virtual-wire mode), and LINT1 delivering NMIs.
    pub fn set_virtual_wire(&mut self) {
        self.svr = SVR_ENABLE | 0xFF;
        self.lvt[LVT_LINT0] = MODE_EXTINT << 8;
        self.lvt[LVT_LINT1] = MODE_NMI << 8;
    }

    /// An INIT: every register returns to its power-on value except the APIC ID.
    pub fn init(&mut self) {
        *self = LocalApic::new(self.id);
    }

    /// The APIC ID as the ID register holds it (software may change it).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether the spurious-vector register's enable bit is set. A software-disabled APIC takes no fixed
    /// interrupts, offers none to the CPU, and keeps every LVT entry masked.
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// A guest read of `data.len()` bytes at `offset` into the register page, at `now_ns`.
    pub fn read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        self.read_with(offset, data, &mut || now_ns);
    }

    /// A guest write of `data` at `offset` into the register page, at `now_ns`; what the machine must do
    /// about it, if anything.
    pub fn write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> Option<Effect> {
        self.write_with(offset, data, &mut || now_ns)
    }

    /// Like [`LocalApic::read`], but calls `now` only for the timer's current count, the one register
    /// that depends on the time; `now` must give the same answer each time it is called.
    ///
    /// Registers are 32 bits wide at 16-byte strides. A read of 1, 2 or 4 bytes within a register's
    /// first four bytes returns those bytes of it; any other read (wider, straddling, in the padding,
    /// outside the page) returns zeros.
    pub fn read_with(&self, offset: u64, data: &mut [u8], now: &mut dyn FnMut() -> u64) {
        data.fill(0);
        let within = (offset & 0xF) as usize;
        if offset >= APIC_SIZE || within >= 4 || data.is_empty() || data.len() > 4 - within {
            return;
        }
        let value = self.register(offset & !0xF, now).to_le_bytes();
        data.copy_from_slice(&value[within..within + data.len()]);
    }

    /// Like [`LocalApic::write`], but calls `now` only if the write depends on the time (it reprograms a
    /// running timer, or starts one); `now` must give the same answer each time it is called.
    ///
    /// Only aligned 4-byte writes to a register are defined; others are ignored, as are writes to
    /// read-only and reserved registers. A write that reprograms the timer (LVT timer, spurious vector,
    /// initial count, divider) first settles the expiries up to now under the old programming, so the
    /// machine need not call [`LocalApic::fire_timer`] before it.
    pub fn write_with(
        &mut self,
        offset: u64,
        data: &[u8],
        now: &mut dyn FnMut() -> u64,
    ) -> Option<Effect> {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return None;
        };
        if offset >= APIC_SIZE || offset & 0xF != 0 {
            return None;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            ID => self.id = (value >> 24) as u8,
            TPR => self.tpr = value as u8,
            EOI => return self.eoi().map(Effect::LevelEoi),
            LDR => self.ldr = (value >> 24) as u8,
            DFR => self.dfr_model = (value >> 28) as u8,
            SVR => {
                self.settle(now);
                self.svr = value & SVR_WRITABLE;
                if !self.software_enabled() {
                    for entry in &mut self.lvt {
                        *entry |= LVT_MASKED;
                    }
                }
            }
            // The readable ESR is loaded by a write (of any value) with the errors seen since the last one.
            ESR => self.esr = std::mem::take(&mut self.esr_pending),
            ICR_LOW => {
                self.icr_low = value & ICR_WRITABLE;
                return self.send().map(Effect::Ipi);
            }
            ICR_HIGH => self.icr_high = value & 0xFF00_0000,
            LVT_FIRST..=LVT_LAST => self.write_lvt(lvt_index(offset), value, now),
            TIMER_INITIAL => {
                self.settle(now);
                // In TSC-deadline mode the initial count is ignored; here the timer simply stays stopped.
                if self.timer_mode() != TimerMode::Stopped {
                    self.timer_initial = value;
                    self.timer = (value != 0).then(|| TimerRun {
                        since_ns: now(),
                        ticks_before: 0,
                    });
                }
            }
            TIMER_DIVIDE => {
                self.settle(now);
                if let Some(run) = self.timer {
                    let t = now();
                    self.timer = Some(TimerRun {
                        since_ns: t,
                        ticks_before: self.ticks_at(run, t),
                    });
                }
                self.timer_divide = value & 0xB;
            }
            _ => {}
        }
        None
    }

    /// The value of the register at 16-byte aligned `offset`.
    fn register(&self, offset: u64, now: &mut dyn FnMut() -> u64) -> u32 {
        let bank = |bits: &[u32; 8], base: u64| bits[((offset - base) >> 4) as usize];
        match offset {
            ID => u32::from(self.id) << 24,
            VER => VERSION,
            TPR => self.tpr.into(),
            APR => self.arbitration_priority().into(),
            PPR => self.ppr().into(),
            LDR => u32::from(self.ldr) << 24,
            DFR => (u32::from(self.dfr_model) << 28) | 0x0FFF_FFFF,
            SVR => self.svr,
            ISR..=ISR_LAST => bank(&self.isr, ISR),
            TMR..=TMR_LAST => bank(&self.tmr, TMR),
            IRR..=IRR_LAST => bank(&self.irr, IRR),
            ESR => self.esr,
            // Delivery status (bit 12) is always idle: an IPI is handed over as the ICR is written.
            ICR_LOW => self.icr_low,
            ICR_HIGH => self.icr_high,
            LVT_FIRST..=LVT_LAST => {
                let index = lvt_index(offset);
                let masked = matches!(index, LVT_THERMAL | LVT_PERF);
                self.lvt[index] | if masked { LVT_MASKED } else { 0 }
            }
            TIMER_INITIAL => self.timer_initial,
            TIMER_CURRENT => self.current_count(now),
            TIMER_DIVIDE => self.timer_divide,
            // EOI is write-only; the rest is reserved.
            _ => 0,
        }
    }

    fn write_lvt(&mut self, index: usize, value: u32, now: &mut dyn FnMut() -> u64) {
        if index == LVT_TIMER {
            self.settle(now);
        }
        let mut value = value & LVT_WRITABLE[index];
        // While software-disabled, every entry stays masked whatever is written.
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        self.lvt[index] = value;
        // A switch between one-shot and periodic while counting acts as though the new mode had held since
        // the load (guests switch only a stopped timer). As in KVM, entering TSC-deadline mode clears the
        // initial count, since that mode ignores it.
        if index == LVT_TIMER && self.timer_mode() == TimerMode::Stopped {
            self.timer = None;
            self.timer_initial = 0;
        }
    }

    /// Turns the ICR into an IPI, or drops it: INIT level de-assert (a synchronisation message of old
    /// APICs, with no effect on today's CPUs), SMI, reserved modes, and fixed vectors below 16.
    fn send(&mut self) -> Option<Ipi> {
        let low = self.icr_low;
        let vector = low as u8;
        let delivery = match (low >> 8) & 7 {
            0 => Delivery::Fixed(vector),
            1 => Delivery::LowestPriority(vector),
            0b100 => Delivery::Nmi,
            0b101 if low & ICR_ASSERT == 0 && low & ICR_LEVEL != 0 => return None,
            0b101 => Delivery::Init,
            0b110 => Delivery::Startup(vector),
            _ => return None,
        };
        if matches!(delivery, Delivery::Fixed(_) | Delivery::LowestPriority(_))
            && vector < FIRST_LEGAL_VECTOR
        {
            self.error(ESR_SEND_ILLEGAL);
            return None;
        }
        let field = (self.icr_high >> 24) as u8;
        let destination = match (low >> 18) & 3 {
            0 if low & ICR_LOGICAL != 0 => Destination::Logical(field),
            0 => Destination::Physical(field),
            1 => Destination::SelfOnly(self.id),
            2 => Destination::AllIncludingSelf,
            _ => Destination::AllExcludingSelf(self.id),
        };
        Some(Ipi {
            delivery,
            destination,
            level_triggered: low & ICR_LEVEL != 0,
        })
    }

    /// Whether this APIC is one of the IPI's destinations. Logical destinations follow the DFR's model:
    /// flat (any common bit with the LDR) or cluster (same cluster in the upper nibble, a common bit in
    /// the lower).
    pub fn matches_destination(&self, destination: Destination) -> bool {
        match destination {
            Destination::Physical(id) => id == BROADCAST || id == self.id,
            Destination::Logical(BROADCAST) | Destination::AllIncludingSelf => true,
            Destination::Logical(mda) if self.dfr_model == 0xF => mda & self.ldr != 0,
            Destination::Logical(mda) => mda >> 4 == self.ldr >> 4 && mda & self.ldr & 0xF != 0,
            Destination::SelfOnly(sender) => sender == self.id,
            Destination::AllExcludingSelf(sender) => sender != self.id,
        }
    }

    /// Records an error; an unmasked error LVT entry raises its interrupt.
    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let entry = self.lvt[LVT_ERROR];
        if entry & LVT_MASKED == 0 && self.software_enabled() {
            let vector = entry as u8;
            if vector >= FIRST_LEGAL_VECTOR {
                self.accept(vector, false);
            } else {
                // Raising the error would be another illegal vector: record it, do not recurse.
                self.esr_pending |= ESR_RECEIVE_ILLEGAL;
            }
        }
    }

    /// A fixed interrupt arrives (from an IPI, the I/O APIC, or this APIC's own LVT): it is latched in
    /// the IRR, and the TMR records its trigger mode. Vectors below 16 are refused with a
    /// received-illegal-vector error; a software-disabled APIC drops it. True if latched.
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if vector < FIRST_LEGAL_VECTOR {
            self.error(ESR_RECEIVE_ILLEGAL);
            return false;
        }
        if !self.software_enabled() {
            return false;
        }
        set_bit(&mut self.irr, vector, true);
        set_bit(&mut self.tmr, vector, level_triggered);
        true
    }

    /// The processor priority: the task priority, or the class of the highest vector in service if
    /// that is higher. Only interrupts of a higher class get through.
    pub fn ppr(&self) -> u8 {
        let in_service = highest(&self.isr).unwrap_or(0);
        if class(self.tpr) >= class(in_service) {
            self.tpr
        } else {
            in_service & 0xF0
        }
    }

    /// The arbitration priority, by which lowest-priority delivery picks a destination (lowest wins):
    /// the task priority, unless a vector in service or requested is of a higher class.
    pub fn arbitration_priority(&self) -> u8 {
        let in_service = class(highest(&self.isr).unwrap_or(0));
        let requested = class(highest(&self.irr).unwrap_or(0));
        let task = class(self.tpr);
        if task >= requested && task > in_service {
            self.tpr
        } else {
            task.max(in_service).max(requested) << 4
        }
    }

    /// The vector the CPU would take now: the highest requested one whose class beats the PPR. None while
    /// software-disabled (requests stay latched until the APIC is enabled again).
    pub fn pending(&self) -> Option<u8> {
        let vector = highest(&self.irr)?;
        (self.software_enabled() && class(vector) > class(self.ppr())).then_some(vector)
    }

    /// The CPU takes the pending interrupt: it moves from the IRR to the ISR. The machine calls this
    /// only when it injects the vector, so there is no window for the request to vanish in between and
    /// no spurious vector to deliver.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.pending()?;
        set_bit(&mut self.irr, vector, false);
        set_bit(&mut self.isr, vector, true);
        Some(vector)
    }

    /// End of interrupt: the highest vector in service is done. Returns it if it was level-triggered,
    /// for the I/O APIC; None for an edge vector or an empty ISR.
    pub fn eoi(&mut self) -> Option<u8> {
        let vector = highest(&self.isr)?;
        set_bit(&mut self.isr, vector, false);
        bit(&self.tmr, vector).then_some(vector)
    }

    /// Whether LINT0 is unmasked in ExtINT mode: the 8259's INTR then goes to the CPU as from a plain
    /// PIC, bypassing the IRR and the priorities, and the vector comes from the 8259's acknowledge.
    pub fn lint0_extint(&self) -> bool {
        let entry = self.lvt[LVT_LINT0];
        entry & LVT_MASKED == 0 && (entry >> 8) & 7 == MODE_EXTINT
    }

    /// Whether LINT1 is unmasked in NMI mode, as a BIOS wires it: a pulse on the LINT1 pin is an NMI.
    pub fn lint1_nmi(&self) -> bool {
        let entry = self.lvt[LVT_LINT1];
        entry & LVT_MASKED == 0 && (entry >> 8) & 7 == MODE_NMI
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            _ => TimerMode::Stopped,
        }
    }

    /// Nanoseconds per counter decrement: the divider (encoded in bits 3, 1, 0: 0b000 is 2, each step
    /// doubles it, and 0b111 is 1) times the bus cycle.
    fn tick_ns(&self) -> u64 {
        let code = ((self.timer_divide & 8) >> 1) | (self.timer_divide & 3);
        (1 << ((code + 1) & 7)) * BUS_CYCLE_NS
    }

    fn ticks_at(&self, run: TimerRun, t: u64) -> u64 {
        run.ticks_before
            .saturating_add(t.saturating_sub(run.since_ns) / self.tick_ns())
    }

    /// Expiries (the count reaching zero) from the load up to `t`.
    fn expiries_through(&self, run: TimerRun, t: u64) -> u64 {
        let ticks = self.ticks_at(run, t);
        let initial = u64::from(self.timer_initial);
        match self.timer_mode() {
            TimerMode::OneShot => u64::from(initial != 0 && ticks >= initial),
            TimerMode::Periodic => ticks.checked_div(initial).unwrap_or(0),
            TimerMode::Stopped => 0,
        }
    }

    /// The current-count register at `now`: counting down from the initial count, reloaded in periodic
    /// mode, resting at zero after a one-shot.
    fn current_count(&self, now: &mut dyn FnMut() -> u64) -> u32 {
        let Some(run) = self.timer else { return 0 };
        let ticks = self.ticks_at(run, now());
        let initial = u64::from(self.timer_initial);
        let left = match self.timer_mode() {
            TimerMode::OneShot => initial.saturating_sub(ticks),
            TimerMode::Periodic => initial - ticks.checked_rem(initial).unwrap_or(0),
            TimerMode::Stopped => 0,
        };
        left as u32
    }

    /// Whether an expiry would raise the timer's interrupt (a masked timer still counts).
    fn timer_interrupts(&self) -> bool {
        self.software_enabled() && self.lvt[LVT_TIMER] & LVT_MASKED == 0
    }

    fn settle(&mut self, now: &mut dyn FnMut() -> u64) {
        if self.timer.is_some() {
            self.fire_timer(now());
        }
    }

    /// When the next timer interrupt falls due, in the time base of `now_ns`: the first expiry not yet
    /// dealt with by [`LocalApic::fire_timer`]. None if the timer is stopped, masked, or a one-shot that
    /// has fired. The answer holds until the next register write or `fire_timer` call.
    pub fn next_timer_ns(&self) -> Option<u64> {
        let run = self.timer?;
        if !self.timer_interrupts() {
            return None;
        }
        let initial = u64::from(self.timer_initial);
        let done = self.ticks_at(run, self.timer_settled_ns);
        let tick = match self.timer_mode() {
            TimerMode::OneShot if done < initial => initial,
            TimerMode::Periodic => done
                .checked_div(initial)?
                .checked_add(1)?
                .checked_mul(initial)?,
            _ => return None,
        };
        // Tick `tick` is counted from the first nanosecond a whole tick period has elapsed.
        let delay = tick
            .checked_sub(run.ticks_before)?
            .checked_mul(self.tick_ns())?;
        run.since_ns.checked_add(delay)
    }

    /// Deals with the timer's expiries up to `now_ns`: if there were any since the last call and the
    /// timer is unmasked, its vector is requested (several expiries coalesce into the one IRR bit, as on
    /// hardware). True if the interrupt was raised. Times at or before the last call change nothing.
    pub fn fire_timer(&mut self, now_ns: u64) -> bool {
        let Some(run) = self.timer else { return false };
        if now_ns <= self.timer_settled_ns {
            return false;
        }
        let expired =
            self.expiries_through(run, now_ns) > self.expiries_through(run, self.timer_settled_ns);
        self.timer_settled_ns = now_ns;
        expired && self.timer_interrupts() && self.accept(self.lvt[LVT_TIMER] as u8, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LVT registers by name.
    const LVTT: u64 = 0x320;
    const LVT_PERF_REG: u64 = 0x340;
    const LINT0: u64 = 0x350;
    const LINT1: u64 = 0x360;
    const LVT_ERR: u64 = 0x370;

    fn rd(apic: &LocalApic, offset: u64, now: u64) -> u32 {
        let mut data = [0u8; 4];
        apic.read(offset, &mut data, now);
        u32::from_le_bytes(data)
    }

    fn wr(apic: &mut LocalApic, offset: u64, value: u32, now: u64) -> Option<Effect> {
        apic.write(offset, &value.to_le_bytes(), now)
    }

    /// An APIC software-enabled with spurious vector 0xFF, as guests set it up.
    fn enabled(id: u8) -> LocalApic {
        let mut apic = LocalApic::new(id);
        wr(&mut apic, SVR, 0x1FF, 0);
        apic
    }

    /// Sends an IPI: ICR high then low, as software does.
    fn icr(apic: &mut LocalApic, high: u32, low: u32) -> Option<Effect> {
        wr(apic, ICR_HIGH, high, 0);
        wr(apic, ICR_LOW, low, 0)
    }

    /// Sets the LVT timer (`mode` 0 one-shot, 1 periodic) with vector 0x30, the divider, and the count.
    fn start_timer(apic: &mut LocalApic, mode: u32, divide: u32, count: u32, t: u64) {
        wr(apic, LVTT, (mode << 17) | 0x30, t);
        wr(apic, TIMER_DIVIDE, divide, t);
        wr(apic, TIMER_INITIAL, count, t);
    }

    #[test]
    fn power_on_values() {
        let apic = LocalApic::new(3);
        let ones = [ID, VER, DFR, SVR].map(|offset| rd(&apic, offset, 0));
        assert_eq!(ones, [0x0300_0000, 0x0005_0014, 0xFFFF_FFFF, 0xFF]);
        let zeros = [
            TPR,
            APR,
            PPR,
            LDR,
            ESR,
            ICR_LOW,
            ICR_HIGH,
            TIMER_INITIAL,
            TIMER_DIVIDE,
        ];
        for offset in zeros.into_iter().chain((ISR..=IRR_LAST).step_by(16)) {
            assert_eq!(rd(&apic, offset, 0), 0, "register {offset:#x}");
        }
        for offset in (LVT_FIRST..=LVT_LAST).step_by(16) {
            assert_eq!(rd(&apic, offset, 0), LVT_MASKED, "LVT {offset:#x}");
        }
        assert!(!apic.software_enabled() && !apic.lint0_extint() && !apic.lint1_nmi());
    }

    #[test]
    fn tpr_and_ppr_gate_pending() {
        let mut apic = enabled(0);
        assert!(apic.accept(0x45, false));
        assert_eq!(rd(&apic, IRR + 0x20, 0), 1 << 5);
        assert_eq!(apic.pending(), Some(0x45));
        // Same class as the TPR: blocked; the PPR follows the TPR.
        wr(&mut apic, TPR, 0x4A, 0);
        assert_eq!((apic.pending(), rd(&apic, PPR, 0)), (None, 0x4A));
        assert_eq!(apic.acknowledge(), None);
        wr(&mut apic, TPR, 0x3F, 0);
        assert_eq!(apic.pending(), Some(0x45));
        // Only the low byte of TPR is writable.
        wr(&mut apic, TPR, 0xFFFF_FF00, 0);
        assert_eq!(rd(&apic, TPR, 0), 0);
    }

    #[test]
    fn nested_interrupts_and_eoi() {
        let mut apic = enabled(0);
        apic.accept(0x31, false);
        assert_eq!(apic.acknowledge(), Some(0x31));
        assert_eq!(rd(&apic, ISR + 0x10, 0), 1 << 0x11);
        assert_eq!(rd(&apic, PPR, 0), 0x30);
        // A vector of the class in service waits; a higher class preempts.
        apic.accept(0x3F, false);
        apic.accept(0x51, false);
        assert_eq!(apic.acknowledge(), Some(0x51));
        assert_eq!((apic.pending(), apic.ppr()), (None, 0x50));
        // A TPR above the class in service is the PPR.
        wr(&mut apic, TPR, 0x62, 0);
        assert_eq!(apic.ppr(), 0x62);
        wr(&mut apic, TPR, 0, 0);
        // EOI ends the highest in service first.
        assert_eq!(wr(&mut apic, EOI, 0, 0), None);
        assert_eq!(rd(&apic, ISR + 0x20, 0), 0);
        assert_eq!((apic.pending(), apic.ppr()), (None, 0x30));
        apic.eoi();
        assert_eq!(apic.acknowledge(), Some(0x3F));
        apic.eoi();
        assert_eq!(apic.eoi(), None);
        assert_eq!(apic.pending(), None);
        assert_eq!(rd(&apic, ISR + 0x10, 0), 0);
    }

    #[test]
    fn level_eoi_is_reported() {
        let mut apic = enabled(0);
        apic.accept(0x40, true);
        apic.accept(0x30, false);
        assert_eq!(rd(&apic, TMR + 0x20, 0), 1);
        assert_eq!((apic.acknowledge(), apic.acknowledge()), (Some(0x40), None));
        assert_eq!(wr(&mut apic, EOI, 0, 0), Some(Effect::LevelEoi(0x40)));
        assert_eq!(apic.acknowledge(), Some(0x30));
        assert_eq!(wr(&mut apic, EOI, 0, 0), None);
        // A later edge interrupt on the vector clears its TMR bit.
        apic.accept(0x40, false);
        assert_eq!(rd(&apic, TMR + 0x20, 0), 0);
    }

    #[test]
    fn illegal_vectors_are_errors() {
        let mut apic = enabled(0);
        assert!(!apic.accept(5, false));
        assert_eq!(apic.irr, [0; 8]);
        // The ESR shows errors only after a write loads it, and the next write clears it.
        assert_eq!(rd(&apic, ESR, 0), 0);
        wr(&mut apic, ESR, 0, 0);
        assert_eq!(rd(&apic, ESR, 0), 0x40);
        wr(&mut apic, ESR, 0, 0);
        assert_eq!(rd(&apic, ESR, 0), 0);
        // Sending a fixed vector below 16 sends nothing and raises the error LVT when unmasked.
        wr(&mut apic, LVT_ERR, 0x1_00FE, 0);
        assert_eq!((icr(&mut apic, 0, 0x400F), apic.pending()), (None, None));
        wr(&mut apic, LVT_ERR, 0xFE, 0);
        assert_eq!(icr(&mut apic, 0, 0x400F), None);
        assert_eq!(apic.pending(), Some(0xFE));
        wr(&mut apic, ESR, 0, 0);
        assert_eq!(rd(&apic, ESR, 0), 0x20);
        // An error LVT with an illegal vector records that too, instead of recursing.
        wr(&mut apic, LVT_ERR, 0x03, 0);
        apic.accept(1, false);
        wr(&mut apic, ESR, 0, 0);
        assert_eq!(rd(&apic, ESR, 0), 0x40);
    }

    #[test]
    fn software_disable() {
        let mut apic = LocalApic::new(0);
        // Disabled: fixed interrupts are dropped and LVT masks cannot be cleared.
        assert!(!apic.accept(0x50, false));
        wr(&mut apic, LINT0, 0x700, 0);
        assert_eq!(rd(&apic, LINT0, 0), 0x1_0700);
        assert!(!apic.lint0_extint());
        wr(&mut apic, SVR, 0x1EF, 0);
        assert_eq!(rd(&apic, SVR, 0), 0x1EF);
        wr(&mut apic, LINT0, 0x700, 0);
        assert!(apic.lint0_extint() && apic.accept(0x50, false));
        // Disabling masks every LVT entry and hides requests, which stay latched.
        wr(&mut apic, SVR, 0xEF, 0);
        assert!(!apic.lint0_extint());
        assert_eq!(apic.pending(), None);
        assert_eq!(rd(&apic, IRR + 0x20, 0), 1 << 0x10);
        wr(&mut apic, SVR, 0xFFFF_F1EF, 0);
        assert_eq!(rd(&apic, SVR, 0), 0x1EF);
        assert_eq!(apic.acknowledge(), Some(0x50));
    }

    #[test]
    fn icr_encodings() {
        use Delivery::*;
        use Destination::*;
        let mut apic = enabled(2);
        let ipi = |delivery, destination, level_triggered| {
            let ipi = Ipi {
                delivery,
                destination,
                level_triggered,
            };
            Some(Effect::Ipi(ipi))
        };
        // (ICR high, ICR low, IPI): INIT assert (level) and its de-assert, which is dropped;
        // shorthands, which ignore the destination field; logical lowest priority; STARTUP.
        let cases = [
            (5 << 24, 0xC500, ipi(Init, Physical(5), true)),
            (5 << 24, 0x8500, None),
            (7 << 24, 0x4_4031, ipi(Fixed(0x31), SelfOnly(2), false)),
            (0, 0x8_0400, ipi(Nmi, AllIncludingSelf, false)),
            (0, 0xC_4500, ipi(Init, AllExcludingSelf(2), false)),
            (
                3 << 24,
                0x4941,
                ipi(LowestPriority(0x41), Logical(3), false),
            ),
            (1 << 24, 0x4698, ipi(Startup(0x98), Physical(1), false)),
        ];
        for (high, low, expect) in cases {
            assert_eq!(icr(&mut apic, high, low), expect, "ICR {high:#x}:{low:#x}");
        }
        assert_eq!(rd(&apic, ICR_LOW, 0), 0x4698);
        assert_eq!(rd(&apic, ICR_HIGH, 0), 1 << 24);
        // Delivery status (bit 12) reads idle; SMI and reserved modes are dropped.
        assert_eq!(icr(&mut apic, 0, 0x1_5200), None);
        assert_eq!(rd(&apic, ICR_LOW, 0), 0x4200);
        assert_eq!(icr(&mut apic, 0, 0x4331), None);
        assert_eq!(icr(&mut apic, 0, 0x4731), None);
    }

    #[test]
    fn destination_matching() {
        use Destination::*;
        let mut apic = LocalApic::new(4);
        let matches = |apic: &LocalApic, dests: &[Destination]| {
            dests
                .iter()
                .map(|&d| apic.matches_destination(d))
                .collect::<Vec<_>>()
        };
        let dests = [
            Physical(4),
            Physical(0xFF),
            Physical(2),
            SelfOnly(4),
            SelfOnly(1),
        ];
        assert_eq!(matches(&apic, &dests), [true, true, false, true, false]);
        let dests = [AllExcludingSelf(1), AllExcludingSelf(4), AllIncludingSelf];
        assert_eq!(matches(&apic, &dests), [true, false, true]);
        // Flat: any common bit; 0xFF is a broadcast.
        let dests = [Logical(0x13), Logical(0x0F), Logical(0xFF)];
        assert_eq!(matches(&apic, &dests), [false, false, true]);
        wr(&mut apic, LDR, 0x1000_0000, 0);
        assert_eq!(matches(&apic, &dests), [true, false, true]);
        // Cluster: the same cluster and a common member bit.
        wr(&mut apic, DFR, 0x0FFF_FFFF, 0);
        wr(&mut apic, LDR, 0x2400_0000, 0);
        assert_eq!(rd(&apic, DFR, 0), 0x0FFF_FFFF);
        assert_eq!(rd(&apic, LDR, 0), 0x2400_0000);
        let dests = [Logical(0x26), Logical(0x16), Logical(0x23), Logical(0xFF)];
        assert_eq!(matches(&apic, &dests), [true, false, false, true]);
        // The ID register is writable and moves the physical destination.
        wr(&mut apic, ID, 0x0900_0000, 0);
        assert_eq!(matches(&apic, &[Physical(9), Physical(4)]), [true, false]);
        assert_eq!(apic.id(), 9);
    }

    #[test]
    fn arbitration_priority() {
        let mut apic = enabled(0);
        wr(&mut apic, TPR, 0x25, 0);
        assert_eq!(rd(&apic, APR, 0), 0x25);
        apic.accept(0x41, false);
        assert_eq!(apic.arbitration_priority(), 0x40);
        apic.acknowledge();
        assert_eq!(apic.arbitration_priority(), 0x40);
        apic.eoi();
        assert_eq!(apic.arbitration_priority(), 0x25);
    }

    #[test]
    fn one_shot_timer() {
        let mut apic = enabled(0);
        assert_eq!(apic.next_timer_ns(), None);
        // Divider code 0 divides by 2: 1000 counts take 2000 ns.
        start_timer(&mut apic, 0, 0, 1000, 100);
        assert_eq!(apic.next_timer_ns(), Some(2100));
        assert_eq!(rd(&apic, TIMER_CURRENT, 100), 1000);
        assert_eq!(rd(&apic, TIMER_CURRENT, 601), 750);
        assert!(!apic.fire_timer(2099));
        assert_eq!(apic.pending(), None);
        assert!(apic.fire_timer(2100));
        assert_eq!((apic.pending(), apic.next_timer_ns()), (Some(0x30), None));
        assert_eq!(rd(&apic, TIMER_CURRENT, 5000), 0);
        assert_eq!(rd(&apic, TIMER_INITIAL, 0), 1000);
        assert!(!apic.fire_timer(9000));
        // Writing 0 stops it.
        start_timer(&mut apic, 0, 0xB, 10, 10_000);
        assert_eq!(apic.next_timer_ns(), Some(10_010));
        wr(&mut apic, TIMER_INITIAL, 0, 10_005);
        assert_eq!(apic.next_timer_ns(), None);
    }

    #[test]
    fn periodic_timer_and_dividers() {
        let codes = [0, 1, 2, 3, 8, 9, 0xA, 0xB];
        for (code, divisor) in codes.into_iter().zip([2, 4, 8, 16, 32, 64, 128, 1]) {
            let mut apic = enabled(0);
            start_timer(&mut apic, 1, code, 100, 0);
            let period = 100 * divisor * BUS_CYCLE_NS;
            assert_eq!(apic.next_timer_ns(), Some(period), "divide code {code:#x}");
            assert_eq!(rd(&apic, TIMER_DIVIDE, 0), code);
        }
        let mut apic = enabled(0);
        start_timer(&mut apic, 1, 3, 100, 0);
        assert!(apic.fire_timer(1600));
        assert_eq!(apic.next_timer_ns(), Some(3200));
        // The count reloads each period.
        assert_eq!(rd(&apic, TIMER_CURRENT, 3199), 1);
        assert_eq!(rd(&apic, TIMER_CURRENT, 3200), 100);
        // Late: several expiries raise one request.
        apic.acknowledge();
        apic.eoi();
        assert!(apic.fire_timer(10_000));
        assert_eq!((apic.acknowledge(), apic.acknowledge()), (Some(0x30), None));
        assert_eq!(apic.next_timer_ns(), Some(11_200));
        // Masked, it counts on without interrupting; unmasking does not replay missed expiries.
        wr(&mut apic, LVTT, 0x3_0030, 10_500);
        assert_eq!(apic.next_timer_ns(), None);
        assert!(!apic.fire_timer(20_000));
        assert_eq!(rd(&apic, TIMER_CURRENT, 20_000), 50);
        wr(&mut apic, LVTT, 0x2_0030, 20_000);
        assert_eq!((apic.pending(), apic.next_timer_ns()), (None, Some(20_800)));
    }

    #[test]
    fn timer_reprogramming() {
        // A divider change keeps the count reached and goes on at the new rate.
        let mut apic = enabled(0);
        start_timer(&mut apic, 0, 0xB, 1000, 0);
        wr(&mut apic, TIMER_DIVIDE, 0, 400);
        assert_eq!(rd(&apic, TIMER_CURRENT, 400), 600);
        assert_eq!(rd(&apic, TIMER_CURRENT, 1000), 300);
        assert_eq!(apic.next_timer_ns(), Some(400 + 1200));
        // Reloading after an expiry nobody fired: the old expiry still raises its vector.
        wr(&mut apic, TIMER_INITIAL, 50, 2000);
        assert_eq!(apic.acknowledge(), Some(0x30));
        assert_eq!(apic.next_timer_ns(), Some(2100));
        // TSC-deadline mode clears the count and stops the timer, and it ignores new counts.
        wr(&mut apic, LVTT, 0x4_0030, 2010);
        assert_eq!(rd(&apic, LVTT, 0), 0x4_0030);
        assert_eq!(rd(&apic, TIMER_INITIAL, 0), 0);
        wr(&mut apic, TIMER_INITIAL, 500, 2020);
        assert_eq!(apic.next_timer_ns(), None);
        assert_eq!(rd(&apic, TIMER_CURRENT, 2030), 0);
        assert!(!apic.fire_timer(10_000));
        assert_eq!(apic.pending(), None);
    }

    #[test]
    fn lint_modes_virtual_wire_and_init() {
        let mut apic = LocalApic::new(7);
        apic.set_virtual_wire();
        assert!(apic.software_enabled() && apic.lint0_extint() && apic.lint1_nmi());
        assert_eq!((rd(&apic, LINT0, 0), rd(&apic, LINT1, 0)), (0x700, 0x400));
        wr(&mut apic, LINT0, 0x1_0700, 0);
        wr(&mut apic, LINT1, 0, 0);
        assert!(!apic.lint0_extint() && !apic.lint1_nmi());
        // Thermal and perf entries hold what is written but read masked.
        wr(&mut apic, LVT_PERF_REG, 0x400, 0);
        assert_eq!(rd(&apic, LVT_PERF_REG, 0), 0x1_0400);
        // INIT returns everything but the ID to power-on values.
        wr(&mut apic, LDR, 0x0100_0000, 0);
        apic.accept(0x40, false);
        start_timer(&mut apic, 1, 0, 10, 0);
        apic.init();
        assert_eq!(apic, LocalApic::new(7));
    }

    #[test]
    fn odd_accesses() {
        let mut apic = LocalApic::new(0xAB);
        let (mut byte, mut half) = ([0u8; 1], [0u8; 2]);
        apic.read(ID + 3, &mut byte, 0);
        apic.read(VER, &mut half, 0);
        assert_eq!((byte, half), ([0xAB], [0x14, 0]));
        let offsets = [ID, ID + 2, ID + 4, ID + 15, 0xFFF, 0x1000, u64::MAX, ID];
        for (offset, len) in offsets.into_iter().zip([8, 4, 4, 1, 2, 4, 4, 0]) {
            let mut data = vec![0x55u8; len];
            apic.read(offset, &mut data, 0);
            assert!(data.iter().all(|&b| b == 0), "read {offset:#x}/{len}");
        }
        let before = apic.clone();
        let offsets = [TPR, TPR, TPR, TPR + 4, TPR + 1, 0x1000, u64::MAX, TPR];
        for (offset, len) in offsets.into_iter().zip([1, 2, 8, 4, 4, 4, 4, 0]) {
            assert_eq!(apic.write(offset, &vec![0xFF; len], 0), None);
        }
        // Read-only and reserved registers ignore writes.
        for offset in [VER, PPR, ISR, IRR, TMR, TIMER_CURRENT, 0x3F0, 0xFF0] {
            wr(&mut apic, offset, 0xFFFF_FFFF, 0);
        }
        assert_eq!(apic, before);
    }

    #[test]
    fn clock_is_read_only_when_needed() {
        let mut apic = enabled(0);
        let reads = std::cell::Cell::new(0);
        let mut clock = || {
            reads.set(reads.get() + 1);
            500
        };
        let mut data = [0u8; 4];
        for offset in [ID, TPR, PPR, TIMER_CURRENT, TIMER_INITIAL] {
            apic.read_with(offset, &mut data, &mut clock);
        }
        apic.write_with(LVTT, &0x2_0030u32.to_le_bytes(), &mut clock);
        apic.write_with(TIMER_DIVIDE, &0xBu32.to_le_bytes(), &mut clock);
        assert_eq!(reads.get(), 0);
        apic.write_with(TIMER_INITIAL, &100u32.to_le_bytes(), &mut clock);
        assert_eq!(reads.get(), 1);
        apic.read_with(TIMER_CURRENT, &mut data, &mut clock);
        apic.write_with(EOI, &[0; 4], &mut clock);
        assert_eq!((reads.get(), u32::from_le_bytes(data)), (2, 100));
    }

    #[test]
    fn checkpoint_round_trip() {
        let mut apic = enabled(1);
        start_timer(&mut apic, 1, 1, 300, 50);
        apic.accept(0x60, true);
        apic.acknowledge();
        apic.accept(0x41, false);
        wr(&mut apic, ESR, 0, 0);
        let bytes = postcard::to_allocvec(&apic).unwrap();
        let mut back: LocalApic = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, apic);
        for a in [&mut apic, &mut back] {
            assert!(a.fire_timer(5000));
            assert_eq!(a.eoi(), Some(0x60));
        }
        assert_eq!(back, apic);
        assert_eq!(back.next_timer_ns(), Some(50 + 1200 * 5));
    }
}
