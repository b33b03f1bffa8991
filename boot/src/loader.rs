//! Boot loaders. [`load`] boots what the image is: a Multiboot v1 kernel (an ELF image or an a.out-kludge
//! image, loaded the way QEMU's `-kernel` and GRUB do, with the multiboot information block in EBX), or
//! failing that an ELF kernel with a PVH entry note, such as Linux's vmlinux (see [`crate::pvh`]). QEMU
//! tries them in the same order.

use crate::elf::{program_headers, u32_at, ElfError, PT_LOAD};
use crate::pvh::{self, PvhError};
use memory::{pc_memory_map, GuestMemory, MemoryError};
use thiserror::Error;

/// Magic value the kernel finds in EAX at its entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The multiboot header must lie in the first 8 KiB of the image.
const HEADER_SEARCH: usize = 8192;
/// Where the loader puts the information block, command line and memory map: low memory the
/// multiboot spec leaves to the loader, below any kernel loaded at 1 MiB.
const INFO_ADDR: u64 = 0x9000;
const CMDLINE_ADDR: u64 = 0x9400;
const MMAP_ADDR: u64 = 0x9800;
const LOADER_NAME_ADDR: u64 = 0x9c00;
const LOADER_NAME: &[u8] = b"retrovisor\0";
/// Longest command line that fits between CMDLINE_ADDR and MMAP_ADDR.
const CMDLINE_MAX: usize = (MMAP_ADDR - CMDLINE_ADDR) as usize - 1;

/// Why an image could not be loaded.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The image has no valid multiboot v1 header.
    #[error("not a Multiboot v1 kernel: no header with magic 0x1BADB002 and a valid checksum in the first 8 KiB")]
    NoMultibootHeader,
    /// The header asks for something we cannot provide.
    #[error(
        "multiboot header requires unsupported features (flags {0:#x}): video mode information"
    )]
    UnsupportedFlags(u32),
    /// The ELF image is malformed.
    #[error("bad ELF image: {0}")]
    BadElf(&'static str),
    /// A segment does not fit in guest RAM.
    #[error("kernel segment at {addr:#x} ({len} bytes) does not fit in guest RAM; {source}")]
    DoesNotFit {
        /// Segment load address.
        addr: u64,
        /// Segment size in memory.
        len: u64,
        /// The failed access.
        source: MemoryError,
    },
    /// The command line is too long for the space reserved for it.
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} are supported")]
    CmdlineTooLong(usize),
    /// Writing the boot information failed (guest RAM too small).
    #[error("cannot write multiboot information: {0}")]
    Info(#[from] MemoryError),
    /// The image is neither kind of kernel this loader boots.
    #[error("not a kernel retrovisor can boot: no Multiboot v1 header (magic 0x1BADB002 with a valid checksum in the first 8 KiB) and not an ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, as Linux's vmlinux has with CONFIG_PVH)")]
    UnknownKernel,
    /// An initial ramdisk was given for a Multiboot kernel.
    #[error("an initrd was given, but the kernel is a Multiboot kernel: retrovisor passes an initrd only to PVH kernels (Linux's vmlinux)")]
    InitrdNeedsPvh,
    /// The PVH boot failed.
    #[error(transparent)]
    Pvh(#[from] PvhError),
}

impl From<ElfError> for LoaderError {
    fn from(e: ElfError) -> LoaderError {
        LoaderError::BadElf(e.0)
    }
}

/// The boot protocol a kernel was loaded with, and what its entry expects in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Multiboot v1: EAX = [`BOOTLOADER_MAGIC`], EBX = the multiboot information block.
    Multiboot,
    /// PVH: EBX = the `hvm_start_info` structure.
    Pvh,
}

/// Loads `image` by the protocol it supports (Multiboot first, then PVH) and returns where and how to
/// start it. `initrd`, if any, is passed as the first PVH module.
pub fn load(
    image: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    mem: &mut GuestMemory,
) -> Result<(Protocol, BootInfo), LoaderError> {
    match load_multiboot(image, cmdline, mem) {
        Ok(_) if initrd.is_some() => Err(LoaderError::InitrdNeedsPvh),
        Ok(boot) => Ok((Protocol::Multiboot, boot)),
        Err(LoaderError::NoMultibootHeader) => {
            let entry = pvh::find_entry(image)?.ok_or(LoaderError::UnknownKernel)?;
            let (_, kernel_end) = load_elf(image, mem)?;
            let info_addr = pvh::write_start_info(mem, cmdline, initrd, kernel_end)?;
            Ok((
                Protocol::Pvh,
                BootInfo {
                    entry,
                    info_addr,
                    by_elf: true,
                },
            ))
        }
        Err(e) => Err(e),
    }
}

