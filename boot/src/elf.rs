//! The parts of an ELF image (32- or 64-bit, little-endian) the loaders, the symbol table and the
//! host-instruction traps read: program headers and section headers. The image is untrusted: every
//! offset is checked.

use thiserror::Error;

/// A malformed ELF image: what is wrong with it.
#[derive(Debug, Error)]
#[error("bad ELF image: {0}")]
pub struct ElfError(pub &'static str);

/// The little-endian u16 at `off`.
fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ElfError("truncated"))
}
/// The little-endian u32 at `off`.
pub(crate) fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ElfError("truncated"))
}
/// The little-endian u64 at `off`.
pub(crate) fn u64_at(b: &[u8], off: usize) -> Result<u64, ElfError> {
    Ok(u64::from(u32_at(b, off)?) | (u64::from(u32_at(b, off + 4)?) << 32))
}

/// One ELF program header: the fields the loaders use.
#[derive(Debug, Clone, Copy)]
pub struct ProgramHeader {
    /// Segment type (PT_LOAD, PT_NOTE, ...).
    pub ptype: u32,
    /// Offset of its bytes in the file.
    pub offset: u64,
    /// Physical load address.
    pub paddr: u64,
    /// Virtual address (where the image's symbols place it).
    pub vaddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zeroed).
    pub memsz: u64,
}

impl ProgramHeader {
    /// The segment's bytes in the file.
    pub fn data<'a>(&self, image: &'a [u8]) -> Result<&'a [u8], ElfError> {
        usize::try_from(self.offset)
            .ok()
            .zip(usize::try_from(self.filesz).ok())
            .and_then(|(o, n)| image.get(o..o.checked_add(n)?))
            .ok_or(ElfError("segment data lies outside the file"))
    }
}

/// Segment type of a loadable segment.
pub const PT_LOAD: u32 = 1;
/// Segment type of a segment of notes.
pub(crate) const PT_NOTE: u32 = 4;

/// The entry point and program headers of an ELF image (32- or 64-bit, little-endian).
pub fn program_headers(image: &[u8]) -> Result<(u64, Vec<ProgramHeader>), ElfError> {
    if image.get(0..4) != Some(b"\x7fELF") {
        return Err(ElfError(
            "no ELF magic and no a.out kludge in the multiboot header",
        ));
    }
    let class64 = match image[4] {
        1 => false,
        2 => true,
        _ => return Err(ElfError("unknown ELF class")),
    };
    if image.get(5) != Some(&1) {
        return Err(ElfError("not little-endian"));
    }
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(image, 24)?,
            u64_at(image, 32)?,
            u16_at(image, 54)?,
            u16_at(image, 56)?,
        )
    } else {
        (
            u64::from(u32_at(image, 24)?),
            u64::from(u32_at(image, 28)?),
            u16_at(image, 42)?,
            u16_at(image, 44)?,
        )
    };
    let mut headers = Vec::new();
    for i in 0..usize::from(phnum) {
        let ph = usize::try_from(phoff).map_err(|_| ElfError("bad program header offset"))?
            + i * usize::from(phentsize);
        headers.push(if class64 {
            ProgramHeader {
                ptype: u32_at(image, ph)?,
                offset: u64_at(image, ph + 8)?,
                vaddr: u64_at(image, ph + 16)?,
                paddr: u64_at(image, ph + 24)?,
                filesz: u64_at(image, ph + 32)?,
                memsz: u64_at(image, ph + 40)?,
            }
        } else {
            let f = |o| u32_at(image, ph + o).map(u64::from);
            ProgramHeader {
                ptype: u32_at(image, ph)?,
                offset: f(4)?,
                vaddr: f(8)?,
                paddr: f(12)?,
                filesz: f(16)?,
                memsz: f(20)?,
            }
        });
    }
    Ok((entry, headers))
}

/// The virtual address at which `image`'s symbols see physical address `paddr`, if one of its loadable
/// segments covers it (a kernel linked high, like Linux, loads at other physical addresses).
pub fn virtual_address(image: &[u8], paddr: u64) -> Option<u64> {
    let (_, headers) = program_headers(image).ok()?;
    headers
        .iter()
        .find(|h| h.ptype == PT_LOAD && (h.paddr..h.paddr.saturating_add(h.memsz)).contains(&paddr))
        .map(|h| h.vaddr.wrapping_add(paddr - h.paddr))
}

/// One ELF section header: the fields retrovisor reads.
#[derive(Debug, Clone, Copy)]
pub struct SectionHeader {
    /// Section type (SHT_SYMTAB, ...).
    pub kind: u32,
    /// Flags (SHF_EXECINSTR, ...).
    pub flags: u64,
    /// Address in the running image (virtual, for a kernel linked high).
    pub addr: u64,
    /// Offset of its bytes in the file.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Index of the associated section (a symbol table's string table).
    pub link: u32,
}

/// The section headers of an ELF image (32- or 64-bit, little-endian); None if it is not an ELF or its
/// table lies outside the file.
pub fn section_headers(b: &[u8]) -> Option<Vec<SectionHeader>> {
    if b.get(..4)? != b"\x7fELF" {
        return None;
    }
    let wide = *b.get(4)? == 2;
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let (shoff, shentsize, shnum) = if wide {
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?)
    } else {
        (u64::from(u32_at(0x20)?), u16_at(0x2e)?, u16_at(0x30)?)
    };
    (0..usize::from(shnum))
        .map(|i| {
            let h = usize::try_from(shoff).ok()? + i * usize::from(shentsize);
            Some(if wide {
                SectionHeader {
                    kind: u32_at(h + 4)?,
                    flags: u64_at(h + 8)?,
                    addr: u64_at(h + 0x10)?,
                    offset: u64_at(h + 0x18)?,
                    size: u64_at(h + 0x20)?,
                    link: u32_at(h + 0x28)?,
                }
            } else {
                SectionHeader {
                    kind: u32_at(h + 4)?,
                    flags: u64::from(u32_at(h + 8)?),
                    addr: u64::from(u32_at(h + 0xc)?),
                    offset: u64::from(u32_at(h + 0x10)?),
                    size: u64::from(u32_at(h + 0x14)?),
                    link: u32_at(h + 0x18)?,
                }
            })
        })
        .collect()
}
