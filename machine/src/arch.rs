//! The architectural bits the VMM reads and writes, named once.

use kvm_bindings::kvm_sregs;

/// RFLAGS.TF: single-step trap after each instruction.
pub const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS.IF: maskable interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.RF: resume flag (debug faults suppressed for one instruction).
pub const RFLAGS_RF: u64 = 1 << 16;
/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1;
/// CR4.OSXSAVE: XSAVE and XGETBV enabled by the OS.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// IA32_APIC_BASE.EN: the local APIC is enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Whether the vCPU is in long mode (64-bit or compatibility).
pub fn long_mode(sregs: &kvm_sregs) -> bool {
    sregs.efer & EFER_LMA != 0
}

/// The operand size of code at CS in the current mode: 64, 32 or 16 bits (what a decoder needs).
pub fn code_bits(sregs: &kvm_sregs) -> u32 {
    if long_mode(sregs) && sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    }
}
