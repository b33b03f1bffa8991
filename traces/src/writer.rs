//! Writing a trace directory while a recording runs.
//!
//! Durability model: every chunk goes to `events.bin` with one `write(2)` of the whole frame, so a
//! recording killed at any moment (even with SIGKILL) leaves a file that is a valid prefix followed
//! by at most one torn frame, which readers drop. Files that are written once (`header.json`,
//! checkpoints, `summary.json`) go to a temporary name, are fsynced and then renamed, so they are
//! either absent or complete. Dropping a [`TraceWriter`] without [`TraceWriter::finish`] behaves
//! like a kill: events pushed since the last flush are lost and the trace reads as cut off.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::codec::{self, PageRef};
use crate::format::{
    checkpoint_file_name, Checkpoint, Event, EventKind, FormatError, Header, Summary,
    CHECKPOINTS_DIR, CHECKPOINT_HEADER_LEN, EVENTS_FILE, HEADER_FILE, MAX_CHECKPOINT_PAYLOAD,
    MAX_EVENTS_PER_CHUNK, PAGE_SIZE, SUMMARY_FILE, UART_RX_FIFO_BYTES,
};
use crate::waypoints::{Waypoint, WaypointWriter};

/// Uncompressed size at which the writer starts a new chunk on its own. Well under the reader's
/// 64 MiB caps, so even incompressible events (whose zstd output is slightly larger) always fit.
const CHUNK_TARGET_BYTES: usize = 16 << 20;
const _: () = assert!(UART_RX_FIFO_BYTES < CHUNK_TARGET_BYTES / 2);

