//! The deterministic PC: guest RAM, the KVM VM and vCPU, userspace devices, the boot loaders (Multiboot, PVH),
//! CPU-state capture and restore, guest-virtual address translation and the execution clock; and probes of
//! what the host's KVM can do.

pub mod clock;
pub mod cpu;
pub mod cpu_model;
pub mod devices;
pub mod disk;
pub mod elf;
pub mod emulate;
pub mod host_traps;
pub mod loader;
pub mod memory;
pub mod paging;
pub mod probe;
pub mod pvh;
pub mod symbols;
pub mod vm;

pub use clock::{Advance, Fingerprint, Kicker, Search, DEBUG_REGISTERS, MAX_SEARCH_HITS};
pub use cpu_model::{host_cpu, CpuModel};
pub use vm::{
    Blocker, Clock, Host, HostInsn, Machine, MachineConfig, MachineError, Queued, Snapshot, Step,
    StopReason,
};
pub use vocab::{HostCpu, Position};
