//! PVH boot: the direct 32-bit entry Xen defined and Linux's vmlinux offers with CONFIG_PVH, which skips
//! the decompressor and the BIOS.
//!
//! The kernel names its entry in an ELF note (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY). The loader loads
//! the PT_LOAD segments at their physical addresses and writes an `hvm_start_info` structure (version 1:
//! command line, modules, memory map) into low memory; the vCPU starts at the entry in 32-bit protected
//! mode with paging off, flat segments and EBX holding the structure's physical address.
//!
//! Layout of the structures (all little-endian, from Xen's public `arch-x86/hvm/start_info.h`):
//! - `hvm_start_info` (56 bytes): magic u32, version u32, flags u32, nr_modules u32, modlist_paddr u64,
//!   cmdline_paddr u64, rsdp_paddr u64, memmap_paddr u64, memmap_entries u32, reserved u32.
//! - `hvm_modlist_entry` (32 bytes): paddr u64, size u64, cmdline_paddr u64, reserved u64.
//! - `hvm_memmap_table_entry` (24 bytes): addr u64, size u64, type u32, reserved u32.

use crate::elf::{program_headers, u32_at, u64_at, PT_NOTE};
use memory::{pc_memory_map, GuestMemory, MemoryError, PAGE_SIZE};
use thiserror::Error;

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// The ELF note type of the 32-bit physical entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Where the structures go: low memory below the 640 KiB mark, clear of the boot GDT (0x500) and of the
/// Multiboot area (0x9000), which a kernel reaches only through EBX.
const START_INFO_ADDR: u64 = 0x6000;
const START_INFO_LEN: usize = 56;
const MODLIST_ADDR: u64 = 0x6040;
const MEMMAP_ADDR: u64 = 0x6080;
const CMDLINE_ADDR: u64 = 0x7000;
/// Longest command line: the page at CMDLINE_ADDR less its terminating zero. (Linux itself keeps at most
/// 2047 characters on x86.)
pub const CMDLINE_MAX: usize = 4095;

/// Why a PVH kernel could not be booted.
#[derive(Debug, Error)]
pub enum PvhError {
    /// The PVH entry note is malformed.
    #[error("bad PVH entry note (Xen, XEN_ELFNOTE_PHYS32_ENTRY) in the kernel's ELF notes: {0}")]
    BadNote(&'static str),
    /// The command line is too long for the page reserved for it.
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} are supported")]
    CmdlineTooLong(usize),
    /// The initrd does not fit between the kernel and the top of RAM.
    #[error("the initrd ({size} bytes) does not fit in guest RAM above the kernel (which ends at {kernel_end:#x}; RAM ends at {ram:#x}): give the guest more --ram")]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// End of the kernel's highest segment.
        kernel_end: u64,
        /// Guest RAM size.
        ram: u64,
    },
    /// Writing the start information failed (guest RAM too small).
    #[error("cannot write the PVH start information: {0}")]
    Memory(#[from] MemoryError),
}

/// The 32-bit entry point named by the image's PVH note, or None if the image is not an ELF with one.
pub fn find_entry(image: &[u8]) -> Result<Option<u32>, PvhError> {
    // Not an ELF, or a malformed one: then it is simply no PVH kernel.
    let Ok((_, headers)) = program_headers(image) else {
        return Ok(None);
    };
    for ph in headers.iter().filter(|ph| ph.ptype == PT_NOTE) {
        let notes = ph
            .data(image)
            .map_err(|_| PvhError::BadNote("a note segment lies outside the file"))?;
        if let Some(desc) = find_note(notes, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)? {
            // The descriptor is a pointer-sized physical address (8 bytes in a 64-bit vmlinux).
            let entry = match desc.len() {
                4 => u64::from(u32_at(desc, 0).map_err(|_| PvhError::BadNote("truncated"))?),
                8 => u64_at(desc, 0).map_err(|_| PvhError::BadNote("truncated"))?,
                _ => return Err(PvhError::BadNote("the entry is neither 4 nor 8 bytes long")),
            };
            return u32::try_from(entry)
                .map(Some)
                .map_err(|_| PvhError::BadNote("the entry lies above 4 GiB"));
        }
    }
    Ok(None)
}

/// The descriptor of the first note named `name` with type `kind` in a block of ELF notes (each: namesz,
/// descsz, type, then the name and the descriptor, each padded to 4 bytes).
fn find_note<'a>(
    mut notes: &'a [u8],
    name: &[u8],
    kind: u32,
) -> Result<Option<&'a [u8]>, PvhError> {
    let pad4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let field = |i: usize| u32_at(notes, 4 * i).map(|v| v as usize);
        let (namesz, descsz, ntype) = match (field(0), field(1), field(2)) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c as u32),
            _ => return Err(PvhError::BadNote("truncated note header")),
        };
        let name_end = pad4(namesz)
            .and_then(|n| n.checked_add(12))
            .ok_or(PvhError::BadNote("note name too long"))?;
        let desc_end = pad4(descsz)
            .and_then(|n| n.checked_add(name_end))
            .ok_or(PvhError::BadNote("note descriptor too long"))?;
        if desc_end > notes.len() {
            return Err(PvhError::BadNote("a note runs past the end of its segment"));
        }
        // The name is stored with its terminating zero.
        let this_name = &notes[12..12 + namesz];
        if ntype == kind && this_name.strip_suffix(&[0]) == Some(name) {
            return Ok(Some(&notes[name_end..name_end + descsz]));
        }
        notes = &notes[desc_end..];
    }
    Ok(None)
}

