//! What this host's KVM can do, measured with a few bytes of guest code in throwaway VMs: the
//! capabilities the machine relies on, the single-step and free-run rates, and the quirks the machine
//! works around (`retrovisor doctor` reports them). Every probe guest is straight-line 32-bit
//! protected-mode code that ends in an `out`, so none can run forever.

use kvm_bindings::{
    kvm_guest_debug, kvm_userspace_memory_region, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a probe could not run.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The probe's guest memory could not be mapped.
    #[error("cannot map memory for a probe guest: {0}")]
    Memory(std::io::Error),
    /// A probe guest stopped in a way its code cannot explain.
    #[error("the {probe} probe guest stopped unexpectedly: {what}")]
    Unexpected {
        /// Which probe.
        probe: &'static str,
        /// How it stopped.
        what: String,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Kvm { what, source }
}

/// A KVM capability, whether this host has it, and whether the machine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Its name without the `KVM_CAP_` prefix.
    pub name: &'static str,
    /// Whether KVM reports it.
    pub present: bool,
    /// Whether the machine cannot run without it.
    pub needed: bool,
    /// What the machine uses it for (or why it does without).
    pub role: &'static str,
}

/// (name, number, needed, role) of every capability worth reporting.
const CAPABILITIES: [(&str, u32, bool, &str); 11] = [
    (
        "SYNC_REGS",
        kvm_bindings::KVM_CAP_SYNC_REGS,
        true,
        "registers come back with every exit, without an ioctl per step",
    ),
    (
        "SET_GUEST_DEBUG",
        kvm_bindings::KVM_CAP_SET_GUEST_DEBUG,
        true,
        "single-stepping (step clock) and a hardware breakpoint (landmark clock)",
    ),
    (
        "XSAVE",
        kvm_bindings::KVM_CAP_XSAVE,
        true,
        "FPU, SSE and AVX state in checkpoints",
    ),
    (
        "XCRS",
        kvm_bindings::KVM_CAP_XCRS,
        true,
        "XCR0 in checkpoints",
    ),
    (
        "VCPU_EVENTS",
        kvm_bindings::KVM_CAP_VCPU_EVENTS,
        true,
        "pending interrupts, exceptions and the interrupt shadow in checkpoints",
    ),
    (
        "DEBUGREGS",
        kvm_bindings::KVM_CAP_DEBUGREGS,
        true,
        "debug registers in checkpoints",
    ),
    (
        "IMMEDIATE_EXIT",
        kvm_bindings::KVM_CAP_IMMEDIATE_EXIT,
        true,
        "completing an I/O without running on; stopping a running guest",
    ),
    (
        "MANUAL_DIRTY_LOG_PROTECT2",
        kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        false,
        "not needed: the dirty log is read with KVM_GET_DIRTY_LOG",
    ),
    (
        "GUEST_DEBUG_HW_BPS",
        kvm_bindings::KVM_CAP_GUEST_DEBUG_HW_BPS,
        false,
        "not needed: x86 has 4 hardware breakpoints and retrovisor uses one",
    ),
    (
        "PMU_CAPABILITY",
        kvm_bindings::KVM_CAP_PMU_CAPABILITY,
        false,
        "not needed: no clock here uses a performance counter",
    ),
    (
        "TSC_CONTROL",
        kvm_bindings::KVM_CAP_TSC_CONTROL,
        false,
        "not needed: the VMM answers RDTSC itself, at the host's frequency",
    ),
];

/// Where probe code starts, and the top of its stack.
const CODE: u64 = 0x1000;
const STACK_TOP: u64 = 0x8000;
/// A GDT with a flat code (0x08) and data (0x10) segment, for code that reloads CS (`iret`).
const GDT: u64 = 0x500;
const GDT_ENTRIES: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
/// The port probe code writes to when it is done.
const DONE_PORT: u16 = 0xf4;
/// `out 0xf4, al`.
const OUT_DONE: [u8; 2] = [0xe6, 0xf4];

