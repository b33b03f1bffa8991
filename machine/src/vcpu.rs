//! One virtual CPU: its KVM file descriptor and what the VMM keeps of it between entries (cached
//! registers, the event it queued, whether it is halted or waits for a start-up IPI, its local APIC).
//!
//! The machine runs one vCPU at a time (see [`crate::smp`]): the one running is `Machine::cpu`, the
//! others wait in `Machine::parked`, and a switch swaps them, so everything that drives a vCPU works on
//! "the vCPU that runs" and never needs to know how many there are.

use crate::cpu::CpuState;
use devices::lapic::LocalApic;
use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_sregs, CpuId, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};

/// An event queued in the vCPU for delivery at the next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// An interrupt from the PIC ([`Machine::inject_interrupt`], in `interrupts.rs`).
    Interrupt,
    /// An exception of an instruction the VMM completed (the #BP of an `int3`).
    Exception,
}

/// The event a captured CPU state holds queued for the next entry, as [`Queued`] names it.
pub(crate) fn queued_in(cpu: &CpuState) -> Option<Queued> {
    let events = &cpu.events;
    if events.exception.injected != 0 {
        Some(Queued::Exception)
    } else if events.interrupt.injected != 0 {
        Some(Queued::Interrupt)
    } else {
        None
    }
}

/// A KVM call that failed while a vCPU was made.
#[derive(Debug)]
pub(crate) struct VcpuError {
    /// Which call.
    pub(crate) what: &'static str,
    /// What KVM said.
    pub(crate) source: kvm_ioctls::Error,
}

/// A [`VcpuError`] for the call `what`.
fn failed(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError { what, source }
}

/// Where a vCPU stands in the start-up protocol of a multiprocessor PC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activity {
    /// It runs (or is halted in `hlt`, see [`Vcpu::halted`]).
    Running,
    /// An application processor after reset or INIT: it runs nothing until a STARTUP IPI.
    WaitForSipi,
}

/// A vCPU and the VMM's view of it.
pub(crate) struct Vcpu {
    /// KVM's vCPU.
    pub(crate) fd: VcpuFd,
    /// Its index, which is also its APIC ID.
    pub(crate) id: u8,
    /// Registers as of the last exit or the last change we made.
    pub(crate) regs: kvm_regs,
    pub(crate) sregs: kvm_sregs,
    /// An event we queued in the vCPU that no entry has delivered yet.
    pub(crate) queued: Option<Queued>,
    /// Set after `hlt` with interrupts enabled, until an interrupt is injected.
    pub(crate) halted: bool,
    /// An STI or MOV SS interrupt shadow covers the next instruction, as KVM reported it at the last exit
    /// (and no instruction the VMM completed since has ended it).
    pub(crate) shadow: bool,
    /// KVM held an exception or interrupt of its own for delivery at the last exit (one whose delivery a
    /// host interrupt cut short): the next entry delivers that first.
    pub(crate) kvm_event: bool,
    /// Whether KVM holds an interrupt shadow we made stale by completing an instruction ourselves.
    pub(crate) stale_shadow: bool,
    /// DR6 at the last debug exit: which debug registers matched.
    pub(crate) last_dr6: u64,
    /// The last exit was a write to a host-trap port: once the `out` completes, complete the instruction
    /// it replaced (see [`crate::host_traps`]).
    pub(crate) host_trap_hit: Option<u16>,
    /// Its local APIC (used only by a machine with several vCPUs).
    pub(crate) lapic: LocalApic,
    /// Running, or waiting for a start-up IPI.
    pub(crate) activity: Activity,
}

impl Vcpu {
    /// Creates vCPU `id` of `vm` with CPUID `cpuid`, its registers synced at every exit and single-step on
    /// (the step clock's default).
    pub(crate) fn create(vm: &VmFd, id: u8, cpuid: &CpuId) -> Result<Vcpu, VcpuError> {
        let mut fd = vm
            .create_vcpu(u64::from(id))
            .map_err(failed("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(failed("KVM_SET_CPUID2"))?;
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        // The events too, so that every exit says, without another ioctl, whether an interrupt shadow or
        // an event of KVM's blocks an interrupt (see [`crate::Machine::interrupt_blocker`]).
        fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        let debug = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
            ..Default::default()
        };
        fd.set_guest_debug(&debug)
            .map_err(failed("KVM_SET_GUEST_DEBUG"))?;
        let regs = fd.get_regs().map_err(failed("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
        Ok(Vcpu {
            fd,
            id,
            regs,
            sregs,
            queued: None,
            halted: false,
            shadow: false,
            kvm_event: false,
            stale_shadow: false,
            last_dr6: 0,
            host_trap_hit: None,
            lapic: LocalApic::new(id),
            activity: if id == 0 {
                Activity::Running
            } else {
                Activity::WaitForSipi
            },
        })
    }
}
