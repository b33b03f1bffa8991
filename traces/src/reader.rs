//! Opening and validating a trace directory.
//!
//! [`TraceReader::open`] reads everything but checkpoint payloads up front and checks it, so a
//! trace that opens is internally consistent. The distinction that matters for recordings cut off
//! by a crash: a frame that ends past the end of `events.bin` is a torn tail (the last write was
//! interrupted) and is dropped; anything wrong inside a complete frame is corruption and an error.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::codec::{self, CheckpointHeader, CheckpointLimits, ChunkHeader, CodecError};
use crate::files;
use crate::format::{
    parse_checkpoint_file_name, written_file_name, Checkpoint, Event, EventKind, FormatError,
    Header, Summary, CHECKPOINTS_DIR, CHECKPOINT_HEADER_LEN, CHUNK_HEADER_LEN, CHUNK_MAGIC,
    EVENTS_FILE, EVENTS_FILE_HEADER_LEN, EVENT_KINDS, EVENT_MEMORY_COST, FORMAT_VERSION,
    HEADER_FILE, MAX_EVENT_MEMORY, MAX_JSON_FILE, PAGE_SIZE, SERIAL_RX_MEMORY_COST, SUMMARY_FILE,
};
use crate::rules::{EventError, EventRules};
use crate::waypoints::{Waypoint, WaypointError, WaypointIndex};

/// Errors from reading a trace.
#[derive(Debug, Error)]
pub enum ReadError {
    /// A file the trace needs is not there.
    #[error("{path} is missing; is this a retrovisor trace directory?")]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// The directory holds the start of a recording that was cut off before it wrote its
    /// header: nothing was recorded.
    #[error("{path} is missing: the recording was cut off before it wrote its header, so nothing was recorded")]
    NothingRecorded {
        /// The missing header file.
        path: PathBuf,
    },
    /// The trace holds no checkpoint, so replay has nowhere to start.
    #[error("{dir} holds nothing replayable: it has no checkpoint (the recording was cut off before its first checkpoint was written)")]
    NoCheckpoints {
        /// The trace directory.
        dir: PathBuf,
    },
    /// A file system operation failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A JSON file is larger than any real one could be.
    #[error("{path} is {size} bytes, larger than the {MAX_JSON_FILE}-byte limit; it is not a trace file")]
    JsonTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A JSON file does not parse.
    #[error("{path} is not valid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// The trace was written by a newer retrovisor.
    #[error("{path}: trace format version {version} is newer than this retrovisor supports ({FORMAT_VERSION}); upgrade retrovisor")]
    NewerVersion {
        /// The header file.
        path: PathBuf,
        /// The trace's format version.
        version: u32,
    },
    /// The trace declares a format version that never existed or is no longer read.
    #[error("{path}: trace format version {version} is not supported (this retrovisor reads versions {} to {FORMAT_VERSION})", crate::format::OLDEST_FORMAT_VERSION)]
    UnsupportedVersion {
        /// The header file.
        path: PathBuf,
        /// The trace's format version.
        version: u32,
    },
    /// A JSON file parses but holds impossible values.
    #[error("{path}: {source}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// The 16-byte header of `events.bin` is wrong.
    #[error("{path}: bad file header: {source}")]
    EventsFileHeader {
        /// The events file.
        path: PathBuf,
        /// What is wrong.
        source: CodecError,
    },
    /// A complete event chunk is corrupt.
    #[error("{path}: event chunk {index} at byte offset {offset} is corrupt: {source}")]
    Chunk {
        /// The events file.
        path: PathBuf,
        /// Index of the chunk (0 = first frame after the file header).
        index: u64,
        /// Byte offset of the frame in the file.
        offset: u64,
        /// What is wrong.
        source: CodecError,
    },
    /// A chunk's events or flush point are out of order with what came before.
    #[error("{path}: event chunk {index} at byte offset {offset} is corrupt: {reason}")]
    ChunkOrder {
        /// The events file.
        path: PathBuf,
        /// Index of the chunk.
        index: u64,
        /// Byte offset of the frame in the file.
        offset: u64,
        /// What is out of order.
        reason: String,
    },
    /// A complete event chunk holds an event the recorded machine could not have produced.
    #[error("{path}: event {index} ({kind} at {unit} {position}, in chunk {chunk} at byte offset {offset}) cannot have been recorded: {source}")]
    ImpossibleEvent {
        /// The events file.
        path: PathBuf,
        /// Index of the event in the whole stream (0 = the first).
        index: u64,
        /// Its kind ([`EventKind::name`]).
        kind: &'static str,
        /// What positions count in this trace: "icount" or "landmark".
        unit: &'static str,
        /// Its position.
        position: u64,
        /// Index of the chunk holding it.
        chunk: u64,
        /// Byte offset of that chunk in the file.
        offset: u64,
        /// What is impossible about it (boxed: it would make every `ReadError` larger).
        source: Box<EventError>,
    },
    /// The trace's events would take more memory than a reader spends on them.
    #[error("{path}: event chunk {index} at byte offset {offset} takes the trace's decoded events past {limit} bytes of memory, more than this reader accepts")]
    TooManyEvents {
        /// The limit ([`MAX_EVENT_MEMORY`]).
        limit: u64,
        /// The events file.
        path: PathBuf,
        /// Index of the chunk.
        index: u64,
        /// Byte offset of the frame in the file.
        offset: u64,
    },
    /// A checkpoint file is corrupt.
    #[error("{path}: checkpoint is corrupt: {source}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        source: CodecError,
    },
    /// A waypoint cannot be used (a replay then finds its kick point by searching).
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
    /// A checkpoint file's size disagrees with the length in its header.
    #[error("{path}: checkpoint file is {actual} bytes but its header declares {declared}")]
    CheckpointSize {
        /// The checkpoint file.
        path: PathBuf,
        /// Size the header implies.
        declared: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A checkpoint file's name and header disagree on its icount.
    #[error("{path}: file name says icount {name_icount} but the checkpoint header says {header_icount}")]
    CheckpointName {
        /// The checkpoint file.
        path: PathBuf,
        /// icount from the name.
        name_icount: u64,
        /// icount from the header.
        header_icount: u64,
    },
    /// The parts of the trace disagree with each other.
    #[error("{path}: {reason}")]
    Inconsistent {
        /// The file whose contents conflict with the rest.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// A checkpoint index is out of range.
    #[error("checkpoint index {index} is out of range: the trace has {count} checkpoints")]
    NoSuchCheckpoint {
        /// The index asked for.
        index: usize,
        /// How many there are.
        count: usize,
    },
    /// No full checkpoint precedes the one asked for, so its memory cannot be rebuilt.
    #[error("{path}: no full checkpoint at or before this one, so its memory cannot be rebuilt")]
    NoFullCheckpoint {
        /// The checkpoint file asked for.
        path: PathBuf,
    },
    /// Guest RAM larger than this host's memory: replay could never hold it.
    #[error("{path}: the guest has {ram_bytes} bytes of RAM, more than this host's {host_bytes} bytes of memory (MemTotal in /proc/meminfo); replay it on a larger machine")]
    RamExceedsHost {
        /// The header file.
        path: PathBuf,
        /// RAM the header declares.
        ram_bytes: u64,
        /// This host's memory.
        host_bytes: u64,
    },
    /// A checkpoint that decompresses to more than this host's memory.
    #[error("{path}: the checkpoint decompresses to {bytes} bytes, more than this host's {host_bytes} bytes of memory (MemTotal in /proc/meminfo)")]
    CheckpointExceedsHost {
        /// The checkpoint file.
        path: PathBuf,
        /// Its declared uncompressed size.
        bytes: u64,
        /// This host's memory.
        host_bytes: u64,
    },
    /// A checkpoint read after an earlier one of its chain could not be.
    #[error(
        "{path}: this checkpoint cannot be restored: it builds on {broken}, which cannot be read"
    )]
    BuildsOnBroken {
        /// The checkpoint asked for.
        path: PathBuf,
        /// The broken checkpoint of its chain.
        broken: PathBuf,
    },
    /// Checkpoints that cannot be restored because an earlier one of their chain is broken.
    #[error("{path}: this checkpoint and the {later} after it cannot be restored: they build on {broken}, which cannot be read")]
    BrokenChain {
        /// The first checkpoint file that depends on the broken one.
        path: PathBuf,
        /// How many more checkpoints after it depend on the broken one too.
        later: usize,
        /// The broken checkpoint file.
        broken: PathBuf,
    },
    /// A page reference names content stored nowhere before it.
    #[error("{path}: page {pfn:#x} refers to content no earlier page since the last full checkpoint has")]
    DanglingPageRef {
        /// The checkpoint file.
        path: PathBuf,
        /// The page holding the reference.
        pfn: u64,
    },
}

