//! The machine: one KVM VM with one vCPU over guest RAM and the userspace devices. This file builds it
//! (memory slot, CPUID, image, boot state) and holds what the rest reads: its parts, its configuration
//! and errors, and the [`Host`] it asks for time and host values. Running it is in [`crate::exits`],
//! interrupts in [`crate::interrupts`], the dirty pages and digests in [`crate::dirty`], checkpoints in
//! [`crate::snapshot`], and the clocks that drive it in [`crate::clock`].

use crate::cpu::{CpuError, XsaveLayout};
use crate::cpu_model::{CpuModel, ModelError};
use crate::emulate::{self, EmulateError};
use crate::host_traps::HostTraps;
use crate::vcpu::{Vcpu, VcpuError};
use boot::loader::{self, LoaderError};
use devices::disk::DiskImage;
use devices::ioapic::Ioapic;
use devices::{Devices, TimeSource, MAX_DISKS};
use kvm_bindings::{
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use memory::{GuestMemory, MemoryError};
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
    /// The pmu clock's hardware counter failed.
    #[error("the pmu clock's counter: {0}")]
    Counter(#[from] crate::perf::PerfError),
    /// The hardware counter's overflow landed past the branch count it was programmed before: its skid
    /// was larger than the margin, or the guest ran on where the overflow signal could not stop it.
    #[error(
        "the branch counter overshot: it was to stop at branch {target}, and counted {counted}"
    )]
    CounterOvershot {
        /// The count the run was to reach.
        target: u64,
        /// The count it reached.
        counted: u64,
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
    /// A vCPU index the machine does not have.
    #[error("there is no vCPU {0} (vCPUs are numbered from 0)")]
    NoSuchCpu(u8),
    /// A vCPU count outside 1 to [`MAX_CPUS`].
    #[error("{0} vCPUs asked for; a machine has 1 to {MAX_CPUS}")]
    BadCpuCount(usize),
    /// A checkpoint was taken with different RAM size.
    #[error("checkpoint page {pfn} is outside guest RAM ({pages} pages)")]
    BadPage {
        /// The page frame number.
        pfn: u64,
        /// Pages of RAM this machine has.
        pages: usize,
    },
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
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
    /// How many vCPUs (1 to [`MAX_CPUS`]). With more than one the machine has a local APIC per vCPU and an
    /// IOAPIC, and runs its vCPUs one at a time (see [`crate::smp`]); with one it is the uniprocessor PC
    /// without an APIC that earlier traces were recorded on.
    pub cpus: usize,
    /// Drop KVM's cached translations (its shadow page tables) at every checkpoint, as a restore must:
    /// PVM writes guest memory when it fills them (the same bytes, but the pages count as written), so
    /// a run that restored a checkpoint, which starts with none, and the recording, which had them warm,
    /// would digest different pages at the kicks after it. Recordings made since then say so in their
    /// trace header (`cold_checkpoints`), and their replays do it too.
    pub cold_checkpoints: bool,
}

/// The most vCPUs a machine has.
pub const MAX_CPUS: usize = 8;

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

