//! The vCPU's architectural state: what a checkpoint saves and restores.

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A vCPU state ioctl failed.
#[derive(Debug, Error)]
#[error("KVM {what} failed: {source}")]
pub struct CpuError {
    /// Which ioctl.
    pub what: &'static str,
    /// The error KVM returned.
    pub source: kvm_ioctls::Error,
}

/// The MSRs a checkpoint saves: the ones a ring-0 guest can set and that KVM keeps. The TSC is left out on
/// purpose: the guest never sees the host TSC (RDTSC is intercepted and logged), so it carries no state.
const SAVED_MSRS: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Everything needed to put the vCPU back exactly where it was.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct CpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state: the legacy 4 KiB XSAVE region (`kvm_xsave` itself is not Clone).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// (index, value) of [`SAVED_MSRS`] that KVM reported.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupt shadow, NMI state.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, ...
    pub mp_state: kvm_mp_state,
    /// DR0-3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for CpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CpuState {{ rip: {:#x}, rsp: {:#x}, rflags: {:#x} }}",
            self.regs.rip, self.regs.rsp, self.regs.rflags
        )
    }
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError { what, source }
}

impl CpuState {
    /// Reads the whole state from the vCPU.
    pub fn capture(vcpu: &VcpuFd) -> Result<CpuState, CpuError> {
        let entries: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| CpuError {
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        Ok(CpuState {
            regs: vcpu.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            xsave: vcpu
                .get_xsave()
                .map_err(err("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
            events: vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            debugregs: vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes the whole state into the vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), CpuError> {
        // sregs before regs: setting CR0/EFER can change how KVM interprets RIP/RFLAGS.
        vcpu.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        let mut xsave = kvm_xsave::default();
        let n = self.xsave.len().min(xsave.region.len());
        xsave.region[..n].copy_from_slice(&self.xsave[..n]);
        // SAFETY: a legacy-size kvm_xsave (4 KiB region, no extra area) is what KVM_SET_XSAVE reads; the
        // region came from KVM_GET_XSAVE on a vCPU with the same CPUID.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError {
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}