/// This host's KVM, open.
pub struct KvmProbe {
    kvm: Kvm,
}

impl KvmProbe {
    /// Opens /dev/kvm and creates (and drops) a VM, which is all retrovisor needs to start.
    pub fn open() -> Result<KvmProbe, ProbeError> {
        let kvm = Kvm::new().map_err(ProbeError::Open)?;
        kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(KvmProbe { kvm })
    }

    /// Whether this host can give a guest the portable CPU model (see [`crate::cpu_model`]).
    pub fn portable_model(&self) -> Result<(), crate::cpu_model::ModelError> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| crate::cpu_model::ModelError::Missing {
                what: "portable model".into(),
                missing: vec![format!("any CPUID (KVM_GET_SUPPORTED_CPUID failed: {e})")],
                host: crate::cpu_model::host_cpu().to_string(),
            })?;
        crate::cpu_model::CpuModel::Portable
            .cpuid(&supported, true)
            .map(drop)
    }

    /// The KVM API version (12 on every Linux since 2.6.22).
    pub fn api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    /// The capabilities the machine uses, and the notable ones it does without, as a VM reports them.
    pub fn capabilities(&self) -> Result<Vec<Capability>, ProbeError> {
        let vm = self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(CAPABILITIES
            .iter()
            .map(|&(name, cap, needed, role)| Capability {
                name,
                present: vm.check_extension_raw(cap.into()) > 0,
                needed,
                role,
            })
            .collect())
    }

    /// Single-steps `inc eax; jmp` for about `time` and returns the steps per second: the ceiling of
    /// the step clock.
    pub fn step_rate(&self, time: Duration) -> Result<f64, ProbeError> {
        let mut g = Guest::new(&self.kvm, &[0x40, 0xeb, 0xfd])?;
        g.debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0)?;
        let start = Instant::now();
        let mut steps = 0u64;
        while start.elapsed() < time {
            for _ in 0..1000 {
                match g.vcpu.run() {
                    Ok(VcpuExit::Debug(_)) => steps += 1,
                    other => return Err(unexpected("single-step", other)),
                }
            }
        }
        Ok(steps as f64 / start.elapsed().as_secs_f64())
    }

    /// Runs `dec ecx; jnz` free, longer and longer until a run takes about `time` / 3, and returns the
    /// instructions per second of the longest run: the speed of `run` and the landmark clock between exits.
    pub fn free_run_rate(&self, time: Duration) -> Result<f64, ProbeError> {
        let mut code = vec![0x49, 0x75, 0xfd]; // dec ecx; jnz .-3
        code.extend_from_slice(&OUT_DONE);
        let mut g = Guest::new(&self.kvm, &code)?;
        let mut iterations: u64 = 10_000;
        loop {
            let mut regs = g.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
            (regs.rip, regs.rcx, regs.rflags) = (CODE, iterations, 2);
            g.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            let start = Instant::now();
            match g.vcpu.run() {
                Ok(VcpuExit::IoOut(DONE_PORT, _)) => {}
                other => return Err(unexpected("free-run", other)),
            }
            let took = start.elapsed();
            // Two instructions per iteration; ecx caps the loop at 2^32 iterations.
            if took >= time / 3 || iterations >= 1 << 31 {
                return Ok(2.0 * iterations as f64 / took.as_secs_f64());
            }
            let grow = (time.as_secs_f64() / 3.0 / took.as_secs_f64().max(1e-6)).clamp(2.0, 100.0);
            iterations = ((iterations as f64 * grow) as u64).min(1 << 31);
        }
    }

    /// Whether KVM_SET_CPUID2 decides what the guest's CPUID says: hides one feature bit of leaf 1 that
    /// the host offers (RDRAND if it can), keeps FPU (EDX bit 0), runs `cpuid` in a guest and checks it
    /// sees both as set. None if leaf 1 offers nothing to hide.
    pub fn cpuid_honoured(&self) -> Result<Option<CpuidProbe>, ProbeError> {
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        // RDRAND is what the landmark clock hides; hosts differ in what they offer (PVM offers neither
        // RDRAND nor SSE3), so the first of a few common features that is there stands in for it.
        const CANDIDATES: [(bool, u32, &str); 6] = [
            (true, 30, "RDRAND"),
            (true, 23, "POPCNT"),
            (true, 13, "CMPXCHG16B"),
            (true, 0, "SSE3"),
            (false, 26, "SSE2"),
            (false, 4, "TSC"),
        ];
        let leaf = |e: &kvm_bindings::kvm_cpuid_entry2| e.function == 1;
        let fpu = cpuid.as_slice().iter().any(|e| leaf(e) && e.edx & 1 != 0);
        let Some((in_ecx, bit, feature)) =
            cpuid.as_slice().iter().find(|e| leaf(e)).and_then(|l| {
                CANDIDATES.into_iter().find(|&(in_ecx, bit, _)| {
                    (if in_ecx { l.ecx } else { l.edx }) & (1 << bit) != 0
                })
            })
        else {
            return Ok(None);
        };
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| leaf(e)) {
            *(if in_ecx { &mut e.ecx } else { &mut e.edx }) &= !(1 << bit);
        }
        // mov eax, 1; cpuid; out
        let mut code = vec![0xb8, 1, 0, 0, 0, 0x0f, 0xa2];
        code.extend_from_slice(&OUT_DONE);
        let mut g = Guest::new(&self.kvm, &code)?;
        g.vcpu
            .set_cpuid2(&cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        match g.vcpu.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => {}
            other => return Err(unexpected("cpuid", other)),
        }
        let regs = g.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let seen = if in_ecx { regs.rcx } else { regs.rdx };
        // A guest that sees FPU gone too got some other table than the one set (an empty one, say).
        let kept = !fpu || regs.rdx & 1 != 0;
        let set = cpuid.as_slice().iter().find(|e| leaf(e));
        // Leaf 1 ECX bits the guest saw that the table did not set (ignoring OSXSAVE, which follows
        // CR4, and the hypervisor bit): PVM mixes the host's own features in.
        let mixed_in = set.map_or(0, |l| regs.rcx as u32 & !l.ecx & !(1 << 27 | 1 << 31));
        Ok(Some(CpuidProbe {
            feature,
            honoured: seen & (1 << bit) == 0 && kept,
            mixed_in,
        }))
    }

    /// Whether KVM runs a 32-bit protected-mode `iret` (to the same privilege level) by itself.
    pub fn iret32_runs(&self) -> Result<bool, ProbeError> {
        let target = (CODE + 12) as u32;
        // pushfd; push 0x08; push target; iretd; then at target: out
        let mut code = vec![0x9c, 0x6a, 0x08, 0x68];
        code.extend_from_slice(&target.to_le_bytes());
        code.extend_from_slice(&[0xcf, 0x90, 0x90, 0x90]);
        code.extend_from_slice(&OUT_DONE);
        let mut g = Guest::new(&self.kvm, &code)?;
        match g.vcpu.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => Ok(true),
            Ok(VcpuExit::InternalError) => Ok(false),
            other => Err(unexpected("iret", other)),
        }
    }

    /// Whether single-stepping a `hlt` reports the halt (KVM_EXIT_HLT), rather than a step past it.
    pub fn hlt_reported_while_stepping(&self) -> Result<bool, ProbeError> {
        let mut code = vec![0xf4];
        code.extend_from_slice(&OUT_DONE);
        let mut g = Guest::new(&self.kvm, &code)?;
        g.debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0)?;
        match g.vcpu.run() {
            Ok(VcpuExit::Hlt) => Ok(true),
            Ok(VcpuExit::Debug(_)) => Ok(false),
            other => Err(unexpected("hlt", other)),
        }
    }

    /// Whether resuming at a hardware breakpoint that has just fired fires it again, without the
    /// instruction running.
    pub fn hw_breakpoint_refires(&self) -> Result<bool, ProbeError> {
        let mut code = vec![0x40]; // inc eax
        code.extend_from_slice(&OUT_DONE);
        let mut g = Guest::new(&self.kvm, &code)?;
        g.debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, CODE)?;
        match g.vcpu.run() {
            Ok(VcpuExit::Debug(_)) => {}
            other => return Err(unexpected("hardware breakpoint", other)),
        }
        match g.vcpu.run() {
            Ok(VcpuExit::Debug(_)) => Ok(true),
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => Ok(false),
            other => Err(unexpected("hardware breakpoint", other)),
        }
    }

    /// Whether an `int3` under KVM_GUESTDBG_USE_SW_BP comes back as a debug exit (rather than a failure to
    /// emulate it).
    pub fn int3_breakpoints_work(&self) -> Result<bool, ProbeError> {
        let mut code = vec![0xcc];
        code.extend_from_slice(&OUT_DONE);
        let mut g = Guest::new(&self.kvm, &code)?;
        g.debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, 0)?;
        match g.vcpu.run() {
            Ok(VcpuExit::Debug(_)) => Ok(true),
            Ok(VcpuExit::InternalError) => Ok(false),
            other => Err(unexpected("int3", other)),
        }
    }
}

