//! The copies of the guest's disk images (`disks/N.img.zst`) and initial ramdisk (`initrd.zst`) that a
//! trace holds.
//!
//! A virtio disk is a deterministic function of its image and of what the guest does, so replay
//! needs exactly the bytes the recording started from, and nothing else: no DMA is logged. The same
//! holds for the initrd, which the loader copies into guest RAM at boot. The recorder stores each
//! file zstd-compressed at the start of the recording; `header.json` lists its size and SHA-256, and
//! the reader checks both, so the user's files may change or vanish after recording. zstd keeps runs
//! of zeros (sparse or unused parts of an image) nearly free.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use crate::files::host_memory;
use crate::format::{
    disk_file_name, sha256_hex, DiskInfo, DISKS_DIR, HEADER_FILE, INITRD_FILE, MAX_ZSTD_WINDOW_LOG,
};
use crate::reader::{open_file, ReadError, TraceReader};
use crate::writer::{TraceWriter, WriteError};

/// zstd level of disk copies: fast, with a window well under the reader's cap.
const DISK_ZSTD_LEVEL: i32 = 3;

impl TraceWriter {
    /// Stores the copy of disk `index` (whose size and SHA-256 the header lists): compressed to a
    /// temporary name, fsynced, then renamed into place. Returns its size on disk.
    pub fn write_disk(&mut self, index: usize, image: &[u8]) -> Result<u64, WriteError> {
        let dir = self.dir().join(DISKS_DIR);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(WriteError::Io {
                    action: "create directory",
                    path: dir,
                    source: e,
                })
            }
            _ => {}
        }
        let size = self.write_copy(&dir, &disk_file_name(index), image)?;
        self.add_backing(image);
        Ok(size)
    }

    /// Stores the copy of the initrd (whose size and SHA-256 the header lists), as
    /// [`TraceWriter::write_disk`] stores a disk. Returns its size on disk.
    pub fn write_initrd(&mut self, initrd: &[u8]) -> Result<u64, WriteError> {
        let dir = self.dir().to_owned();
        let size = self.write_copy(&dir, INITRD_FILE, initrd)?;
        self.add_backing(initrd);
        Ok(size)
    }

    /// Writes `image` zstd-compressed to `dir/name` atomically (temporary name, fsync, rename).
    fn write_copy(&mut self, dir: &Path, name: &str, image: &[u8]) -> Result<u64, WriteError> {
        let io_err = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source: io::Error| WriteError::Io {
                action,
                path,
                source,
            }
        };
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let compress = || -> io::Result<File> {
            let mut enc = zstd::stream::write::Encoder::new(BufWriter::new(file), DISK_ZSTD_LEVEL)?;
            enc.include_checksum(true)?;
            enc.set_pledged_src_size(Some(image.len() as u64))?;
            enc.write_all(image)?;
            enc.finish()?
                .into_inner()
                .map_err(io::IntoInnerError::into_error)
        };
        let file = compress().map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        let size = file.metadata().map_err(io_err("inspect", &tmp))?.len();
        fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        for d in [dir, self.dir()] {
            File::open(d)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync directory", d))?;
        }
        Ok(size)
    }
}

impl TraceReader {
    /// Reads the copy of disk `index` and checks it against the header: exactly the recorded size
    /// and SHA-256. Refuses a size this host cannot allocate before reading anything.
    pub fn read_disk(&self, index: usize) -> Result<Vec<u8>, ReadError> {
        let Some(info) = self.header().disks.get(index) else {
            return Err(ReadError::Inconsistent {
                path: self.dir().join(HEADER_FILE),
                reason: format!(
                    "disk {index} asked for, but the header lists {} disks",
                    self.header().disks.len()
                ),
            });
        };
        let path = self.dir().join(DISKS_DIR).join(disk_file_name(index));
        read_copy(&path, info, "disk")
    }