/// What [`TraceReader::open`] learns about a checkpoint from its fixed header alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Where the checkpoint was taken, counted by the trace's clock.
    pub at: u64,
    /// Guest rip at the checkpoint.
    pub rip: u64,
    /// Whether it holds all non-zero pages (else only pages changed since the previous one).
    pub full: bool,
    /// The machine's state digest.
    pub digest: [u8; 32],
    /// Size of the file.
    pub bytes_on_disk: u64,
    /// Bytes its payload decompresses to, as its header declares.
    pub uncompressed_len: u64,
    /// Path of the file.
    pub path: PathBuf,
}

/// Where a torn final frame was found in `events.bin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Byte offset where the torn frame starts (the valid prefix ends here).
    pub offset: u64,
    /// Bytes of the torn frame present in the file.
    pub bytes: u64,
}

/// Which checkpoint of a chain could not be read, and why: what a caller needs to fall back to
/// the checkpoint before it (every checkpoint from `failed` up to the next full one builds on it).
#[derive(Debug, Error)]
#[error("{source}")]
pub struct ChainError {
    /// Index of the checkpoint that failed (for an index out of range or a chain without a full
    /// checkpoint, the index asked for).
    pub failed: usize,
    /// What is wrong with it.
    pub source: ReadError,
}

/// A validated trace, open for reading.
#[derive(Debug)]
pub struct TraceReader {
    dir: PathBuf,
    header: Header,
    events: Vec<Event>,
    summary: Option<Summary>,
    complete_upto: u64,
    torn_tail: Option<TornTail>,
    checkpoints: Vec<CheckpointInfo>,
    /// Checkpoints of a cut-off recording past the end of its complete event stream.
    ignored_checkpoints: usize,
    limits: CheckpointLimits,
    /// This host's memory, if known: no checkpoint larger than it is read.
    host_memory: Option<u64>,
    events_size: u64,
    /// The initrd and disk copies and the guest image, by the hash of each of their 4 KiB blocks, once a
    /// chain of checkpoints needed them (only in traces whose header has `page_backing`).
    backing: std::sync::OnceLock<Backing>,
    /// The guest image, if the caller gave it ([`TraceReader::set_image`]).
    image: Option<Vec<u8>>,
    /// Where `waypoints.bin` holds each waypoint.
    waypoints: WaypointIndex,
}

/// The blocks checkpoint pages may refer to besides pages of their own chain: the 4 KiB blocks of the
/// trace's initrd and disk copies and of the guest image.
struct Backing {
    /// The copies.
    sources: Vec<Vec<u8>>,
    /// Each non-zero block's xxh3-128, with the source and offset of its first occurrence.
    blocks: HashMap<u128, (usize, usize)>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backing({} blocks)", self.blocks.len())
    }
}

impl Backing {
    fn new(sources: Vec<Vec<u8>>) -> Backing {
        let mut blocks = HashMap::new();
        for (i, source) in sources.iter().enumerate() {
            for (n, block) in source.chunks_exact(PAGE_SIZE).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    blocks
                        .entry(crate::format::page_hash(block))
                        .or_insert((i, n * PAGE_SIZE));
                }
            }
        }
        Backing { sources, blocks }
    }

    /// The block with content hash `hash`, if there is one.
    fn block(&self, hash: u128) -> Option<&[u8]> {
        let &(source, at) = self.blocks.get(&hash)?;
        Some(&self.sources[source][at..at + PAGE_SIZE])
    }
}