/// Errors from writing a trace.
#[derive(Debug, Error)]
pub enum WriteError {
    /// A file system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "write".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The target directory already holds files; traces are never overwritten.
    #[error("{path} already exists and is not empty; refusing to overwrite it (choose a new name or remove it)")]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The target directory exists, though empty. A trace gets a directory of its own, created by
    /// [`TraceWriter::create`], so a name that is taken (say, by a mistyped `-o`) is never written into.
    #[error("{path} already exists (an empty directory); a trace is written into a new directory of its own (choose a new name or remove it)")]
    Exists {
        /// The directory.
        path: PathBuf,
    },
    /// The target path exists and is not a directory.
    #[error("{path} exists and is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The header given to [`TraceWriter::create`] is invalid.
    #[error("invalid trace header: {source}")]
    InvalidHeader {
        /// What is wrong with it.
        source: FormatError,
    },
    /// The summary given to [`TraceWriter::finish`] is invalid.
    #[error("invalid trace summary: {source}")]
    InvalidSummary {
        /// What is wrong with it.
        source: FormatError,
    },
    /// An event's icount is below the previous event's.
    #[error("event at icount {icount} pushed after an event at icount {previous}; events must come in icount order")]
    EventOutOfOrder {
        /// The event's icount.
        icount: u64,
        /// The previous event's icount.
        previous: u64,
    },
    /// An event's icount is below a point the stream was already declared complete up to.
    #[error("event at icount {icount} pushed after the stream was flushed as complete up to icount {upto}")]
    EventBeforeFlushPoint {
        /// The event's icount.
        icount: u64,
        /// The flush point.
        upto: u64,
    },
    /// A `SerialRx` event carries more bytes than the UART takes at once, which readers refuse.
    #[error("SerialRx event at icount {icount} carries {len} bytes; one event may carry at most {UART_RX_FIFO_BYTES}, what the UART's receive FIFO holds")]
    SerialRxTooLong {
        /// The event's icount.
        icount: u64,
        /// How many bytes it carries.
        len: usize,
    },
    /// An event could not be encoded.
    #[error("cannot encode event at icount {icount}: {source}")]
    Encode {
        /// The event's icount.
        icount: u64,
        /// postcard's complaint.
        source: postcard::Error,
    },
    /// A flush point (or checkpoint, or end) lies before an earlier flush point.
    #[error("cannot mark the stream complete up to icount {upto}: it was already marked complete up to {previous}")]
    FlushBackward {
        /// The requested point.
        upto: u64,
        /// The earlier point.
        previous: u64,
    },
    /// Checkpoints must come in strictly increasing icount order.
    #[error("checkpoint at icount {icount} written after one at icount {previous}; checkpoint icounts must increase")]
    CheckpointOutOfOrder {
        /// The checkpoint's icount.
        icount: u64,
        /// The previous checkpoint's icount.
        previous: u64,
    },
    /// The first checkpoint must be full: incremental ones only make sense on top of one.
    #[error(
        "checkpoint at icount {icount} is incremental but no full checkpoint was written before it"
    )]
    NoFullCheckpoint {
        /// The checkpoint's icount.
        icount: u64,
    },
    /// A checkpoint page is not exactly one page long.
    #[error("checkpoint at icount {icount}: page {pfn:#x} is {len} bytes, expected {PAGE_SIZE}")]
    BadPageSize {
        /// The checkpoint's icount.
        icount: u64,
        /// The page frame number.
        pfn: u64,
        /// Its length.
        len: usize,
    },
    /// A checkpoint page lies outside guest RAM.
    #[error(
        "checkpoint at icount {icount}: page {pfn:#x} is outside guest RAM ({ram_pages:#x} pages)"
    )]
    PageOutsideRam {
        /// The checkpoint's icount.
        icount: u64,
        /// The page frame number.
        pfn: u64,
        /// Pages of guest RAM.
        ram_pages: u64,
    },
    /// A checkpoint lists the same page twice.
    #[error("checkpoint at icount {icount}: page {pfn:#x} appears more than once")]
    DuplicatePage {
        /// The checkpoint's icount.
        icount: u64,
        /// The page frame number.
        pfn: u64,
    },
    /// A checkpoint is larger than the format allows.
    #[error("checkpoint at icount {icount} is {bytes} bytes, more than the {MAX_CHECKPOINT_PAYLOAD}-byte limit")]
    CheckpointTooLarge {
        /// The checkpoint's icount.
        icount: u64,
        /// Its (compressed or uncompressed) size.
        bytes: u64,
    },
    /// The summary disagrees with what was written.
    #[error("summary does not match the recording: {reason}")]
    SummaryMismatch {
        /// What disagrees.
        reason: String,
    },
    /// An earlier write failed, so the writer stopped writing.
    #[error("{path}: an earlier write to the trace failed; nothing more is written so the trace stays a readable prefix")]
    Failed {
        /// The trace directory.
        path: PathBuf,
    },
    /// Writing `waypoints.bin` failed.
    #[error(transparent)]
    Waypoint(Box<crate::waypoints::WaypointError>),
    /// A waypoint names a kick event that was not pushed yet.
    #[error("a waypoint names event {kick}, but only {events} events were pushed")]
    WaypointAhead {
        /// The event index the waypoint names.
        kick: u64,
        /// Events pushed.
        events: u64,
    },
}

impl WriteError {
    /// If the write failed for want of space, why, in a few words: the file system is full
    /// (`ENOSPC`), the disk quota is used up (`EDQUOT`), or a file reached the process's file size
    /// limit (`EFBIG`). A recording has to stop then, and the user has to make room.
    pub fn out_of_space(&self) -> Option<&'static str> {
        let WriteError::Io { source, .. } = self else {
            return None;
        };
        match source.raw_os_error()? {
            libc::ENOSPC => Some("the file system is full"),
            libc::EDQUOT => Some("the disk quota is used up"),
            libc::EFBIG => Some("a file reached this process's file size limit"),
            _ => None,
        }
    }
}

