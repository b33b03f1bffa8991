//! Interrupts and exceptions: whether the guest can take one now (decided from its state alone), queuing
//! one for delivery, and what an entry that a signal cut short still holds.

use crate::arch::{self, CR0_PE, RFLAGS_IF, RFLAGS_TF};
use crate::emulate::{self};
use crate::vcpu::Queued;
use crate::vm::{kvm_err, Machine, MachineError};
use std::os::fd::AsRawFd;
use thiserror::Error;

/// What keeps the CPU from taking an interrupt ([`Machine::interrupt_blocker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Blocker {
    /// Maskable interrupts are off.
    #[error("RFLAGS.IF is clear (interrupts are off)")]
    InterruptFlag,
    /// The instruction after `sti` or `mov ss` cannot be interrupted.
    #[error("an interrupt shadow covers the next instruction (it follows sti or mov ss)")]
    Shadow,
    /// The VMM queued an event that no entry has delivered yet.
    #[error("{}", match .0 {
        Queued::Interrupt => "an interrupt already queued in the vCPU waits for delivery",
        Queued::Exception => "an exception the VMM queued (the #BP of an int3 it completed) waits for delivery",
    })]
    Queued(Queued),
    /// KVM holds an event of its own for delivery.
    #[error("KVM holds an exception or interrupt for redelivery")]
    KvmEvent,
}

/// `_IOW(KVMIO, 0x86, struct kvm_interrupt)`.
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;

impl Machine {
    /// Whether an interrupt is waiting at the PIC and the CPU would take it now.
    pub fn interrupt_ready(&self) -> bool {
        self.interrupts_enabled() && self.has_pending_vector()
    }

    /// Whether the CPU would take an interrupt now (IF set, no interrupt shadow), whatever the PIC holds.
    pub fn interrupts_enabled(&self) -> bool {
        self.interrupt_blocker().is_none()
    }

    /// What keeps the CPU from taking an interrupt now, if anything. Decided from the guest's state alone
    /// (RFLAGS.IF, the interrupt shadow, what is queued for delivery), never from how the last exit
    /// happened: a point reached by a kick's signal in the recording is reached by a breakpoint in replay,
    /// and both must give the same answer. (KVM's `ready_for_interrupt_injection` and `if_flag` depend on
    /// the kind of exit that filled them in: after a debug exit they said "not ready" where the kick's
    /// exit had said "ready", and recordings made under load did not replay.)
    pub fn interrupt_blocker(&self) -> Option<Blocker> {
        if self.cpu.regs.rflags & RFLAGS_IF == 0 {
            return Some(Blocker::InterruptFlag);
        }
        // Not while an exception (a completed int3's #BP) or an interrupt waits for the next entry: KVM
        // enters with that one and keeps a second for a later entry, and which entry that is depends on
        // host exits (preemption), not on the guest. A timer interrupt queued beside the #BP of Linux's
        // int3 self-test was taken at different points of the handler from run to run under load.
        if let Some(queued) = self.cpu.queued {
            return Some(Blocker::Queued(queued));
        }
        if self.cpu.kvm_event {
            return Some(Blocker::KvmEvent);
        }
        if self.cpu.shadow {
            return Some(Blocker::Shadow);
        }
        None
    }

    /// Acknowledges the PIC's pending interrupt and queues it in the vCPU: the next step delivers it.
    /// Returns the vector, or None if the PIC withdrew it. Only call when [`Machine::interrupt_ready`].
    pub fn inject_interrupt(&mut self) -> Result<Option<u8>, MachineError> {
        let Some(vector) = self.acknowledge_vector() else {
            return Ok(None);
        };
        if self.cpu.stale_shadow {
            self.clear_interrupt_shadow()?;
        }
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer, which refers to a live local; the
        // fd is our vCPU. (kvm-ioctls has no wrapper for this ioctl, which only exists without an in-kernel irqchip.)
        let ret = unsafe { libc::ioctl(self.cpu.fd.as_raw_fd(), KVM_INTERRUPT, &irq) };
        if ret < 0 {
            return Err(kvm_err("KVM_INTERRUPT")(kvm_ioctls::Error::last()));
        }
        self.cpu.halted = false;
        self.cpu.queued = Some(Queued::Interrupt);
        Ok(Some(vector))
    }

