//! Guest physical memory: one anonymous mapping registered with KVM at guest physical address 0.
//!
//! Besides plain access, it tracks the pages the VMM itself writes (loader, devices), because the KVM
//! dirty log only sees stores made by the guest, and incremental checkpoints need both.

use memmap2::MmapMut;
use thiserror::Error;

/// Size of a guest page; checkpoints and dirty tracking work in these units.
pub const PAGE_SIZE: usize = 4096;

/// Errors from guest memory access.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The mapping could not be created.
    #[error("cannot allocate {bytes} bytes of guest RAM: {source}")]
    Alloc {
        /// Requested size.
        bytes: u64,
        /// Why the host refused.
        source: std::io::Error,
    },
    /// An access fell (partly) outside guest RAM.
    #[error("guest physical access at {addr:#x} (+{len}) is outside guest RAM ({size:#x} bytes)")]
    OutOfRange {
        /// Start of the access.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// Size of guest RAM.
        size: u64,
    },
}

/// Guest RAM, mapped at guest physical address 0.
pub struct GuestMemory {
    map: MmapMut,
    /// One bit per page written by the VMM since the last [`GuestMemory::take_vmm_dirty`].
    vmm_dirty: Vec<u64>,
}

impl GuestMemory {
    /// Allocates `bytes` of zeroed guest RAM (rounded up to whole pages).
    pub fn new(bytes: u64) -> Result<Self, MemoryError> {
        let size = bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        let map = MmapMut::map_anon(size as usize)
            .map_err(|source| MemoryError::Alloc { bytes, source })?;
        let pages = size as usize / PAGE_SIZE;
        Ok(GuestMemory {
            map,
            vmm_dirty: vec![0; pages.div_ceil(64)],
        })
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Number of pages of guest RAM.
    pub fn pages(&self) -> usize {
        self.map.len() / PAGE_SIZE
    }

    /// Host address of guest physical 0, for registering the memory slot with KVM.
    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, MemoryError> {
        let end = addr.checked_add(len as u64).filter(|&e| e <= self.size());
        match end {
            Some(end) => Ok(addr as usize..end as usize),
            None => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size(),
            }),
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.map[r]);
        Ok(())
    }

    /// Writes `data` into guest memory at `addr`, marking the pages dirty for the next checkpoint.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let r = self.range(addr, data.len())?;
        if !data.is_empty() {
            for page in r.start / PAGE_SIZE..=(r.end - 1) / PAGE_SIZE {
                self.vmm_dirty[page / 64] |= 1 << (page % 64);
            }
        }
        self.map[r].copy_from_slice(data);
        Ok(())
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The contents of page `pfn`.
    pub fn page(&self, pfn: usize) -> &[u8] {
        &self.map[pfn * PAGE_SIZE..(pfn + 1) * PAGE_SIZE]
    }

    /// Overwrites page `pfn` (restoring a checkpoint). Not marked dirty: the restored state *is* the baseline.
    pub fn set_page(&mut self, pfn: usize, data: &[u8]) -> Result<(), MemoryError> {
        let r = self.range((pfn * PAGE_SIZE) as u64, PAGE_SIZE)?;
        if data.len() != PAGE_SIZE {
            return Err(MemoryError::OutOfRange {
                addr: r.start as u64,
                len: data.len(),
                size: self.size(),
            });
        }
        self.map[r].copy_from_slice(data);
        Ok(())
    }

    /// Zeroes all of guest RAM (before restoring a full checkpoint, whose absent pages are zero).
    pub fn clear(&mut self) {
        self.map.fill(0);
    }

    /// Returns and clears the bitmap of pages the VMM wrote.
    pub fn take_vmm_dirty(&mut self) -> Vec<u64> {
        let fresh = vec![0; self.vmm_dirty.len()];
        std::mem::replace(&mut self.vmm_dirty, fresh)
    }

    /// The whole of guest RAM, for hashing.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }
}

/// The PC memory map both protocols report, as QEMU does: conventional memory, the BIOS ROM hole, then
/// RAM from 1 MiB to the end of guest RAM. (base, length, type): type 1 is RAM, 2 reserved.
pub fn pc_memory_map(ram: u64) -> [(u64, u64, u32); 3] {
    [
        (0, 0x9fc00, 1),
        (0xf0000, 0x10000, 2),
        (0x10_0000, ram.saturating_sub(0x10_0000), 1),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_and_vmm_writes_are_tracked() {
        let mut m = GuestMemory::new(3 * PAGE_SIZE as u64 - 5).unwrap();
        assert_eq!(m.size(), 3 * PAGE_SIZE as u64);
        m.write(PAGE_SIZE as u64 - 2, &[1, 2, 3, 4]).unwrap();
        assert_eq!(m.take_vmm_dirty()[0], 0b11);
        assert_eq!(m.take_vmm_dirty()[0], 0);
        assert_eq!(m.read_u32(PAGE_SIZE as u64 - 2).unwrap(), 0x0403_0201);
        assert!(m.read(3 * PAGE_SIZE as u64 - 1, &mut [0; 2]).is_err());
        assert!(m.write(u64::MAX, &[0]).is_err());
    }
}
