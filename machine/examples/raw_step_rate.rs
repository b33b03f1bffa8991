//! The raw KVM single-step rate of this host: the ceiling for record and replay with the `step` clock.
//! A two-instruction loop (`inc eax; jmp .-3`) in 32-bit protected mode, stepped with
//! KVM_GUESTDBG_SINGLESTEP and nothing else per step.
//!
//! Usage: cargo run --release -p machine --example raw_step_rate [SECONDS]

use kvm_bindings::{
    kvm_guest_debug, kvm_userspace_memory_region, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
};
use kvm_ioctls::{Kvm, VcpuExit};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2.0);
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let mut mem = memmap2::MmapMut::map_anon(1 << 16)?;
    // inc eax; jmp back to the inc.
    mem[0x1000..0x1003].copy_from_slice(&[0x40, 0xeb, 0xfd]);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem.len() as u64,
        userspace_addr: mem.as_mut_ptr() as u64,
    };
    // SAFETY: the mapping outlives the VM: both live until the end of main, and the VM is dropped first.
    unsafe { vm.set_user_memory_region(region)? };
    let mut vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        (seg.base, seg.limit, seg.g, seg.db, seg.present, seg.s) = (0, 0xffff_ffff, 1, 1, 1, 1);
    }
    sregs.cs.type_ = 0xb;
    sregs.cs.selector = 8;
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    (regs.rip, regs.rflags) = (0x1000, 2);
    vcpu.set_regs(&regs)?;
    vcpu.set_guest_debug(&kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    })?;
    // RV_SYNC=1 / 2: also have KVM copy regs / regs+sregs into kvm_run at every exit (what the step clock uses).
    let sync = std::env::var("RV_SYNC").unwrap_or_default();
    if sync == "1" || sync == "2" {
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
    }
    if sync == "2" {
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
    }
    let start = Instant::now();
    let mut steps = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..1000 {
            match vcpu.run()? {
                VcpuExit::Debug(_) => steps += 1,
                other => return Err(format!("unexpected exit {other:?}").into()),
            }
        }
    }
    println!(
        "raw KVM single-step rate: {:.0} steps/s",
        steps as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
