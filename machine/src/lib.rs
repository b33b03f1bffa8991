//! The deterministic PC: the KVM VM and its vCPU over guest RAM (the `memory` crate), the userspace
//! devices (`devices`) and an image the boot loaders put in place (`boot`); the guest's CPU model, CPU-state
//! capture and restore, guest-virtual address translation, the instructions the VMM completes itself,
//! and the execution clock; and probes of what the host's KVM can do.

pub mod arch;
pub mod clock;
pub mod counter;
pub mod cpu;
pub mod cpu_model;
pub mod dirty;
pub mod emulate;
pub mod exits;
pub mod host_traps;
pub mod interrupts;
pub mod paging;
pub mod perf;
pub mod pmu;
pub mod probe;
pub mod smp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod waypoint;

pub use clock::{Advance, Fingerprint, Kicker, Search, DEBUG_REGISTERS, MAX_SEARCH_HITS};
pub use counter::SimulatedCounter;
pub use cpu_model::{host_cpu, CpuModel};
pub use interrupts::Blocker;
pub use snapshot::Snapshot;
pub use vcpu::Queued;
pub use vm::{
    Clock, Host, HostInsn, Machine, MachineConfig, MachineError, Step, StopReason, MAX_CPUS,
};
pub use vocab::{HostCpu, Landmarks, Position};
pub use waypoint::Waypoint;