impl TraceReader {
    /// Opens and validates the trace in `dir`: the header (including its format version), every
    /// event chunk, the fixed header of every checkpoint, and the summary if there is one.
    pub fn open(dir: &Path) -> Result<TraceReader, ReadError> {
        let header_path = dir.join(HEADER_FILE);
        let header = match read_header(&header_path) {
            // The writer creates events.bin before it writes the header: a directory with one but
            // not the other is a recording killed in its first moments, not some other directory.
            Err(ReadError::Missing { path }) if dir.join(EVENTS_FILE).exists() => {
                return Err(ReadError::NothingRecorded { path })
            }
            other => other?,
        };
        let host_memory = files::host_memory();
        if let Some(host_bytes) = host_memory {
            let ram_bytes = header.machine.ram_bytes;
            if ram_bytes > host_bytes {
                return Err(ReadError::RamExceedsHost {
                    path: header_path,
                    ram_bytes,
                    host_bytes,
                });
            }
        }
        let limits = CheckpointLimits::of(&header);
        let events_path = dir.join(EVENTS_FILE);
        let stream = read_events(&events_path, &header, MAX_EVENT_MEMORY)?;
        let summary_path = dir.join(SUMMARY_FILE);
        let summary = read_summary(&summary_path)?;

        let complete_upto = match &summary {
            Some(summary) => {
                check_summary(summary, &summary_path, &stream)?;
                summary.end
            }
            None => stream.complete_upto,
        };

        let mut checkpoints = list_checkpoints(&dir.join(CHECKPOINTS_DIR), &limits)?;
        let listed = checkpoints.len();
        if let Some(summary) = &summary {
            if checkpoints.len() as u64 != summary.checkpoints {
                return Err(ReadError::Inconsistent {
                    path: summary_path,
                    reason: format!(
                        "summary counts {} checkpoints but {} checkpoint files are present",
                        summary.checkpoints,
                        checkpoints.len()
                    ),
                });
            }
            if let Some(last) = checkpoints.last().filter(|c| c.at > complete_upto) {
                return Err(ReadError::Inconsistent {
                    path: last.path.clone(),
                    reason: format!(
                        "checkpoint lies past the end of the recording (icount {complete_upto})"
                    ),
                });
            }
        } else {
            // The writer flushes events up to a checkpoint before writing it, so this only happens
            // if the system crashed before buffered event writes reached the disk, or the trace was
            // tampered with. Such a checkpoint cannot be reached by replaying the surviving events
            // (and its state may depend on events that are lost), so it is left out.
            checkpoints.retain(|c| c.at <= complete_upto);
        }
        let ignored_checkpoints = listed - checkpoints.len();
        // The writer ends a chunk at each checkpoint's position before it writes the checkpoint,
        // so every checkpoint replay can reach lies where some chunk ends.
        if let Some(cp) = checkpoints
            .iter()
            .find(|c| stream.uptos.binary_search(&c.at).is_err())
        {
            let name = cp.path.file_name().unwrap_or_default().to_string_lossy();
            return Err(ReadError::Inconsistent {
                path: events_path,
                reason: format!(
                    "no chunk ends at icount {}, where checkpoint {name} lies, though the writer \
                     ends one there before it writes a checkpoint: a chunk's upto_icount was changed",
                    cp.at
                ),
            });
        }

        let waypoints = WaypointIndex::scan(dir, &limits, stream.events.len() as u64);
        Ok(TraceReader {
            waypoints,
            dir: dir.to_owned(),
            header,
            events: stream.events,
            summary,
            complete_upto,
            torn_tail: stream.torn_tail,
            checkpoints,
            ignored_checkpoints,
            limits,
            host_memory,
            events_size: stream.file_size,
            backing: std::sync::OnceLock::new(),
            image: None,
        })
    }

    /// The waypoint of the kick at event index `kick`, if the trace has one: None if not, an error if
    /// its record cannot be used (see [`Waypoint`]).
    pub fn waypoint(&self, kick: u64) -> Option<Result<Waypoint, ReadError>> {
        Some(
            self.waypoints
                .read(kick, &self.limits)?
                .map_err(ReadError::from),
        )
    }

    /// Whether the kick at event index `kick` has a waypoint.
    pub fn has_waypoint(&self, kick: u64) -> bool {
        self.waypoints.has(kick)
    }

    /// How many waypoints the trace has, the bytes of their file, and why the reader could not index
    /// all of it, if it could not (they only save a replay time: it searches for the kick points of
    /// the others).
    pub fn waypoint_summary(&self) -> (usize, u64, Option<ReadError>) {
        (
            self.waypoints.len(),
            self.waypoints.bytes,
            self.waypoints.problem().map(ReadError::from),
        )
    }

    /// The trace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trace's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// All events, in icount order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The summary, or `None` if the recording was cut off.
    pub fn summary(&self) -> Option<&Summary> {
        self.summary.as_ref()
    }

    /// Highest icount the event stream is known complete up to: the end of the recording if it
    /// finished, otherwise the flush point of the last intact chunk. Replay past it is guesswork.
    pub fn complete_upto(&self) -> u64 {
        self.complete_upto
    }

    /// True if the recording was cut off (no summary: a crash, a kill, or a writer dropped
    /// without finishing). The events up to [`TraceReader::complete_upto`] are still valid.
    pub fn cut_off(&self) -> bool {
        self.summary.is_none()
    }

    /// True if a torn final chunk (an interrupted write) was dropped from `events.bin`.
    pub fn truncated_tail(&self) -> bool {
        self.torn_tail.is_some()
    }