/// Writes one trace directory: see the module docs for what survives a crash.
#[derive(Debug)]
pub struct TraceWriter {
    dir: PathBuf,
    events_path: PathBuf,
    events_file: File,
    ram_pages: u64,
    /// postcard encodings of the events buffered since the last chunk, back to back.
    pending: Vec<u8>,
    pending_count: u32,
    /// icount of the last event pushed.
    last_icount: u64,
    /// upto_icount of the last chunk written.
    complete_upto: u64,
    /// Chunks written.
    chunks: u64,
    /// icount of the last checkpoint written.
    last_checkpoint: Option<u64>,
    /// Content hashes of the pages stored since the last full checkpoint: a page with one of these
    /// contents is stored as a reference instead of again.
    stored_pages: std::collections::HashSet<u128>,
    /// Content hashes of the 4 KiB blocks of the initrd and disk copies this trace holds: with
    /// `page_backing` in the header, a checkpoint page with one of these contents is stored as a
    /// reference to that block (FORMAT.md, "Checkpoints").
    backing_pages: std::collections::HashSet<u128>,
    /// Whether the header allows references to `backing_pages`.
    page_backing: bool,
    checkpoints: u64,
    event_bytes: u64,
    checkpoint_bytes: u64,
    /// Events pushed so far: the index the next one gets in the stream.
    events: u64,
    /// `waypoints.bin`, once the first waypoint is written.
    waypoints: Option<WaypointWriter>,
    /// Set when a write failed. Appending after a partial frame would turn a torn tail (which
    /// readers drop) into corruption in the middle of `events.bin`; and once a checkpoint is
    /// missing, an incremental one written after it would leave out the pages it held.
    failed: bool,
}

