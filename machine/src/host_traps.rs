//! Host-instruction traps: making a kernel's `rdtsc`, `rdtscp`, `rdrand`, `rdseed` (and `cpuid`, when the
//! VMM answers it) reach the VMM when the guest runs free.
//!
//! Running free, these never exit: the guest reads the host's counter or random generator and nothing is
//! logged, so a kernel that mixes them into its state (Linux does, into its entropy pool, at boot and at
//! every interrupt) cannot be replayed. Linux cannot be told not to use the TSC (on x86-64
//! `random_get_entropy()` is `rdtsc` whatever CPUID says), this host's KVM does not hide RDRAND/RDSEED
//! when the VMM's CPUID clears them, and KVM offers a VMM no way to intercept any of them. So the VMM
//! finds the instructions in the kernel image itself: every one in the image's executable sections,
//! alternatives' replacements included, is overwritten after loading with `out %al, $NN` (`e6 NN`, two
//! bytes, as short as the shortest of them) padded with `nop`s: port [`RDTSC_PORT`] for `rdtsc`,
//! [`TRAP_PORT`] for the others. That `out` is an exit at the same
//! point in record and replay (a landmark), where the VMM completes the original instruction with a
//! logged value, exactly as the step clock does. A write to the port from anywhere else is ignored, like
//! a write to any port nothing decodes.
//!
//! The scan decodes each executable section linearly, as objdump does; kernel text keeps no data between
//! functions, and padding decodes as `int3` or `nop`, so it stays in step. What the scan cannot see is
//! code the guest makes at run time (modules, BPF) or runs in user mode: the limits are in the README.

use boot::elf::{program_headers, section_headers, PT_LOAD};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};
use memory::{GuestMemory, MemoryError};
use std::collections::BTreeMap;

/// The port a trapped `rdtsc` writes (0xe0-0xef are free in the PC/AT map). Linux's alternatives copy
/// code, a trapped `rdtsc` included (`lfence; rdtsc` replacing `rdtsc`), to places the site table does
/// not list: a trap on this port is an RDTSC wherever it is, so the VMM reserves the port.
pub const RDTSC_PORT: u16 = 0xe5;
/// The port the other trapped instructions write (`rdtscp`, `rdrand`, `rdseed`): completed only at the
/// sites the table lists, since the trap alone does not say which instruction and register it replaced.
pub const TRAP_PORT: u16 = 0xe6;
/// The port a trapped `cpuid` writes, when the VMM answers CPUID (see [`crate::cpu_model`]): like
/// `rdtsc`, a `cpuid` has no operands, so a trap on this port is a CPUID wherever it is.
pub const CPUID_PORT: u16 = 0xe7;
/// What a trapped `rdtsc` was.
const RDTSC: [u8; 2] = [0x0f, 0x31];
/// What a trapped `cpuid` was.
const CPUID: [u8; 2] = [0x0f, 0xa2];
/// Section flag of sections holding instructions.
const SHF_EXECINSTR: u64 = 4;
/// Section type of sections whose bytes are in the file.
const SHT_PROGBITS: u32 = 1;

/// The trapped instructions of one loaded image, by guest-physical address.
#[derive(Debug, Default, Clone)]
pub struct HostTraps {
    /// Physical address of each trapped instruction, and its original bytes.
    sites: BTreeMap<u64, Vec<u8>>,
}

impl HostTraps {
    /// Finds every `rdtsc`, `rdtscp`, `rdrand` and `rdseed` in the executable sections of `image` (an ELF
    /// loaded at the physical addresses of its program headers), and every `cpuid` if `cpuid`. None for
    /// an image without section headers.
    pub fn find(image: &[u8], cpuid: bool) -> HostTraps {
        let mut sites = BTreeMap::new();
        let Ok((_, segments)) = program_headers(image) else {
            return HostTraps::default();
        };
        let bitness = if image.get(4) == Some(&2) { 64 } else { 32 };
        let sections = section_headers(image).unwrap_or_default();
        for s in sections
            .iter()
            .filter(|s| s.kind == SHT_PROGBITS && s.flags & SHF_EXECINSTR != 0)
        {
            // Where the section's bytes are loaded: through the loadable segment that holds them.
            let Some(base) = segments.iter().find_map(|ph| {
                let inside = ph.ptype == PT_LOAD
                    && s.offset >= ph.offset
                    && s.offset + s.size <= ph.offset + ph.filesz;
                inside.then(|| ph.paddr + (s.offset - ph.offset))
            }) else {
                continue;
            };
            let Some(bytes) = usize::try_from(s.offset)
                .ok()
                .zip(usize::try_from(s.size).ok())
                .and_then(|(o, n)| image.get(o..o.checked_add(n)?))
            else {
                continue;
            };
            let mut decoder = Decoder::with_ip(bitness, bytes, s.addr, DecoderOptions::NONE);
            let mut insn = Instruction::default();
            while decoder.can_decode() {
                let at = decoder.position();
                decoder.decode_out(&mut insn);
                let trapped = match insn.mnemonic() {
                    Mnemonic::Rdtsc | Mnemonic::Rdtscp => true,
                    Mnemonic::Cpuid => cpuid,
                    // Only the register forms exist; anything else is not an instruction we complete.
                    Mnemonic::Rdrand | Mnemonic::Rdseed => insn.op0_kind() == OpKind::Register,
                    _ => false,
                };
                if trapped {
                    sites.insert(base + at as u64, bytes[at..at + insn.len()].to_vec());
                }
            }
        }
        HostTraps { sites }
    }

