//! The machine with several vCPUs: they run **one at a time**, on the thread that drives the machine,
//! and the outside (the recorder's scheduler, or a replay following its trace) says when another one
//! takes over ([`Machine::switch_to`]). The vCPU that runs is `Machine::cpu`; a switch swaps it with a
//! parked one, so that the clocks, the exits and the interrupt logic keep driving "the vCPU that runs"
//! unchanged, and shared memory sees exactly the interleaving of the switches.
//!
//! Each vCPU has a local APIC ([`devices::lapic`]) behind the xAPIC page at 0xFEE00000, which KVM
//! hands to us as MMIO exits (there is no in-kernel irqchip), and an IOAPIC ([`devices::ioapic`]) at
//! 0xFEC00000 routes the ISA interrupts. The 8259 pair stays wired to the bootstrap processor's LINT0,
//! which starts in virtual-wire mode as a BIOS leaves it, so a guest that never touches an APIC works
//! as on the uniprocessor PC. INIT and STARTUP IPIs are handled here: KVM without an irqchip takes no
//! multiprocessor state but "runnable", so an application processor's wait for its start-up IPI is
//! ours to keep.
//!
//! A machine with one vCPU has none of this (no APIC page, no IOAPIC): it is the PC earlier traces were
//! recorded on, and its checkpoints stay byte for byte what they were.

use crate::cpu::CpuState;
use crate::vcpu::{Activity, Vcpu};
use crate::vm::{kvm_err, Machine, MachineError};
use boot::mptable::ioapic_pin;
use devices::ioapic::{self, DeliveryMode, DestinationMode};
use devices::lapic::{self, Delivery, Destination, Effect, LocalApic};
use devices::TimeSource;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};

/// What a checkpoint of a machine with several vCPUs holds beyond the uniprocessor state (which keeps
/// vCPU 0): the other vCPUs, every local APIC, the IOAPIC and which vCPU runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct SmpState {
    /// The vCPU that runs.
    pub(crate) current: u8,
    /// vCPUs 1 and up.
    pub(crate) others: Vec<ParkedState>,
    /// Every vCPU's activity, vCPU 0 first.
    pub(crate) activity: Vec<Activity>,
    /// Every local APIC, vCPU 0's first.
    pub(crate) lapics: Vec<LocalApic>,
    pub(crate) ioapic: ioapic::Ioapic,
}

/// An application processor's CPU state in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct ParkedState {
    pub(crate) halted: bool,
    pub(crate) cpu: CpuState,
}

impl Machine {
    /// How many vCPUs the machine has.
    pub fn cpus(&self) -> usize {
        self.parked.len()
    }

    /// Whether the machine has several vCPUs (and so APICs).
    pub fn is_multiprocessor(&self) -> bool {
        self.parked.len() > 1
    }

    /// The vCPU that runs now (its index, which is its APIC ID).
    pub fn current_cpu(&self) -> u8 {
        self.cpu.id
    }

    /// The vCPU `id`, running or parked.
    pub(crate) fn vcpu(&self, id: u8) -> &Vcpu {
        if id == self.cpu.id {
            &self.cpu
        } else {
            self.parked[usize::from(id)]
                .as_ref()
                .expect("only the running vCPU is taken out of `parked`")
        }
    }

    /// The vCPU `id`, running or parked, to change.
    fn vcpu_mut(&mut self, id: u8) -> &mut Vcpu {
        if id == self.cpu.id {
            &mut self.cpu
        } else {
            self.parked[usize::from(id)]
                .as_mut()
                .expect("only the running vCPU is taken out of `parked`")
        }
    }

    /// Registers of vCPU `id` as of its last exit (or last change).
    pub fn cpu_regs(&self, id: u8) -> (&kvm_regs, &kvm_sregs) {
        let v = self.vcpu(id);
        (&v.regs, &v.sregs)
    }