/// What the CPUID probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidProbe {
    /// The feature it hid.
    pub feature: &'static str,
    /// Whether the guest saw it hidden, and saw a feature that was kept.
    pub honoured: bool,
    /// Leaf 1 ECX feature bits the guest saw although the table did not set them.
    pub mixed_in: u32,
}

fn unexpected(probe: &'static str, exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> ProbeError {
    ProbeError::Unexpected {
        probe,
        what: match exit {
            Ok(exit) => format!("{exit:?}"),
            Err(e) => format!("KVM_RUN failed: {e}"),
        },
    }
}

/// A throwaway VM with 64 KiB of RAM, its code at [`CODE`], in flat 32-bit protected mode at CPL 0.
struct Guest {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    _mem: memmap2::MmapMut,
}

impl Guest {
    fn new(kvm: &Kvm, code: &[u8]) -> Result<Guest, ProbeError> {
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut mem = memmap2::MmapMut::map_anon(1 << 16).map_err(ProbeError::Memory)?;
        mem[CODE as usize..CODE as usize + code.len()].copy_from_slice(code);
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            let at = GDT as usize + 8 * i;
            mem[at..at + 8].copy_from_slice(&d.to_le_bytes());
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.len() as u64,
            userspace_addr: mem.as_mut_ptr() as u64,
        };
        // SAFETY: the mapping lives in the returned Guest, whose fields drop the VM before the mapping.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        for (seg, selector) in [
            (&mut sregs.cs, 0x08),
            (&mut sregs.ds, 0x10),
            (&mut sregs.es, 0x10),
            (&mut sregs.ss, 0x10),
        ] {
            (seg.base, seg.limit, seg.g, seg.db, seg.present, seg.s) = (0, 0xffff_ffff, 1, 1, 1, 1);
            (seg.selector, seg.type_) = (selector, if selector == 0x08 { 0xb } else { 0x3 });
        }
        (sregs.gdt.base, sregs.gdt.limit) = (GDT, (GDT_ENTRIES.len() * 8 - 1) as u16);
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        (regs.rip, regs.rsp, regs.rflags) = (CODE, STACK_TOP, 2);
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(Guest {
            vcpu,
            _vm: vm,
            _mem: mem,
        })
    }

    /// Sets the guest-debug controls (and DR0, for a hardware breakpoint).
    fn debug(&mut self, control: u32, dr0: u64) -> Result<(), ProbeError> {
        let mut debug = kvm_guest_debug {
            control,
            ..Default::default()
        };
        if control & KVM_GUESTDBG_USE_HW_BP != 0 {
            debug.arch.debugreg[0] = dr0;
            // Local enable of DR0 as an execution breakpoint, plus the bits DR7 always has set.
            debug.arch.debugreg[7] = 0x1 | 0x600;
        }
        self.vcpu
            .set_guest_debug(&debug)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))
    }
}