/// The deterministic PC.
pub struct Machine {
    pub(crate) _kvm: Kvm,
    pub(crate) vm: VmFd,
    /// See [`MachineConfig::cold_checkpoints`].
    cold_checkpoints: bool,
    /// The vCPU that runs now.
    pub(crate) cpu: Vcpu,
    /// The others, by index (None at the running one's): see [`crate::smp`].
    pub(crate) parked: Vec<Option<Vcpu>>,
    /// The IOAPIC, on a machine with several vCPUs (the 8259 pair alone serves one).
    pub(crate) ioapic: Option<Ioapic>,
    pub(crate) mem: GuestMemory,
    /// The userspace devices.
    pub devices: Devices,
    pub(crate) icount: u64,
    /// Landmarks so far: exits the guest itself caused (see [`crate::clock`]), or with the pmu clock
    /// conditional branches it retired (see [`crate::pmu`]).
    pub(crate) landmarks: u64,
    /// What [`Machine::landmarks`] counts.
    pub(crate) counting: vocab::Landmarks,
    /// The pmu clock's simulated counter (see [`crate::pmu`]), unless `hardware` counts.
    pub(crate) counter: crate::counter::SimulatedCounter,
    /// The pmu clock's hardware counter, where the host has one (see [`Machine::use_hardware_counter`]).
    pub(crate) hardware: Option<crate::perf::HardwareCounter>,
    /// How the machine is driven.
    pub(crate) clock: Clock,
    /// What the state blob records as the position: the icount (step traces) or the landmark count.
    pub(crate) positions: Clock,
    /// The CPUID given to KVM (see [`Machine::cpuid_table`]).
    pub(crate) cpuid_table: Vec<[u32; 7]>,
    /// Whether the VMM answers CPUID from `cpuid_table` (see [`MachineConfig::answer_cpuid`]).
    pub(crate) answer_cpuid: bool,
    /// Where that CPU's XSAVE components lie: what a canonical state keeps.
    pub(crate) xsave_layout: XsaveLayout,
    /// The image's trapped host instructions (see [`crate::host_traps`]); empty unless the config asked
    /// for them.
    pub(crate) host_traps: HostTraps,
    /// Pages written since the last [`Machine::mark_checkpoint`] (a bitmap): what a fingerprint digests.
    pub(crate) dirty_since_mark: Vec<u64>,
    /// Pages written since the last [`Machine::take_dirty_pages`].
    pub(crate) dirty_since_take: Vec<u64>,
    /// Pages written since the last [`Machine::wrote_since_probe`].
    pub(crate) dirty_since_probe: Vec<u64>,
    /// Pages written since the last waypoint or checkpoint (see [`crate::waypoint`]).
    pub(crate) dirty_since_waypoint: Vec<u64>,
    /// xxh3-128 of every page of RAM as of the last digest (see [`Machine::digest_of`]).
    pub(crate) page_hashes: Vec<u128>,
    /// Pages whose hash is out of date.
    pub(crate) stale_hashes: Vec<u64>,
    /// Whether digests cover RAM by page hashes.
    pub(crate) digest_pages: bool,
    /// See [`Machine::keep_stale_registers`].
    pub(crate) legacy_stale_regs: bool,
    /// The breakpoints in the debug registers while running free (see [`Machine::arm`]).
    pub(crate) breakpoints: Vec<u64>,
    /// Which of `breakpoints` fired last.
    pub(crate) stop_fired: Option<usize>,
    pub(crate) output: Vec<u8>,
}

