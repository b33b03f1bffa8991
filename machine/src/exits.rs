//! Entering the guest and handling each exit: I/O handed to the devices and completed, the instructions
//! the VMM completes itself (those KVM cannot emulate here, and those whose results come from the host),
//! and one step of the step clock.
//!
//! Every instruction boundary of the step clock passes through [`Machine::step`], which is what makes the
//! instruction count exact on any KVM (including PVM, which has no PMU). The quirks of stepping on PVM are
//! handled here so that the same sequence of calls always gives the same instruction count and state:
//! - `out` reports only an I/O exit (RIP already past it); `in` reports an I/O exit before completing. Both
//!   are completed by re-entering with `immediate_exit`, so no further instruction runs in that step.
//! - `hlt` never exits as HLT while stepping, and RDTSC/RDRAND never exit at all: the instruction at RIP is
//!   decoded before each step and these are executed here instead, with values the [`Host`] supplies.
//! - A protected-mode 32-bit `iret` cannot be emulated by PVM: see [`crate::emulate`].

use crate::arch::{self, APIC_BASE_ENABLE, CR0_PE, CR4_OSXSAVE, RFLAGS_IF};
use crate::emulate::{self, hex_bytes, set_gpr, Completion, EmulateError};
use crate::host_traps;
use crate::vm::{kvm_err, Host, HostInsn, Machine, MachineError, Step, StopReason};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuExit;
use vocab::Landmarks;

/// How one entry into the guest ended, once I/O has been handed to the devices.
pub(crate) enum Exit {
    /// Port or MMIO access (still to be completed by the next entry).
    Io,
    /// The guest ran: a single-step or a breakpoint (debug exit).
    Ran,
    /// `hlt` (only seen when free running).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// KVM could not emulate the instruction at RIP.
    EmulationFailed,
    /// A signal interrupted KVM_RUN.
    Interrupted,
}

impl Machine {
    /// Executes exactly one guest instruction (or reports that the guest is idle or stopped). Landmarks
    /// are counted as the landmark clock would see them (see [`crate::clock`]).
    pub fn step(&mut self, host: &mut dyn Host) -> Result<Step, MachineError> {
        if self.cpu.halted {
            return Ok(Step::Idle);
        }
        let insn = self.decode_at_rip();
        if let Some(insn) = insn {
            if let Some(step) = self.execute_here(&insn, host)? {
                return Ok(step);
            }
        }
        let flags_slot = self
            .cpu
            .queued
            .is_some()
            .then(|| self.pushed_flags_slot())
            .flatten()
            .filter(|_| !self.legacy_stale_regs);
        // Whether this step retires a conditional branch (a landmark of the pmu clock): no event is
        // delivered first, and RIP ends at one of the branch's two destinations.
        let branch = insn
            .filter(|i| {
                self.counting == Landmarks::Branches
                    && self.cpu.queued.is_none()
                    && !self.cpu.kvm_event
                    && i.flow_control() == FlowControl::ConditionalBranch
            })
            .filter(|_| self.hardware.is_none())
            .map(|i| (i.next_ip(), i.near_branch_target()));
        let stop = self.run_one(host)?;
        if let Some(slot) = flags_slot {
            self.clear_pushed_trap_flag(slot);
        }
        if let Some((next, target)) = branch {
            let rip = self.cpu.regs.rip;
            if rip == next || rip == target {
                self.landmarks += 1;
            }
        }
        Ok(stop.map(Step::Stopped).unwrap_or(Step::Retired))
    }

    /// The landmarks an exit the VMM completes itself makes: one, unless landmarks are branches.
    fn exit_landmark(&self) -> u64 {
        u64::from(self.counting == Landmarks::Exits)
    }

    /// Decodes the instruction at CS:RIP, or None if its bytes are not readable (KVM will raise the fault).
    pub(crate) fn decode_at_rip(&self) -> Option<Instruction> {
        self.decode_at(self.cpu.regs.rip)
    }