    /// Where the interrupt about to be delivered will push the flags (a linear address and their width),
    /// for a ring-0 guest or a 64-bit one entering ring 0 from ring 3: the cases the guests we run meet.
    pub(crate) fn pushed_flags_slot(&self) -> Option<(u64, usize)> {
        let (r, s) = (&self.cpu.regs, &self.cpu.sregs);
        let long = arch::long_mode(s);
        if long {
            // 64-bit delivery aligns the stack to 16 and pushes SS, RSP, RFLAGS, CS, RIP; from ring 3 it
            // switches to the TSS's RSP0 first.
            let rsp = if s.cs.selector & 3 == 0 {
                r.rsp
            } else {
                let mut rsp0 = [0u8; 8];
                self.read_virtual(s.tr.base + 4, &mut rsp0).ok()?;
                u64::from_le_bytes(rsp0)
            };
            return Some(((rsp & !0xf).wrapping_sub(24), 8));
        }
        if s.cs.selector & 3 != 0 {
            return None;
        }
        if s.cr0 & CR0_PE != 0 && s.cs.db == 1 {
            // 32-bit, same privilege: EFLAGS, CS, EIP.
            let esp = (r.rsp as u32).wrapping_sub(4);
            return Some((s.ss.base.wrapping_add(u64::from(esp)), 4));
        }
        // 16-bit: FLAGS, CS, IP.
        let sp = (r.rsp as u16).wrapping_sub(2);
        Some((s.ss.base.wrapping_add(u64::from(sp)), 2))
    }

    /// PVM quirk: an interrupt delivered while single-stepping pushes the flags with TF set, the trap flag
    /// the step clock runs with, where running free pushes them without it; the `iret` then gives the guest
    /// TF, and a free run after it would take a debug trap the recording never did. So the step clock
    /// clears TF in the pushed image (at `slot`, if it is there and has it set).
    pub(crate) fn clear_pushed_trap_flag(&mut self, (linear, width): (u64, usize)) {
        let paging = emulate::paging_mode(&self.cpu.sregs);
        let mut image = [0u8; 8];
        if paging
            .read_linear(&self.mem, linear, &mut image[..width])
            .is_err()
        {
            return;
        }
        let flags = u64::from_le_bytes(image);
        if flags & RFLAGS_TF != 0 {
            let cleared = (flags & !RFLAGS_TF).to_le_bytes();
            // Cannot fail: the same bytes were just read.
            let _ = paging.write_linear(&mut self.mem, linear, &cleared[..width]);
        }
    }

    /// We completed an instruction ourselves: any STI/MOV SS shadow KVM still holds is over (and cleared
    /// in KVM before the next entry).
    pub(crate) fn completed_instruction(&mut self) {
        self.cpu.stale_shadow |= self.cpu.shadow;
        self.cpu.shadow = false;
    }

    /// Queues exception `vector` (one without an error code) for delivery at the next entry, with the
    /// return address the current RIP.
    pub(crate) fn inject_exception(&mut self, vector: u8) -> Result<(), MachineError> {
        let mut events = self
            .cpu
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.cpu
            .fd
            .set_vcpu_events(&events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        self.cpu.queued = Some(Queued::Exception);
        Ok(())
    }

    pub(crate) fn clear_interrupt_shadow(&mut self) -> Result<(), MachineError> {
        let mut events = self
            .cpu
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        events.interrupt.shadow = 0;
        self.cpu
            .fd
            .set_vcpu_events(&events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        self.cpu.stale_shadow = false;
        Ok(())
    }

    /// After a signal cut an entry short: whether KVM still holds an event we queued where its events do
    /// not show it. PVM takes an injected exception in hand at entry, and a signal that then stops the
    /// entry before the guest runs leaves it in flight: KVM_GET_VCPU_EVENTS shows nothing, yet the next
    /// entry delivers it (seen with the #BP of a completed `int3`: an interrupt queued beside it made
    /// replay diverge). `ready_for_interrupt_injection` says so: it is clear although IF is set and no
    /// shadow blocks. (Only this question is asked of that exit-dependent field: whether an interrupt
    /// can be taken is decided from the state, see [`Machine::interrupt_blocker`].)
    pub(crate) fn in_flight(&mut self) -> bool {
        let run = self.cpu.fd.get_kvm_run();
        run.ready_for_interrupt_injection == 0
            && self.cpu.fd.sync_regs().regs.rflags & RFLAGS_IF != 0
            && !self.cpu.shadow
    }
}
