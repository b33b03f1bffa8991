//! `waypoints.bin`: the machine at kick points, keyed by the kick's event, so that a replay can jump to
//! a kick point instead of searching for it (FORMAT.md, "Waypoints").
//!
//! Waypoints only save time: a replay without them (an older trace, a cut-off or damaged file) finds
//! every kick point by its fingerprint, as before. So the reader never refuses a trace for this file: it
//! indexes the records it can, and a record that does not verify when it is read is reported and passed
//! over. Each record is a checkpoint file's encoding (its CRC covers everything after its first 12
//! bytes), checked when the file is indexed: a damaged record is left out and said, and the records
//! after it are found again by their magic.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::codec::{self, CheckpointHeader, CheckpointLimits, PageRef, PAGE_REF_LEN};
use crate::format::{
    Checkpoint, CHECKPOINT_HEADER_LEN, WAYPOINTS_FILE_HEADER_LEN, WAYPOINTS_MAGIC,
};

/// What went wrong with `waypoints.bin`.
#[derive(Debug, Error)]
pub enum WaypointError {
    /// Writing the file failed.
    #[error("cannot {action} {path}: {source}")]
    Write {
        /// What was being done, e.g. "append to".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A waypoint cannot be used (a replay then finds its kick point by searching).
    #[error("{path}: the waypoint at byte {offset} cannot be used: {reason}")]
    Unusable {
        /// `waypoints.bin`.
        path: PathBuf,
        /// Where its record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// A [`WaypointError::Write`] for `action` on `path`.
fn write_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WaypointError {
    let path = path.to_owned();
    move |source| WaypointError::Write {
        action,
        path,
        source,
    }
}

/// Checks the record at `offset` of a file of `size` bytes, whose last indexed record names event
/// `last`: its kick event index and length, `None` where the index ends without damage (a torn last
/// record, or records written ahead of a cut-off event stream), or why it is damaged.
///
/// Every record's CRC is checked here, not only when it is read: a damaged index or length would
/// otherwise key a good record to the wrong kick or pass for a torn tail, and lose it unsaid.
fn check_record(
    file: &File,
    offset: u64,
    size: u64,
    limits: &CheckpointLimits,
    events: u64,
    last: Option<u64>,
    magic: [u8; 8],
) -> Result<Option<(u64, u64)>, String> {
    let mut fixed = [0u8; CHECKPOINT_HEADER_LEN];
    file.read_exact_at(&mut fixed, offset)
        .map_err(|e| e.to_string())?;
    let record = CheckpointHeader::decode(&fixed, limits).map_err(|e| e.to_string())?;
    let len = CHECKPOINT_HEADER_LEN as u64 + record.compressed_len;
    if offset + len > size {
        // A record cut short by a killed recording is the file's last; a length damaged on disk
        // usually leaves records after it.
        return match next_magic(file, offset + magic.len() as u64, size, &magic) {
            Some(_) => Err(format!(
                "its length ({len} bytes) runs past the end of the file, yet records follow it"
            )),
            None => Ok(None),
        };
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, offset)
        .map_err(|e| e.to_string())?;
    record.check_crc(&bytes).map_err(|e| e.to_string())?;
    if record.icount >= events {
        // Written before the events of a cut-off recording reached the disk.
        return Ok(None);
    }
    if last.is_some_and(|k| record.icount <= k) {
        return Err(format!(
            "it names event {}, which is not after the one before it",
            record.icount
        ));
    }
    Ok(Some((record.icount, len)))
}

/// Where the next record's magic starts at or after `from`, if anywhere before `size`. Read only
/// when a file is damaged, so it reads the rest of the file at once.
fn next_magic(file: &File, from: u64, size: u64, magic: &[u8; 8]) -> Option<u64> {
    let mut rest = vec![0u8; size.checked_sub(from)? as usize];
    file.read_exact_at(&mut rest, from).ok()?;
    rest.windows(magic.len())
        .position(|w| w == magic)
        .map(|at| from + at as u64)
}

/// A waypoint as the trace holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    /// The index, in the event stream, of the `Kick` event whose point this is.
    pub kick: u64,
    /// Guest rip at the point.
    pub rip: u64,
    /// The running vCPU's state, opaque to the trace.
    pub state: Vec<u8>,
    /// (page frame, contents) of the pages written since the previous waypoint or checkpoint.
    pub pages: Vec<(u64, Vec<u8>)>,
}

/// The 16-byte file header: magic, version 1, reserved.
fn file_header() -> [u8; WAYPOINTS_FILE_HEADER_LEN] {
    let mut h = [0u8; WAYPOINTS_FILE_HEADER_LEN];
    h[..8].copy_from_slice(&WAYPOINTS_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// The writer's side: `waypoints.bin`, created at the first waypoint and appended to with one `write(2)`
/// per record, like `events.bin` (a kill leaves at most a torn last record, which readers drop).
#[derive(Debug)]
pub(crate) struct WaypointWriter {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    pub(crate) bytes: u64,
}

impl WaypointWriter {
    /// Creates `waypoints.bin` in `dir`, with its header.
    pub(crate) fn create(dir: &Path) -> Result<WaypointWriter, WaypointError> {
        let path = dir.join(crate::format::WAYPOINTS_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_err("create", &path))?;
        let header = file_header();
        file.write_all(&header).map_err(write_err("write", &path))?;
        Ok(WaypointWriter {
            path,
            file,
            bytes: header.len() as u64,
        })
    }

    /// Appends one waypoint.
    pub(crate) fn append(&mut self, waypoint: &Waypoint) -> Result<(), WaypointError> {
        let pages: Vec<PageRef<'_>> = waypoint
            .pages
            .iter()
            .map(|(pfn, data)| (*pfn, Some(data.as_slice())))
            .collect();
        let len = codec::checkpoint_payload_len(waypoint.state.len(), &pages);
        let record = Checkpoint {
            at: waypoint.kick,
            rip: waypoint.rip,
            full: false,
            digest: [0; 32],
            state: waypoint.state.clone(),
            pages: Vec::new(),
        };
        let bytes = codec::encode_checkpoint(&record, &pages, len)
            .map_err(write_err("compress a waypoint for", &self.path))?;
        self.file
            .write_all(&bytes)
            .map_err(write_err("append to", &self.path))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Makes the file durable (at the end of a recording).
    pub(crate) fn sync(&self) -> Result<(), WaypointError> {
        self.file.sync_all().map_err(write_err("fsync", &self.path))
    }
}

/// The reader's side: where each waypoint's record lies.
#[derive(Debug, Default)]
pub(crate) struct WaypointIndex {
    path: PathBuf,
    /// Kick event index → (offset, length) of its record.
    records: BTreeMap<u64, (u64, u64)>,
    /// The file, kept open for the records' reads once it has some.
    file: Option<File>,
    /// Bytes of the file.
    pub(crate) bytes: u64,
    /// Why indexing stopped before the end of the file (where, and why), if it did for another reason
    /// than a torn tail.
    pub(crate) problem: Option<(u64, String)>,
}

impl WaypointIndex {
    /// Indexes `waypoints.bin` in `dir` (none if it is absent) by reading each record's fixed header.
    /// Events past `events` (a stream cut off before them) have no waypoint.
    pub(crate) fn scan(dir: &Path, limits: &CheckpointLimits, events: u64) -> WaypointIndex {
        let path = dir.join(crate::format::WAYPOINTS_FILE);
        let mut index = WaypointIndex {
            path: path.clone(),
            ..WaypointIndex::default()
        };
        let (file, size) = match crate::files::open_regular(&path) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return index,
            Err(e) => {
                index.problem = Some((0, e.to_string()));
                return index;
            }
        };
        index.bytes = size;
        let mut header = [0u8; WAYPOINTS_FILE_HEADER_LEN];
        if size < header.len() as u64 {
            return index;
        }
        if file.read_exact_at(&mut header, 0).is_err() || header != file_header() {
            index.problem = Some((0, "the file header is not a waypoint file's".into()));
            return index;
        }
        let magic = crate::format::checkpoint_magic(limits.version);
        let mut offset = header.len() as u64;
        let mut last = None;
        while offset + CHECKPOINT_HEADER_LEN as u64 <= size {
            match check_record(&file, offset, size, limits, events, last, magic) {
                Ok(Some((kick, len))) => {
                    last = Some(kick);
                    index.records.insert(kick, (offset, len));
                    offset += len;
                }
                Ok(None) => break,
                Err(reason) => {
                    // The first damage is the one said; the records after it are still used, found
                    // again by their magic, since each is checked on its own.
                    index.problem.get_or_insert((offset, reason));
                    match next_magic(&file, offset + 1, size, &magic) {
                        Some(next) => offset = next,
                        None => break,
                    }
                }
            }
        }
        index.file = Some(file);
        index
    }

    /// How many waypoints there are.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// The kick event indexes that have a waypoint, in order.
    pub(crate) fn kicks(&self) -> impl Iterator<Item = u64> + '_ {
        self.records.keys().copied()
    }

    /// The problem that stopped indexing, as an error.
    pub(crate) fn problem(&self) -> Option<WaypointError> {
        self.problem
            .as_ref()
            .map(|(offset, reason)| WaypointError::Unusable {
                path: self.path.clone(),
                offset: *offset,
                reason: reason.clone(),
            })
    }

    /// Whether the kick at event index `kick` has a waypoint.
    pub(crate) fn has(&self, kick: u64) -> bool {
        self.records.contains_key(&kick)
    }

    /// Reads and checks the waypoint of the kick at event index `kick`, if it has one.
    pub(crate) fn read(
        &self,
        kick: u64,
        limits: &CheckpointLimits,
    ) -> Option<Result<Waypoint, WaypointError>> {
        let &(offset, len) = self.records.get(&kick)?;
        let file = self.file.as_ref()?;
        let unusable = |reason: String| WaypointError::Unusable {
            path: self.path.clone(),
            offset,
            reason,
        };
        let read = || -> Result<Waypoint, WaypointError> {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|e| unusable(e.to_string()))?;
            let record =
                codec::decode_checkpoint(&bytes, limits).map_err(|e| unusable(e.to_string()))?;
            if let Some((pfn, _)) = record.pages.iter().find(|(_, p)| p.len() == PAGE_REF_LEN) {
                return Err(unusable(format!(
                    "page {pfn:#x} is a reference, which waypoints do not use"
                )));
            }
            Ok(Waypoint {
                kick: record.at,
                rip: record.rip,
                state: record.state,
                pages: record.pages,
            })
        };
        Some(read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM_PAGES: u64 = 16;

    fn limits() -> CheckpointLimits {
        CheckpointLimits {
            ram_pages: RAM_PAGES,
            max_payload: 1 << 20,
            max_state: 1 << 12,
            version: crate::format::FORMAT_VERSION,
        }
    }

    fn waypoint(kick: u64) -> Waypoint {
        let page = |pfn: u64| (pfn, vec![kick as u8 ^ pfn as u8; crate::format::PAGE_SIZE]);
        Waypoint {
            kick,
            rip: 0x1000 + kick,
            state: vec![kick as u8; 40],
            pages: vec![page(kick % RAM_PAGES), page((kick + 3) % RAM_PAGES)],
        }
    }

    /// The records of a file, each (start, end), as written.
    fn write_three(dir: &Path) -> Vec<(u64, u64)> {
        let mut writer = WaypointWriter::create(dir).unwrap();
        let mut spans = Vec::new();
        for kick in [2, 5, 9] {
            let start = writer.bytes;
            writer.append(&waypoint(kick)).unwrap();
            spans.push((start, writer.bytes));
        }
        spans
    }

    #[test]
    fn every_damaged_byte_is_reported_and_the_other_records_stay_usable() {
        let dir = std::env::temp_dir().join(format!("rv-waypoints-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spans = write_three(&dir);
        let path = dir.join(crate::format::WAYPOINTS_FILE);
        let good = std::fs::read(&path).unwrap();
        let index = WaypointIndex::scan(&dir, &limits(), 100);
        assert_eq!(index.kicks().collect::<Vec<_>>(), [2, 5, 9]);
        assert!(index.problem.is_none());
        for kick in [2, 5, 9] {
            assert_eq!(
                index.read(kick, &limits()).unwrap().unwrap(),
                waypoint(kick)
            );
        }

        for at in 0..good.len() {
            let mut bytes = good.clone();
            bytes[at] ^= 0x5a;
            std::fs::write(&path, &bytes).unwrap();
            let index = WaypointIndex::scan(&dir, &limits(), 100);
            let damaged = spans
                .iter()
                .position(|&(s, e)| (s..e).contains(&(at as u64)));
            // A length grown in the last record's header reads as that record torn off by a kill:
            // the one damage no check can tell from a crash.
            let last_length = damaged == Some(2) && (61..69).contains(&(at as u64 - spans[2].0));
            if last_length && index.problem.is_none() {
                assert_eq!(index.kicks().collect::<Vec<_>>(), [2, 5], "byte {at}");
                continue;
            }
            assert!(index.problem.is_some(), "byte {at}: damage not reported");
            let Some(damaged) = damaged else {
                // The file header: nothing in the file is trusted.
                assert_eq!(index.len(), 0, "byte {at}");
                continue;
            };
            for (i, kick) in [2, 5, 9].into_iter().enumerate() {
                if i != damaged {
                    let read = index.read(kick, &limits());
                    assert_eq!(read.unwrap().unwrap(), waypoint(kick), "byte {at}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