/// What the vCPU needs to start the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// 32-bit protected-mode entry point.
    pub entry: u32,
    /// Address of the boot information the kernel finds in EBX: the multiboot information block, or
    /// PVH's `hvm_start_info`.
    pub info_addr: u32,
    /// Whether the image was loaded at the physical addresses of its ELF program headers (not through
    /// Multiboot's a.out kludge): then its sections say where each of its bytes is in guest memory.
    pub by_elf: bool,
}

/// The multiboot header: offset in the image and flags.
struct Header {
    offset: usize,
    flags: u32,
}

fn find_header(image: &[u8]) -> Result<Header, LoaderError> {
    let end = image.len().min(HEADER_SEARCH);
    (0..end.saturating_sub(11))
        .step_by(4)
        .find_map(|off| {
            let magic = u32_at(image, off).ok()?;
            let flags = u32_at(image, off + 4).ok()?;
            let sum = u32_at(image, off + 8).ok()?;
            (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
                .then_some(Header { offset: off, flags })
        })
        .ok_or(LoaderError::NoMultibootHeader)
}

fn load_segment(
    mem: &mut GuestMemory,
    addr: u64,
    data: &[u8],
    mem_len: u64,
) -> Result<(), LoaderError> {
    let fit = |source| LoaderError::DoesNotFit {
        addr,
        len: mem_len,
        source,
    };
    mem.write(addr, data).map_err(fit)?;
    let zeros = mem_len.saturating_sub(data.len() as u64);
    if zeros > 0 {
        // Guest RAM may not be fresh (a reused machine), so .bss is cleared explicitly.
        let zeros = usize::try_from(zeros).map_err(|_| LoaderError::BadElf("segment too large"))?;
        mem.write(addr + data.len() as u64, &vec![0; zeros])
            .map_err(fit)?;
    }
    Ok(())
}

/// Loads the ELF program headers (PT_LOAD, at their physical addresses as QEMU does). Returns the entry
/// and the end of the highest segment in memory.
fn load_elf(image: &[u8], mem: &mut GuestMemory) -> Result<(u32, u64), LoaderError> {
    let (entry, headers) = program_headers(image)?;
    let entry = u32::try_from(entry)
        .map_err(|_| LoaderError::BadElf("entry point above 4 GiB (needs a 32-bit entry)"))?;
    let mut end = None;
    for ph in headers
        .iter()
        .filter(|ph| ph.ptype == PT_LOAD && ph.memsz != 0)
    {
        let data = ph.data(image)?;
        if ph.filesz > ph.memsz {
            return Err(LoaderError::BadElf(
                "segment file size exceeds its memory size",
            ));
        }
        load_segment(mem, ph.paddr, data, ph.memsz)?;
        end = end.max(Some(ph.paddr.saturating_add(ph.memsz)));
    }
    let end = end.ok_or(LoaderError::BadElf("no loadable segments"))?;
    Ok((entry, end))
}

/// Loads using the addresses in the multiboot header (flag bit 16), for non-ELF images.
fn load_aout_kludge(image: &[u8], h: &Header, mem: &mut GuestMemory) -> Result<u32, LoaderError> {
    let f = |i: usize| u32_at(image, h.offset + 12 + 4 * i);
    let (header_addr, load_addr, load_end, bss_end, entry) = (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
    let file_start = (h.offset as u64 + u64::from(load_addr))
        .checked_sub(u64::from(header_addr))
        .ok_or(LoaderError::BadElf(
            "a.out kludge: load_addr above header_addr",
        ))? as usize;
    let file_end = if load_end == 0 {
        image.len()
    } else {
        file_start + (load_end.saturating_sub(load_addr)) as usize
    };
    let data = image.get(file_start..file_end).ok_or(LoaderError::BadElf(
        "a.out kludge: load range outside the file",
    ))?;
    let mem_len = if bss_end == 0 {
        data.len() as u64
    } else {
        u64::from(bss_end.saturating_sub(load_addr))
    };
    load_segment(
        mem,
        u64::from(load_addr),
        data,
        mem_len.max(data.len() as u64),
    )?;
    Ok(entry)
}

/// Loads a Multiboot v1 kernel image into guest memory and writes the information block.
pub fn load_multiboot(
    image: &[u8],
    cmdline: &str,
    mem: &mut GuestMemory,
) -> Result<BootInfo, LoaderError> {
    let header = find_header(image)?;
    const VIDEO_MODE: u32 = 1 << 2;
    const AOUT_KLUDGE: u32 = 1 << 16;
    if header.flags & VIDEO_MODE != 0 {
        return Err(LoaderError::UnsupportedFlags(header.flags));
    }
    let by_elf = header.flags & AOUT_KLUDGE == 0;
    let entry = if by_elf {
        load_elf(image, mem)?.0
    } else {
        load_aout_kludge(image, &header, mem)?
    };
    if cmdline.len() > CMDLINE_MAX {
        return Err(LoaderError::CmdlineTooLong(cmdline.len()));
    }
    write_info(mem, cmdline)?;
    Ok(BootInfo {
        entry,
        info_addr: INFO_ADDR as u32,
        by_elf,
    })
}

fn write_info(mem: &mut GuestMemory, cmdline: &str) -> Result<(), MemoryError> {
    let ram = mem.size();
    let mut mmap = Vec::new();
    for (base, len, kind) in pc_memory_map(ram) {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    mem.write(MMAP_ADDR, &mmap)?;
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write(CMDLINE_ADDR, &line)?;
    mem.write(LOADER_NAME_ADDR, LOADER_NAME)?;

    const MEM: u32 = 1 << 0;
    const CMDLINE: u32 = 1 << 2;
    const MMAP: u32 = 1 << 6;
    const LOADER_NAME_FLAG: u32 = 1 << 9;
    let mut info = [0u8; 72];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, MEM | CMDLINE | MMAP | LOADER_NAME_FLAG);
    put(4, 639);
    put(8, (ram.saturating_sub(0x10_0000) / 1024) as u32);
    put(16, CMDLINE_ADDR as u32);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    put(64, LOADER_NAME_ADDR as u32);
    mem.write(INFO_ADDR, &info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF32 with one PT_LOAD segment and a multiboot header inside it.
    fn tiny_elf(flags: u32) -> Vec<u8> {
        let mut img = vec![0u8; 0x100];
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = 1;
        img[5] = 1;
        img[24..28].copy_from_slice(&0x10_0010u32.to_le_bytes()); // entry
        img[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
        img[42..44].copy_from_slice(&32u16.to_le_bytes());
        img[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        img[ph + 4..ph + 8].copy_from_slice(&0x80u32.to_le_bytes()); // offset
        img[ph + 12..ph + 16].copy_from_slice(&0x10_0000u32.to_le_bytes()); // paddr
        img[ph + 16..ph + 20].copy_from_slice(&0x20u32.to_le_bytes()); // filesz
        img[ph + 20..ph + 24].copy_from_slice(&0x1000u32.to_le_bytes()); // memsz
        let hdr = [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        ];
        for (i, w) in hdr.iter().enumerate() {
            img[0x80 + 4 * i..0x84 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        img
    }

    #[test]
    fn loads_elf_and_writes_info() {
        let mut mem = GuestMemory::new(4 << 20).unwrap();
        let boot = load_multiboot(&tiny_elf(2), "console=ttyS0", &mut mem).unwrap();
        assert_eq!(
            boot,
            BootInfo {
                entry: 0x10_0010,
                info_addr: 0x9000,
                by_elf: true,
            }
        );
        assert_eq!(mem.read_u32(0x10_0000).unwrap(), HEADER_MAGIC);
        assert_eq!(mem.read_u32(0x9008).unwrap(), 3 * 1024); // mem_upper in KiB
        let mut line = [0u8; 14];
        mem.read(u64::from(mem.read_u32(0x9010).unwrap()), &mut line)
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
    }

    #[test]
    fn rejects_bad_images() {
        let mut mem = GuestMemory::new(4 << 20).unwrap();
        assert!(matches!(
            load_multiboot(b"hello", "", &mut mem),
            Err(LoaderError::NoMultibootHeader)
        ));
        let mut bad_sum = tiny_elf(2);
        bad_sum[0x88] ^= 1;
        assert!(matches!(
            load_multiboot(&bad_sum, "", &mut mem),
            Err(LoaderError::NoMultibootHeader)
        ));
        assert!(matches!(
            load_multiboot(&tiny_elf(4), "", &mut mem),
            Err(LoaderError::UnsupportedFlags(4))
        ));
        let mut small = GuestMemory::new(1 << 20).unwrap();
        assert!(matches!(
            load_multiboot(&tiny_elf(2), "", &mut small),
            Err(LoaderError::DoesNotFit { .. })
        ));
        // An initrd goes only to PVH kernels.
        assert!(matches!(
            load(&tiny_elf(2), "", Some(b"initrd"), &mut mem),
            Err(LoaderError::InitrdNeedsPvh)
        ));
        assert!(matches!(
            load(&tiny_elf(2), "", None, &mut mem),
            Ok((Protocol::Multiboot, _))
        ));
        let mut truncated = tiny_elf(2);
        truncated[28..32].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(matches!(
            load_multiboot(&truncated, "", &mut mem),
            Err(LoaderError::BadElf(_))
        ));
    }
}