    /// Decodes the instruction at CS:`rip` in the current mode, or None if its bytes are not readable or
    /// not an instruction.
    pub fn decode_at(&self, rip: u64) -> Option<Instruction> {
        let bitness = arch::code_bits(&self.cpu.sregs);
        let linear = self.cpu.sregs.cs.base.wrapping_add(rip);
        let paging = emulate::paging_mode(&self.cpu.sregs);
        let mut bytes = [0u8; 15];
        // The instruction may end on a page the guest has not mapped: then decode what is readable.
        let first = (4096 - (linear & 0xfff) as usize).min(15);
        paging
            .read_linear(&self.mem, linear, &mut bytes[..first])
            .ok()?;
        let len = if paging
            .read_linear(&self.mem, linear + first as u64, &mut bytes[first..])
            .is_ok()
        {
            15
        } else {
            first
        };
        let mut decoder = Decoder::with_ip(bitness, &bytes[..len], rip, DecoderOptions::NONE);
        let insn = decoder.decode();
        (!insn.is_invalid()).then_some(insn)
    }

    /// Executes the instructions KVM would not handle deterministically. Returns None for everything else.
    pub(crate) fn execute_here(
        &mut self,
        insn: &Instruction,
        host: &mut dyn Host,
    ) -> Result<Option<Step>, MachineError> {
        let mut regs = self.cpu.regs;
        match insn.mnemonic() {
            Mnemonic::Hlt => {
                // Free running, `hlt` is an exit: a landmark.
                self.landmarks += self.exit_landmark();
                // With interrupts off, a uniprocessor stops for good; one vCPU of several only parks
                // (the others run on, and the machine stops when none can).
                if regs.rflags & RFLAGS_IF == 0 && !self.is_multiprocessor() {
                    return Ok(Some(Step::Stopped(StopReason::Halted)));
                }
                self.cpu.halted = true;
            }
            Mnemonic::Rdtsc
            | Mnemonic::Rdtscp
            | Mnemonic::Rdrand
            | Mnemonic::Rdseed
            | Mnemonic::Cpuid => {
                if !self.execute_host_insn(insn, host)? {
                    return Ok(None);
                }
                // Free running on PVM, RDRAND and RDSEED fail to emulate and reach the VMM: a landmark.
                if matches!(insn.mnemonic(), Mnemonic::Rdrand | Mnemonic::Rdseed) {
                    self.landmarks += self.exit_landmark();
                }
                self.icount += 1;
                return Ok(Some(Step::Retired));
            }
            _ => return Ok(None),
        }
        regs.rip = insn.next_ip();
        self.set_regs(regs)?;
        self.icount += 1;
        Ok(Some(Step::Retired))
    }