    /// Where the dropped torn final chunk was, if there was one.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.torn_tail
    }

    /// A sentence describing how the recording was cut off, or `None` if it finished cleanly.
    pub fn cut_off_description(&self) -> Option<String> {
        if !self.cut_off() {
            return None;
        }
        let mut text = format!(
            "the recording was cut off (no {SUMMARY_FILE}); its events are complete up to icount {}",
            self.complete_upto
        );
        if let Some(torn) = self.torn_tail {
            text.push_str(&format!(
                "; an incomplete final chunk ({} bytes at offset {} of {EVENTS_FILE}) was dropped",
                torn.bytes, torn.offset
            ));
        }
        Some(text)
    }

    /// The checkpoints, sorted by icount: those replay can reach (see
    /// [`TraceReader::ignored_checkpoints`]).
    pub fn checkpoints(&self) -> &[CheckpointInfo] {
        &self.checkpoints
    }

    /// How many checkpoint files of a cut-off recording lie past the end of its complete event
    /// stream ([`TraceReader::complete_upto`]) and are left out of
    /// [`TraceReader::checkpoints`]: replaying the surviving events cannot reach them.
    pub fn ignored_checkpoints(&self) -> usize {
        self.ignored_checkpoints
    }

    /// The icount up to which the trace can be replayed: [`TraceReader::complete_upto`], or `None`
    /// if the trace holds no checkpoint to start from (a recording cut off in its first moments).
    pub fn replayable_upto(&self) -> Option<u64> {
        (!self.checkpoints.is_empty()).then_some(self.complete_upto)
    }

    /// Reads and fully verifies (CRC, sizes, every page) checkpoint `index`. Zero pages of an
    /// incremental checkpoint come back as `PAGE_SIZE` zero bytes.
    pub fn read_checkpoint(&self, index: usize) -> Result<Checkpoint, ReadError> {
        let mut last = None;
        self.read_chain(index, |cp| last = Some(cp))
            .map_err(|e| e.source)?;
        last.ok_or(ReadError::NoSuchCheckpoint {
            index,
            count: self.checkpoints.len(),
        })
    }

    /// Reads the checkpoints from the last full one up to `index` in order, resolving page
    /// references (content stored earlier in the chain), and hands each to `each`. Returns the
    /// cursor past `index`; an error says which checkpoint of the chain failed.
    fn read_chain(
        &self,
        index: usize,
        mut each: impl FnMut(Checkpoint),
    ) -> Result<ChainCursor, ChainError> {
        let at_index = |source| ChainError {
            failed: index,
            source,
        };
        let info = self.checkpoint_info(index).map_err(at_index)?;
        let base = self.checkpoints[..=index]
            .iter()
            .rposition(|c| c.full)
            .ok_or_else(|| {
                at_index(ReadError::NoFullCheckpoint {
                    path: info.path.clone(),
                })
            })?;
        let mut cursor = ChainCursor::at(base);
        for i in base..=index {
            let cp = self
                .read_next(&mut cursor)
                .map_err(|source| ChainError { failed: i, source })?;
            each(cp);
        }
        Ok(cursor)
    }

    /// A cursor at the start of checkpoint `index`'s chain: its last full checkpoint at or before
    /// it (or `index` itself if there is none: reading it then says so). [`TraceReader::read_next`]
    /// then reads the chain up to `index`, and on from there; from 0, every checkpoint in order.
    pub fn chain_cursor(&self, index: usize) -> ChainCursor {
        let end = (index + 1).min(self.checkpoints.len());
        ChainCursor::at(
            self.checkpoints[..end]
                .iter()
                .rposition(|c| c.full)
                .unwrap_or(index),
        )
    }

    /// Reads checkpoint [`ChainCursor::next`] and fully verifies it, as
    /// [`TraceReader::read_checkpoint`] does, resolving its page references with the chain the
    /// cursor has read (a full checkpoint starts a new chain), and moves the cursor past it. Reading
    /// in order costs one file per checkpoint, where [`TraceReader::read_checkpoint`] reads the
    /// chain from its last full checkpoint. Once a checkpoint cannot be read, the incremental
    /// checkpoints after it build on it: reading them is an error up to the next full one.
    pub fn read_next(&self, cursor: &mut ChainCursor) -> Result<Checkpoint, ReadError> {
        let index = cursor.next;
        cursor.next += 1;
        let info = self.checkpoint_info(index)?;
        if info.full {
            cursor.content = PageContent::default();
            cursor.broken = None;
        } else if let Some(broken) = &cursor.broken {
            return Err(ReadError::BuildsOnBroken {
                path: info.path.clone(),
                broken: broken.clone(),
            });
        } else if index == 0 {
            cursor.broken = Some(info.path.clone());
            return Err(ReadError::NoFullCheckpoint {
                path: info.path.clone(),
            });
        }
        let read = self.backing().and_then(|backing| {
            let mut cp = self.read_raw(index)?;
            cursor.content.resolve(&mut cp, &info.path, backing)?;
            Ok(cp)
        });
        if read.is_err() {
            cursor.broken = Some(info.path.clone());
        }
        read
    }

    /// The blocks checkpoint pages may refer to, read once; None in traces without `page_backing`.
    fn backing(&self) -> Result<Option<&Backing>, ReadError> {
        if !self.header.page_backing {
            return Ok(None);
        }
        if let Some(b) = self.backing.get() {
            return Ok(Some(b));
        }
        let mut sources = Vec::new();
        sources.extend(self.read_initrd()?);
        for i in 0..self.header.disks.len() {
            sources.push(self.read_disk(i)?);
        }
        sources.extend(self.image.clone());
        Ok(Some(self.backing.get_or_init(|| Backing::new(sources))))
    }

    /// Gives the reader the guest image (already checked against the header's hash), whose blocks
    /// checkpoint pages of a `page_backing` trace may refer to. Call it before reading checkpoints:
    /// without it, such a reference reads as dangling.
    pub fn set_image(&mut self, image: Vec<u8>) {
        if self.header.page_backing {
            self.image = Some(image);
        }
    }

    fn checkpoint_info(&self, index: usize) -> Result<&CheckpointInfo, ReadError> {
        if self.checkpoints.is_empty() {
            return Err(ReadError::NoCheckpoints {
                dir: self.dir.clone(),
            });
        }
        self.checkpoints
            .get(index)
            .ok_or(ReadError::NoSuchCheckpoint {
                index,
                count: self.checkpoints.len(),
            })
    }

    fn read_raw(&self, index: usize) -> Result<Checkpoint, ReadError> {
        let info = self.checkpoint_info(index)?;
        let path = &info.path;
        if let Some(host_bytes) = self.host_memory.filter(|&h| info.uncompressed_len > h) {
            return Err(ReadError::CheckpointExceedsHost {
                path: path.clone(),
                bytes: info.uncompressed_len,
                host_bytes,
            });
        }
        let bytes = read_checkpoint_file(path, info.bytes_on_disk)?;
        let cp = codec::decode_checkpoint(&bytes, &self.limits).map_err(|source| {
            ReadError::Checkpoint {
                path: path.clone(),
                source,
            }
        })?;
        // The file may have changed since open; the name check must hold for what was read.
        if cp.at != info.at {
            return Err(ReadError::CheckpointName {
                path: path.clone(),
                name_icount: info.at,
                header_icount: cp.at,
            });
        }
        Ok(cp)
    }

    /// The page frames written (by the guest or a device) between the checkpoint before `index` and it: an
    /// incremental checkpoint's own pages; for a full one, the list recorded beside it (see
    /// `TraceWriter::write_pages_written`), or, where that is missing or unreadable, every page it
    /// stores (more than were written, which only costs a search its shortcut).
    pub fn pages_written_before(&self, index: usize) -> Result<Vec<u64>, ReadError> {
        /// Largest list accepted: one entry per page of the most RAM a trace may describe.
        const MAX_LIST_BYTES: u64 = 8 << 20;
        let info = self.checkpoint_info(index)?;
        if info.full {
            let path = info.path.with_file_name(written_file_name(info.at));
            let listed = fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file() && m.len() <= MAX_LIST_BYTES && m.len() % 8 == 0)
                .and_then(|_| fs::read(&path).ok());
            if let Some(bytes) = listed {
                return Ok(bytes
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                    .collect());
            }
        }
        self.checkpoint_pages(index)
    }

    /// The page frames checkpoint `index` lists: for an incremental checkpoint, every page written (by the
    /// guest or a device) since the checkpoint before it.
    fn checkpoint_pages(&self, index: usize) -> Result<Vec<u64>, ReadError> {
        Ok(self
            .read_raw(index)?
            .pages
            .iter()
            .map(|(pfn, _)| *pfn)
            .collect())
    }

    /// The CPU and device state blob of checkpoint `index` alone (its file is read and checked, but
    /// not the chain before it: the state does not depend on earlier checkpoints).
    pub fn checkpoint_state(&self, index: usize) -> Result<Vec<u8>, ReadError> {
        Ok(self.read_raw(index)?.state)
    }

    /// Guest memory at checkpoint `index`: the pages of the nearest full checkpoint at or before
    /// it, overlaid with every incremental checkpoint after that up to `index` (later wins).
    /// Pages absent from the map are zero. Returns checkpoint `index` and the pages by pfn; the
    /// checkpoint's own `pages` are moved into the map (its `pages` comes back empty) so memory is
    /// not held twice.
    pub fn restore_point(
        &self,
        index: usize,
    ) -> Result<(Checkpoint, BTreeMap<u64, Vec<u8>>), ReadError> {
        self.restore_chain(index)
            .map(|p| (p.checkpoint, p.memory))
            .map_err(|e| e.source)
    }

    /// [`TraceReader::restore_point`], with the cursor past checkpoint `index` (to read the
    /// checkpoints after it one by one), and with an error that says which checkpoint of the chain
    /// failed: a caller can fall back to the one before it ([`ChainError::failed`] - 1), the latest
    /// that does not build on the broken one.
    pub fn restore_chain(&self, index: usize) -> Result<RestorePoint, ChainError> {
        let mut memory = BTreeMap::new();
        let mut last = None;
        let cursor = self.read_chain(index, |mut cp| {
            memory.extend(std::mem::take(&mut cp.pages));
            last = Some(cp);
        })?;
        let checkpoint = last.ok_or(ChainError {
            failed: index,
            source: ReadError::NoSuchCheckpoint {
                index,
                count: self.checkpoints.len(),
            },
        })?;
        Ok(RestorePoint {
            checkpoint,
            memory,
            cursor,
        })
    }

    /// Reads and checks everything [`TraceReader::open`] does not: every checkpoint in full (CRC,
    /// decompression, page rules, and the whole chain's page references) and every disk copy
    /// (size and SHA-256). The event stream was read and checked in full by `open` already.
    /// Returns every problem found, each naming its file; none means the trace is intact.
    ///
    /// A broken checkpoint also breaks every later one up to the next full checkpoint, since
    /// restoring builds on it: that is reported once, as [`ReadError::BrokenChain`], and
    /// references those later checkpoints make to content only it stored are not reported again.
    pub fn verify(&self) -> Vec<ReadError> {
        let mut problems = Vec::new();
        let mut content = PageContent::default();
        // The broken checkpoint of the current chain, and the indexes that depend on it.
        let mut broken: Option<(PathBuf, Vec<usize>)> = None;
        let end_chain = |broken: &mut Option<(PathBuf, Vec<usize>)>, problems: &mut Vec<_>| {
            if let Some((path, dependents)) = broken.take() {
                if let Some(&first) = dependents.first() {
                    problems.push(ReadError::BrokenChain {
                        path: self.checkpoints[first].path.clone(),
                        later: dependents.len() - 1,
                        broken: path,
                    });
                }
            }
        };
        // A damaged initrd or disk copy is reported below; its blocks then resolve nothing.
        let backing = self.backing().ok().flatten();
        for (i, info) in self.checkpoints.iter().enumerate() {
            if info.full {
                end_chain(&mut broken, &mut problems);
                content = PageContent::default();
            } else if i == 0 {
                problems.push(ReadError::NoFullCheckpoint {
                    path: info.path.clone(),
                });
                broken = Some((info.path.clone(), Vec::new()));
                continue;
            }
            let result = self
                .read_raw(i)
                .and_then(|mut cp| content.resolve(&mut cp, &info.path, backing));
            match (result, &mut broken) {
                (Ok(()), None) => {}
                (Ok(()), Some((_, dependents))) => dependents.push(i),
                // Content the broken checkpoint stored is unknown: a reference to it is expected.
                (Err(ReadError::DanglingPageRef { .. }), Some((_, dependents))) => {
                    dependents.push(i);
                }
                (Err(e), Some(_)) => problems.push(e),
                (Err(e), None) => {
                    problems.push(e);
                    broken = Some((info.path.clone(), Vec::new()));
                }
            }
        }
        end_chain(&mut broken, &mut problems);
        for disk in 0..self.header.disks.len() {
            if let Err(e) = self.read_disk(disk) {
                problems.push(e);
            }
        }
        if let Err(e) = self.read_initrd() {
            problems.push(e);
        }
        problems.extend(self.waypoints.problem().map(ReadError::from));
        for kick in self.waypoints.kicks() {
            match self.waypoint(kick) {
                Some(Ok(w)) => {
                    let names_kick = matches!(
                        self.events.get(kick as usize),
                        Some(Event { kind: EventKind::Kick { fingerprint }, .. }) if fingerprint.rip == w.rip
                    );
                    if !names_kick {
                        problems.push(ReadError::Inconsistent {
                            path: self.dir.join(crate::format::WAYPOINTS_FILE),
                            reason: format!(
                                "a waypoint at rip {:#x} names event {kick}, which is not a kick there",
                                w.rip
                            ),
                        });
                    }
                }
                Some(Err(e)) => problems.push(e),
                None => {}
            }
        }
        problems
    }

    /// Sizes on disk of `events.bin` and of all checkpoint files together.
    pub fn sizes(&self) -> (u64, u64) {
        (
            self.events_size,
            self.checkpoints.iter().map(|c| c.bytes_on_disk).sum(),
        )
    }
}

