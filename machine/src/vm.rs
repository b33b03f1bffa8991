//! The machine: one KVM VM with one vCPU, guest RAM and the userspace devices, driven one instruction at
//! a time by the `step` clock.
//!
//! Every instruction boundary passes through [`Machine::step`], which is what makes the instruction count
//! exact on any KVM (including PVM, which has no PMU). The quirks of stepping on PVM are handled here so that
//! the same sequence of calls always gives the same instruction count and the same state:
//! - `out` reports only an I/O exit (RIP already past it); `in` reports an I/O exit before completing. Both
//!   are completed by re-entering with `immediate_exit`, so no further instruction runs in that step.
//! - `hlt` never exits as HLT while stepping, and RDTSC/RDRAND never exit at all: the instruction at RIP is
//!   decoded before each step and these are executed here instead, with values the [`Host`] supplies.
//! - A protected-mode 32-bit `iret` cannot be emulated by PVM: see [`crate::emulate`].

use crate::cpu::{CpuError, CpuState, XsaveLayout};
use crate::cpu_model::{CpuModel, ModelError};
use crate::emulate::{self, hex_bytes, set_gpr, Completion, EmulateError};
use crate::host_traps::{self, HostTraps};
use boot::loader::{self, LoaderError};
use devices::disk::DiskImage;
use devices::{Devices, TimeSource, MAX_DISKS};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};
use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use memory::{GuestMemory, MemoryError, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use thiserror::Error;
pub use vocab::{Clock, HostInsn, StopReason};

/// Errors from creating or running the machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (retrovisor needs KVM: check that /dev/kvm exists and that you may read and write it)")]
    NoKvm(kvm_ioctls::Error),
    /// A recorded CPUID table has more entries than KVM takes.
    #[error("the trace's CPUID table has {0} entries; KVM takes at most {KVM_MAX_CPUID_ENTRIES}")]
    BadCpuid(usize),
    /// The host cannot give the guest its CPU.
    #[error(transparent)]
    CpuModel(#[from] ModelError),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// vCPU state could not be read or written.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Guest RAM could not be set up or accessed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel image could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// An instruction neither KVM nor we can complete.
    #[error("at icount {icount}: {source}")]
    Emulation {
        /// Instructions retired before the failing one.
        icount: u64,
        /// What failed.
        source: EmulateError,
    },
    /// KVM stopped the vCPU for a reason we do not handle.
    #[error("at icount {icount}, rip {rip:#x}: unexpected KVM exit: {what}")]
    UnexpectedExit {
        /// Instructions retired so far.
        icount: u64,
        /// Guest RIP.
        rip: u64,
        /// The exit.
        what: String,
    },
    /// A checkpoint's state blob does not decode.
    #[error("checkpoint machine state does not decode: {0}")]
    BadState(postcard::Error),
    /// A checkpoint's device state does not fit this machine (its disks).
    #[error("checkpoint device state does not fit this machine: {0}")]
    BadDeviceState(String),
    /// More disks than the machine has slots for.
    #[error("{count} disks given; a machine has at most {MAX_DISKS}")]
    TooManyDisks {
        /// How many were given.
        count: usize,
    },
    /// A checkpoint was taken with different RAM size.
    #[error("checkpoint page {pfn} is outside guest RAM ({pages} pages)")]
    BadPage {
        /// The page frame number.
        pfn: u64,
        /// Pages of RAM this machine has.
        pages: usize,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

/// The machine's shape; recorded in the trace header so replay builds the same machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Kernel command line passed through the multiboot information or PVH's start information.
    pub cmdline: String,
    /// Initial ramdisk, passed to a PVH kernel as its first module.
    pub initrd: Option<Vec<u8>>,
    /// Disk images, one virtio block device each (at most [`MAX_DISKS`]); the guest's writes go to an
    /// overlay in the machine state, never to these bytes.
    pub disks: Vec<DiskImage>,
    /// Hide RDRAND, RDSEED and RDTSCP from the guest's CPUID: the landmark clock runs free, where their
    /// results never reach the VMM to be logged, so a guest must not be told it has them.
    pub hide_host_values: bool,
    /// The guest's CPUID, as [`Machine::cpuid_table`] gives it: a replay builds the CPU its recording
    /// had. None: the table of `cpu`.
    pub cpuid: Option<Vec<[u32; 7]>>,
    /// The CPU model the guest gets when `cpuid` is None.
    pub cpu: CpuModel,
    /// The VMM answers the guest's CPUID from the table itself, rather than KVM: this host's KVM (PVM)
    /// mixes the host's own feature bits into leaves 1 and 7 whatever table it is given, so only the
    /// VMM can show the guest the same CPU on every host. With the step clock every `cpuid` is decoded
    /// before it runs; running free, those in the image are trapped (see [`crate::host_traps`]).
    pub answer_cpuid: bool,
    /// Trap the image's `rdtsc`, `rdtscp`, `rdrand` and `rdseed` instructions to the VMM (see
    /// [`crate::host_traps`]), so that what a free-running guest reads from the host is logged and replayed.
    pub trap_host_insns: bool,
}

/// What the machine asks of its environment: time for device reads, and results of host-sourced instructions.
/// The recorder answers from the host (and logs), the replayer from the trace.
pub trait Host: TimeSource {
    /// The result of `insn`: the value (TSC or random number) and, for RDTSCP, TSC_AUX.
    fn host_value(&mut self, insn: HostInsn) -> (u64, u64);
}

/// The result of one [`Machine::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// One instruction retired.
    Retired,
    /// The guest is halted waiting for an interrupt; nothing retired.
    Idle,
    /// The guest ended; nothing more will run.
    Stopped(StopReason),
}

/// Machine state that is not guest RAM: serialized into checkpoints and hashed into digests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct MachineState {
    /// The position: the icount in step traces, the landmark count in landmark traces.
    icount: u64,
    halted: bool,
    cpu: CpuState,
    devices: Devices,
}

