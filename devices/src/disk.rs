//! Disk images and the copy-on-write overlay that keeps them unmodified.
//!
//! A [`DiskImage`] is the read-only base: the bytes of the user's image file, read into memory once
//! when the machine is built (so a file changed or deleted later cannot change the run), or, on
//! replay, the trace's hashed copy. Every guest write lands in an [`Overlay`]: a map from 4 KiB block
//! number to the block's current contents. A [`Disk`] is the two together; reads see the overlay
//! where it has a block and the base image elsewhere.
//!
//! The overlay is machine state: it is serialized into checkpoints with the device that owns it (the
//! base image is not: it is reattached when a checkpoint is restored). Nothing here ever writes the
//! image file, except [`Overlay::write_back`], which only `run --disk-writeback` calls.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Bytes per sector: the unit of virtio-blk requests and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes per overlay block.
pub const BLOCK_SIZE: usize = 4096;

/// Problems with a disk image file, or with a disk restored from a checkpoint.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The file cannot be opened or read.
    #[error("cannot read disk image {path}: {source}")]
    Read {
        /// The image path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is empty or shorter than one sector.
    #[error(
        "disk image {path} is {}: a disk needs at least one 512-byte sector",
        if *size == 0 { "empty".to_string() } else { format!("only {size} bytes") }
    )]
    TooSmall {
        /// The image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The path names a directory, a FIFO, a device or a socket.
    #[error("disk image {path} is {what}, not an image file")]
    NotAFile {
        /// The image path.
        path: PathBuf,
        /// What it is, e.g. "a FIFO".
        what: &'static str,
    },
    /// The image does not fit in memory.
    #[error("disk image {path} is {size} bytes, more than this host can hold in memory")]
    TooLarge {
        /// The image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing the guest's changes back into the image file failed.
    #[error("cannot write the guest's disk writes back to {path}: {source}")]
    WriteBack {
        /// The image path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A checkpoint's disk is not the size of the image it is restored onto.
    #[error("the checkpoint's disk is {saved} bytes but the disk image is {image} bytes")]
    SizeMismatch {
        /// The size the checkpoint records.
        saved: u64,
        /// The image's size.
        image: u64,
    },
    /// A checkpoint's overlay holds a block past the end of the image, or one of the wrong length.
    #[error("the checkpoint's disk overlay has a bad block {block} ({len} bytes)")]
    BadBlock {
        /// The block number.
        block: u64,
        /// Its length.
        len: usize,
    },
}

/// The read-only base contents of a disk, shared cheaply (cloning shares the bytes).
#[derive(Clone, Default)]
pub struct DiskImage {
    /// A `Vec` rather than a slice: turning a `Vec` into an `Arc<[u8]>` would copy the whole image.
    bytes: Arc<Vec<u8>>,
    path: PathBuf,
}

impl DiskImage {
    /// Reads the image file at `path` into memory. A missing or unreadable file, anything but a
    /// regular file (a directory, a FIFO, a device), or a file shorter than one sector is an error.
    pub fn open(path: &Path) -> Result<DiskImage, DiskError> {
        let read_err = |source| DiskError::Read {
            path: path.to_owned(),
            source,
        };
        // O_NONBLOCK: opening a FIFO with no writer would otherwise block forever. It changes
        // nothing for a regular file, and anything else is refused below before it is read (a
        // device such as /dev/zero would read without end).
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let kind = meta.file_type();
        if !kind.is_file() {
            let what = if kind.is_dir() {
                "a directory"
            } else if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else {
                "not a regular file"
            };
            return Err(DiskError::NotAFile {
                path: path.to_owned(),
                what,
            });
        }
        let hint = meta.len();
        let mut bytes = Vec::new();
        usize::try_from(hint)
            .ok()
            .and_then(|n| bytes.try_reserve_exact(n).ok())
            .ok_or_else(|| DiskError::TooLarge {
                path: path.to_owned(),
                size: hint,
            })?;
        file.read_to_end(&mut bytes).map_err(read_err)?;
        let image = DiskImage::new(bytes, path.to_owned());
        if image.sectors() == 0 {
            return Err(DiskError::TooSmall {
                path: path.to_owned(),
                size: image.len(),
            });
        }
        Ok(image)
    }

    /// An image from bytes already in memory (the trace's copy on replay); `path` is only a label.
    pub fn new(bytes: Vec<u8>, path: PathBuf) -> DiskImage {
        DiskImage {
            bytes: Arc::new(bytes),
            path,
        }
    }

    /// The image's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The path the image came from (or the label it was given).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the image has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whole 512-byte sectors: the disk's capacity. Trailing bytes past the last whole sector are
    /// not reachable by the guest.
    pub fn sectors(&self) -> u64 {
        self.len() / SECTOR_SIZE
    }
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiskImage({}, {} bytes)",
            self.path.display(),
            self.len()
        )
    }
}