/// The contents of the pages stored so far in a chain of checkpoints, by xxh3-128, to resolve the
/// page references of later ones; and what restoring the chain so far gives each page.
#[derive(Default)]
struct PageContent {
    /// Page contents stored in full, by their xxh3-128.
    stored: HashMap<u128, Vec<u8>>,
    /// The xxh3-128 of each non-zero page as restoring the checkpoints resolved so far gives it.
    restored: HashMap<u64, u128>,
}

impl PageContent {
    /// Replaces each page reference of `cp` (read from `path`) by the content it names (a page stored
    /// earlier in the chain, or a block of `backing`), and remembers the content of each page stored
    /// in full.
    fn resolve(
        &mut self,
        cp: &mut Checkpoint,
        path: &Path,
        backing: Option<&Backing>,
    ) -> Result<(), ReadError> {
        if cp.full {
            // A full checkpoint lists every non-zero page: the ones it leaves out are zero.
            self.restored.clear();
        }
        for (pfn, page) in &mut cp.pages {
            if let Ok(hash) = <[u8; codec::PAGE_REF_LEN]>::try_from(&page[..]) {
                let hash = u128::from_le_bytes(hash);
                *page = self
                    .stored
                    .get(&hash)
                    .cloned()
                    .or_else(|| backing?.block(hash).map(<[u8]>::to_vec))
                    .ok_or_else(|| ReadError::DanglingPageRef {
                        path: path.to_owned(),
                        pfn: *pfn,
                    })?;
                // A reference is the xxh3-128 of the content it names.
                self.restored.insert(*pfn, hash);
            } else if page.iter().any(|&b| b != 0) {
                let hash = crate::format::page_hash(page);
                self.stored.insert(hash, page.clone());
                self.restored.insert(*pfn, hash);
            } else {
                self.restored.remove(pfn);
            }
        }
        Ok(())
    }
}

