//! The symbol table of an ELF guest image (32- or 64-bit), for naming addresses in what retrovisor prints
//! (the function a store was made in) and finding the address of a name (`monitor history &guard 4`).
//! An image without a symbol table (stripped) simply has no names.

/// Functions and objects of an image, by address.
#[derive(Debug, Default, Clone)]
pub struct Symbols {
    /// (address, size, name), sorted by address.
    entries: Vec<(u64, u64, String)>,
}

/// Section type of a symbol table.
const SHT_SYMTAB: u32 = 2;
/// Symbol types worth naming: objects and functions.
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;

impl Symbols {
    /// The functions and objects `image` defines; none if it is not an ELF or has no symbol table. The
    /// image is untrusted: every offset is checked, and a malformed table gives what could be read.
    pub fn from_elf(image: &[u8]) -> Symbols {
        let mut entries = Self::read(image).unwrap_or_default();
        entries.sort();
        Symbols { entries }
    }

    fn read(b: &[u8]) -> Option<Vec<(u64, u64, String)>> {
        let sections = crate::elf::section_headers(b)?;
        let wide = *b.get(4)? == 2;
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
        let word = |o: usize| {
            if wide {
                u64_at(o)
            } else {
                u32_at(o).map(u64::from)
            }
        };
        let symtab = sections.iter().find(|s| s.kind == SHT_SYMTAB)?;
        let (symoff, symsize) = (symtab.offset, symtab.size);
        let strings = sections.get(symtab.link as usize)?;
        let (stroff, strsize) = (strings.offset, strings.size);
        let strtab =
            b.get(usize::try_from(stroff).ok()?..usize::try_from(stroff + strsize).ok()?)?;
        let entsize = if wide { 24 } else { 16 };
        let mut out = Vec::new();
        for i in 0..(symsize / entsize) as usize {
            let s = usize::try_from(symoff).ok()? + i * entsize as usize;
            let (name, info, value, size) = if wide {
                (u32_at(s)?, *b.get(s + 4)?, u64_at(s + 8)?, u64_at(s + 16)?)
            } else {
                (u32_at(s)?, *b.get(s + 12)?, word(s + 4)?, word(s + 8)?)
            };
            if !matches!(info & 0xf, STT_OBJECT | STT_FUNC) || value == 0 {
                continue;
            }
            let name = strtab.get(name as usize..)?;
            let end = name.iter().position(|&c| c == 0)?;
            out.push((
                value,
                size,
                String::from_utf8_lossy(&name[..end]).into_owned(),
            ));
        }
        Some(out)
    }

    /// The symbol `addr` lies in, and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self
            .entries
            .partition_point(|e| e.0 <= addr)
            .checked_sub(1)?;
        let (start, size, name) = &self.entries[i];
        (addr < start + (*size).max(1)).then(|| (name.as_str(), addr - start))
    }

    /// The names of the symbols that overlap the addresses `start..end`, in address order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(move |(addr, size, _)| {
                *addr < end && addr.saturating_add((*size).max(1)) > start
            })
            .map(|(_, _, name)| name.as_str())
    }

    /// The address and size of the symbol called `name`.
    pub fn find(&self, name: &str) -> Option<(u64, u64)> {
        self.entries
            .iter()
            .find(|e| e.2 == name)
            .map(|e| (e.0, e.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real images are checked end to end (tests/gdb_history.rs names functions and finds `&guard`).
    #[test]
    fn garbage_and_truncated_images_have_no_symbols() {
        assert!(Symbols::from_elf(b"not an elf").lookup(0x1000).is_none());
        let mut elf = b"\x7fELF\x01\x01\x01".to_vec();
        elf.resize(64, 0);
        assert!(
            Symbols::from_elf(&elf).find("main").is_none(),
            "truncated tables give nothing"
        );
    }
}