pub(crate) const MEM_SLOT: u32 = 0;
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
        if !(1..=MAX_CPUS).contains(&config.cpus) {
            return Err(MachineError::BadCpuCount(config.cpus));
        }
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut cpuid = match &config.cpuid {
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
        if config.cpus > 1 {
            crate::cpu_model::multiprocessor_cpuid(&mut cpuid, config.cpus);
        }
        let cpuid_table: Vec<[u32; 7]> = cpuid
            .as_slice()
            .iter()
            .map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
            .collect();
        let mut vcpus = Vec::with_capacity(config.cpus);
        for id in 0..config.cpus as u8 {
            if config.cpus > 1 {
                crate::cpu_model::set_apic_id(&mut cpuid, id);
            }
            vcpus.push(
                Vcpu::create(&vm, id, &cpuid)
                    .map_err(|VcpuError { what, source }| MachineError::Kvm { what, source })?,
            );
        }
        let mut parked: Vec<Option<Vcpu>> = vcpus.into_iter().map(Some).collect();
        let mut cpu = parked[0].take().expect("vCPU 0 was just created");
        if config.cpus > 1 {
            // The 8259's interrupts reach the bootstrap processor as a BIOS leaves it.
            cpu.lapic.set_virtual_wire();
        }

        let (protocol, boot) =
            loader::load(image, &config.cmdline, config.initrd.as_deref(), &mut mem)?;
        // Only an image loaded by its ELF headers: its sections then say where each instruction is.
        let host_traps = if config.trap_host_insns && boot.by_elf {
            HostTraps::find(image, config.answer_cpuid)
        } else {
            HostTraps::default()
        };
        host_traps.patch(&mut mem)?;
        if config.cpus > 1 {
            // How the kernel learns of the other CPUs and the IOAPIC.
            boot::mptable::write(&mut mem, config.cpus as u8)?;
        }
        for (i, d) in BOOT_GDT.iter().enumerate() {
            mem.write(BOOT_GDT_ADDR + 8 * i as u64, &d.to_le_bytes())?;
        }
        let mut sregs = cpu.sregs;
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
        cpu.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
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
        cpu.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        (cpu.regs, cpu.sregs) = (regs, sregs);
        if config.disks.len() > MAX_DISKS {
            return Err(MachineError::TooManyDisks {
                count: config.disks.len(),
            });
        }
        let devices = Devices::with_disks(mem.size(), &config.disks);
        let (pages, bitmap_words) = (mem.pages(), mem.pages().div_ceil(64));
        let mut machine = Machine {
            cold_checkpoints: config.cold_checkpoints,
            _kvm: kvm,
            vm,
            cpu,
            parked,
            ioapic: (config.cpus > 1).then(Ioapic::new),
            mem,
            devices,
            icount: 0,
            landmarks: 0,
            clock: Clock::Step,
            positions: Clock::Step,
            counting: vocab::Landmarks::Exits,
            counter: crate::counter::SimulatedCounter::new(0),
            hardware: None,
            host_traps,
            xsave_layout: XsaveLayout::from_cpuid(&cpuid_table),
            answer_cpuid: config.answer_cpuid,
            cpuid_table,
            dirty_since_mark: vec![0; bitmap_words],
            dirty_since_take: vec![0; bitmap_words],
            dirty_since_probe: vec![0; bitmap_words],
            dirty_since_waypoint: vec![0; bitmap_words],
            page_hashes: vec![0; pages],
            stale_hashes: vec![u64::MAX; bitmap_words],
            digest_pages: false,
            legacy_stale_regs: false,
            breakpoints: Vec::new(),
            stop_fired: None,
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

    /// Drops every translation KVM caches for the guest (its shadow page tables), by removing guest RAM's
    /// memory slot and adding it again: after RAM was rewritten from here (a restore), KVM would otherwise
    /// go on using translations of page tables that no longer hold what it read. The dirty log is read
    /// first (a new slot's starts clean), so no write goes unseen.
    pub fn reset_mmu(&mut self) -> Result<(), MachineError> {
        self.collect_dirty()?;
        let mut region = kvm_userspace_memory_region {
            slot: MEM_SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: self.mem.host_addr(),
        };
        // SAFETY: a slot of size 0 deletes the slot; nothing of our memory is handed over.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        region.memory_size = self.mem.size();
        // SAFETY: as in `Machine::new`: the region is our mapping, which outlives the VM.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(())
    }

    /// Whether checkpoints drop KVM's cached translations (see [`MachineConfig::cold_checkpoints`]).
    pub fn cold_checkpoints(&self) -> bool {
        self.cold_checkpoints
    }

    /// Guest RIP.
    pub fn rip(&self) -> u64 {
        self.cpu.regs.rip
    }

    /// General-purpose registers as of now.
    pub fn regs(&self) -> &kvm_regs {
        &self.cpu.regs
    }

    /// Segment and control registers as of now.
    pub fn sregs(&self) -> &kvm_sregs {
        &self.cpu.sregs
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
        let paging = emulate::paging_mode(&self.cpu.sregs);
        paging.read_linear(&self.mem, addr, buf)?;
        if !self.host_traps.is_empty() {
            for (phys, range) in paging.pieces(&self.mem, addr, buf.len())? {
                self.host_traps.unpatch(phys, &mut buf[range]);
            }
        }
        Ok(())
    }

    /// Writes bytes at a guest-virtual (linear) address through the guest's page tables: a debugger's
    /// write into a live run. Nothing is written unless every page is mapped; the pages count as written
    /// by the VMM for checkpoints and digests.
    pub fn write_virtual(
        &mut self,
        addr: u64,
        data: &[u8],
    ) -> Result<(), crate::paging::PagingError> {
        let paging = emulate::paging_mode(&self.cpu.sregs);
        paging.write_linear(&mut self.mem, addr, data)
    }

    /// Sets the running vCPU's general registers, rip and rflags: what an instruction the VMM completes
    /// leaves, or what a debugger writes into a live run.
    pub fn set_general_registers(&mut self, regs: kvm_regs) -> Result<(), MachineError> {
        self.cpu
            .fd
            .set_regs(&regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        self.cpu.regs = regs;
        self.publish_regs();
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
        emulate::paging_mode(&self.cpu.sregs).translate(&self.mem, addr)
    }

    /// Serial output the guest produced since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Raises an edge on IRQ `line` at the PIC (a time-driven source such as the PIT).
    pub fn pulse_irq(&mut self, line: u8) -> Result<(), MachineError> {
        self.route_irq_edge(line)
    }

    /// Free space in the UART receive FIFO.
    pub fn serial_rx_room(&self) -> usize {
        self.devices.uart.rx_room()
    }

    /// Offers bytes to the UART receiver; returns how many it took.
    pub fn push_serial_rx(&mut self, bytes: &[u8]) -> Result<usize, MachineError> {
        let n = self.devices.uart.push_rx(bytes);
        self.sync_irqs()?;
        Ok(n)
    }

    /// Moves the interrupt edges devices raised to the PIC and, on a multiprocessor machine, the IOAPIC.
    pub(crate) fn sync_irqs(&mut self) -> Result<(), MachineError> {
        let lines = self.devices.sync_irqs();
        if self.ioapic.is_some() {
            for line in (0..16).filter(|l| lines & (1 << l) != 0) {
                self.route_irq_edge_to_ioapic(line)?;
            }
        }
        Ok(())
    }

    /// Replays a trace recorded before [`Machine::publish_regs`] existed: after an instruction the VMM
    /// completed, the cached registers show the instruction before until the next exit, as they did.
    pub fn keep_stale_registers(&mut self) {
        self.legacy_stale_regs = true;
    }

    /// Number of bytes of guest RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.mem.size()
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
        self.cpu.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))
    }
}