    /// Reads the copy of the initrd, if the recording had one, and checks it against the header as
    /// [`TraceReader::read_disk`] checks a disk.
    pub fn read_initrd(&self) -> Result<Option<Vec<u8>>, ReadError> {
        match &self.header().initrd {
            Some(info) => read_copy(&self.dir().join(INITRD_FILE), info, "initrd").map(Some),
            None => Ok(None),
        }
    }

    /// Total size on disk of the disk copies that are present.
    pub fn disk_copy_bytes(&self) -> u64 {
        (0..self.header().disks.len())
            .filter_map(|i| fs::metadata(self.dir().join(DISKS_DIR).join(disk_file_name(i))).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Reads the zstd copy at `path` of a file the header lists as `info` (`what`: "disk" or "initrd", for
/// messages) and checks it: exactly the recorded size and SHA-256. Refuses a size this host cannot
/// allocate before reading anything.
fn read_copy(path: &Path, info: &DiskInfo, what: &str) -> Result<Vec<u8>, ReadError> {
    let inconsistent = |reason: String| ReadError::Inconsistent {
        path: path.to_owned(),
        reason,
    };
    // A FIFO or device in place of the copy is refused rather than read from.
    let (file, _) = open_file(path)?.ok_or_else(|| ReadError::Missing {
        path: path.to_owned(),
    })?;
    if let Some(host) = host_memory().filter(|&host| info.size > host) {
        return Err(inconsistent(format!(
            "{HEADER_FILE} declares a {}-byte {what}, more than this host's {host} bytes of memory",
            info.size
        )));
    }
    let mut bytes = Vec::new();
    // One byte more than the size, so a copy that is too long is noticed without regrowing.
    usize::try_from(info.size)
        .ok()
        .and_then(|n| n.checked_add(1))
        .and_then(|n| bytes.try_reserve_exact(n).ok())
        .ok_or_else(|| {
            inconsistent(format!(
                "{HEADER_FILE} declares a {}-byte {what}, more than this host can hold in memory",
                info.size
            ))
        })?;
    let decompress = |bytes: &mut Vec<u8>| -> io::Result<()> {
        let mut dec = zstd::stream::read::Decoder::new(file)?;
        dec.window_log_max(MAX_ZSTD_WINDOW_LOG)?;
        dec.take(info.size + 1).read_to_end(bytes)?;
        Ok(())
    };
    decompress(&mut bytes)
        .map_err(|e| inconsistent(format!("the {what} copy does not decompress: {e}")))?;
    if bytes.len() as u64 != info.size {
        return Err(inconsistent(format!(
            "the {what} copy holds {}{} bytes but {HEADER_FILE} records {}",
            if bytes.len() as u64 > info.size {
                "more than "
            } else {
                ""
            },
            bytes.len().min(info.size as usize),
            info.size
        )));
    }
    let found = sha256_hex(&bytes);
    if found != info.sha256 {
        return Err(inconsistent(format!(
            "the {what} copy has sha256 {found} but {HEADER_FILE} records {}",
            info.sha256
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use crate::format::*;
    use crate::{TraceReader, TraceWriter};

    fn header(disks: Vec<DiskInfo>) -> Header {
        Header {
            format_version: FORMAT_VERSION,
            tool_version: "test".into(),
            image_path: "guest.elf".into(),
            image_sha256: sha256_hex(b"guest"),
            image_size: 5,
            machine: MachineConfig {
                ram_bytes: 1 << 20,
                cmdline: String::new(),
                memory_map: Vec::new(),
            },
            clock: "step".into(),
            time_mode: TimeMode::Virtual,
            checkpoint_every: 1000,
            created_unix_secs: 0,
            disks,
            digest: Default::default(),
            host_traps: false,
            page_backing: false,
            cpu_model: "host".into(),
            recorded_on: None,
            cpus: 1,
            cold_checkpoints: false,
            chaos_seed: None,
            branched_from: None,
            vmm_cpuid: false,
            cpuid: Vec::new(),
            initrd: None,
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rv-disks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn disk_copies_round_trip_and_are_verified() {
        let image: Vec<u8> = (0..1 << 20)
            .map(|i: u32| if i < 4096 { i as u8 } else { 0 })
            .collect();
        let info = DiskInfo {
            path: "/somewhere/disk.img".into(),
            size: image.len() as u64,
            sha256: sha256_hex(&image),
        };
        let dir = scratch("roundtrip");
        let mut w = TraceWriter::create(&dir, &header(vec![info.clone()])).unwrap();
        let stored = w.write_disk(0, &image).unwrap();
        assert!(
            stored < 16 << 10,
            "a mostly-zero MiB should compress well: {stored}"
        );
        // A finished recording ends with its stop event, which the summary counts.
        w.push(Event {
            at: 0,
            rip: 0,
            kind: EventKind::Stop {
                reason: StopReason::Halted,
            },
        })
        .unwrap();
        w.finish(&Summary {
            end: 0,
            stop: StopReason::Halted,
            events_by_kind: [("stop".to_string(), 1)].into(),
            checkpoints: 0,
            output_bytes: 0,
            output_sha256: sha256_hex(b""),
            wall_secs: 0.0,
        })
        .unwrap();
        let r = TraceReader::open(&dir).unwrap();
        assert_eq!(r.read_disk(0).unwrap(), image);
        assert_eq!(r.disk_copy_bytes(), stored);
        assert!(r.read_disk(1).is_err());

        // A copy that differs from the header, in content or length, is refused.
        let copy = dir.join(DISKS_DIR).join(disk_file_name(0));
        let mut other = image.clone();
        other[7] ^= 1;
        std::fs::write(&copy, zstd::bulk::compress(&other, 3).unwrap()).unwrap();
        let err = r.read_disk(0).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        std::fs::write(&copy, zstd::bulk::compress(&image[1..], 3).unwrap()).unwrap();
        let err = r.read_disk(0).unwrap_err().to_string();
        assert!(err.contains("bytes but"), "{err}");
        std::fs::write(&copy, b"not zstd").unwrap();
        assert!(r.read_disk(0).is_err());
        std::fs::remove_file(&copy).unwrap();
        assert!(r.read_disk(0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn header_disks_are_validated() {
        let ok = DiskInfo {
            path: "d".into(),
            size: 512,
            sha256: sha256_hex(b"d"),
        };
        assert!(header(vec![ok.clone(); 4]).validate().is_ok());
        assert!(header(vec![ok.clone(); 5]).validate().is_err());
        let zero = DiskInfo {
            size: 0,
            ..ok.clone()
        };
        assert!(header(vec![zero]).validate().is_err());
        let huge = DiskInfo {
            size: MAX_DISK_BYTES + 1,
            ..ok.clone()
        };
        assert!(header(vec![huge]).validate().is_err());
        let bad_hash = DiskInfo {
            sha256: "xyz".into(),
            ..ok
        };
        assert!(header(vec![bad_hash]).validate().is_err());
        // Headers without the field (every trace of a guest without disks) still parse.
        let mut json = serde_json::to_value(header(vec![])).unwrap();
        json.as_object_mut().unwrap().remove("disks");
        let back: Header = serde_json::from_value(json).unwrap();
        assert!(back.disks.is_empty());
    }

    #[test]
    fn a_hostile_disk_size_is_refused_before_reading() {
        let info = DiskInfo {
            path: "d".into(),
            size: MAX_DISK_BYTES,
            sha256: sha256_hex(b"d"),
        };
        let dir = scratch("hostile");
        let mut w = TraceWriter::create(&dir, &header(vec![info])).unwrap();
        w.write_disk(0, &[0; 4096]).unwrap();
        drop(w);
        let r = TraceReader::open(&dir).unwrap();
        // Refused as unallocatable, or (on a host that overcommits that far) as too short.
        let err = r.read_disk(0).unwrap_err().to_string();
        assert!(err.contains("byte"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