    /// The FPU and SSE registers of vCPU `id` as it holds them now.
    pub fn cpu_fpu(&self, id: u8) -> Result<kvm_bindings::kvm_fpu, MachineError> {
        self.vcpu(id).fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))
    }

    /// Whether vCPU `id` has something to do: it has been started and is not halted, or it is halted
    /// with an interrupt it can take waiting (running it would deliver it).
    pub fn cpu_can_run(&self, id: u8) -> bool {
        let v = self.vcpu(id);
        match v.activity {
            Activity::WaitForSipi => false,
            Activity::Running if !v.halted => true,
            Activity::Running => {
                v.regs.rflags & crate::arch::RFLAGS_IF != 0
                    && (v.lapic.pending().is_some()
                        || (id == 0 && self.devices.pic.has_interrupt() && self.extint_open(v)))
            }
        }
    }

    /// Whether any vCPU has something to do (see [`Machine::cpu_can_run`]): false only when every one
    /// is halted or waiting for a start-up IPI, and no interrupt that could wake one is waiting.
    pub fn any_cpu_can_run(&self) -> bool {
        (0..self.cpus() as u8).any(|id| self.cpu_can_run(id))
    }

    /// Whether a timer edge (`timer_edge`) and these serial bytes would raise an interrupt. On a
    /// uniprocessor, asked of a copy of the PIC; with several vCPUs any edge may reach a local APIC
    /// through the IOAPIC (the guest has masked the 8259 then), so any input counts: delivering one
    /// that raises nothing costs a kick point, never exactness.
    pub fn interrupt_after(&self, timer_edge: bool, serial: &[u8]) -> bool {
        if self.is_multiprocessor() {
            return timer_edge || !serial.is_empty();
        }
        self.devices.interrupt_after(timer_edge, serial)
    }

    /// Makes vCPU `id` the one that runs. Its guest-debug settings (single-step or breakpoints) are the
    /// machine's, so they are set again on it.
    pub fn switch_to(&mut self, id: u8) -> Result<(), MachineError> {
        if id == self.cpu.id {
            return Ok(());
        }
        let slot = self
            .parked
            .get_mut(usize::from(id))
            .ok_or(MachineError::NoSuchCpu(id))?;
        let mut next = slot.take().ok_or(MachineError::NoSuchCpu(id))?;
        self.cpu
            .fd
            .set_guest_debug(&kvm_bindings::kvm_guest_debug::default())
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        std::mem::swap(&mut self.cpu, &mut next);
        let old = next.id;
        self.parked[usize::from(old)] = Some(next);
        self.apply_debug(None)
    }

    /// Whether the PIC's interrupts reach vCPU `v` through its LINT0 (ExtINT): only the bootstrap
    /// processor's is wired, and the guest may mask it.
    fn extint_open(&self, v: &Vcpu) -> bool {
        v.id == 0 && (!self.is_multiprocessor() || v.lapic.lint0_extint())
    }

    /// Whether an interrupt waits for the running vCPU: at its local APIC, or at the PIC through LINT0.
    /// (On a uniprocessor machine, at the PIC.)
    pub(crate) fn has_pending_vector(&self) -> bool {
        if !self.is_multiprocessor() {
            return self.devices.pic.has_interrupt();
        }
        self.cpu.lapic.pending().is_some()
            || (self.extint_open(&self.cpu) && self.devices.pic.has_interrupt())
    }

    /// Acknowledges the vector the running vCPU takes: from its local APIC (into the ISR), else from the
    /// PIC.
    pub(crate) fn acknowledge_vector(&mut self) -> Option<u8> {
        if self.is_multiprocessor() {
            if let Some(vector) = self.cpu.lapic.acknowledge() {
                return Some(vector);
            }
            if !self.extint_open(&self.cpu) {
                return None;
            }
        }
        self.devices.pic.acknowledge()
    }

    /// An edge on ISA IRQ `line`: to the PIC and, on a multiprocessor machine, to the IOAPIC.
    pub(crate) fn route_irq_edge(&mut self, line: u8) -> Result<(), MachineError> {
        self.devices.pic.pulse_irq(line);
        self.route_irq_edge_to_ioapic(line)
    }

    /// An edge on ISA IRQ `line` that has reached the PIC already: to the IOAPIC too, if there is one.
    pub(crate) fn route_irq_edge_to_ioapic(&mut self, line: u8) -> Result<(), MachineError> {
        if let Some(ioapic) = self.ioapic.as_mut() {
            ioapic.pulse_irq(ioapic_pin(line));
            self.deliver_ioapic()?;
        }
        Ok(())
    }

    /// Hands the IOAPIC's messages to the local APICs they are for.
    fn deliver_ioapic(&mut self) -> Result<(), MachineError> {
        let Some(ioapic) = self.ioapic.as_mut() else {
            return Ok(());
        };
        for d in ioapic.take_deliveries() {
            let destination = match d.dest_mode {
                DestinationMode::Physical => Destination::Physical(d.dest),
                DestinationMode::Logical => Destination::Logical(d.dest),
            };
            let delivery = match d.mode {
                DeliveryMode::Fixed => Delivery::Fixed(d.vector),
                DeliveryMode::LowestPriority => Delivery::LowestPriority(d.vector),
                DeliveryMode::Nmi => Delivery::Nmi,
                DeliveryMode::Init => Delivery::Init,
                // An ExtINT pin hands over the PIC's vector, which reaches the bootstrap processor
                // through LINT0 anyway; SMI has no handler here.
                DeliveryMode::ExtInt | DeliveryMode::Smi => continue,
            };
            self.deliver(lapic::Ipi {
                delivery,
                destination,
                level_triggered: d.level_triggered,
            })?;
        }
        Ok(())
    }

    /// Delivers an interrupt message to every local APIC it names (lowest priority: to the one of them
    /// with the lowest arbitration priority, the lowest APIC ID among equals, so the choice is
    /// deterministic).
    fn deliver(&mut self, ipi: lapic::Ipi) -> Result<(), MachineError> {
        let targets: Vec<u8> = (0..self.cpus() as u8)
            .filter(|&id| self.vcpu(id).lapic.matches_destination(ipi.destination))
            .collect();
        let targets = match ipi.delivery {
            Delivery::LowestPriority(_) => targets
                .into_iter()
                .min_by_key(|&id| (self.vcpu(id).lapic.arbitration_priority(), id))
                .into_iter()
                .collect(),
            _ => targets,
        };
        for id in targets {
            let v = self.vcpu_mut(id);
            match ipi.delivery {
                Delivery::Fixed(vector) | Delivery::LowestPriority(vector) => {
                    v.lapic.accept(vector, ipi.level_triggered);
                }
                // KVM delivers an NMI at the vCPU's next entry; an NMI it cannot take yet it keeps.
                Delivery::Nmi => {
                    // Errors only for a vCPU fd that is not a vCPU, which ours always are.
                    let _ = v.fd.nmi();
                    v.halted = false;
                }
                Delivery::Init => {
                    // The bootstrap processor ignores INIT here (a reset of it would be a reboot).
                    if id != 0 {
                        v.activity = Activity::WaitForSipi;
                        v.halted = false;
                        v.lapic.init();
                    }
                }
                Delivery::Startup(vector) => {
                    // A STARTUP IPI to a processor that is not waiting for one is ignored, as on hardware.
                    if v.activity == Activity::WaitForSipi {
                        start_at_sipi(v, vector)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A guest write to the running vCPU's local APIC page; an IPI or an EOI it makes is routed.
    pub(crate) fn lapic_write(
        &mut self,
        offset: u64,
        data: &[u8],
        time: &mut dyn TimeSource,
    ) -> Result<(), MachineError> {
        let effect = self
            .cpu
            .lapic
            .write_with(offset, data, &mut || time.monotonic_ns());
        match effect {
            Some(Effect::Ipi(ipi)) => self.deliver(ipi),
            Some(Effect::LevelEoi(vector)) => {
                if let Some(ioapic) = self.ioapic.as_mut() {
                    ioapic.end_of_interrupt(vector);
                }
                self.deliver_ioapic()
            }
            None => Ok(()),
        }
    }

    /// A guest write to the IOAPIC window (reads have no effects: the exit handler serves them).
    pub(crate) fn ioapic_write(&mut self, offset: u64, data: &[u8]) -> Result<(), MachineError> {
        if let Some(ioapic) = self.ioapic.as_mut() {
            ioapic.write(offset, data);
        }
        self.deliver_ioapic()
    }

    /// When the next local APIC timer interrupt falls due (the earliest over all vCPUs), and whose.
    pub fn next_apic_timer(&self) -> Option<(u64, u8)> {
        if !self.is_multiprocessor() {
            return None;
        }
        (0..self.cpus() as u8)
            .filter_map(|id| self.vcpu(id).lapic.next_timer_ns().map(|t| (t, id)))
            .min()
    }

    /// Lets vCPU `id`'s APIC timer count up to `now_ns`, raising its interrupt if it expired; true if it
    /// did. The recorder calls it when [`Machine::next_apic_timer`] falls due, and logs it; replay calls
    /// it where the trace says.
    pub fn fire_apic_timer(&mut self, id: u8, now_ns: u64) -> Result<bool, MachineError> {
        if usize::from(id) >= self.cpus() {
            return Err(MachineError::NoSuchCpu(id));
        }
        Ok(self.vcpu_mut(id).lapic.fire_timer(now_ns))
    }

    /// The state beyond the uniprocessor one a checkpoint holds (None on a uniprocessor machine).
    pub(crate) fn smp_state(&self) -> Result<Option<SmpState>, MachineError> {
        if !self.is_multiprocessor() {
            return Ok(None);
        }
        let ids = 0..self.cpus() as u8;
        let others = ids
            .clone()
            .skip(1)
            .map(|id| {
                let v = self.vcpu(id);
                Ok(ParkedState {
                    halted: v.halted,
                    cpu: CpuState::capture(&v.fd, &self.xsave_layout)?,
                })
            })
            .collect::<Result<_, MachineError>>()?;
        Ok(Some(SmpState {
            current: self.cpu.id,
            others,
            activity: ids.clone().map(|id| self.vcpu(id).activity).collect(),
            lapics: ids.map(|id| self.vcpu(id).lapic.clone()).collect(),
            ioapic: self.ioapic.clone().unwrap_or_default(),
        }))
    }

    /// Restores what [`Machine::smp_state`] captured, after the uniprocessor part put vCPU 0 back (as
    /// the running one).
    pub(crate) fn restore_smp_state(&mut self, st: &SmpState) -> Result<(), MachineError> {
        if st.others.len() + 1 != self.cpus()
            || st.lapics.len() != self.cpus()
            || st.activity.len() != self.cpus()
        {
            return Err(MachineError::BadDeviceState(format!(
                "the checkpoint holds {} vCPUs, this machine has {}",
                st.lapics.len(),
                self.cpus()
            )));
        }
        for (i, other) in st.others.iter().enumerate() {
            let v = self.vcpu_mut(i as u8 + 1);
            other.cpu.restore(&v.fd)?;
            v.regs = other.cpu.regs;
            v.sregs = other.cpu.sregs;
            v.halted = other.halted;
            v.queued = crate::vcpu::queued_in(&other.cpu);
            v.shadow = other.cpu.events.interrupt.shadow != 0;
            v.kvm_event = false;
            v.stale_shadow = false;
        }
        for id in 0..self.cpus() as u8 {
            let v = self.vcpu_mut(id);
            v.lapic = st.lapics[usize::from(id)].clone();
            v.activity = st.activity[usize::from(id)];
        }
        self.ioapic = Some(st.ioapic.clone());
        self.switch_to(st.current)
    }
}

/// Puts `v` where a STARTUP IPI with `vector` starts a processor: real mode at `vector * 0x1000`
/// (CS = vector << 8, IP = 0), every other register as INIT leaves it.
fn start_at_sipi(v: &mut Vcpu, vector: u8) -> Result<(), MachineError> {
    let real = kvm_segment {
        limit: 0xffff,
        type_: 3,
        present: 1,
        s: 1,
        ..Default::default()
    };
    let mut sregs = v.sregs;
    sregs.cs = kvm_segment {
        selector: u16::from(vector) << 8,
        base: u64::from(vector) << 12,
        type_: 0xb,
        ..real
    };
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (real, real, real, real, real);
    sregs.tr = kvm_segment {
        type_: 0xb,
        s: 0,
        ..real
    };
    sregs.ldt = kvm_segment {
        type_: 2,
        s: 0,
        ..real
    };
    (
        sregs.gdt.base,
        sregs.gdt.limit,
        sregs.idt.base,
        sregs.idt.limit,
    ) = (0, 0xffff, 0, 0xffff);
    // CD | NW | ET: CR0 after INIT.
    (
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer,
    ) = (0x10, 0, 0, 0, 0, 0);
    let regs = kvm_regs {
        rflags: 2,
        // EDX holds the processor signature's family after INIT.
        rdx: 0x600,
        ..Default::default()
    };
    v.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    v.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    (v.regs, v.sregs) = (regs, sregs);
    v.activity = Activity::Running;
    v.halted = false;
    v.queued = None;
    v.shadow = false;
    v.kvm_event = false;
    v.stale_shadow = false;
    Ok(())
}