/// A checkpoint of the machine as the trace stores it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Position: instruction count (step clock) or landmark count (landmark clock).
    pub icount: u64,
    /// Guest RIP.
    pub rip: u64,
    /// Serialized CPU and device state.
    pub state: Vec<u8>,
    /// (page frame, contents): every non-zero page if full, else pages changed since the previous snapshot.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// The page frames written since the previous snapshot (by the guest or a device's DMA): `pages`'
    /// frames when incremental; what a search may skip by when full.
    pub written: Vec<u64>,
    /// Digest of the whole machine (see `Machine::digest`).
    pub digest: [u8; 32],
}

/// RFLAGS.IF: maskable interrupts enabled.
pub(crate) const RFLAGS_IF: u64 = 1 << 9;

/// An event queued in the vCPU for delivery at the next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// An interrupt from the PIC ([`Machine::inject_interrupt`]).
    Interrupt,
    /// An exception of an instruction the VMM completed (the #BP of an `int3`).
    Exception,
}

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

/// The deterministic PC.
pub struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    pub(crate) vcpu: VcpuFd,
    pub(crate) mem: GuestMemory,
    /// The userspace devices.
    pub devices: Devices,
    pub(crate) icount: u64,
    /// Landmarks so far: exits the guest itself caused (see [`crate::clock`]).
    pub(crate) landmarks: u64,
    /// How the machine is driven.
    pub(crate) clock: Clock,
    /// What the state blob records as the position: the icount (step traces) or the landmark count.
    pub(crate) positions: Clock,
    /// An event we queued in the vCPU that no entry has delivered yet.
    pub(crate) queued: Option<Queued>,
    /// The CPUID given to KVM (see [`Machine::cpuid_table`]).
    cpuid_table: Vec<[u32; 7]>,
    /// Whether the VMM answers CPUID from `cpuid_table` (see [`MachineConfig::answer_cpuid`]).
    answer_cpuid: bool,
    /// Where that CPU's XSAVE components lie: what a canonical state keeps.
    xsave_layout: XsaveLayout,
    /// The image's trapped host instructions (see [`crate::host_traps`]); empty unless the config asked
    /// for them.
    host_traps: HostTraps,
    /// The last exit was a write to this trap port ([`host_traps::RDTSC_PORT`] or
    /// [`host_traps::TRAP_PORT`]): once the `out` completes, complete the instruction it replaced.
    host_trap_hit: Option<u16>,
    /// Pages written since the last [`Machine::mark_checkpoint`] (a bitmap): what a fingerprint digests.
    pub(crate) dirty_since_mark: Vec<u64>,
    /// Pages written since the last [`Machine::take_dirty_pages`].
    dirty_since_take: Vec<u64>,
    /// Pages written since the last [`Machine::wrote_since_probe`].
    dirty_since_probe: Vec<u64>,
    /// xxh3-128 of every page of RAM as of the last digest (see [`Machine::digest_of`]).
    page_hashes: Vec<u128>,
    /// Pages whose hash is out of date.
    stale_hashes: Vec<u64>,
    /// Whether digests cover RAM by page hashes.
    digest_pages: bool,
    /// Set after `hlt` with interrupts enabled, until an interrupt is injected.
    pub(crate) halted: bool,
    /// Registers as of the last exit or the last change we made.
    pub(crate) regs: kvm_regs,
    pub(crate) sregs: kvm_sregs,
    /// An STI or MOV SS interrupt shadow covers the next instruction, as KVM reported it at the last exit
    /// (and no instruction the VMM completed since has ended it).
    pub(crate) shadow: bool,
    /// KVM held an exception or interrupt of its own for delivery at the last exit (one whose delivery a
    /// host interrupt cut short): the next entry delivers that first.
    pub(crate) kvm_event: bool,
    /// Whether KVM holds an interrupt shadow we made stale by completing an instruction ourselves.
    pub(crate) stale_shadow: bool,
    /// See [`Machine::keep_stale_registers`].
    legacy_stale_regs: bool,
    /// The breakpoints in the debug registers while running free (see [`Machine::arm`]).
    pub(crate) breakpoints: Vec<u64>,
    /// Which of `breakpoints` fired last.
    pub(crate) stop_fired: Option<usize>,
    /// DR6 at the last debug exit: which debug registers matched.
    pub(crate) last_dr6: u64,
    output: Vec<u8>,
}

const MEM_SLOT: u32 = 0;
/// `_IOW(KVMIO, 0x86, struct kvm_interrupt)`.
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;
/// A GDT with a flat code (0x08) and data (0x10) segment, for the boot state (Multiboot leaves GDTR undefined,
/// but a valid one makes an early `iret` or segment reload well defined).
const BOOT_GDT_ADDR: u64 = 0x500;
const BOOT_GDT: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