/// Two images are equal when their bytes are (the path is only a label).
impl PartialEq for DiskImage {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.bytes, &other.bytes) || self.bytes == other.bytes
    }
}

impl Eq for DiskImage {}

/// The blocks the guest has written: block number -> [`BLOCK_SIZE`] bytes (the whole block as the
/// guest now sees it; bytes past the end of the image stay zero).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl Overlay {
    /// Number of blocks written.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes the overlay holds.
    pub fn bytes(&self) -> u64 {
        (self.blocks.len() * BLOCK_SIZE) as u64
    }

    /// Writes the blocks into the image file `file` of `size` bytes (only the parts inside the file:
    /// the image never grows), then syncs it. Only `run --disk-writeback` uses this.
    pub fn write_back(&self, file: &File, size: u64, path: &Path) -> Result<(), DiskError> {
        let err = |source| DiskError::WriteBack {
            path: path.to_owned(),
            source,
        };
        for (&block, data) in &self.blocks {
            let offset = block * BLOCK_SIZE as u64;
            if offset >= size {
                continue;
            }
            let n = (size - offset).min(BLOCK_SIZE as u64) as usize;
            file.write_all_at(&data[..n], offset).map_err(err)?;
        }
        file.sync_all().map_err(err)
    }
}

/// A disk: the base image (not serialized) under the guest's writes (serialized).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    #[serde(skip)]
    image: DiskImage,
    /// Size of the image; a restored state must match the image it is attached to.
    size: u64,
    overlay: Overlay,
}

