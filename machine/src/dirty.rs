//! Which pages of guest RAM were written, since a checkpoint, since the last take, since a probe and since
//! a waypoint (KVM's dirty log plus what the VMM wrote itself), and the digests over RAM that rest on them.

use crate::vm::{kvm_err, Machine, MachineError, MEM_SLOT};

impl Machine {
    /// The machine digest: xxh3-128 of the state and RAM, then xxh3-128 of the state alone, so a mismatch
    /// can tell registers and devices from memory. A fast non-cryptographic hash is enough: it detects
    /// divergence, it does not authenticate. RAM is covered as [`Machine::digest_pages`] says: byte for byte
    /// (older traces), or by the cached hash of each page, rehashing only the pages written since the last
    /// digest, so that a checkpoint costs in proportion to what the guest wrote, not to its RAM.
    pub(crate) fn digest_of(&mut self, state_blob: &[u8]) -> Result<[u8; 32], MachineError> {
        let mut whole = xxhash_rust::xxh3::Xxh3::new();
        whole.update(state_blob);
        if self.digest_pages {
            self.refresh_page_hashes()?;
            for h in &self.page_hashes {
                whole.update(&h.to_le_bytes());
            }
        } else {
            whole.update(self.mem.as_slice());
        }
        let mut d = [0u8; 32];
        d[..16].copy_from_slice(&whole.digest128().to_le_bytes());
        d[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(state_blob).to_le_bytes());
        Ok(d)
    }

    /// Rehashes the pages written (by the guest, a device, or a restore) since the last digest.
    pub(crate) fn refresh_page_hashes(&mut self) -> Result<(), MachineError> {
        self.collect_dirty()?;
        for (i, word) in self.stale_hashes.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let pfn = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(h) = self.page_hashes.get_mut(pfn) {
                    *h = xxhash_rust::xxh3::xxh3_128(self.mem.page(pfn));
                }
            }
        }
        Ok(())
    }

    /// Makes checkpoint digests cover RAM through per-page hashes (traces that say `digest: pages`), or
    /// byte for byte (older traces).
    pub fn set_digest_pages(&mut self, pages: bool) {
        self.digest_pages = pages;
    }

    /// Folds the pages written since the last look (KVM's dirty log, and the VMM's own writes) into both
    /// dirty sets.
    pub(crate) fn collect_dirty(&mut self) -> Result<(), MachineError> {
        let kvm_dirty = self
            .vm
            .get_dirty_log(MEM_SLOT, self.mem.size() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let vmm_dirty = self.mem.take_vmm_dirty();
        for (i, &vmm) in vmm_dirty.iter().enumerate() {
            self.mark_written(i, kvm_dirty.get(i).copied().unwrap_or(0) | vmm);
        }
        Ok(())
    }

    /// Adds the pages of bitmap word `i` set in `fresh` to every dirty set, as written by the guest.
    pub(crate) fn mark_written(&mut self, i: usize, fresh: u64) {
        self.dirty_since_mark[i] |= fresh;
        self.dirty_since_take[i] |= fresh;
        self.dirty_since_probe[i] |= fresh;
        self.dirty_since_waypoint[i] |= fresh;
        self.stale_hashes[i] |= fresh;
    }

    /// Page frames written since the last snapshot, restore or call of this (by the guest, per KVM's dirty
    /// log, or by the VMM), in increasing order; resets the tracking.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<u64>, MachineError> {
        self.collect_dirty()?;
        let taken = std::mem::replace(
            &mut self.dirty_since_take,
            vec![0; self.dirty_since_mark.len()],
        );
        Ok(bitmap_pages(&taken))
    }

    /// Whether any of the page frames `pfns` was written (by the guest or a device) since the last call;
    /// starts a new period for the next one. What a watchpoint search asks at every landmark: a page
    /// written between two landmarks may have changed and changed back, which comparing values misses.
    pub fn wrote_since_probe(&mut self, pfns: &[u64]) -> Result<bool, MachineError> {
        self.collect_dirty()?;
        let wrote = pfns.iter().any(|&pfn| {
            self.dirty_since_probe
                .get((pfn / 64) as usize)
                .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
        });
        self.dirty_since_probe.fill(0);
        Ok(wrote)
    }

    /// Starts a new checkpoint interval for fingerprints: they digest the pages written since here. Record
    /// and replay call it at the same positions (every checkpoint), so their digests agree.
    pub fn mark_checkpoint(&mut self) -> Result<(), MachineError> {
        if self.cold_checkpoints() {
            // It reads the dirty log first.
            self.reset_mmu()?;
        } else {
            self.collect_dirty()?;
        }
        self.dirty_since_mark.fill(0);
        self.dirty_since_waypoint.fill(0);
        Ok(())
    }

    /// The pages written since the last [`Machine::mark_checkpoint`] (for an in-memory snapshot, which must
    /// put them back on restore so that later fingerprints digest the same pages).
    pub fn dirty_since_checkpoint(&mut self) -> Result<Vec<u64>, MachineError> {
        self.collect_dirty()?;
        Ok(bitmap_pages(&self.dirty_since_mark))
    }

    /// Sets the pages written since the last checkpoint, as [`Machine::dirty_since_checkpoint`] returned
    /// them when a snapshot was taken (after restoring that snapshot).
    pub fn set_dirty_since_checkpoint(&mut self, pages: &[u64]) {
        self.dirty_since_mark.fill(0);
        for &pfn in pages {
            if let Some(word) = self.dirty_since_mark.get_mut((pfn / 64) as usize) {
                *word |= 1 << (pfn % 64);
            }
        }
    }
}

/// The page frames whose bits are set in `bitmap`, in increasing order.
pub(crate) fn bitmap_pages(bitmap: &[u64]) -> Vec<u64> {
    bitmap
        .iter()
        .enumerate()
        .flat_map(|(i, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
        .collect()
}