/// Where a reading of checkpoints one after another stands ([`TraceReader::read_next`]): the next
/// checkpoint to read, and what the chain read so far holds, which that one's page references may
/// name.
pub struct ChainCursor {
    /// Index of the next checkpoint to read.
    next: usize,
    content: PageContent,
    /// The checkpoint of this chain that could not be read, if one could not: the incremental
    /// checkpoints after it build on it.
    broken: Option<PathBuf>,
}

impl std::fmt::Debug for ChainCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChainCursor(next {}, {} pages stored)",
            self.next,
            self.content.stored.len()
        )
    }
}

impl ChainCursor {
    /// A cursor at checkpoint `next`, which must be full (or it reads as broken).
    fn at(next: usize) -> ChainCursor {
        ChainCursor {
            next,
            content: PageContent::default(),
            broken: None,
        }
    }

    /// Index of the next checkpoint [`TraceReader::read_next`] reads.
    pub fn next(&self) -> usize {
        self.next
    }

    /// The [`crate::page_hash`] of page `pfn` as restoring the last checkpoint read gives it, or
    /// `None` if that page is zero.
    pub fn restored_hash(&self, pfn: u64) -> Option<u128> {
        self.content.restored.get(&pfn).copied()
    }
}

/// A checkpoint read with the chain it builds on ([`TraceReader::restore_chain`]): what restoring
/// it takes.
#[derive(Debug)]
pub struct RestorePoint {
    /// The checkpoint, its `pages` moved into `memory`.
    pub checkpoint: Checkpoint,
    /// Guest memory at the checkpoint by page frame number; pages absent are zero.
    pub memory: BTreeMap<u64, Vec<u8>>,
    /// The cursor past the checkpoint.
    pub cursor: ChainCursor,
}

/// Just the field every header version has, so a newer header that no longer parses as ours
/// still gets the "upgrade" error instead of a confusing parse error.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

fn read_header(path: &Path) -> Result<Header, ReadError> {
    let bytes = read_json_file(path)?.ok_or_else(|| ReadError::Missing {
        path: path.to_owned(),
    })?;
    let probe: VersionProbe = serde_json::from_slice(&bytes).map_err(|source| ReadError::Json {
        path: path.to_owned(),
        source,
    })?;
    if probe.format_version > FORMAT_VERSION {
        return Err(ReadError::NewerVersion {
            path: path.to_owned(),
            version: probe.format_version,
        });
    }
    if probe.format_version < crate::format::OLDEST_FORMAT_VERSION {
        return Err(ReadError::UnsupportedVersion {
            path: path.to_owned(),
            version: probe.format_version,
        });
    }
    let header: Header = serde_json::from_slice(&bytes).map_err(|source| ReadError::Json {
        path: path.to_owned(),
        source,
    })?;
    header.validate().map_err(|source| ReadError::InvalidJson {
        path: path.to_owned(),
        source,
    })?;
    Ok(header)
}

fn read_summary(path: &Path) -> Result<Option<Summary>, ReadError> {
    let Some(bytes) = read_json_file(path)? else {
        return Ok(None);
    };
    let summary: Summary = serde_json::from_slice(&bytes).map_err(|source| ReadError::Json {
        path: path.to_owned(),
        source,
    })?;
    summary
        .validate()
        .map_err(|source| ReadError::InvalidJson {
            path: path.to_owned(),
            source,
        })?;
    Ok(Some(summary))
}

/// A finished recording's summary must agree with the event stream the writer fsynced before it.
fn check_summary(summary: &Summary, path: &Path, stream: &EventStream) -> Result<(), ReadError> {
    let reason = if let Some(torn) = stream.torn_tail {
        format!(
            "the recording finished, yet {EVENTS_FILE} ends in an incomplete chunk at offset {}",
            torn.offset
        )
    } else if stream.chunks == 0 {
        format!("the recording finished, yet {EVENTS_FILE} holds no chunks")
    } else if stream.complete_upto != summary.end {
        format!(
            "end_icount is {} but the last event chunk is complete up to icount {}",
            summary.end, stream.complete_upto
        )
    } else if let Some(e) = stream.events.last().filter(|e| e.at > summary.end) {
        format!(
            "an event at icount {} lies past end_icount {}",
            e.at, summary.end
        )
    } else if let Some(reason) = stop_disagrees(summary, &stream.events) {
        reason
    } else if let Some(reason) = counts_disagree(summary, &stream.events) {
        reason
    } else {
        return Ok(());
    };
    Err(ReadError::Inconsistent {
        path: path.to_owned(),
        reason,
    })
}

/// Why a finished recording's events do not end with the stop the summary names, if they do not:
/// the recorder's last event is its stop, at `end_icount`, for the reason the summary gives.
fn stop_disagrees(summary: &Summary, events: &[Event]) -> Option<String> {
    let Some(last) = events.last() else {
        return Some(format!(
            "the recording finished, yet {EVENTS_FILE} holds no event, not even its stop"
        ));
    };
    let index = events.len() - 1;
    let EventKind::Stop { reason } = &last.kind else {
        return Some(format!(
            "the recording finished, so its last event must be its stop event, but the last \
             (event {index}, at icount {}) is an event of kind {}",
            last.at,
            last.kind.name()
        ));
    };
    if *reason != summary.stop {
        return Some(format!(
            "the stop event (event {index}) says the guest ended by {reason:?}, the summary by {:?}",
            summary.stop
        ));
    }
    (last.at != summary.end).then(|| {
        format!(
            "the stop event (event {index}) lies at icount {}, but end_icount is {}",
            last.at, summary.end
        )
    })
}

/// Why the summary's count of events by kind differs from what the stream holds, if it does: the
/// recorder counts every event it writes, so a count that differs means events were added,
/// dropped or changed.
fn counts_disagree(summary: &Summary, events: &[Event]) -> Option<String> {
    if let Some(kind) = summary
        .events_by_kind
        .keys()
        .find(|k| !EVENT_KINDS.contains(&k.as_str()))
    {
        return Some(format!(
            "events_by_kind counts events of kind {kind:?}, which does not exist (the kinds are {})",
            EVENT_KINDS.join(", ")
        ));
    }
    let mut held = [0u64; EVENT_KINDS.len()];
    for e in events {
        let name = e.kind.name();
        if let Some(at) = EVENT_KINDS.iter().position(|&k| k == name) {
            held[at] += 1;
        }
    }
    EVENT_KINDS.iter().zip(held).find_map(|(&kind, held)| {
        let counted = summary.events_by_kind.get(kind).copied().unwrap_or(0);
        (counted != held).then(|| {
            format!("events_by_kind counts {counted} {kind} events, but {EVENTS_FILE} holds {held}")
        })
    })
}