impl Disk {
    /// A disk showing `image`, with nothing written yet.
    pub fn new(image: DiskImage) -> Disk {
        Disk {
            size: image.len(),
            image,
            overlay: Overlay::default(),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Bytes the guest can reach: whole sectors.
    pub fn capacity_bytes(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }

    /// The image under the overlay, as the machine was given it.
    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    /// The guest's writes so far.
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// Takes the guest's writes out (at the end of a run, for write-back).
    pub fn take_overlay(&mut self) -> Overlay {
        std::mem::take(&mut self.overlay)
    }

    /// The bytes at `offset` up to the end of its block (or of the image), as the guest sees them.
    /// `offset` must be below [`Disk::capacity_bytes`]; otherwise the result is empty.
    fn chunk(&self, offset: u64) -> &[u8] {
        if offset >= self.capacity_bytes() {
            return &[];
        }
        let block = offset / BLOCK_SIZE as u64;
        let within = (offset % BLOCK_SIZE as u64) as usize;
        let block_end = ((block + 1) * BLOCK_SIZE as u64).min(self.capacity_bytes());
        let len = (block_end - offset) as usize;
        match self.overlay.blocks.get(&block) {
            // A block of the wrong length (from a checkpoint not yet checked) reads as nothing.
            Some(data) => data.get(within..within + len).unwrap_or_default(),
            None => {
                let start = offset as usize;
                self.image.bytes().get(start..start + len).unwrap_or(&[])
            }
        }
    }

    /// The bytes at `offset` up to the end of its block, for writing: the block moves into the
    /// overlay first (copied from the image). Empty if `offset` is beyond the capacity.
    fn chunk_mut(&mut self, offset: u64) -> &mut [u8] {
        if offset >= self.capacity_bytes() {
            return &mut [];
        }
        let block = offset / BLOCK_SIZE as u64;
        let within = (offset % BLOCK_SIZE as u64) as usize;
        let block_start = block * BLOCK_SIZE as u64;
        let block_end = (block_start + BLOCK_SIZE as u64).min(self.capacity_bytes());
        let len = (block_end - offset) as usize;
        let image = &self.image;
        let data = self.overlay.blocks.entry(block).or_insert_with(|| {
            let mut data = vec![0u8; BLOCK_SIZE];
            let start = block_start as usize;
            let end = (block_start + BLOCK_SIZE as u64).min(image.len()) as usize;
            if let Some(src) = image.bytes().get(start..end) {
                data[..src.len()].copy_from_slice(src);
            }
            data
        });
        data.get_mut(within..within + len).unwrap_or_default()
    }

    /// Hands `f` the bytes of `[offset, offset + len)` as the guest sees them, a block at a time, each
    /// piece with its position in the range. False if the range is not inside the capacity, if no
    /// image is attached (a restored state before [`Disk::adopt_image`]), or as soon as `f` returns
    /// false.
    pub fn read_with(&self, offset: u64, len: u64, mut f: impl FnMut(u64, &[u8]) -> bool) -> bool {
        self.contains(offset, len)
            && pieces(offset, len).all(|(at, n)| match self.chunk(at).get(..n) {
                Some(bytes) => f(at - offset, bytes),
                None => false,
            })
    }

    /// Hands `f` the bytes of `[offset, offset + len)` to overwrite, a block at a time (each block moves
    /// into the overlay first), each piece with its position in the range. False if the range is not
    /// inside the capacity (then nothing moves), or as soon as `f` returns false.
    pub fn write_with(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> bool {
        self.contains(offset, len)
            && pieces(offset, len).all(|(at, n)| match self.chunk_mut(at).get_mut(..n) {
                Some(bytes) => f(at - offset, bytes),
                None => false,
            })
    }

    /// Copies `buf.len()` bytes at `offset` out of the disk; false (and nothing copied) if the range
    /// is not inside the capacity.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.read_with(offset, buf.len() as u64, |at, bytes| {
            buf[at as usize..][..bytes.len()].copy_from_slice(bytes);
            true
        })
    }

    /// Writes `data` at `offset` (into the overlay); false (and nothing written) if the range is not
    /// inside the capacity.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        self.write_with(offset, data.len() as u64, |at, bytes| {
            bytes.copy_from_slice(&data[at as usize..][..bytes.len()]);
            true
        })
    }

    /// Whether `[offset, offset + len)` lies inside the capacity.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.capacity_bytes())
    }

    /// Takes the base image of `current` (the live disk this restored state replaces) and checks
    /// that the restored overlay fits it: the same image size, every block inside the image and
    /// exactly one block long.
    pub fn adopt_image(&mut self, current: &Disk) -> Result<(), DiskError> {
        if self.size != current.image.len() {
            return Err(DiskError::SizeMismatch {
                saved: self.size,
                image: current.image.len(),
            });
        }
        let blocks = self.size.div_ceil(BLOCK_SIZE as u64);
        for (&block, data) in &self.overlay.blocks {
            if block >= blocks || data.len() != BLOCK_SIZE {
                return Err(DiskError::BadBlock {
                    block,
                    len: data.len(),
                });
            }
        }
        self.image = current.image.clone();
        Ok(())
    }
}

