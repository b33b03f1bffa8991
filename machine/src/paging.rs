//! Guest-virtual to guest-physical translation by walking the guest's page tables in our copy of RAM.
//!
//! Used to decode the instruction at RIP before stepping it and, by the debugger, to read memory at the
//! addresses gdb names. Supports paging off, 32-bit (with 4 MiB pages), PAE and 4-level long mode.

use memory::GuestMemory;
use thiserror::Error;

/// Why an address could not be translated.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PagingError {
    /// A page-table entry on the walk was not present.
    #[error("linear address {0:#x} is not mapped by the guest page tables")]
    NotMapped(u64),
    /// A page-table entry lies outside guest RAM.
    #[error("page table for linear address {0:#x} lies outside guest RAM")]
    TableOutsideRam(u64),
}

/// The control registers that decide how linear addresses translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingMode {
    /// CR0 (PG is bit 31).
    pub cr0: u64,
    /// CR3: the root of the page tables.
    pub cr3: u64,
    /// CR4 (PSE bit 4, PAE bit 5, LA57 bit 12).
    pub cr4: u64,
    /// EFER (LMA bit 10).
    pub efer: u64,
}

const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

impl PagingMode {
    /// Whether paging is enabled at all.
    pub fn paging(&self) -> bool {
        self.cr0 & (1 << 31) != 0
    }