/// Reads a small JSON file, `None` if it does not exist.
fn read_json_file(path: &Path) -> Result<Option<Vec<u8>>, ReadError> {
    let Some((file, size)) = open_file(path)? else {
        return Ok(None);
    };
    if size > MAX_JSON_FILE {
        return Err(ReadError::JsonTooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let mut bytes = Vec::new();
    // take(): the file may grow after the size check.
    file.take(MAX_JSON_FILE)
        .read_to_end(&mut bytes)
        .map_err(|source| ReadError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(Some(bytes))
}

/// Opens a regular file and returns it with its size, or `None` if nothing has that name.
/// Anything else under a trace file's name (a FIFO, a device, a directory) is refused without
/// blocking or reading from it (see [`files::open_regular`]).
pub(crate) fn open_file(path: &Path) -> Result<Option<(File, u64)>, ReadError> {
    match files::open_regular(path) {
        Ok(opened) => Ok(Some(opened)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReadError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads a whole checkpoint file whose size `open` already checked, refusing it if it changed.
fn read_checkpoint_file(path: &Path, expected: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let (file, _) = open_file(path)?.ok_or_else(|| ReadError::Missing {
        path: path.to_owned(),
    })?;
    let mut bytes = Vec::new();
    file.take(expected.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 != expected {
        return Err(ReadError::CheckpointSize {
            path: path.to_owned(),
            declared: expected,
            actual: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// The validated contents of `events.bin`.
struct EventStream {
    events: Vec<Event>,
    chunks: u64,
    /// Each chunk's `upto_icount`, in file order (never decreasing).
    uptos: Vec<u64>,
    complete_upto: u64,
    torn_tail: Option<TornTail>,
    file_size: u64,
    /// Memory the decoded events take, as [`memory_cost`] counts it.
    memory: u64,
}

/// Memory a decoded event counts against [`MAX_EVENT_MEMORY`] (FORMAT.md).
fn memory_cost(event: &Event) -> u64 {
    match &event.kind {
        EventKind::SerialRx { bytes } => {
            EVENT_MEMORY_COST + SERIAL_RX_MEMORY_COST + bytes.len() as u64
        }
        _ => EVENT_MEMORY_COST,
    }
}

/// Reads and checks every chunk of `events.bin` of the trace `header` describes: the bytes, the
/// order of events and chunk bounds, and each event against what the machine can produce
/// ([`EventRules`]). A stream whose decoded events would take more than `memory_budget` bytes
/// ([`memory_cost`]) is refused.
fn read_events(path: &Path, header: &Header, memory_budget: u64) -> Result<EventStream, ReadError> {
    let version = header.format_version;
    let unit = if header.clock != "step" {
        "landmark"
    } else {
        "icount"
    };
    let mut rules = EventRules::new(header);
    let io_err = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let (mut file, file_size) = open_file(path)?.ok_or_else(|| ReadError::Missing {
        path: path.to_owned(),
    })?;
    let mut stream = EventStream {
        events: Vec::new(),
        chunks: 0,
        uptos: Vec::new(),
        complete_upto: 0,
        torn_tail: None,
        file_size,
        memory: 0,
    };

    // A file shorter than its header was cut off while the writer created it: a torn, empty
    // stream if what is there is the start of a valid header.
    let mut file_header = [0u8; EVENTS_FILE_HEADER_LEN];
    let present = file_size.min(EVENTS_FILE_HEADER_LEN as u64) as usize;
    file.read_exact(&mut file_header[..present])
        .map_err(io_err)?;
    if present < EVENTS_FILE_HEADER_LEN {
        if codec::events_file_header(version).starts_with(&file_header[..present]) {
            stream.torn_tail = Some(TornTail {
                offset: 0,
                bytes: file_size,
            });
            return Ok(stream);
        }
        let source = CodecError::Truncated {
            what: "file header",
            len: EVENTS_FILE_HEADER_LEN as u64,
            left: present,
        };
        return Err(ReadError::EventsFileHeader {
            path: path.to_owned(),
            source,
        });
    }
    codec::check_events_file_header(&file_header, version).map_err(|source| {
        ReadError::EventsFileHeader {
            path: path.to_owned(),
            source,
        }
    })?;

    let mut offset = EVENTS_FILE_HEADER_LEN as u64;
    let mut index = 0u64;
    while offset < file_size {
        let left = file_size - offset;
        let chunk_err = |source| ReadError::Chunk {
            path: path.to_owned(),
            index,
            offset,
            source,
        };
        if left < CHUNK_HEADER_LEN as u64 {
            // Too short for a frame header: a torn write if it starts like one (or is zeros).
            let mut tail = [0u8; CHUNK_HEADER_LEN];
            let tail = &mut tail[..left as usize];
            file.read_exact(tail).map_err(io_err)?;
            let magic = CHUNK_MAGIC.to_le_bytes();
            let n = tail.len().min(magic.len());
            if tail[..n] == magic[..n] || tail.iter().all(|&b| b == 0) {
                stream.torn_tail = Some(TornTail {
                    offset,
                    bytes: left,
                });
                break;
            }
            return Err(chunk_err(CodecError::BadMagic {
                found: tail[..n].to_vec(),
                expected: magic.to_vec(),
            }));
        }
        let mut raw_header = [0u8; CHUNK_HEADER_LEN];
        file.read_exact(&mut raw_header).map_err(io_err)?;
        let chunk = match ChunkHeader::decode(&raw_header) {
            Ok(chunk) => chunk,
            Err(source) => {
                // A system crash can leave the file extended with zeros where data never landed:
                // that is a torn tail too, but only if nothing but zeros follows.
                if raw_header.iter().all(|&b| b == 0)
                    && files::rest_is_zero(&mut file).map_err(io_err)?
                {
                    stream.torn_tail = Some(TornTail {
                        offset,
                        bytes: left,
                    });
                    break;
                }
                return Err(chunk_err(source));
            }
        };
        // Every event costs at least EVENT_MEMORY_COST: a chunk that cannot fit is refused before
        // it is decoded.
        if stream.memory + u64::from(chunk.event_count) * EVENT_MEMORY_COST > memory_budget {
            return Err(ReadError::TooManyEvents {
                limit: memory_budget,
                path: path.to_owned(),
                index,
                offset,
            });
        }
        let frame_len = CHUNK_HEADER_LEN as u64 + u64::from(chunk.compressed_len);
        if frame_len > left {
            // The header is intact (its CRC matched) but the payload was cut short.
            stream.torn_tail = Some(TornTail {
                offset,
                bytes: left,
            });
            break;
        }
        // compressed_len is capped at 64 MiB by ChunkHeader::decode, and the bytes are present.
        let mut payload = vec![0u8; chunk.compressed_len as usize];
        file.read_exact(&mut payload).map_err(io_err)?;
        let events = codec::decode_chunk_payload(&chunk, &payload).map_err(chunk_err)?;
        check_chunk_order(&stream, &chunk, &events).map_err(|reason| ReadError::ChunkOrder {
            path: path.to_owned(),
            index,
            offset,
            reason,
        })?;
        for (i, event) in events.iter().enumerate() {
            rules
                .check(event)
                .map_err(|source| ReadError::ImpossibleEvent {
                    path: path.to_owned(),
                    index: (stream.events.len() + i) as u64,
                    kind: event.kind.name(),
                    unit,
                    position: event.at,
                    chunk: index,
                    offset,
                    source: Box::new(source),
                })?;
        }
        stream.memory += events.iter().map(memory_cost).sum::<u64>();
        if stream.memory > memory_budget {
            return Err(ReadError::TooManyEvents {
                limit: memory_budget,
                path: path.to_owned(),
                index,
                offset,
            });
        }
        stream.events.extend(events);
        stream.complete_upto = chunk.upto_icount;
        stream.uptos.push(chunk.upto_icount);
        stream.chunks += 1;
        offset += frame_len;
        index += 1;
    }
    // Growth by doubling may have reserved up to twice what the events need.
    stream.events.shrink_to_fit();
    Ok(stream)
}

/// Checks a decoded chunk against the stream so far and its own bound: events never go backward,
/// never precede an earlier flush point nor lie past their own chunk's, and flush points never
/// decrease.
fn check_chunk_order(
    stream: &EventStream,
    header: &ChunkHeader,
    events: &[Event],
) -> Result<(), String> {
    if header.upto_icount < stream.complete_upto {
        return Err(format!(
            "upto_icount {} is below the previous chunk's {}",
            header.upto_icount, stream.complete_upto
        ));
    }
    let mut previous = stream.events.last().map_or(0, |e| e.at);
    for (i, event) in events.iter().enumerate() {
        if event.at < previous {
            return Err(format!(
                "event {i} at icount {} follows an event at icount {previous}",
                event.at
            ));
        }
        if event.at < stream.complete_upto {
            return Err(format!(
                "event {i} at icount {} lies before the previous chunk's upto_icount {}",
                event.at, stream.complete_upto
            ));
        }
        // The writer closes a chunk at a point no later than its events: the next event's
        // position, a checkpoint's, or the end.
        if event.at > header.upto_icount {
            return Err(format!(
                "event {i} at icount {} lies past the chunk's own upto_icount {}",
                event.at, header.upto_icount
            ));
        }
        previous = event.at;
    }
    Ok(())
}

/// Lists checkpoint files by their fixed headers, sorted by icount. Files whose names are not
/// checkpoint names (such as the writer's temporary files) are ignored. A missing directory means
/// no checkpoints (tools that drop empty directories must not break a trace).
fn list_checkpoints(
    dir: &Path,
    limits: &CheckpointLimits,
) -> Result<Vec<CheckpointInfo>, ReadError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ReadError::Io {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut checkpoints = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ReadError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(name_icount) = name.to_str().and_then(parse_checkpoint_file_name) else {
            continue;
        };
        checkpoints.push(checkpoint_info(&entry.path(), name_icount, limits)?);
    }
    checkpoints.sort_by_key(|c| c.at);
    Ok(checkpoints)
}

/// Reads and checks a checkpoint file's fixed header (not its payload or CRC).
fn checkpoint_info(
    path: &Path,
    name_icount: u64,
    limits: &CheckpointLimits,
) -> Result<CheckpointInfo, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let (mut file, size) = open_file(path)?.ok_or_else(|| ReadError::Missing {
        path: path.to_owned(),
    })?;
    let mut raw = [0u8; CHECKPOINT_HEADER_LEN];
    if size < CHECKPOINT_HEADER_LEN as u64 {
        return Err(ReadError::Checkpoint {
            path: path.to_owned(),
            source: CodecError::Truncated {
                what: "checkpoint header",
                len: raw.len() as u64,
                left: size as usize,
            },
        });
    }
    file.read_exact(&mut raw).map_err(io_err)?;
    let header =
        CheckpointHeader::decode(&raw, limits).map_err(|source| ReadError::Checkpoint {
            path: path.to_owned(),
            source,
        })?;
    if header.icount != name_icount {
        return Err(ReadError::CheckpointName {
            path: path.to_owned(),
            name_icount,
            header_icount: header.icount,
        });
    }
    let declared = CHECKPOINT_HEADER_LEN as u64 + header.compressed_len;
    if size != declared {
        return Err(ReadError::CheckpointSize {
            path: path.to_owned(),
            declared,
            actual: size,
        });
    }
    Ok(CheckpointInfo {
        at: header.icount,
        rip: header.rip,
        full: header.full,
        digest: header.digest,
        bytes_on_disk: size,
        uncompressed_len: header.uncompressed_len,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::*;
    use crate::TraceWriter;

    #[test]
    fn decoded_events_are_bounded_by_memory_not_by_luck() {
        let dir = std::env::temp_dir().join(format!("rv-event-budget-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let header = Header {
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
            disks: vec![],
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
        };
        let mut w = TraceWriter::create(&dir, &header).unwrap();
        let rx = EventKind::SerialRx { bytes: vec![7; 10] };
        for (icount, kind) in [(1, EventKind::Irq { line: 0 }), (2, rx)] {
            w.push(Event {
                at: icount,
                rip: 0,
                kind,
            })
            .unwrap();
            w.flush(icount).unwrap();
        }
        drop(w);
        let path = dir.join(EVENTS_FILE);
        // An Irq costs EVENT_MEMORY_COST; a 10-byte SerialRx that plus SERIAL_RX_MEMORY_COST + 10.
        let total = 2 * EVENT_MEMORY_COST + SERIAL_RX_MEMORY_COST + 10;
        assert_eq!(read_events(&path, &header, total).unwrap().memory, total);
        match read_events(&path, &header, total - 1) {
            Err(ReadError::TooManyEvents {
                index: 1, limit, ..
            }) => assert_eq!(limit, total - 1),
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => panic!("the budget was not enforced"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