/// `[offset, offset + len)` split where blocks begin: the start and length of each piece. The caller
/// checks that the range does not overflow.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let block_end = (at / BLOCK_SIZE as u64 + 1) * BLOCK_SIZE as u64;
        let piece = (at, (block_end.min(end) - at) as usize);
        at = block_end;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    #[test]
    fn overlay_reads_through_and_copies_on_write() {
        let base = pattern(3 * BLOCK_SIZE + 1000);
        let mut disk = Disk::new(DiskImage::new(base.clone(), "t".into()));
        assert_eq!(disk.sectors(), (3 * BLOCK_SIZE as u64 + 1000) / 512);
        let mut buf = vec![0; 1024];
        assert!(disk.read(BLOCK_SIZE as u64 - 512, &mut buf));
        assert_eq!(buf, &base[BLOCK_SIZE - 512..BLOCK_SIZE + 512]);

        // A write straddling two blocks moves both into the overlay and leaves the image alone.
        assert!(disk.write(BLOCK_SIZE as u64 - 10, &[0xAB; 20]));
        assert_eq!(disk.overlay().blocks(), 2);
        assert!(disk.read(BLOCK_SIZE as u64 - 512, &mut buf));
        let mut expected = base[BLOCK_SIZE - 512..BLOCK_SIZE + 512].to_vec();
        expected[502..522].fill(0xAB);
        assert_eq!(buf, expected);
        assert_eq!(disk.image.bytes(), &base[..]);

        // The partial last block: capacity ends at a sector boundary.
        let cap = disk.capacity_bytes();
        assert!(!disk.write(cap - 1, &[1, 2]));
        assert!(disk.write(cap - 512, &[9; 512]));
        assert!(disk.read(cap - 512, &mut buf[..512]));
        assert_eq!(&buf[..512], &[9; 512][..]);
        assert!(!disk.read(u64::MAX, &mut buf[..1]));
        assert!(disk.chunk(cap).is_empty());
        assert!(disk.chunk_mut(cap).is_empty());
    }

    #[test]
    fn restored_overlay_is_checked_against_the_image() {
        let live = Disk::new(DiskImage::new(pattern(8192), "t".into()));
        let mut saved = live.clone();
        saved.write(100, b"hello");
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let mut back: Disk = postcard::from_bytes(&bytes).unwrap();
        assert!(back.image.is_empty());
        back.adopt_image(&live).unwrap();
        assert_eq!(back, saved);

        let mut bad = saved.clone();
        bad.overlay.blocks.insert(2, vec![0; BLOCK_SIZE]);
        assert!(bad.adopt_image(&live).is_err());
        let mut bad = saved.clone();
        bad.overlay.blocks.insert(1, vec![0; 3]);
        assert!(bad.adopt_image(&live).is_err());
        let other = Disk::new(DiskImage::new(pattern(4096), "u".into()));
        assert!(saved.clone().adopt_image(&other).is_err());
    }

    #[test]
    fn write_back_writes_only_inside_the_file() {
        let dir = std::env::temp_dir().join(format!("rv-disk-wb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let base = pattern(5000);
        std::fs::write(&path, &base).unwrap();
        let image = DiskImage::open(&path).unwrap();
        let mut disk = Disk::new(image);
        assert!(disk.write(4096, &[0xEE; 512]));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        disk.take_overlay().write_back(&file, 5000, &path).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), 5000);
        assert_eq!(&after[..4096], &base[..4096]);
        assert_eq!(&after[4096..4608], &[0xEE; 512][..]);
        assert_eq!(&after[4608..], &base[4608..]);

        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            DiskImage::open(&path),
            Err(DiskError::TooSmall { size: 0, .. })
        ));
        assert!(matches!(
            DiskImage::open(&dir.join("missing")),
            Err(DiskError::Read { .. })
        ));
        assert!(matches!(
            DiskImage::open(&dir),
            Err(DiskError::NotAFile {
                what: "a directory",
                ..
            })
        ));
        // Neither blocks: a FIFO without a writer, a device that never ends.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            DiskImage::open(&fifo),
            Err(DiskError::NotAFile { what: "a FIFO", .. })
        ));
        assert!(matches!(
            DiskImage::open(Path::new("/dev/zero")),
            Err(DiskError::NotAFile {
                what: "a device",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