    /// How many instructions are trapped.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Overwrites every site in guest memory with its trap.
    pub fn patch(&self, mem: &mut GuestMemory) -> Result<(), MemoryError> {
        for (&at, original) in &self.sites {
            let mut trap = vec![0x90u8; original.len()];
            trap[0] = 0xe6;
            trap[1] = match original.as_slice() {
                o if o == RDTSC => RDTSC_PORT as u8,
                o if o == CPUID => CPUID_PORT as u8,
                _ => TRAP_PORT as u8,
            };
            mem.write(at, &trap)?;
        }
        Ok(())
    }

    /// The original bytes of the trapped instruction whose trap on `port` ends at physical address
    /// `end` (where the `out` leaves RIP), if there is one: a listed site, or any RDTSC trap.
    pub fn original_ending_at(&self, port: u16, end: u64) -> Option<&[u8]> {
        match self.sites.get(&end.checked_sub(2)?) {
            Some(bytes) => Some(bytes.as_slice()),
            None if port == RDTSC_PORT => Some(&RDTSC),
            None if port == CPUID_PORT => Some(&CPUID),
            None => None,
        }
    }

    /// Puts the original instructions back into `bytes`, a copy of guest memory read from physical
    /// address `at`: what a debugger shows is the guest's own code, not the traps.
    pub fn unpatch(&self, at: u64, bytes: &mut [u8]) {
        let end = at + bytes.len() as u64;
        // A site starting before `at` may still overlap it: an instruction is at most 15 bytes long.
        for (&site, original) in self.sites.range(at.saturating_sub(14)..end) {
            for (i, &b) in original.iter().enumerate() {
                let addr = site + i as u64;
                if (at..end).contains(&addr) {
                    bytes[(addr - at) as usize] = b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `find` is checked end to end: rand.elf and the Linux kernel replay exactly because of it.
    #[test]
    fn traps_are_written_found_by_their_end_and_hidden_from_readers() {
        let rdrand_rax = vec![0x48, 0x0f, 0xc7, 0xf0];
        let traps = HostTraps {
            sites: BTreeMap::from([
                (0x1000, vec![0x0f, 0x31]),
                (0x1010, rdrand_rax.clone()),
                (0x1018, vec![0x0f, 0xa2]),
            ]),
        };
        let mut mem = GuestMemory::new(1 << 16).unwrap();
        traps.patch(&mut mem).unwrap();
        let mut code = [0u8; 0x20];
        mem.read(0x1000, &mut code).unwrap();
        assert_eq!(&code[..2], &[0xe6, RDTSC_PORT as u8]);
        assert_eq!(&code[0x10..0x14], &[0xe6, TRAP_PORT as u8, 0x90, 0x90]);
        assert_eq!(&code[0x18..0x1a], &[0xe6, CPUID_PORT as u8]);
        assert_eq!(
            traps.original_ending_at(CPUID_PORT, 0x3002),
            Some(&CPUID[..])
        );
        // The `out` leaves RIP two bytes past the site, whatever the original's length.
        assert_eq!(
            traps.original_ending_at(TRAP_PORT, 0x1012),
            Some(&rdrand_rax[..])
        );
        assert_eq!(traps.original_ending_at(TRAP_PORT, 0x1013), None);
        // An RDTSC trap that alternatives moved off its listed site is still an RDTSC.
        assert_eq!(
            traps.original_ending_at(RDTSC_PORT, 0x2005),
            Some(&RDTSC[..])
        );
        // A read that starts inside a site sees the original bytes from there on.
        let mut window = [0u8; 4];
        mem.read(0x1011, &mut window).unwrap();
        traps.unpatch(0x1011, &mut window);
        assert_eq!(window, [0x0f, 0xc7, 0xf0, 0x00]);
        traps.unpatch(0x1000, &mut code);
        assert_eq!(&code[..2], &[0x0f, 0x31]);
        assert_eq!(&code[0x10..0x14], &rdrand_rax[..]);
    }
}