    /// Executes an instruction whose result comes from the host (RDTSC, RDTSCP, RDRAND, RDSEED with a
    /// register operand) with the value `host` gives. False if it is not one.
    pub(crate) fn execute_host_insn(
        &mut self,
        insn: &Instruction,
        host: &mut dyn Host,
    ) -> Result<bool, MachineError> {
        let mut regs = self.cpu.regs;
        match insn.mnemonic() {
            Mnemonic::Rdtsc | Mnemonic::Rdtscp => {
                let which = if insn.mnemonic() == Mnemonic::Rdtsc {
                    HostInsn::Rdtsc
                } else {
                    HostInsn::Rdtscp
                };
                let (tsc, aux) = host.host_value(which);
                regs.rax = tsc & 0xffff_ffff;
                regs.rdx = tsc >> 32;
                if which == HostInsn::Rdtscp {
                    regs.rcx = aux & 0xffff_ffff;
                }
            }
            Mnemonic::Cpuid if self.answer_cpuid => {
                // In 64-bit mode CPUID clears the upper halves, as any 32-bit register write does.
                let [a, b, c, d] = self.cpuid_answer(regs.rax as u32, regs.rcx as u32);
                (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (a.into(), b.into(), c.into(), d.into());
            }
            Mnemonic::Rdrand | Mnemonic::Rdseed => {
                let which = if insn.mnemonic() == Mnemonic::Rdrand {
                    HostInsn::Rdrand
                } else {
                    HostInsn::Rdseed
                };
                if insn.op0_kind() != OpKind::Register {
                    return Ok(false);
                }
                let (value, _) = host.host_value(which);
                set_gpr(&mut regs, insn.op0_register(), value);
                // CF=1 (a value is available); OF, SF, ZF, AF, PF cleared.
                regs.rflags = (regs.rflags & !0x8d5) | 1;
            }
            _ => return Ok(false),
        }
        regs.rip = insn.next_ip();
        self.set_regs(regs)?;
        Ok(true)
    }

    /// What CPUID leaf `leaf`, subleaf `subleaf` returns on the guest's CPU, from its table. As on Intel
    /// CPUs (the portable model is GenuineIntel), a leaf above the highest basic or extended leaf reads as
    /// the highest basic leaf; the hypervisor range, which the table does not describe, reads as zeros.
    /// Two bits follow the vCPU's state, as KVM makes them: APIC (leaf 1 EDX bit 9) is clear while
    /// IA32_APIC_BASE disables the APIC, and OSXSAVE (leaf 1 ECX bit 27) mirrors CR4.OSXSAVE.
    pub(crate) fn cpuid_answer(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let find = |function: u32, index: u32| {
            self.cpuid_table.iter().find(|e| {
                e[0] == function
                    && (e[2] & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e[1] == index)
            })
        };
        let max = |function| find(function, 0).map_or(0, |e| e[3]);
        let (max_basic, max_extended) = (max(0), max(0x8000_0000));
        let leaf = match leaf {
            0x4000_0000..=0x4fff_ffff => return [0; 4],
            0x8000_0000.. if leaf > max_extended => max_basic,
            _ if leaf < 0x8000_0000 && leaf > max_basic => max_basic,
            _ => leaf,
        };
        let mut out = find(leaf, subleaf).map_or([0; 4], |e| [e[3], e[4], e[5], e[6]]);
        if leaf == 1 {
            if self.cpu.sregs.apic_base & APIC_BASE_ENABLE == 0 {
                out[3] &= !(1 << 9);
            }
            out[2] = out[2] & !(1 << 27) | u32::from(self.cpu.sregs.cr4 & CR4_OSXSAVE != 0) << 27;
            if self.is_multiprocessor() {
                out[1] = out[1] & 0x00ff_ffff | u32::from(self.cpu.id) << 24;
            }
        }
        if leaf == 0xb && self.is_multiprocessor() {
            out[3] = u32::from(self.cpu.id);
        }
        out
    }

    /// Sets the registers as an instruction the VMM completed left them.
    pub(crate) fn set_regs(&mut self, regs: kvm_regs) -> Result<(), MachineError> {
        self.set_general_registers(regs)?;
        self.completed_instruction();
        Ok(())
    }

    /// Enters the guest once and hands any I/O to the devices.
    pub(crate) fn enter(&mut self, host: &mut dyn Host) -> Result<Exit, MachineError> {
        // An entry delivers what was queued, unless a signal ended KVM_RUN before the guest ran.
        let queued = self.cpu.queued.take();
        let entered_at = (self.cpu.regs.rip, self.cpu.regs.rsp);
        let mut mmio_write = None;
        let counted_from = self.hardware_entry()?;
        let exit = match self.cpu.fd.run() {
            Ok(VcpuExit::Debug(debug)) => {
                self.cpu.last_dr6 = debug.dr6;
                Exit::Ran
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let trap = matches!(
                    port,
                    host_traps::RDTSC_PORT | host_traps::TRAP_PORT | host_traps::CPUID_PORT
                );
                if trap && !self.host_traps.is_empty() {
                    self.cpu.host_trap_hit = Some(port);
                } else {
                    self.devices.io_out(port, data, host);
                }
                Exit::Io
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.devices.io_in(port, data, host);
                Exit::Io
            }
            // The APICs of a multiprocessor machine and the virtio disks; elsewhere, like an empty bus,
            // reads float high and writes are dropped.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match self
                    .ioapic
                    .as_ref()
                    .and_then(|io| apic_window(addr).map(|w| (io, w)))
                {
                    Some((_, ApicWindow::Local(offset))) => {
                        self.cpu
                            .lapic
                            .read_with(offset, data, &mut || host.monotonic_ns());
                    }
                    Some((ioapic, ApicWindow::Io(offset))) => ioapic.read(offset, data),
                    None => self.devices.mmio_read(addr, data),
                }
                Exit::Io
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                // Handled once the exit's borrow of the vCPU ends: an APIC write may reach other vCPUs.
                let mut bytes = [0u8; 8];
                let len = data.len().min(bytes.len());
                bytes[..len].copy_from_slice(&data[..len]);
                mmio_write = Some((addr, bytes, len));
                Exit::Io
            }
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::InternalError) => Exit::EmulationFailed,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            Ok(other) => {
                let what = format!("{other:?}");
                self.refresh_regs();
                return Err(MachineError::UnexpectedExit {
                    icount: self.icount,
                    rip: self.cpu.regs.rip,
                    what,
                });
            }
        };
        // What the hardware counter counted in that run, read before anything the exit makes us do.
        self.landmarks += self.hardware_exit(counted_from)?;
        if let Some((addr, bytes, len)) = mmio_write {
            self.mmio_write(addr, &bytes[..len], host)?;
        }
        // Every exit, a signal's included, leaves the events and registers in kvm_run (SyncReg): one
        // copy of them serves both questions below.
        let sync = self.cpu.fd.sync_regs();
        let events = sync.events;
        let held = events.exception.injected != 0
            || events.exception.pending != 0
            || events.interrupt.injected != 0
            || events.nmi.injected != 0;
        self.cpu.shadow = events.interrupt.shadow != 0;
        self.cpu.stale_shadow = false;
        // A signal that cut short the entry meant to deliver our event leaves it delivered or not,
        // and KVM does not always say which: its events may show it, `in_flight` may, and where the
        // guest stands where it entered (the handler would have moved RIP and RSP) it is taken as
        // waiting still. Wrongly waiting costs only this point as a place to deliver input; wrongly
        // delivered, an interrupt queued beside a #BP still in flight made a recording that did not
        // replay (int3loop, a kick at the int3's return address, once in a full test suite's load).
        let unmoved = (sync.regs.rip, sync.regs.rsp) == entered_at;
        if matches!(exit, Exit::Interrupted)
            && queued.is_some()
            && (held || unmoved || self.in_flight())
        {
            // Still waiting in the vCPU: it is ours, not KVM's.
            self.cpu.queued = queued;
            self.cpu.kvm_event = false;
        } else {
            self.cpu.kvm_event = held;
        }
        self.landmarks += self.landmarks_in(&exit);
        Ok(exit)
    }

    /// A guest MMIO write: to the running vCPU's local APIC or the IOAPIC on a multiprocessor machine,
    /// else to the disks.
    fn mmio_write(
        &mut self,
        addr: u64,
        data: &[u8],
        host: &mut dyn Host,
    ) -> Result<(), MachineError> {
        match self.ioapic.is_some().then(|| apic_window(addr)).flatten() {
            Some(ApicWindow::Local(offset)) => self.lapic_write(offset, data, host),
            Some(ApicWindow::Io(offset)) => self.ioapic_write(offset, data),
            None => {
                self.devices.mmio_write(addr, data, &mut self.mem);
                Ok(())
            }
        }
    }

    /// Completes a pending I/O without running further: with `immediate_exit` KVM finishes the operation and
    /// returns before the guest executes anything else (a string I/O may need more rounds).
    pub(crate) fn complete_io(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
        self.cpu.fd.set_kvm_immediate_exit(1);
        let result = loop {
            match self.enter(host) {
                Ok(Exit::Io) => continue,
                other => break other.map(|_| ()),
            }
        };
        self.cpu.fd.set_kvm_immediate_exit(0);
        result?;
        if let Some(port) = self.cpu.host_trap_hit.take() {
            self.complete_host_trap(port, host)?;
        }
        Ok(())
    }

    /// A trap `out` has completed (RIP is past it): if it replaced a host instruction, complete that
    /// instruction with the value `host` gives and move RIP past it. A write to the port from
    /// anywhere else does nothing, as on a PC.
    pub(crate) fn complete_host_trap(
        &mut self,
        port: u16,
        host: &mut dyn Host,
    ) -> Result<(), MachineError> {
        self.refresh_regs();
        let end = self.cpu.sregs.cs.base.wrapping_add(self.cpu.regs.rip);
        let Ok(end) = emulate::paging_mode(&self.cpu.sregs).translate(&self.mem, end) else {
            return Ok(());
        };
        let Some(original) = self.host_traps.original_ending_at(port, end) else {
            return Ok(());
        };
        let bitness = arch::code_bits(&self.cpu.sregs);
        let rip = self.cpu.regs.rip.wrapping_sub(2);
        let insn = Decoder::with_ip(bitness, original, rip, DecoderOptions::NONE).decode();
        self.execute_host_insn(&insn, host)?;
        Ok(())
    }

    /// Bookkeeping after the guest ran: device interrupts, output, exit requests, registers.
    pub(crate) fn after_exit(
        &mut self,
        mut stop: Option<StopReason>,
    ) -> Result<Option<StopReason>, MachineError> {
        self.sync_irqs()?;
        self.output.extend(self.devices.uart.take_output());
        if let Some(status) = self.devices.debug_exit.take_exit() {
            stop = Some(StopReason::GuestExit { status });
        }
        self.refresh_regs();
        Ok(stop)
    }

    /// Runs the vCPU for one single-step, handling the exit; returns the stop if the guest ended.
    pub(crate) fn run_one(
        &mut self,
        host: &mut dyn Host,
    ) -> Result<Option<StopReason>, MachineError> {
        if self.cpu.stale_shadow {
            self.clear_interrupt_shadow()?;
        }
        let exit = loop {
            match self.enter(host)? {
                // A signal arrived before the guest ran: nothing happened, try again.
                Exit::Interrupted => continue,
                exit => break exit,
            }
        };
        let stop = self.finish_exit(exit, host)?;
        self.icount += 1;
        Ok(stop)
    }

    /// Completes what an exit left pending (the I/O, or an instruction KVM could not emulate) and does the
    /// bookkeeping; returns the stop if the guest ended.
    pub(crate) fn finish_exit(
        &mut self,
        exit: Exit,
        host: &mut dyn Host,
    ) -> Result<Option<StopReason>, MachineError> {
        let stop = match exit {
            // Completed at once, so that inputs delivered at this position find the instruction finished.
            Exit::Io => {
                self.complete_io(host)?;
                None
            }
            Exit::Hlt => {
                self.cpu.halted = true;
                None
            }
            Exit::Shutdown => Some(StopReason::TripleFault),
            Exit::EmulationFailed => {
                self.refresh_regs();
                self.complete_failed_emulation(host)?;
                None
            }
            Exit::Ran | Exit::Interrupted => None,
        };
        self.after_exit(stop)
    }

    pub(crate) fn refresh_regs(&mut self) {
        let sync = self.cpu.fd.sync_regs_mut();
        self.cpu.regs = sync.regs;
        self.cpu.sregs = sync.sregs;
    }

    /// KVM gave up on the instruction at RIP: complete it ourselves if it is one we know (protected-mode
    /// `iret`), else report it with its bytes.
    pub(crate) fn complete_failed_emulation(
        &mut self,
        host: &mut dyn Host,
    ) -> Result<(), MachineError> {
        let insn = self.decode_at_rip();
        // Running free on PVM, RDRAND and RDSEED fail to emulate: execute them here, as the step clock
        // does, so their results are logged.
        if let Some(insn) =
            insn.filter(|i| matches!(i.mnemonic(), Mnemonic::Rdrand | Mnemonic::Rdseed))
        {
            if self.execute_host_insn(&insn, host)? {
                return Ok(());
            }
        }
        let protected = self.cpu.sregs.cr0 & CR0_PE != 0 && !arch::long_mode(&self.cpu.sregs);
        let mut regs = self.cpu.regs;
        let mut sregs = self.cpu.sregs;
        let simple = match &insn {
            Some(insn) => emulate::complete_simple(insn, &mut self.mem, &mut regs, &sregs),
            None => Ok(None),
        };
        let mut simple = simple.map_err(|source| MachineError::Emulation {
            icount: self.icount,
            source,
        })?;
        if let Some(insn) = insn.filter(|_| simple.is_none()) {
            let mut fpu = self.cpu.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
            let fsw = fpu.fsw;
            simple = emulate::complete_x87(&insn, &mut fpu.fsw, sregs.cr0, &mut regs);
            if fpu.fsw != fsw {
                self.cpu.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
            }
        }
        if let Some(completion) = simple {
            self.set_regs(regs)?;
            match completion {
                Completion::Done => {}
                Completion::Exception(vector) | Completion::Fault(vector) => {
                    self.inject_exception(vector)?;
                }
            }
            return Ok(());
        }
        let result = match insn.map(|i| i.code()) {
            Some(iced_x86::Code::Iretd) if protected => {
                emulate::iret_protected(&self.mem, &mut regs, &mut sregs, false)
            }
            Some(iced_x86::Code::Iretw) if protected => {
                emulate::iret_protected(&self.mem, &mut regs, &mut sregs, true)
            }
            _ => {
                let mut bytes = [0u8; 15];
                let linear = self.cpu.sregs.cs.base.wrapping_add(self.cpu.regs.rip);
                let n = if emulate::paging_mode(&self.cpu.sregs)
                    .read_linear(&self.mem, linear, &mut bytes)
                    .is_ok()
                {
                    15
                } else {
                    0
                };
                Err(EmulateError::Unsupported {
                    rip: self.cpu.regs.rip,
                    bytes: hex_bytes(&bytes[..n]),
                })
            }
        };
        result.map_err(|source| MachineError::Emulation {
            icount: self.icount,
            source,
        })?;
        self.cpu
            .fd
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.cpu
            .fd
            .set_regs(&regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        self.cpu.regs = regs;
        self.cpu.sregs = sregs;
        self.publish_regs();
        self.completed_instruction();
        Ok(())
    }

    /// After the VMM set registers itself (completing an instruction), makes the copy in `kvm_run` that
    /// [`Machine::refresh_regs`] reads agree: KVM fills it only at its next exit, so until then it still
    /// shows the instruction before. (Version-1 traces were recorded with that stale copy: for them it
    /// is kept, so that they replay as recorded.)
    pub(crate) fn publish_regs(&mut self) {
        if self.legacy_stale_regs {
            return;
        }
        let sync = self.cpu.fd.sync_regs_mut();
        sync.regs = self.cpu.regs;
        sync.sregs = self.cpu.sregs;
    }
}

/// Which APIC register window a guest-physical address falls in, on a multiprocessor machine.
enum ApicWindow {
    /// The running vCPU's local APIC page, at this offset.
    Local(u64),
    /// The IOAPIC's window, at this offset.
    Io(u64),
}

fn apic_window(addr: u64) -> Option<ApicWindow> {
    use devices::{ioapic, lapic};
    if (lapic::APIC_BASE..lapic::APIC_BASE + lapic::APIC_SIZE).contains(&addr) {
        Some(ApicWindow::Local(addr - lapic::APIC_BASE))
    } else if (ioapic::BASE..ioapic::BASE + ioapic::MMIO_SIZE).contains(&addr) {
        Some(ApicWindow::Io(addr - ioapic::BASE))
    } else {
        None
    }
}