/// Writes the `hvm_start_info` structure, the command line, the memory map and (with an initrd) the module
/// list and the initrd itself, which goes at the top of RAM, page-aligned, as QEMU places it. Returns the
/// structure's address (the kernel's EBX).
pub fn write_start_info(
    mem: &mut GuestMemory,
    cmdline: &str,
    initrd: Option<&[u8]>,
    kernel_end: u64,
) -> Result<u32, PvhError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(PvhError::CmdlineTooLong(cmdline.len()));
    }
    let ram = mem.size();
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write(CMDLINE_ADDR, &line)?;

    let map = pc_memory_map(ram);
    let mut memmap = Vec::new();
    for (base, len, kind) in map {
        memmap.extend_from_slice(&base.to_le_bytes());
        memmap.extend_from_slice(&len.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write(MEMMAP_ADDR, &memmap)?;

    let modules = match initrd {
        Some(bytes) => {
            let size = bytes.len() as u64;
            let too_big = PvhError::InitrdDoesNotFit {
                size,
                kernel_end,
                ram,
            };
            let addr = ram
                .checked_sub(size)
                .map(|a| a & !(PAGE_SIZE as u64 - 1))
                .filter(|&a| a >= kernel_end)
                .ok_or(too_big)?;
            mem.write(addr, bytes)?;
            let mut entry = [0u8; 32];
            entry[0..8].copy_from_slice(&addr.to_le_bytes());
            entry[8..16].copy_from_slice(&size.to_le_bytes());
            mem.write(MODLIST_ADDR, &entry)?;
            1u32
        }
        None => 0,
    };

    let mut info = [0u8; START_INFO_LEN];
    info[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
    info[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1: with the memory map
    info[12..16].copy_from_slice(&modules.to_le_bytes());
    if modules > 0 {
        info[16..24].copy_from_slice(&MODLIST_ADDR.to_le_bytes());
    }
    info[24..32].copy_from_slice(&CMDLINE_ADDR.to_le_bytes());
    // rsdp_paddr stays 0: there is no ACPI.
    info[40..48].copy_from_slice(&MEMMAP_ADDR.to_le_bytes());
    info[48..52].copy_from_slice(&(map.len() as u32).to_le_bytes());
    mem.write(START_INFO_ADDR, &info)?;
    Ok(START_INFO_ADDR as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{load, LoaderError, Protocol};

    /// Appends an ELF note.
    fn note(out: &mut Vec<u8>, name: &[u8], kind: u32, desc: &[u8]) {
        out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(desc);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    /// A synthetic ELF64 kernel as vmlinux is laid out: a PT_LOAD segment of code at 2 MiB (with .bss), and
    /// a PT_NOTE segment holding an unrelated note and then the PVH entry note (8-byte descriptor).
    fn pvh_elf(entry_note: Option<u64>) -> Vec<u8> {
        let mut notes = Vec::new();
        note(&mut notes, b"GNU", 3, &[0xaa; 20]);
        note(&mut notes, b"Xen", 6, b"linux\0"); // XEN_ELFNOTE_GUEST_OS, not the entry
        if let Some(entry) = entry_note {
            note(
                &mut notes,
                b"Xen",
                XEN_ELFNOTE_PHYS32_ENTRY,
                &entry.to_le_bytes(),
            );
        }
        let code: Vec<u8> = (0..0x100u32).map(|i| i as u8).collect();
        let (phoff, code_off) = (64usize, 0x200usize);
        let notes_off = code_off + code.len();
        let mut img = vec![0u8; notes_off];
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = 2; // ELF64
        img[5] = 1; // little-endian
        img[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // e_entry: the 64-bit entry, unused
        img[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        img[54..56].copy_from_slice(&56u16.to_le_bytes());
        img[56..58].copy_from_slice(&2u16.to_le_bytes());
        let mut ph = |i: usize, ptype: u32, off: usize, paddr: u64, filesz: usize, memsz: usize| {
            let p = phoff + 56 * i;
            img[p..p + 4].copy_from_slice(&ptype.to_le_bytes());
            img[p + 8..p + 16].copy_from_slice(&(off as u64).to_le_bytes());
            img[p + 16..p + 24].copy_from_slice(&0xffff_ffff_8020_0000u64.to_le_bytes()); // vaddr
            img[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            img[p + 32..p + 40].copy_from_slice(&(filesz as u64).to_le_bytes());
            img[p + 40..p + 48].copy_from_slice(&(memsz as u64).to_le_bytes());
        };
        ph(0, 1, code_off, 0x20_0000, code.len(), 0x3000);
        ph(1, PT_NOTE, notes_off, 0, notes.len(), notes.len());
        img[code_off..code_off + code.len()].copy_from_slice(&code);
        img.extend_from_slice(&notes);
        img
    }

    fn u64_in(mem: &GuestMemory, addr: u64) -> u64 {
        mem.read_u64(addr).unwrap()
    }

    #[test]
    fn boots_a_pvh_elf_with_cmdline_memmap_and_initrd() {
        let mut mem = GuestMemory::new(8 << 20).unwrap();
        // Stale bytes where .bss goes must be cleared.
        mem.write(0x20_0100, &[0xff; 64]).unwrap();
        let initrd: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (protocol, boot) = load(
            &pvh_elf(Some(0x20_0040)),
            "console=ttyS0",
            Some(&initrd),
            &mut mem,
        )
        .unwrap();
        assert_eq!(protocol, Protocol::Pvh);
        assert_eq!(boot.entry, 0x20_0040);
        let info = u64::from(boot.info_addr);
        assert_eq!(mem.read_u32(info).unwrap(), START_INFO_MAGIC);
        assert_eq!(mem.read_u32(info + 4).unwrap(), 1, "version");
        assert_eq!(mem.read_u32(info + 12).unwrap(), 1, "nr_modules");
        // The kernel's segment, its .bss zeroed.
        assert_eq!(mem.read_u32(0x20_0000).unwrap(), 0x0302_0100);
        assert_eq!(mem.read_u64(0x20_0100).unwrap(), 0);
        // The command line.
        let mut line = [0u8; 14];
        mem.read(u64_in(&mem, info + 24), &mut line).unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
        assert_eq!(u64_in(&mem, info + 32), 0, "no ACPI RSDP");
        // The initrd module: page-aligned at the top of RAM, above the kernel, with its bytes.
        let modlist = u64_in(&mem, info + 16);
        let (addr, size) = (u64_in(&mem, modlist), u64_in(&mem, modlist + 8));
        assert_eq!(size, initrd.len() as u64);
        assert_eq!(addr % 4096, 0);
        assert!(addr >= 0x20_3000 && addr + size <= 8 << 20, "{addr:#x}");
        let mut back = vec![0u8; initrd.len()];
        mem.read(addr, &mut back).unwrap();
        assert_eq!(back, initrd);
        // The memory map: RAM below 640 KiB, the ROM hole reserved, RAM from 1 MiB to the end.
        let (map, entries) = (u64_in(&mem, info + 40), mem.read_u32(info + 48).unwrap());
        let entry = |i: u64| {
            let e = map + 24 * i;
            (
                u64_in(&mem, e),
                u64_in(&mem, e + 8),
                mem.read_u32(e + 16).unwrap(),
            )
        };
        let got: Vec<_> = (0..u64::from(entries)).map(entry).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, 1),
                (0xf0000, 0x10000, 2),
                (0x10_0000, (8 << 20) - 0x10_0000, 1)
            ]
        );
    }

    #[test]
    fn without_initrd_there_are_no_modules() {
        let mut mem = GuestMemory::new(4 << 20).unwrap();
        let (_, boot) = load(&pvh_elf(Some(0x20_0000)), "", None, &mut mem).unwrap();
        let info = u64::from(boot.info_addr);
        assert_eq!(mem.read_u32(info + 12).unwrap(), 0);
        assert_eq!(u64_in(&mem, info + 16), 0);
    }

    #[test]
    fn refuses_what_it_cannot_boot() {
        let mut mem = GuestMemory::new(4 << 20).unwrap();
        // An ELF without the entry note is neither kind of kernel.
        assert!(matches!(
            load(&pvh_elf(None), "", None, &mut mem),
            Err(LoaderError::UnknownKernel)
        ));
        assert!(matches!(
            load(b"not a kernel", "", None, &mut mem),
            Err(LoaderError::UnknownKernel)
        ));
        // An entry note that names an address past 4 GiB.
        assert!(matches!(
            load(&pvh_elf(Some(1 << 32)), "", None, &mut mem),
            Err(LoaderError::Pvh(PvhError::BadNote(_)))
        ));
        // An initrd larger than the RAM above the kernel.
        let err = load(
            &pvh_elf(Some(0x20_0000)),
            "",
            Some(&vec![1u8; 2 << 20]),
            &mut mem,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("does not fit in guest RAM"),
            "{err}"
        );
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(matches!(
            load(&pvh_elf(Some(0x20_0000)), &long, None, &mut mem),
            Err(LoaderError::Pvh(PvhError::CmdlineTooLong(_)))
        ));
        // A truncated note segment.
        let mut cut = pvh_elf(Some(0x20_0000));
        let len = cut.len();
        cut.truncate(len - 4);
        assert!(load(&cut, "", None, &mut mem).is_err());
    }
}