impl TraceWriter {
    /// Creates the trace directory `dir` (which must not exist: an existing trace is never
    /// overwritten, and no other directory is written into), its parents if needed, `events.bin`
    /// with its file header, the checkpoints directory, and `header.json` (atomically).
    pub fn create(dir: &Path, header: &Header) -> Result<TraceWriter, WriteError> {
        header
            .validate()
            .map_err(|source| WriteError::InvalidHeader { source })?;
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(WriteError::NotADirectory {
                    path: dir.to_owned(),
                })
            }
            Ok(_) => {
                let mut entries = fs::read_dir(dir).map_err(io_err("list", dir))?;
                let path = dir.to_owned();
                return Err(match entries.next() {
                    Some(_) => WriteError::NotEmpty { path },
                    None => WriteError::Exists { path },
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
                }
                // create_dir, not create_dir_all: it fails if another process made `dir` meanwhile.
                fs::create_dir(dir).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => WriteError::Exists {
                        path: dir.to_owned(),
                    },
                    _ => io_err("create directory", dir)(e),
                })?;
            }
            Err(e) => {
                return Err(WriteError::Io {
                    action: "inspect",
                    path: dir.to_owned(),
                    source: e,
                })
            }
        }

        let checkpoints = dir.join(CHECKPOINTS_DIR);
        fs::create_dir(&checkpoints).map_err(io_err("create directory", &checkpoints))?;
        let events_path = dir.join(EVENTS_FILE);
        // create_new: if another process raced us into the directory, fail rather than clobber.
        let mut events_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&events_path)
            .map_err(io_err("create", &events_path))?;
        let file_header = codec::events_file_header(crate::format::FORMAT_VERSION);
        events_file
            .write_all(&file_header)
            .map_err(io_err("write", &events_path))?;

        // Compact: the CPUID table alone would take hundreds of lines pretty-printed, and a recording
        // must start on a nearly full disk (`retrovisor info` shows the header readably).
        let mut json = serde_json::to_vec(header).map_err(|e| WriteError::Io {
            action: "serialize",
            path: dir.join(HEADER_FILE),
            source: e.into(),
        })?;
        json.push(b'\n');
        write_atomic(&dir.join(HEADER_FILE), &json)?;
        sync_dir(dir)?;

        Ok(TraceWriter {
            dir: dir.to_owned(),
            events_path,
            events_file,
            ram_pages: header.ram_pages(),
            pending: Vec::new(),
            pending_count: 0,
            last_icount: 0,
            complete_upto: 0,
            chunks: 0,
            last_checkpoint: None,
            stored_pages: std::collections::HashSet::new(),
            backing_pages: std::collections::HashSet::new(),
            page_backing: header.page_backing,
            checkpoints: 0,
            event_bytes: file_header.len() as u64,
            checkpoint_bytes: 0,
            events: 0,
            waypoints: None,
            failed: false,
        })
    }

    /// Buffers an event. Events must come in non-decreasing icount order and not before the last
    /// flush point. A chunk is written on its own when the buffer gets large.
    pub fn push(&mut self, event: Event) -> Result<(), WriteError> {
        self.check_usable()?;
        let icount = event.at;
        if let EventKind::SerialRx { bytes } = &event.kind {
            if bytes.len() > UART_RX_FIFO_BYTES {
                return Err(WriteError::SerialRxTooLong {
                    icount,
                    len: bytes.len(),
                });
            }
        }
        if icount < self.last_icount {
            return Err(WriteError::EventOutOfOrder {
                icount,
                previous: self.last_icount,
            });
        }
        if icount < self.complete_upto {
            return Err(WriteError::EventBeforeFlushPoint {
                icount,
                upto: self.complete_upto,
            });
        }
        // Every event fits in a chunk: the longest, a SerialRx, encodes to a few hundred bytes.
        let encoded =
            postcard::to_stdvec(&event).map_err(|source| WriteError::Encode { icount, source })?;
        if self.pending.len() + encoded.len() > CHUNK_TARGET_BYTES
            || self.pending_count == MAX_EVENTS_PER_CHUNK
        {
            // Every later event has icount >= this one, so the stream is complete up to it.
            self.write_chunk(icount)?;
        }
        self.pending.extend_from_slice(&encoded);
        self.pending_count += 1;
        self.events += 1;
        self.last_icount = icount;
        Ok(())
    }

    /// Writes the buffered events as one chunk that marks the stream complete up to
    /// `upto_icount` (no event with a smaller icount will follow). A chunk is written even with no
    /// events, to record progress. One `write(2)`, no fsync.
    pub fn flush(&mut self, upto_icount: u64) -> Result<(), WriteError> {
        self.check_usable()?;
        if upto_icount < self.complete_upto {
            return Err(WriteError::FlushBackward {
                upto: upto_icount,
                previous: self.complete_upto,
            });
        }
        self.write_chunk(upto_icount)
    }

    /// Flushes events up to the checkpoint's icount, then writes the checkpoint file atomically.
    /// Pages of a full checkpoint that are all zero are dropped (they are implied); in an
    /// incremental one they are kept as zero-page markers so restoring clears them. Returns the
    /// file's size on disk.
    pub fn write_checkpoint(&mut self, cp: &Checkpoint) -> Result<u64, WriteError> {
        self.check_usable()?;
        let icount = cp.at;
        match self.last_checkpoint {
            Some(previous) if icount <= previous => {
                return Err(WriteError::CheckpointOutOfOrder { icount, previous });
            }
            None if !cp.full => return Err(WriteError::NoFullCheckpoint { icount }),
            _ => {}
        }
        let pages = self.checkpoint_pages(cp)?;
        // Identical pages are stored once: later copies (in this checkpoint or any since the last full
        // one, which is where readers start merging) become references to the content hash.
        let mut known = if cp.full {
            // Pages equal to a block of the initrd or a disk are stored as references to it.
            self.backing_pages.clone()
        } else {
            self.stored_pages.clone()
        };
        let hashes: Vec<Option<[u8; codec::PAGE_REF_LEN]>> = pages
            .iter()
            .map(|&(_, bytes)| {
                let bytes = bytes?;
                let h = crate::format::page_hash(bytes);
                (!known.insert(h)).then(|| h.to_le_bytes())
            })
            .collect();
        let pages: Vec<PageRef<'_>> = pages
            .iter()
            .zip(&hashes)
            .map(|(&(pfn, bytes), h)| (pfn, h.as_ref().map(|h| &h[..]).or(bytes)))
            .collect();
        let payload_len = codec::checkpoint_payload_len(cp.state.len(), &pages);
        if payload_len > MAX_CHECKPOINT_PAYLOAD {
            return Err(WriteError::CheckpointTooLarge {
                icount,
                bytes: payload_len,
            });
        }

        self.flush(icount)?;

        let path = self
            .dir
            .join(CHECKPOINTS_DIR)
            .join(checkpoint_file_name(icount));
        let bytes =
            codec::encode_checkpoint(cp, &pages, payload_len).map_err(io_err("compress", &path))?;
        let compressed = (bytes.len() - CHECKPOINT_HEADER_LEN) as u64;
        if compressed > MAX_CHECKPOINT_PAYLOAD {
            return Err(WriteError::CheckpointTooLarge {
                icount,
                bytes: compressed,
            });
        }
        if let Err(e) = write_atomic(&path, &bytes) {
            self.failed = true;
            return Err(e);
        }
        self.stored_pages = known;
        self.last_checkpoint = Some(icount);
        self.checkpoints += 1;
        self.checkpoint_bytes += bytes.len() as u64;
        Ok(bytes.len() as u64)
    }

    /// Events pushed so far, which is the index in the stream the next one gets.
    pub fn events_pushed(&self) -> u64 {
        self.events
    }

    /// Appends a waypoint to `waypoints.bin` (created at the first). Its `kick` is the index of a `Kick`
    /// event already pushed; the record may reach the disk before that event does (a reader ignores
    /// waypoints past the events it has).
    pub fn write_waypoint(&mut self, waypoint: &Waypoint) -> Result<(), WriteError> {
        self.check_usable()?;
        if waypoint.kick >= self.events {
            return Err(WriteError::WaypointAhead {
                kick: waypoint.kick,
                events: self.events,
            });
        }
        if self.waypoints.is_none() {
            let created = WaypointWriter::create(&self.dir);
            self.failed = created.is_err();
            self.waypoints = Some(created.map_err(|e| WriteError::Waypoint(Box::new(e)))?);
        }
        let file = self.waypoints.as_mut().expect("created above");
        let before = file.bytes;
        if let Err(e) = file.append(waypoint) {
            self.failed = true;
            return Err(WriteError::Waypoint(Box::new(e)));
        }
        self.checkpoint_bytes += file.bytes - before;
        Ok(())
    }

    /// For the full checkpoint just written at `icount`: the page frames the guest (or a device's DMA)
    /// wrote since the checkpoint before it, in a file beside it. A full checkpoint stores every page, so
    /// its own page list cannot tell a search which pages an interval left alone; without this file (an
    /// older trace, or a recording cut off between the two writes) searches take every page as written.
    pub fn write_pages_written(&mut self, icount: u64, pfns: &[u64]) -> Result<(), WriteError> {
        self.check_usable()?;
        let path = self
            .dir
            .join(CHECKPOINTS_DIR)
            .join(crate::format::written_file_name(icount));
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        if let Err(e) = write_atomic(&path, &bytes) {
            self.failed = true;
            return Err(e);
        }
        Ok(())
    }

    /// Notes the 4 KiB blocks of `image` (an initrd or disk copy just written into the trace, or the guest
    /// image, which replay has and checks) as content later checkpoint pages may refer to, if the header
    /// allows it. All-zero blocks are left out: zero pages have their own marker.
    pub fn add_backing(&mut self, image: &[u8]) {
        if !self.page_backing {
            return;
        }
        for block in image.chunks_exact(PAGE_SIZE) {
            if block.iter().any(|&b| b != 0) {
                self.backing_pages.insert(crate::format::page_hash(block));
            }
        }
    }

    /// Ends the recording: flushes up to `summary.end_icount` (unless the stream was just flushed
    /// there), fsyncs `events.bin`, writes `summary.json` atomically and fsyncs the directories.
    /// Only a trace that went through here reads as complete.
    pub fn finish(mut self, summary: &Summary) -> Result<(), WriteError> {
        self.check_usable()?;
        summary
            .validate()
            .map_err(|source| WriteError::InvalidSummary { source })?;
        if self.last_icount > summary.end {
            return Err(WriteError::SummaryMismatch {
                reason: format!(
                    "end_icount {} is before the last event (icount {})",
                    summary.end, self.last_icount
                ),
            });
        }
        if summary.checkpoints != self.checkpoints {
            return Err(WriteError::SummaryMismatch {
                reason: format!(
                    "it counts {} checkpoints, {} were written",
                    summary.checkpoints, self.checkpoints
                ),
            });
        }
        // Unless the caller just flushed up to the end, the last events still have to go out.
        if self.pending_count > 0 || self.chunks == 0 || self.complete_upto != summary.end {
            self.flush(summary.end)?;
        }
        self.events_file
            .sync_all()
            .map_err(io_err("fsync", &self.events_path))?;
        if let Some(waypoints) = &self.waypoints {
            waypoints
                .sync()
                .map_err(|e| WriteError::Waypoint(Box::new(e)))?;
        }
        let path = self.dir.join(SUMMARY_FILE);
        let json = serde_json::to_vec_pretty(summary).map_err(|e| WriteError::Io {
            action: "serialize",
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomic(&path, &json)?;
        // The checkpoint renames and the summary's are only durable once their directories are.
        sync_dir(&self.dir.join(CHECKPOINTS_DIR))?;
        sync_dir(&self.dir)
    }

    /// The trace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes written so far to `events.bin` and to checkpoint files.
    pub fn bytes_written(&self) -> (u64, u64) {
        (self.event_bytes, self.checkpoint_bytes)
    }

    /// What a reader could replay of the trace as written so far, were the recording cut off
    /// now: up to the flush point of the last chunk written in full, or `None` if no checkpoint
    /// was written (there is nowhere to start).
    pub fn replayable_upto(&self) -> Option<u64> {
        (self.checkpoints > 0).then_some(self.complete_upto)
    }

    fn check_usable(&self) -> Result<(), WriteError> {
        if self.failed {
            return Err(WriteError::Failed {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Appends the pending events as one frame with the given flush point.
    fn write_chunk(&mut self, upto_icount: u64) -> Result<(), WriteError> {
        let frame = codec::encode_chunk(upto_icount, self.pending_count, &self.pending)
            .map_err(io_err("compress events for", &self.events_path))?;
        // One write call per frame: a kill leaves either the whole frame or a torn tail.
        if let Err(source) = self.events_file.write_all(&frame) {
            self.failed = true;
            return Err(WriteError::Io {
                action: "append to",
                path: self.events_path.clone(),
                source,
            });
        }
        self.event_bytes += frame.len() as u64;
        self.pending.clear();
        self.pending_count = 0;
        self.complete_upto = upto_icount;
        self.chunks += 1;
        Ok(())
    }

    /// Validates a checkpoint's pages and returns them sorted by pfn, with all-zero pages dropped
    /// (full checkpoint) or turned into zero-page markers (incremental).
    fn checkpoint_pages<'a>(&self, cp: &'a Checkpoint) -> Result<Vec<PageRef<'a>>, WriteError> {
        let icount = cp.at;
        let mut pages = Vec::with_capacity(cp.pages.len());
        for (pfn, bytes) in &cp.pages {
            let pfn = *pfn;
            if bytes.len() != PAGE_SIZE {
                return Err(WriteError::BadPageSize {
                    icount,
                    pfn,
                    len: bytes.len(),
                });
            }
            if pfn >= self.ram_pages {
                return Err(WriteError::PageOutsideRam {
                    icount,
                    pfn,
                    ram_pages: self.ram_pages,
                });
            }
            let zero = bytes.iter().all(|&b| b == 0);
            match (zero, cp.full) {
                (true, true) => {}
                (true, false) => pages.push((pfn, None)),
                (false, _) => pages.push((pfn, Some(bytes.as_slice()))),
            }
        }
        pages.sort_unstable_by_key(|&(pfn, _)| pfn);
        if let Some(w) = pages.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(WriteError::DuplicatePage {
                icount,
                pfn: w[0].0,
            });
        }
        Ok(pages)
    }
}

/// Writes `bytes` to `path` so that `path` is either absent or complete: temporary file in the
/// same directory, fsync, rename. On failure the temporary file is removed, so a full disk gets
/// back the space it took.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    // The leading dot and .tmp suffix keep readers from mistaking it for a real file.
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let written = file
        .write_all(bytes)
        .map_err(io_err("write", &tmp))
        .and_then(|()| file.sync_all().map_err(io_err("fsync", &tmp)))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("rename into place", path)));
    if written.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// fsyncs a directory so renames and creations in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    let path = path.to_owned();
    move |source| WriteError::Io {
        action,
        path,
        source,
    }
}