    /// Translates a linear address to a guest physical address.
    pub fn translate(&self, mem: &GuestMemory, linear: u64) -> Result<u64, PagingError> {
        if !self.paging() {
            return Ok(linear & 0xffff_ffff);
        }
        let entry = |table: u64, index: u64| {
            mem.read_u64(table + index * 8)
                .map_err(|_| PagingError::TableOutsideRam(linear))
        };
        if self.efer & crate::arch::EFER_LMA != 0 {
            // 4-level (5-level LA57 guests are not supported by our small guests; treat as 4-level).
            let mut table = self.cr3 & ADDR_MASK;
            for level in (0..4).rev() {
                let shift = 12 + 9 * level;
                let e = entry(table, (linear >> shift) & 0x1ff)?;
                if e & PRESENT == 0 {
                    return Err(PagingError::NotMapped(linear));
                }
                if level > 0 && level < 3 && e & LARGE != 0 {
                    let size = 1u64 << shift;
                    return Ok((e & ADDR_MASK & !(size - 1)) | (linear & (size - 1)));
                }
                table = e & ADDR_MASK;
            }
            return Ok(table | (linear & 0xfff));
        }
        if self.cr4 & (1 << 5) != 0 {
            // PAE: a 4-entry PDPT, then 2-level 64-bit tables.
            let pdpt = self.cr3 & 0xffff_ffe0;
            let e = entry(pdpt, (linear >> 30) & 3)?;
            if e & PRESENT == 0 {
                return Err(PagingError::NotMapped(linear));
            }
            let pde = entry(e & ADDR_MASK, (linear >> 21) & 0x1ff)?;
            if pde & PRESENT == 0 {
                return Err(PagingError::NotMapped(linear));
            }
            if pde & LARGE != 0 {
                return Ok((pde & ADDR_MASK & !0x1f_ffff) | (linear & 0x1f_ffff));
            }
            let pte = entry(pde & ADDR_MASK, (linear >> 12) & 0x1ff)?;
            if pte & PRESENT == 0 {
                return Err(PagingError::NotMapped(linear));
            }
            return Ok((pte & ADDR_MASK) | (linear & 0xfff));
        }
        // Classic 32-bit paging.
        let entry32 = |table: u64, index: u64| {
            mem.read_u32(table + index * 4)
                .map(u64::from)
                .map_err(|_| PagingError::TableOutsideRam(linear))
        };
        let linear = linear & 0xffff_ffff;
        let pde = entry32(self.cr3 & 0xffff_f000, linear >> 22)?;
        if pde & PRESENT == 0 {
            return Err(PagingError::NotMapped(linear));
        }
        if pde & LARGE != 0 && self.cr4 & (1 << 4) != 0 {
            // 4 MiB page; bits 13-20 of the PDE extend the address above 4 GiB (PSE-36).
            let high = ((pde >> 13) & 0xff) << 32;
            return Ok(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
        }
        let pte = entry32(pde & 0xffff_f000, (linear >> 12) & 0x3ff)?;
        if pte & PRESENT == 0 {
            return Err(PagingError::NotMapped(linear));
        }
        Ok((pte & 0xffff_f000) | (linear & 0xfff))
    }

    /// Splits `len` bytes at a linear address into (guest physical address, range of the bytes) pieces
    /// that do not cross a page, translating each; all are translated before any is used.
    pub(crate) fn pieces(
        &self,
        mem: &GuestMemory,
        linear: u64,
        len: usize,
    ) -> Result<Vec<(u64, std::ops::Range<usize>)>, PagingError> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let addr = linear.wrapping_add(done as u64);
            let in_page = (4096 - (addr & 0xfff) as usize).min(len - done);
            out.push((self.translate(mem, addr)?, done..done + in_page));
            done += in_page;
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes at a linear address, page by page (the pages need not be contiguous).
    pub fn read_linear(
        &self,
        mem: &GuestMemory,
        linear: u64,
        buf: &mut [u8],
    ) -> Result<(), PagingError> {
        for (phys, range) in self.pieces(mem, linear, buf.len())? {
            let at = linear.wrapping_add(range.start as u64);
            mem.read(phys, &mut buf[range])
                .map_err(|_| PagingError::NotMapped(at))?;
        }
        Ok(())
    }

    /// Writes bytes at a linear address, page by page; nothing is written unless every page is mapped.
    pub fn write_linear(
        &self,
        mem: &mut GuestMemory,
        linear: u64,
        data: &[u8],
    ) -> Result<(), PagingError> {
        for (phys, range) in self.pieces(mem, linear, data.len())? {
            let at = linear.wrapping_add(range.start as u64);
            mem.write(phys, &data[range])
                .map_err(|_| PagingError::NotMapped(at))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_all_modes() {
        let mut mem = GuestMemory::new(1 << 22).unwrap();
        // 32-bit: PD at 0x1000, PT at 0x2000 mapping linear 0x400000 -> 0x5000; a 4 MiB page at 0xc0000000 -> 0.
        mem.write(0x1000 + 4, &(0x2000u32 | 1).to_le_bytes())
            .unwrap();
        mem.write(0x2000, &(0x5000u32 | 1).to_le_bytes()).unwrap();
        mem.write(0x1000 + 0x300 * 4, &(0x83u32).to_le_bytes())
            .unwrap();
        let m32 = PagingMode {
            cr0: 1 << 31,
            cr3: 0x1000,
            cr4: 1 << 4,
            efer: 0,
        };
        assert_eq!(m32.translate(&mem, 0x40_0123), Ok(0x5123));
        assert_eq!(m32.translate(&mem, 0xc012_3456), Ok(0x12_3456));
        assert_eq!(
            m32.translate(&mem, 0x80_0000),
            Err(PagingError::NotMapped(0x80_0000))
        );
        // 4-level: PML4 0x10000 -> PDPT 0x11000 -> PD 0x12000 with a 2 MiB page at linear 0 -> 0x200000.
        mem.write(0x10000, &(0x11000u64 | 3).to_le_bytes()).unwrap();
        mem.write(0x11000, &(0x12000u64 | 3).to_le_bytes()).unwrap();
        mem.write(0x12000, &(0x20_0000u64 | 0x83).to_le_bytes())
            .unwrap();
        let m64 = PagingMode {
            cr0: 1 << 31,
            cr3: 0x10000,
            cr4: 1 << 5,
            efer: 1 << 10,
        };
        assert_eq!(m64.translate(&mem, 0x1234), Ok(0x20_1234));
        assert!(m64.translate(&mem, 1 << 39).is_err());
        // PAE: PDPT at 0x20000 -> PD 0x12000 (reused).
        mem.write(0x20000, &(0x12000u64 | 1).to_le_bytes()).unwrap();
        let pae = PagingMode {
            cr0: 1 << 31,
            cr3: 0x20000,
            cr4: 1 << 5,
            efer: 0,
        };
        assert_eq!(pae.translate(&mem, 0x10), Ok(0x20_0010));
        // Paging off: identity (within 4 GiB).
        assert_eq!(
            PagingMode::default().translate(&mem, 0x1_0000_1234),
            Ok(0x1234)
        );
        let mut buf = [0u8; 8];
        m64.read_linear(&mem, 0xffc, &mut buf).unwrap();
    }
}
