//! Waypoints: the machine as it stood at a kick point, so that a replay can jump there instead of
//! finding the point by its fingerprint.
//!
//! Finding a kick point costs one breakpoint stop per pass of its rip since the landmark before it (about
//! 55 µs each here), and a guest that computes in a loop for milliseconds passes it thousands of times:
//! replay then takes several times the recording's time. A waypoint holds what that stretch changed:
//! the running vCPU's state at the point and the pages written since the previous waypoint or checkpoint.
//! A replay that stands anywhere between that previous one and the point, in the recording's state, has
//! every other page as the recording had it at the point, so writing these pages and the vCPU state puts
//! it exactly at the point, without executing the stretch. Nothing outside the vCPU and RAM changes in a
//! stretch without exits.

use crate::cpu::CpuState;
use crate::vcpu::queued_in;
use crate::vm::{Machine, MachineError};

/// What a waypoint holds (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct Waypoint {
    /// The running vCPU's state, serialized ([`CpuState`] in postcard).
    pub state: Vec<u8>,
    /// (page frame, contents) of every page written since the previous waypoint or checkpoint.
    pub pages: Vec<(u64, Vec<u8>)>,
}

impl Machine {
    /// The waypoint of the point where the machine stands, a kick point of a recording; starts a new
    /// waypoint interval. None where a waypoint could not stand in for the search: while an event waits
    /// in the vCPU (queued by the VMM or held by KVM), which a restore would not put back as it was.
    pub fn take_waypoint(&mut self) -> Result<Option<Waypoint>, MachineError> {
        self.collect_dirty()?;
        if self.cpu.queued.is_some() || self.cpu.kvm_event {
            return Ok(None);
        }
        let cpu = CpuState::capture(&self.cpu.fd, &self.xsave_layout)?;
        let state = postcard::to_allocvec(&cpu).map_err(MachineError::BadState)?;
        let written = std::mem::replace(
            &mut self.dirty_since_waypoint,
            vec![0; self.dirty_since_mark.len()],
        );
        let pages = crate::dirty::bitmap_pages(&written)
            .into_iter()
            .map(|pfn| (pfn, self.mem.page(pfn as usize).to_vec()))
            .collect();
        Ok(Some(Waypoint { state, pages }))
    }

    /// Puts the machine at a waypoint: its pages written (and counted as written by the guest, as they
    /// were in the recording: fingerprints, searches and checkpoints see them), the running vCPU's state
    /// restored, and KVM's cached translations dropped, since page tables may be among the pages.
    pub fn restore_waypoint(&mut self, waypoint: &Waypoint) -> Result<(), MachineError> {
        let cpu: CpuState =
            postcard::from_bytes(&waypoint.state).map_err(MachineError::BadState)?;
        for (pfn, data) in &waypoint.pages {
            self.restore_page(*pfn, Some(data))?;
            self.mark_written((pfn / 64) as usize, 1 << (pfn % 64));
        }
        cpu.restore(&self.cpu.fd)?;
        self.cpu.regs = cpu.regs;
        self.cpu.sregs = cpu.sregs;
        self.cpu.queued = queued_in(&cpu);
        self.cpu.shadow = cpu.events.interrupt.shadow != 0;
        self.cpu.kvm_event = false;
        self.cpu.stale_shadow = false;
        self.reset_mmu()
    }
}
