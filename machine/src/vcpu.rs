//! One virtual CPU: its KVM file descriptor and what the VMM keeps of it between entries (cached
//! registers, the event it queued, whether it is halted or waits for a start-up IPI, its local APIC).
//!
//! The machine runs one vCPU at a time (see [`crate::smp`]): the one running is `Machine::cpu`, the
//! others wait in `Machine::parked`, and a switch swaps them, so everything that drives a vCPU works on
//! "the vCPU that runs" and never needs to know how many there are.

use crate::vm::{kvm_err, MachineError, Queued};
use devices::lapic::LocalApic;
use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_sregs, CpuId, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};

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
    pub(crate) fn create(vm: &VmFd, id: u8, cpuid: &CpuId) -> Result<Vcpu, MachineError> {
        let mut fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
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
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
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