impl Machine {
    /// Creates the VM, loads `image` (Multiboot v1, or an ELF with a PVH entry) and sets the vCPU at the
    /// kernel's entry.
    pub fn new(config: &MachineConfig, image: &[u8]) -> Result<Machine, MachineError> {
        let kvm = Kvm::new().map_err(MachineError::NoKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut mem = GuestMemory::new(config.ram_bytes)?;
        let region = kvm_userspace_memory_region {
            slot: MEM_SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: mem.host_addr(),
        };
        // SAFETY: the region is our anonymous mapping, which lives as long as the VM (both are owned by the
        // Machine, and `vm` is dropped first because fields drop in declaration order after `_kvm`... the
        // mapping outlives the VM because `mem` is declared after `vm` and `vcpu`).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpuid = match &config.cpuid {
            Some(table) => {
                // A recorded CPU with a feature this host cannot give would replay differently, if at
                // all: refuse it up front, by name.
                let cpuid = cpuid_from_table(table)?;
                let missing = crate::cpu_model::missing_features(cpuid.as_slice(), &supported);
                if !missing.is_empty() {
                    return Err(ModelError::Missing {
                        what: "recorded CPU".into(),
                        missing,
                        host: crate::cpu_model::host_cpu().to_string(),
                    }
                    .into());
                }
                cpuid
            }
            None => config.cpu.cpuid(&supported, config.hide_host_values)?,
        };
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let cpuid_table: Vec<[u32; 7]> = cpuid
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        // The events too, so that every exit says, without another ioctl, whether an interrupt shadow or
        // an event of KVM's blocks an interrupt (see [`Machine::interrupt_blocker`]).
        vcpu.set_sync_valid_reg(SyncReg::VcpuEvents);

        let (protocol, boot) =
            loader::load(image, &config.cmdline, config.initrd.as_deref(), &mut mem)?;
        // Only an image loaded by its ELF headers: its sections then say where each instruction is.
        let host_traps = if config.trap_host_insns && boot.by_elf {
            HostTraps::find(image, config.answer_cpuid)
        } else {
            HostTraps::default()
        };
        host_traps.patch(&mut mem)?;
        for (i, d) in BOOT_GDT.iter().enumerate() {
            mem.write(BOOT_GDT_ADDR + 8 * i as u64, &d.to_le_bytes())?;
        }
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_bindings::kvm_segment {
            selector: 0x10,
            type_: 0x3,
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = BOOT_GDT_ADDR;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.cr0 = 0x11; // PE | ET: protected mode, paging off, as Multiboot and PVH specify.
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: u64::from(boot.entry),
            rax: match protocol {
                loader::Protocol::Multiboot => u64::from(loader::BOOTLOADER_MAGIC),
                loader::Protocol::Pvh => 0,
            },
            rbx: u64::from(boot.info_addr),
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let debug = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
            ..Default::default()
        };
        vcpu.set_guest_debug(&debug)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        if config.disks.len() > MAX_DISKS {
            return Err(MachineError::TooManyDisks {
                count: config.disks.len(),
            });
        }
        let devices = Devices::with_disks(mem.size(), &config.disks);
        let (pages, bitmap_words) = (mem.pages(), mem.pages().div_ceil(64));
        let mut machine = Machine {
            _kvm: kvm,
            vm,
            vcpu,
            mem,
            devices,
            icount: 0,
            landmarks: 0,
            clock: Clock::Step,
            positions: Clock::Step,
            queued: None,
            host_traps,
            host_trap_hit: None,
            xsave_layout: XsaveLayout::from_cpuid(&cpuid_table),
            answer_cpuid: config.answer_cpuid,
            cpuid_table,
            dirty_since_mark: vec![0; bitmap_words],
            dirty_since_take: vec![0; bitmap_words],
            dirty_since_probe: vec![0; bitmap_words],
            page_hashes: vec![0; pages],
            stale_hashes: vec![u64::MAX; bitmap_words],
            digest_pages: false,
            halted: false,
            regs,
            sregs,
            shadow: false,
            kvm_event: false,
            stale_shadow: false,
            legacy_stale_regs: false,
            breakpoints: Vec::new(),
            stop_fired: None,
            last_dr6: 0,
            output: Vec::new(),
        };
        // The loader's writes are in the VMM-dirty map; the first (full) checkpoint covers them.
        machine.take_dirty_pages()?;
        Ok(machine)
    }

    /// Instructions retired since boot.
    pub fn icount(&self) -> u64 {
        self.icount
    }

    /// Guest RIP.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// General-purpose registers as of now.
    pub fn regs(&self) -> &kvm_regs {
        &self.regs
    }

    /// Segment and control registers as of now.
    pub fn sregs(&self) -> &kvm_sregs {
        &self.sregs
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Reads guest memory at a guest-virtual (linear) address through the guest's page tables.
    /// Where the VMM trapped the guest's host instructions (see [`crate::host_traps`]) it shows the
    /// original instructions, as the guest's own code has them.
    pub fn read_virtual(
        &self,
        addr: u64,
        buf: &mut [u8],
    ) -> Result<(), crate::paging::PagingError> {
        let paging = emulate::paging_mode(&self.sregs);
        paging.read_linear(&self.mem, addr, buf)?;
        if !self.host_traps.is_empty() {
            for (phys, range) in paging.pieces(&self.mem, addr, buf.len())? {
                self.host_traps.unpatch(phys, &mut buf[range]);
            }
        }
        Ok(())
    }

    /// The guest's CPUID as the VMM set it: one entry per leaf and subleaf, [function, index, flags, eax,
    /// ebx, ecx, edx] as KVM_SET_CPUID2 takes them.
    pub fn cpuid_table(&self) -> &[[u32; 7]] {
        &self.cpuid_table
    }

    /// How many host instructions of the image the VMM traps (see [`crate::host_traps`]).
    pub fn host_traps(&self) -> usize {
        self.host_traps.len()
    }

    /// The guest-physical address a guest-virtual (linear) address maps to now, through the guest's page
    /// tables.
    pub fn translate(&self, addr: u64) -> Result<u64, crate::paging::PagingError> {
        emulate::paging_mode(&self.sregs).translate(&self.mem, addr)
    }

    /// Serial output the guest produced since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Whether an interrupt is waiting at the PIC and the CPU would take it now.
    pub fn interrupt_ready(&self) -> bool {
        self.interrupts_enabled() && self.devices.pic.has_interrupt()
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
        if self.regs.rflags & RFLAGS_IF == 0 {
            return Some(Blocker::InterruptFlag);
        }
        // Not while an exception (a completed int3's #BP) or an interrupt waits for the next entry: KVM
        // enters with that one and keeps a second for a later entry, and which entry that is depends on
        // host exits (preemption), not on the guest. A timer interrupt queued beside the #BP of Linux's
        // int3 self-test was taken at different points of the handler from run to run under load.
        if let Some(queued) = self.queued {
            return Some(Blocker::Queued(queued));
        }
        if self.kvm_event {
            return Some(Blocker::KvmEvent);
        }
        if self.shadow {
            return Some(Blocker::Shadow);
        }
        None
    }

    /// Acknowledges the PIC's pending interrupt and queues it in the vCPU: the next step delivers it.
    /// Returns the vector, or None if the PIC withdrew it. Only call when [`Machine::interrupt_ready`].
    pub fn inject_interrupt(&mut self) -> Result<Option<u8>, MachineError> {
        let Some(vector) = self.devices.pic.acknowledge() else {
            return Ok(None);
        };
        if self.stale_shadow {
            self.clear_interrupt_shadow()?;
        }
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer, which refers to a live local; the
        // fd is our vCPU. (kvm-ioctls has no wrapper for this ioctl, which only exists without an in-kernel irqchip.)
        let ret = unsafe { libc::ioctl(self.vcpu.as_raw_fd(), KVM_INTERRUPT, &irq) };
        if ret < 0 {
            return Err(kvm_err("KVM_INTERRUPT")(kvm_ioctls::Error::last()));
        }
        self.halted = false;
        self.queued = Some(Queued::Interrupt);
        Ok(Some(vector))
    }

    /// Raises an edge on IRQ `line` at the PIC (a time-driven source such as the PIT).
    pub fn pulse_irq(&mut self, line: u8) {
        self.devices.pic.pulse_irq(line);
    }

    /// Free space in the UART receive FIFO.
    pub fn serial_rx_room(&self) -> usize {
        self.devices.uart.rx_room()
    }

    /// Offers bytes to the UART receiver; returns how many it took.
    pub fn push_serial_rx(&mut self, bytes: &[u8]) -> usize {
        let n = self.devices.uart.push_rx(bytes);
        self.devices.sync_irqs();
        n
    }

    /// Executes exactly one guest instruction (or reports that the guest is idle or stopped). Landmarks
    /// are counted as the landmark clock would see them (see [`crate::clock`]).
    pub fn step(&mut self, host: &mut dyn Host) -> Result<Step, MachineError> {
        if self.halted {
            return Ok(Step::Idle);
        }
        let insn = self.decode_at_rip();
        if let Some(insn) = insn {
            if let Some(step) = self.execute_here(&insn, host)? {
                return Ok(step);
            }
        }
        let flags_slot = self
            .queued
            .is_some()
            .then(|| self.pushed_flags_slot())
            .flatten()
            .filter(|_| !self.legacy_stale_regs);
        let stop = self.run_one(host)?;
        if let Some(slot) = flags_slot {
            self.clear_pushed_trap_flag(slot);
        }
        Ok(stop.map(Step::Stopped).unwrap_or(Step::Retired))
    }

    /// Where the interrupt about to be delivered will push the flags (a linear address and their width),
    /// for a ring-0 guest or a 64-bit one entering ring 0 from ring 3: the cases the guests we run meet.
    fn pushed_flags_slot(&self) -> Option<(u64, usize)> {
        let (r, s) = (&self.regs, &self.sregs);
        let long = s.efer & (1 << 10) != 0;
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
        if s.cr0 & 1 != 0 && s.cs.db == 1 {
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
    fn clear_pushed_trap_flag(&mut self, (linear, width): (u64, usize)) {
        const TF: u64 = 1 << 8;
        let paging = emulate::paging_mode(&self.sregs);
        let mut image = [0u8; 8];
        if paging
            .read_linear(&self.mem, linear, &mut image[..width])
            .is_err()
        {
            return;
        }
        let flags = u64::from_le_bytes(image);
        if flags & TF != 0 {
            let cleared = (flags & !TF).to_le_bytes();
            // Cannot fail: the same bytes were just read.
            let _ = paging.write_linear(&mut self.mem, linear, &cleared[..width]);
        }
    }

    /// Decodes the instruction at CS:RIP, or None if its bytes are not readable (KVM will raise the fault).
    pub(crate) fn decode_at_rip(&self) -> Option<Instruction> {
        self.decode_at(self.regs.rip)
    }

    /// Decodes the instruction at CS:`rip` in the current mode, or None if its bytes are not readable or
    /// not an instruction.
    pub fn decode_at(&self, rip: u64) -> Option<Instruction> {
        let bitness = if self.sregs.efer & (1 << 10) != 0 && self.sregs.cs.l == 1 {
            64
        } else if self.sregs.cs.db == 1 {
            32
        } else {
            16
        };
        let linear = self.sregs.cs.base.wrapping_add(rip);
        let paging = emulate::paging_mode(&self.sregs);
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
    fn execute_here(
        &mut self,
        insn: &Instruction,
        host: &mut dyn Host,
    ) -> Result<Option<Step>, MachineError> {
        let mut regs = self.regs;
        match insn.mnemonic() {
            Mnemonic::Hlt => {
                // Free running, `hlt` is an exit: a landmark.
                self.landmarks += 1;
                if regs.rflags & RFLAGS_IF == 0 {
                    return Ok(Some(Step::Stopped(StopReason::Halted)));
                }
                self.halted = true;
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
                    self.landmarks += 1;
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
    fn execute_host_insn(
        &mut self,
        insn: &Instruction,
        host: &mut dyn Host,
    ) -> Result<bool, MachineError> {
        let mut regs = self.regs;
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
    fn cpuid_answer(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
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
            const APIC_ENABLED: u64 = 1 << 11;
            const CR4_OSXSAVE: u64 = 1 << 18;
            if self.sregs.apic_base & APIC_ENABLED == 0 {
                out[3] &= !(1 << 9);
            }
            out[2] = out[2] & !(1 << 27) | u32::from(self.sregs.cr4 & CR4_OSXSAVE != 0) << 27;
        }
        out
    }

    fn set_regs(&mut self, regs: kvm_regs) -> Result<(), MachineError> {
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        self.regs = regs;
        self.publish_regs();
        self.completed_instruction();
        Ok(())
    }

    /// We completed an instruction ourselves: any STI/MOV SS shadow KVM still holds is over (and cleared
    /// in KVM before the next entry).
    fn completed_instruction(&mut self) {
        self.stale_shadow |= self.shadow;
        self.shadow = false;
    }

    /// Queues exception `vector` (one without an error code) for delivery at the next entry, with the
    /// return address the current RIP.
    fn inject_exception(&mut self, vector: u8) -> Result<(), MachineError> {
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        self.queued = Some(Queued::Exception);
        Ok(())
    }

    pub(crate) fn clear_interrupt_shadow(&mut self) -> Result<(), MachineError> {
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        events.interrupt.shadow = 0;
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        self.stale_shadow = false;
        Ok(())
    }

    /// Enters the guest once and hands any I/O to the devices.
    pub(crate) fn enter(&mut self, host: &mut dyn Host) -> Result<Exit, MachineError> {
        // An entry delivers what was queued, unless a signal ended KVM_RUN before the guest ran.
        let queued = self.queued.take();
        let exit = match self.vcpu.run() {
            Ok(VcpuExit::Debug(debug)) => {
                self.last_dr6 = debug.dr6;
                Exit::Ran
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let trap = matches!(
                    port,
                    host_traps::RDTSC_PORT | host_traps::TRAP_PORT | host_traps::CPUID_PORT
                );
                if trap && !self.host_traps.is_empty() {
                    self.host_trap_hit = Some(port);
                } else {
                    self.devices.io_out(port, data, host);
                }
                Exit::Io
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.devices.io_in(port, data, host);
                Exit::Io
            }
            // The virtio disks; elsewhere, like an empty bus, reads float high and writes are dropped.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.devices.mmio_read(addr, data);
                Exit::Io
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.devices.mmio_write(addr, data, &mut self.mem);
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
                    rip: self.regs.rip,
                    what,
                });
            }
        };
        // Every exit, a signal's included, leaves the events in kvm_run (SyncReg::VcpuEvents).
        let events = self.vcpu.sync_regs().events;
        let held = events.exception.injected != 0
            || events.exception.pending != 0
            || events.interrupt.injected != 0
            || events.nmi.injected != 0;
        self.shadow = events.interrupt.shadow != 0;
        self.stale_shadow = false;
        if matches!(exit, Exit::Interrupted) && queued.is_some() && (held || self.in_flight()) {
            // Still waiting in the vCPU: it is ours, not KVM's.
            self.queued = queued;
            self.kvm_event = false;
        } else {
            self.kvm_event = held;
        }
        self.landmarks += self.landmarks_in(&exit);
        Ok(exit)
    }

    /// After a signal cut an entry short: whether KVM still holds an event we queued where its events do
    /// not show it. PVM takes an injected exception in hand at entry, and a signal that then stops the
    /// entry before the guest runs leaves it in flight: KVM_GET_VCPU_EVENTS shows nothing, yet the next
    /// entry delivers it (seen with the #BP of a completed `int3`: an interrupt queued beside it made
    /// replay diverge). `ready_for_interrupt_injection` says so: it is clear although IF is set and no
    /// shadow blocks. (Only this question is asked of that exit-dependent field: whether an interrupt
    /// can be taken is decided from the state, see [`Machine::interrupt_blocker`].)
    fn in_flight(&mut self) -> bool {
        let run = self.vcpu.get_kvm_run();
        run.ready_for_interrupt_injection == 0
            && self.vcpu.sync_regs().regs.rflags & RFLAGS_IF != 0
            && !self.shadow
    }

    /// Completes a pending I/O without running further: with `immediate_exit` KVM finishes the operation and
    /// returns before the guest executes anything else (a string I/O may need more rounds).
    pub(crate) fn complete_io(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let result = loop {
            match self.enter(host) {
                Ok(Exit::Io) => continue,
                other => break other.map(|_| ()),
            }
        };
        self.vcpu.set_kvm_immediate_exit(0);
        result?;
        if let Some(port) = self.host_trap_hit.take() {
            self.complete_host_trap(port, host)?;
        }
        Ok(())
    }

    /// A trap `out` has completed (RIP is past it): if it replaced a host instruction, complete that
    /// instruction with the value `host` gives and move RIP past it. A write to the port from
    /// anywhere else does nothing, as on a PC.
    fn complete_host_trap(&mut self, port: u16, host: &mut dyn Host) -> Result<(), MachineError> {
        self.refresh_regs();
        let end = self.sregs.cs.base.wrapping_add(self.regs.rip);
        let Ok(end) = emulate::paging_mode(&self.sregs).translate(&self.mem, end) else {
            return Ok(());
        };
        let Some(original) = self.host_traps.original_ending_at(port, end) else {
            return Ok(());
        };
        let bitness = if self.sregs.efer & (1 << 10) != 0 && self.sregs.cs.l == 1 {
            64
        } else {
            32
        };
        let rip = self.regs.rip.wrapping_sub(2);
        let insn = Decoder::with_ip(bitness, original, rip, DecoderOptions::NONE).decode();
        self.execute_host_insn(&insn, host)?;
        Ok(())
    }

    /// Bookkeeping after the guest ran: device interrupts, output, exit requests, registers.
    pub(crate) fn after_exit(&mut self, mut stop: Option<StopReason>) -> Option<StopReason> {
        self.devices.sync_irqs();
        self.output.extend(self.devices.uart.take_output());
        if let Some(status) = self.devices.debug_exit.take_exit() {
            stop = Some(StopReason::GuestExit { status });
        }
        self.refresh_regs();
        stop
    }

    /// Runs the vCPU for one single-step, handling the exit; returns the stop if the guest ended.
    pub(crate) fn run_one(
        &mut self,
        host: &mut dyn Host,
    ) -> Result<Option<StopReason>, MachineError> {
        if self.stale_shadow {
            self.clear_interrupt_shadow()?;
        }
        let stop = loop {
            match self.enter(host)? {
                // A signal arrived before the guest ran: nothing happened, try again.
                Exit::Interrupted => continue,
                Exit::Io => {
                    self.complete_io(host)?;
                    break None;
                }
                Exit::Ran => break None,
                Exit::Hlt => {
                    self.halted = true;
                    break None;
                }
                Exit::Shutdown => break Some(StopReason::TripleFault),
                Exit::EmulationFailed => {
                    self.refresh_regs();
                    self.complete_failed_emulation(host)?;
                    break None;
                }
            }
        };
        let stop = self.after_exit(stop);
        self.icount += 1;
        Ok(stop)
    }

    pub(crate) fn refresh_regs(&mut self) {
        let sync = self.vcpu.sync_regs_mut();
        self.regs = sync.regs;
        self.sregs = sync.sregs;
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
        let protected = self.sregs.cr0 & 1 != 0 && self.sregs.efer & (1 << 10) == 0;
        let mut regs = self.regs;
        let mut sregs = self.sregs;
        let simple = match &insn {
            Some(insn) => emulate::complete_simple(insn, &mut self.mem, &mut regs, &sregs),
            None => Ok(None),
        };
        let mut simple = simple.map_err(|source| MachineError::Emulation {
            icount: self.icount,
            source,
        })?;
        if let Some(insn) = insn.filter(|_| simple.is_none()) {
            let mut fpu = self.vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
            let fsw = fpu.fsw;
            simple = emulate::complete_x87(&insn, &mut fpu.fsw, sregs.cr0, &mut regs);
            if fpu.fsw != fsw {
                self.vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
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
                let linear = self.sregs.cs.base.wrapping_add(self.regs.rip);
                let n = if emulate::paging_mode(&self.sregs)
                    .read_linear(&self.mem, linear, &mut bytes)
                    .is_ok()
                {
                    15
                } else {
                    0
                };
                Err(EmulateError::Unsupported {
                    rip: self.regs.rip,
                    bytes: hex_bytes(&bytes[..n]),
                })
            }
        };
        result.map_err(|source| MachineError::Emulation {
            icount: self.icount,
            source,
        })?;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        self.regs = regs;
        self.sregs = sregs;
        self.publish_regs();
        self.completed_instruction();
        Ok(())
    }

    /// After the VMM set registers itself (completing an instruction), makes the copy in `kvm_run` that
    /// [`Machine::refresh_regs`] reads agree: KVM fills it only at its next exit, so until then it still
    /// shows the instruction before. (Version-1 traces were recorded with that stale copy: for them it
    /// is kept, so that they replay as recorded.)
    fn publish_regs(&mut self) {
        if self.legacy_stale_regs {
            return;
        }
        let sync = self.vcpu.sync_regs_mut();
        sync.regs = self.regs;
        sync.sregs = self.sregs;
    }

    /// Replays a trace recorded before [`Machine::publish_regs`] existed: after an instruction the VMM
    /// completed, the cached registers show the instruction before until the next exit, as they did.
    pub fn keep_stale_registers(&mut self) {
        self.legacy_stale_regs = true;
    }

    fn state(&self) -> Result<MachineState, MachineError> {
        Ok(MachineState {
            icount: self.position(),
            halted: self.halted,
            cpu: CpuState::capture(&self.vcpu, &self.xsave_layout)?,
            devices: self.devices.clone(),
        })
    }

    /// The machine digest: xxh3-128 of the state and RAM, then xxh3-128 of the state alone, so a mismatch
    /// can tell registers and devices from memory. A fast non-cryptographic hash is enough: it detects
    /// divergence, it does not authenticate. RAM is covered as [`Machine::digest_pages`] says: byte for byte
    /// (older traces), or by the cached hash of each page, rehashing only the pages written since the last
    /// digest, so that a checkpoint costs in proportion to what the guest wrote, not to its RAM.
    fn digest_of(&mut self, state_blob: &[u8]) -> Result<[u8; 32], MachineError> {
        let mut whole = xxhash_rust::xxh3::Xxh3::new();
        whole.update(state_blob);
        if self.digest_pages {
            self.refresh_page_hashes()?;
            for h in &self.page_hashes {
                whole.update(&h.to_le_bytes());
            }
        } else {
            whole.update(self.mem.as_slice());
        }
        let mut d = [0u8; 32];
        d[..16].copy_from_slice(&whole.digest128().to_le_bytes());
        d[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(state_blob).to_le_bytes());
        Ok(d)
    }

    /// Rehashes the pages written (by the guest, a device, or a restore) since the last digest.
    fn refresh_page_hashes(&mut self) -> Result<(), MachineError> {
        self.collect_dirty()?;
        for (i, word) in self.stale_hashes.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let pfn = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(h) = self.page_hashes.get_mut(pfn) {
                    *h = xxhash_rust::xxh3::xxh3_128(self.mem.page(pfn));
                }
            }
        }
        Ok(())
    }

    /// Makes checkpoint digests cover RAM through per-page hashes (traces that say `digest: pages`), or
    /// byte for byte (older traces).
    pub fn set_digest_pages(&mut self, pages: bool) {
        self.digest_pages = pages;
    }

    /// Folds the pages written since the last look (KVM's dirty log, and the VMM's own writes) into both
    /// dirty sets.
    pub(crate) fn collect_dirty(&mut self) -> Result<(), MachineError> {
        let kvm_dirty = self
            .vm
            .get_dirty_log(MEM_SLOT, self.mem.size() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let vmm_dirty = self.mem.take_vmm_dirty();
        for (i, ((mark, take), probe)) in self
            .dirty_since_mark
            .iter_mut()
            .zip(self.dirty_since_take.iter_mut())
            .zip(self.dirty_since_probe.iter_mut())
            .enumerate()
        {
            let fresh = kvm_dirty.get(i).copied().unwrap_or(0) | vmm_dirty[i];
            *mark |= fresh;
            *take |= fresh;
            *probe |= fresh;
            self.stale_hashes[i] |= fresh;
        }
        Ok(())
    }

    /// Page frames written since the last snapshot, restore or call of this (by the guest, per KVM's dirty
    /// log, or by the VMM), in increasing order; resets the tracking.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<u64>, MachineError> {
        self.collect_dirty()?;
        let taken = std::mem::replace(
            &mut self.dirty_since_take,
            vec![0; self.dirty_since_mark.len()],
        );
        Ok(bitmap_pages(&taken))
    }

    /// Whether any of the page frames `pfns` was written (by the guest or a device) since the last call;
    /// starts a new period for the next one. What a watchpoint search asks at every landmark: a page
    /// written between two landmarks may have changed and changed back, which comparing values misses.
    pub fn wrote_since_probe(&mut self, pfns: &[u64]) -> Result<bool, MachineError> {
        self.collect_dirty()?;
        let wrote = pfns.iter().any(|&pfn| {
            self.dirty_since_probe
                .get((pfn / 64) as usize)
                .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
        });
        self.dirty_since_probe.fill(0);
        Ok(wrote)
    }

    /// Starts a new checkpoint interval for fingerprints: they digest the pages written since here. Record
    /// and replay call it at the same positions (every checkpoint), so their digests agree.
    pub fn mark_checkpoint(&mut self) -> Result<(), MachineError> {
        self.collect_dirty()?;
        self.dirty_since_mark.fill(0);
        Ok(())
    }

    /// The pages written since the last [`Machine::mark_checkpoint`] (for an in-memory snapshot, which must
    /// put them back on restore so that later fingerprints digest the same pages).
    pub fn dirty_since_checkpoint(&mut self) -> Result<Vec<u64>, MachineError> {
        self.collect_dirty()?;
        Ok(bitmap_pages(&self.dirty_since_mark))
    }

    /// Sets the pages written since the last checkpoint, as [`Machine::dirty_since_checkpoint`] returned
    /// them when a snapshot was taken (after restoring that snapshot).
    pub fn set_dirty_since_checkpoint(&mut self, pages: &[u64]) {
        self.dirty_since_mark.fill(0);
        for &pfn in pages {
            if let Some(word) = self.dirty_since_mark.get_mut((pfn / 64) as usize) {
                *word |= 1 << (pfn % 64);
            }
        }
    }

    /// The serialized CPU and device state (a checkpoint without memory).
    pub fn state_blob(&self) -> Result<Vec<u8>, MachineError> {
        postcard::to_allocvec(&self.state()?).map_err(MachineError::BadState)
    }

    /// Takes a checkpoint: `full` holds every non-zero page, otherwise the pages written since the previous one.
    pub fn snapshot(&mut self, full: bool) -> Result<Snapshot, MachineError> {
        let state = self.state_blob()?;
        let dirty = self.take_dirty_pages()?;
        self.dirty_since_mark.fill(0);
        let pages = if full {
            (0..self.mem.pages() as u64)
                .filter(|&pfn| self.mem.page(pfn as usize).iter().any(|&b| b != 0))
                .collect()
        } else {
            dirty.clone()
        };
        let pages = pages
            .into_iter()
            .map(|pfn| (pfn, self.mem.page(pfn as usize).to_vec()))
            .collect();
        let digest = self.digest_of(&state)?;
        Ok(Snapshot {
            icount: self.position(),
            rip: self.regs.rip,
            state,
            pages,
            written: dirty,
            digest,
        })
    }

    /// The digest of the machine as it is now (as [`Snapshot::digest`] would be): bytes 0-15 cover CPU,
    /// device state and RAM, bytes 16-31 CPU and device state only.
    pub fn digest(&mut self) -> Result<[u8; 32], MachineError> {
        let state = self.state_blob()?;
        self.digest_of(&state)
    }

    /// Decodes a state blob, with its XSAVE region in canonical form (traces recorded before capture
    /// canonicalized it hold the raw form).
    fn canonical_state(&self, blob: &[u8]) -> Result<MachineState, MachineError> {
        let mut state: MachineState = postcard::from_bytes(blob).map_err(MachineError::BadState)?;
        self.xsave_layout.canonicalize(&mut state.cpu.xsave);
        Ok(state)
    }

    /// Whether the machine now holds the state a checkpoint recorded as (`recorded`, `digest`) even
    /// though [`Machine::digest`] differs from `digest`: RAM is identical (the recorded digest over the
    /// recorded state blob and this RAM matches) and the CPU and device state are equal once both are
    /// canonical. So a checkpoint whose XSAVE region was saved in another (equivalent) form, as
    /// traces from before canonicalization hold, is no divergence.
    pub fn equivalent_to(
        &mut self,
        recorded: &[u8],
        digest: &[u8; 32],
    ) -> Result<bool, MachineError> {
        if self.digest_of(recorded)?[..16] != digest[..16] {
            return Ok(false);
        }
        self.state_matches(recorded)
    }

    /// Decodes a state blob as restoring it would make it: canonical, and with this machine's disk
    /// images attached (checkpoints do not hold them), so that it equals [`Machine::state`] when the
    /// machine is in that state.
    fn recorded_state(&self, blob: &[u8]) -> Result<MachineState, MachineError> {
        let mut state = self.canonical_state(blob)?;
        state.devices = self
            .devices
            .restored(state.devices)
            .map_err(MachineError::BadDeviceState)?;
        Ok(state)
    }

    /// Whether the CPU and device state now is the one `recorded` holds (a blob made by
    /// [`Machine::state_blob`], as a checkpoint stores it), once both are canonical: what a replay that
    /// reached a checkpoint's digest checks the state the checkpoint stores against.
    pub fn state_matches(&self, recorded: &[u8]) -> Result<bool, MachineError> {
        Ok(self.recorded_state(recorded)? == self.state()?)
    }

    /// The digest a checkpoint storing the state blob `state` and the RAM the machine holds now
    /// has (see [`Machine::digest`]): its recorded digest, if what it stores is what was digested.
    pub fn digest_with_state(&mut self, state: &[u8]) -> Result<[u8; 32], MachineError> {
        self.digest_of(state)
    }

    /// What differs between the CPU and device state now and `recorded` (a blob made by
    /// [`Machine::state_blob`], as a checkpoint holds it), one line per field, at most `limit` lines:
    /// what a divergence report names.
    pub fn state_differences(
        &self,
        recorded: &[u8],
        limit: usize,
    ) -> Result<Vec<String>, MachineError> {
        let then = self.canonical_state(recorded)?;
        let now = self.state()?;
        let mut out = Vec::new();
        if now.icount != then.icount {
            out.push(format!(
                "icount is {}, recorded {}",
                now.icount, then.icount
            ));
        }
        if now.halted != then.halted {
            out.push(format!(
                "halted is {}, recorded {}",
                now.halted, then.halted
            ));
        }
        out.extend(now.cpu.differences(&then.cpu, &self.xsave_layout));
        if now.devices != then.devices {
            // Devices are plain serde data: compare them as JSON trees to name the field.
            let to_json = |d: &Devices| serde_json::to_value(d).unwrap_or_default();
            json_differences(
                "devices",
                &to_json(&now.devices),
                &to_json(&then.devices),
                &mut out,
            );
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Overwrites one page of RAM with `data` (None: zeroes), without marking it dirty: restoring is how the
    /// baseline is set, not a change to it.
    pub fn restore_page(&mut self, pfn: u64, data: Option<&[u8]>) -> Result<(), MachineError> {
        const ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        let n = self.mem.pages();
        let idx = usize::try_from(pfn)
            .ok()
            .filter(|&p| p < n)
            .ok_or(MachineError::BadPage { pfn, pages: n })?;
        self.stale_hashes[idx / 64] |= 1 << (idx % 64);
        Ok(self.mem.set_page(idx, data.unwrap_or(&ZERO))?)
    }

    /// Restores CPU and device state from a blob made by [`Machine::state_blob`]; memory is left alone.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), MachineError> {
        let st: MachineState = postcard::from_bytes(state).map_err(MachineError::BadState)?;
        let devices = self
            .devices
            .restored(st.devices)
            .map_err(MachineError::BadDeviceState)?;
        st.cpu.restore(&self.vcpu)?;
        match self.positions {
            Clock::Step => self.icount = st.icount,
            Clock::Landmark => self.landmarks = st.icount,
        }
        self.halted = st.halted;
        let events = &st.cpu.events;
        // An event the state holds queued is delivered at the next entry, as when it was queued.
        self.queued = if events.exception.injected != 0 {
            Some(Queued::Exception)
        } else if events.interrupt.injected != 0 {
            Some(Queued::Interrupt)
        } else {
            None
        };
        self.devices = devices;
        self.regs = st.cpu.regs;
        self.sregs = st.cpu.sregs;
        self.shadow = events.interrupt.shadow != 0;
        self.kvm_event = false;
        self.stale_shadow = false;
        self.output.clear();
        Ok(())
    }

    /// Restores a checkpoint: the state blob and the complete set of non-zero pages (absent pages are zero).
    pub fn restore<'a>(
        &mut self,
        state: &[u8],
        pages: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), MachineError> {
        self.mem.clear();
        self.stale_hashes.fill(u64::MAX);
        for (pfn, data) in pages {
            self.restore_page(pfn, Some(data))?;
        }
        self.restore_state(state)?;
        self.take_dirty_pages()?;
        self.dirty_since_mark.fill(0);
        Ok(())
    }

    /// Number of bytes of guest RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.mem.size()
    }

    /// Size of a page, for checkpoint accounting.
    pub const PAGE_SIZE: usize = PAGE_SIZE;
}

/// The page frames whose bits are set in `bitmap`, in increasing order.
fn bitmap_pages(bitmap: &[u64]) -> Vec<u64> {
    bitmap
        .iter()
        .enumerate()
        .flat_map(|(i, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
        .collect()
}

/// Appends "PATH is A, recorded B" for every leaf where two JSON trees differ.
fn json_differences(
    path: &str,
    now: &serde_json::Value,
    then: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (now, then) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, va) in a {
                let vb = b.get(key).unwrap_or(&Value::Null);
                json_differences(&format!("{path}.{key}"), va, vb, out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                json_differences(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if now != then => {
            let short = |v: &Value| {
                let s = v.to_string();
                if s.len() > 80 {
                    format!("{}...", &s[..s.floor_char_boundary(80)])
                } else {
                    s
                }
            };
            out.push(format!(
                "{path} is {}, recorded {}",
                short(now),
                short(then)
            ));
        }
        _ => {}
    }
}

/// The KVM form of a CPUID table from [`Machine::cpuid_table`].
fn cpuid_from_table(table: &[[u32; 7]]) -> Result<kvm_bindings::CpuId, MachineError> {
    let entries: Vec<_> = table
        .iter()
        .map(
            |&[function, index, flags, eax, ebx, ecx, edx]| kvm_bindings::kvm_cpuid_entry2 {
                function,
                index,
                flags,
                eax,
                ebx,
                ecx,
                edx,
                ..Default::default()
            },
        )
        .collect();
    kvm_bindings::CpuId::from_entries(&entries).map_err(|_| MachineError::BadCpuid(table.len()))
}

/// Debugger access to the x87/SSE registers, read from KVM on demand: stepping never needs them, so the
/// machine does not cache them, but a debugger showing all registers does.
impl Machine {
    /// The FPU and SSE registers as the vCPU holds them now.
    pub fn fpu(&self) -> Result<kvm_bindings::kvm_fpu, MachineError> {
        self.vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))
    }
}
