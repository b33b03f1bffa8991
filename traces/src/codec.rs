//! The bytes of `events.bin` frames and checkpoint files: encoding for the writer and validating
//! decoding for the reader.
//!
//! Decoding treats its input as hostile: every length is checked against a cap before anything is
//! allocated for it, decompression stops one byte past the declared size, and the postcard payloads
//! are walked element by element so a lying element count cannot reserve memory up front. Errors
//! here say what is wrong with the bytes; the reader adds which file, chunk and offset they came from.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::format::{
    checkpoint_magic, events_magic, Checkpoint, Event, Header, CHECKPOINT_HEADER_LEN,
    CHECKPOINT_MAGIC, CHUNK_HEADER_LEN, CHUNK_MAGIC, EVENTS_FILE_HEADER_LEN, MAX_CHUNK_COMPRESSED,
    MAX_CHUNK_UNCOMPRESSED, MAX_EVENTS_PER_CHUNK, MAX_SERIAL_RX_BYTES, MAX_ZSTD_WINDOW_LOG,
    PAGE_SIZE,
};

/// zstd level for event chunks and checkpoints: fast, and a small window (which readers cap).
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// What is wrong with the bytes of a frame or checkpoint file.
#[derive(Debug, Error)]
pub enum CodecError {
    /// The bytes do not start with the expected magic.
    #[error("bad magic {found:02x?} (expected {expected:02x?})")]
    BadMagic {
        /// The bytes found.
        found: Vec<u8>,
        /// The bytes expected.
        expected: Vec<u8>,
    },
    /// A version field names another format than the trace's header.
    #[error("format version {found}, not the header's")]
    BadVersion {
        /// The version found.
        found: u32,
    },
    /// A reserved field is not zero.
    #[error("reserved field is {found:#x}, expected 0")]
    Reserved {
        /// The value found.
        found: u32,
    },
    /// A CRC-32 does not match the bytes it covers.
    #[error("{what} crc32 mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// Which checksum.
        what: &'static str,
        /// The checksum in the file.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },
    /// A declared length or count exceeds what this format allows.
    #[error("{what} of {value} exceeds the limit of {max}")]
    TooLarge {
        /// Which length or count.
        what: &'static str,
        /// The declared value.
        value: u64,
        /// The cap.
        max: u64,
    },
    /// The `full` flag is neither 0 nor 1.
    #[error("full flag is {found}, expected 0 or 1")]
    BadFlag {
        /// The value found.
        found: u8,
    },
    /// zstd rejected the payload.
    #[error("zstd decompression failed: {source}")]
    Decompress {
        /// zstd's complaint.
        source: io::Error,
    },
    /// The payload decompressed to another size than the header declares.
    #[error("payload decompressed to {actual} bytes, header declares {declared}")]
    SizeMismatch {
        /// Declared uncompressed length.
        declared: u64,
        /// Bytes actually produced (at most one past the declared length: decoding stops there).
        actual: u64,
    },
    /// The decompressed payload is not valid postcard for the expected type.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// postcard's complaint.
        source: postcard::Error,
    },
    /// A `SerialRx` event carries more bytes than a UART takes at once.
    #[error("event {index} is a SerialRx of {len} bytes, more than the {MAX_SERIAL_RX_BYTES} bytes one event may carry")]
    SerialRxTooLong {
        /// Index of the event in its chunk.
        index: u64,
        /// The byte count it declares.
        len: u64,
    },
    /// The payload holds another number of events than the frame header declares.
    #[error("payload holds {actual} events, frame header declares {declared}")]
    CountMismatch {
        /// Count in the frame header.
        declared: u64,
        /// Count in the payload.
        actual: u64,
    },
    /// Bytes are left over after the payload's last element.
    #[error("{count} stray bytes after the end of the payload")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A declared length runs past the end of the payload.
    #[error("{what} of {len} bytes runs past the end of the payload ({left} bytes left)")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Its declared length.
        len: u64,
        /// Bytes left in the payload.
        left: usize,
    },
    /// A page has another length than a page or the zero-page marker.
    #[error("page {pfn:#x} is {len} bytes, expected {PAGE_SIZE} (or 0 for a zero page, 16 for a reference)")]
    PageSize {
        /// Its page frame number.
        pfn: u64,
        /// Its length.
        len: u64,
    },
    /// Page frame numbers are not strictly increasing, or one lies outside guest RAM.
    #[error(
        "page frame number {pfn:#x} (after {previous:?}) is out of order or outside guest RAM \
         ({ram_pages:#x} pages); pages must be sorted, unique and inside RAM"
    )]
    BadPfn {
        /// The offending page frame number.
        pfn: u64,
        /// The one before it, if any.
        previous: Option<u64>,
        /// Pages of guest RAM, from the header.
        ram_pages: u64,
    },
}

/// The 16-byte header at the start of `events.bin` in format `version`.
pub(crate) fn events_file_header(version: u32) -> [u8; EVENTS_FILE_HEADER_LEN] {
    let mut h = [0u8; EVENTS_FILE_HEADER_LEN];
    h[..8].copy_from_slice(&events_magic(version));
    h[8..12].copy_from_slice(&version.to_le_bytes());
    // h[12..16] is the reserved u32, zero.
    h
}

/// Checks the 16-byte header at the start of `events.bin` of a trace in format `expected`.
pub(crate) fn check_events_file_header(
    h: &[u8; EVENTS_FILE_HEADER_LEN],
    expected: u32,
) -> Result<(), CodecError> {
    if h[..8] != events_magic(expected) {
        return Err(CodecError::BadMagic {
            found: h[..8].to_vec(),
            expected: events_magic(expected).to_vec(),
        });
    }
    let version = le_u32(h, 8);
    if version != expected {
        return Err(CodecError::BadVersion { found: version });
    }
    let reserved = le_u32(h, 12);
    if reserved != 0 {
        return Err(CodecError::Reserved { found: reserved });
    }
    Ok(())
}

/// The fixed header of one event chunk frame in `events.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    /// Length of the zstd payload that follows the header.
    pub compressed_len: u32,
    /// Length of the postcard bytes inside it.
    pub uncompressed_len: u32,
    /// CRC-32 of the compressed payload.
    pub payload_crc: u32,
    /// The event stream is complete up to this icount once this chunk is read.
    pub upto_icount: u64,
    /// Number of events in the payload.
    pub event_count: u32,
}

impl ChunkHeader {
    /// The 32 header bytes, ending with the CRC-32 of the 28 before it.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        h[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&self.compressed_len.to_le_bytes());
        h[8..12].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.payload_crc.to_le_bytes());
        h[16..24].copy_from_slice(&self.upto_icount.to_le_bytes());
        h[24..28].copy_from_slice(&self.event_count.to_le_bytes());
        let crc = crc32fast::hash(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a frame header: magic, header CRC, and every length against its cap, so
    /// the caller may trust `compressed_len` enough to read that many bytes.
    pub fn decode(h: &[u8; CHUNK_HEADER_LEN]) -> Result<ChunkHeader, CodecError> {
        let magic = le_u32(h, 0);
        if magic != CHUNK_MAGIC {
            return Err(CodecError::BadMagic {
                found: h[0..4].to_vec(),
                expected: CHUNK_MAGIC.to_le_bytes().to_vec(),
            });
        }
        let stored = le_u32(h, 28);
        let computed = crc32fast::hash(&h[..28]);
        if stored != computed {
            return Err(CodecError::Crc {
                what: "frame header",
                stored,
                computed,
            });
        }
        let header = ChunkHeader {
            compressed_len: le_u32(h, 4),
            uncompressed_len: le_u32(h, 8),
            payload_crc: le_u32(h, 12),
            upto_icount: le_u64(h, 16),
            event_count: le_u32(h, 24),
        };
        cap(
            "compressed payload length",
            header.compressed_len.into(),
            MAX_CHUNK_COMPRESSED.into(),
        )?;
        cap(
            "uncompressed payload length",
            header.uncompressed_len.into(),
            MAX_CHUNK_UNCOMPRESSED.into(),
        )?;
        cap(
            "event count",
            header.event_count.into(),
            MAX_EVENTS_PER_CHUNK.into(),
        )?;
        Ok(header)
    }
}

/// Builds one complete frame (header and payload) from `count` events already postcard-encoded
/// back to back in `encoded_events`, so the writer can append it with a single write.
pub(crate) fn encode_chunk(
    upto_icount: u64,
    count: u32,
    encoded_events: &[u8],
) -> io::Result<Vec<u8>> {
    // The payload is a postcard `Vec<Event>`: the element count as a varint, then the elements.
    let mut payload = Vec::with_capacity(10 + encoded_events.len());
    put_varint(&mut payload, count.into());
    payload.extend_from_slice(encoded_events);
    let compressed = zstd::bulk::compress(&payload, ZSTD_LEVEL)?;
    let header = ChunkHeader {
        compressed_len: length_u32(compressed.len())?,
        uncompressed_len: length_u32(payload.len())?,
        payload_crc: crc32fast::hash(&compressed),
        upto_icount,
        event_count: count,
    };
    let mut frame = Vec::with_capacity(CHUNK_HEADER_LEN + compressed.len());
    frame.extend_from_slice(&header.encode());
    frame.extend_from_slice(&compressed);
    Ok(frame)
}

/// Checks a frame's payload against its (already validated) header and decodes its events.
pub(crate) fn decode_chunk_payload(
    header: &ChunkHeader,
    compressed: &[u8],
) -> Result<Vec<Event>, CodecError> {
    let computed = crc32fast::hash(compressed);
    if computed != header.payload_crc {
        return Err(CodecError::Crc {
            what: "payload",
            stored: header.payload_crc,
            computed,
        });
    }
    let raw = decompress_exact(compressed, header.uncompressed_len.into())?;
    let (count, mut rest) = take_varint(&raw, "event count")?;
    if count != u64::from(header.event_count) {
        return Err(CodecError::CountMismatch {
            declared: header.event_count.into(),
            actual: count,
        });
    }
    // Every event encodes to at least 4 bytes (icount, rip, kind, one byte of fields), so a count
    // the bytes cannot hold reserves no more than the bytes justify.
    let mut events = Vec::with_capacity(count.min(rest.len() as u64 / 4) as usize);
    for index in 0..count {
        check_serial_rx_len(rest, index)?;
        let (event, tail) =
            postcard::take_from_bytes::<Event>(rest).map_err(|source| CodecError::Decode {
                what: "event",
                source,
            })?;
        events.push(event);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes { count: rest.len() });
    }
    Ok(events)
}

/// Refuses an encoded event (at the front of `bytes`) that is a `SerialRx` longer than
/// [`MAX_SERIAL_RX_BYTES`], before postcard decodes it and allocates for its bytes. Anything else,
/// including bytes that do not parse, is left for postcard to decode or reject.
fn check_serial_rx_len(bytes: &[u8], index: u64) -> Result<(), CodecError> {
    /// postcard's variant index of `EventKind::SerialRx` (FORMAT.md).
    const SERIAL_RX: u64 = 0;
    let len = take_varint(bytes, "icount")
        .and_then(|(_, rest)| take_varint(rest, "rip"))
        .and_then(|(_, rest)| take_varint(rest, "event kind"))
        .and_then(|(kind, rest)| match kind {
            SERIAL_RX => take_varint(rest, "byte count").map(|(len, _)| Some(len)),
            _ => Ok(None),
        });
    match len {
        Ok(Some(len)) if len > MAX_SERIAL_RX_BYTES as u64 => {
            Err(CodecError::SerialRxTooLong { index, len })
        }
        _ => Ok(()),
    }
}

/// What a checkpoint of one trace may hold, from its header: see
/// [`Header::max_checkpoint_payload`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckpointLimits {
    /// Pages of guest RAM: page frame numbers are below this.
    pub ram_pages: u64,
    /// Largest uncompressed payload.
    pub max_payload: u64,
    /// Largest opaque state.
    pub max_state: u64,
    /// The trace's format version (checkpoint magics carry it).
    pub version: u32,
}

impl CheckpointLimits {
    /// The limits a header justifies.
    pub fn of(header: &Header) -> CheckpointLimits {
        CheckpointLimits {
            ram_pages: header.ram_pages(),
            max_payload: header.max_checkpoint_payload(),
            max_state: header.max_state_bytes(),
            version: header.format_version,
        }
    }

    /// Largest compressed payload: zstd never grows its input by more than a fraction of a
    /// percent plus a few bytes of framing, so this bound is generous.
    pub fn max_compressed(&self) -> u64 {
        self.max_payload + self.max_payload / 128 + 4096
    }
}

/// The fixed header of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckpointHeader {
    /// CRC-32 of every byte of the file after the CRC field.
    pub crc: u32,
    /// icount of the checkpoint.
    pub icount: u64,
    /// Guest rip at the checkpoint.
    pub rip: u64,
    /// Whether the checkpoint holds all non-zero pages.
    pub full: bool,
    /// The machine's state digest.
    pub digest: [u8; 32],
    /// Length of the zstd payload after the header.
    pub compressed_len: u64,
    /// Length of the postcard bytes inside it.
    pub uncompressed_len: u64,
}

impl CheckpointHeader {
    /// Parses and checks the fixed header: magic, flag, and lengths against the caps `limits`
    /// sets. The CRC can only be checked with the whole file (see [`decode_checkpoint`]).
    pub fn decode(
        h: &[u8; CHECKPOINT_HEADER_LEN],
        limits: &CheckpointLimits,
    ) -> Result<CheckpointHeader, CodecError> {
        let magic = checkpoint_magic(limits.version);
        if h[..8] != magic {
            return Err(CodecError::BadMagic {
                found: h[..8].to_vec(),
                expected: magic.to_vec(),
            });
        }
        let full = match h[28] {
            0 => false,
            1 => true,
            found => return Err(CodecError::BadFlag { found }),
        };
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&h[29..61]);
        let header = CheckpointHeader {
            crc: le_u32(h, 8),
            icount: le_u64(h, 12),
            rip: le_u64(h, 20),
            full,
            digest,
            compressed_len: le_u64(h, 61),
            uncompressed_len: le_u64(h, 69),
        };
        cap(
            "compressed payload length",
            header.compressed_len,
            limits.max_compressed(),
        )?;
        cap(
            "uncompressed payload length (the most this machine's RAM and state can need)",
            header.uncompressed_len,
            limits.max_payload,
        )?;
        Ok(header)
    }

    /// Checks the CRC of `file`, the whole record this header starts.
    pub fn check_crc(&self, file: &[u8]) -> Result<(), CodecError> {
        let computed = crc32fast::hash(file.get(12..).unwrap_or_default());
        if computed != self.crc {
            return Err(CodecError::Crc {
                what: "checkpoint",
                stored: self.crc,
                computed,
            });
        }
        Ok(())
    }
}

/// A page as the checkpoint encoder takes it: `None` stands for an all-zero page, stored as the
/// zero-page marker (an empty byte string); `Some` holds either the page's `PAGE_SIZE` bytes or a
/// [`PAGE_REF_LEN`]-byte reference to identical content stored earlier.
pub(crate) type PageRef<'a> = (u64, Option<&'a [u8]>);

/// Length of a page reference: the xxh3-128 of the page's content, little-endian, standing for a page
/// with that content stored earlier in the same checkpoint or in one since the last full checkpoint.
pub const PAGE_REF_LEN: usize = 16;

/// Builds a whole checkpoint file. `pages` must be sorted by pfn, unique, and each `PAGE_SIZE`
/// long (the writer checks); `uncompressed_len` is what [`checkpoint_payload_len`] returned.
pub(crate) fn encode_checkpoint(
    cp: &Checkpoint,
    pages: &[PageRef<'_>],
    uncompressed_len: u64,
) -> io::Result<Vec<u8>> {
    // Compress straight from the caller's buffers: a full checkpoint can be as large as guest RAM,
    // so the postcard bytes are never assembled in memory, only the compressed result.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    encoder.set_pledged_src_size(Some(uncompressed_len))?;
    let mut varint = Vec::with_capacity(20);
    put_varint(&mut varint, cp.state.len() as u64);
    encoder.write_all(&varint)?;
    encoder.write_all(&cp.state)?;
    varint.clear();
    put_varint(&mut varint, pages.len() as u64);
    encoder.write_all(&varint)?;
    for &(pfn, bytes) in pages {
        let bytes = bytes.unwrap_or(&[]);
        varint.clear();
        put_varint(&mut varint, pfn);
        put_varint(&mut varint, bytes.len() as u64);
        encoder.write_all(&varint)?;
        encoder.write_all(bytes)?;
    }
    let compressed = encoder.finish()?;

    let mut file = Vec::with_capacity(CHECKPOINT_HEADER_LEN + compressed.len());
    file.extend_from_slice(&CHECKPOINT_MAGIC);
    file.extend_from_slice(&[0; 4]); // CRC, filled in below once everything it covers is in place.
    file.extend_from_slice(&cp.at.to_le_bytes());
    file.extend_from_slice(&cp.rip.to_le_bytes());
    file.push(u8::from(cp.full));
    file.extend_from_slice(&cp.digest);
    file.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
    file.extend_from_slice(&uncompressed_len.to_le_bytes());
    file.extend_from_slice(&compressed);
    let crc = crc32fast::hash(&file[12..]);
    file[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(file)
}

/// Length of the postcard encoding of a checkpoint's `(state, pages)` for [`encode_checkpoint`].
pub(crate) fn checkpoint_payload_len(state_len: usize, pages: &[PageRef<'_>]) -> u64 {
    let mut len = varint_len(state_len as u64) + state_len as u64 + varint_len(pages.len() as u64);
    for &(pfn, bytes) in pages {
        let page_len = bytes.map_or(0, <[u8]>::len) as u64;
        len += varint_len(pfn) + varint_len(page_len) + page_len;
    }
    len
}

/// Decodes a whole checkpoint file: header, CRC, payload. Page frame numbers must be below
/// `limits.ram_pages` (guest RAM is one block at physical address 0). Zero-page markers come back
/// as `PAGE_SIZE` zero bytes, so callers never see the marker; page references come back as their
/// [`PAGE_REF_LEN`] bytes, for the reader to resolve against earlier pages.
pub(crate) fn decode_checkpoint(
    file: &[u8],
    limits: &CheckpointLimits,
) -> Result<Checkpoint, CodecError> {
    let ram_pages = limits.ram_pages;
    let fixed: &[u8; CHECKPOINT_HEADER_LEN] = file
        .get(..CHECKPOINT_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(CodecError::Truncated {
            what: "checkpoint header",
            len: CHECKPOINT_HEADER_LEN as u64,
            left: file.len(),
        })?;
    let header = CheckpointHeader::decode(fixed, limits)?;
    header.check_crc(file)?;
    let compressed = &file[CHECKPOINT_HEADER_LEN..];
    if compressed.len() as u64 != header.compressed_len {
        return Err(CodecError::SizeMismatch {
            declared: header.compressed_len,
            actual: compressed.len() as u64,
        });
    }
    let raw = decompress_exact(compressed, header.uncompressed_len)?;

    let (state_len, rest) = take_varint(&raw, "state length")?;
    cap("machine state length", state_len, limits.max_state)?;
    let (state, rest) = take_bytes(rest, state_len, "state")?;
    let (page_count, mut rest) = take_varint(rest, "page count")?;
    // Zero-page markers take three bytes on disk but a whole page once decoded, so the count is
    // bounded by guest RAM, not by the payload: no checkpoint can hold more pages than RAM has.
    cap("page count", page_count, ram_pages)?;
    let mut pages = Vec::with_capacity(page_count.min(rest.len() as u64 / 2) as usize);
    let mut previous = None;
    for _ in 0..page_count {
        let (pfn, tail) = take_varint(rest, "page frame number")?;
        if pfn >= ram_pages || previous.is_some_and(|p| pfn <= p) {
            return Err(CodecError::BadPfn {
                pfn,
                previous,
                ram_pages,
            });
        }
        previous = Some(pfn);
        let (len, tail) = take_varint(tail, "page length")?;
        let (bytes, tail) = match len {
            0 => (vec![0; PAGE_SIZE], tail),
            n if n == PAGE_SIZE as u64 || n == PAGE_REF_LEN as u64 => {
                let (bytes, tail) = take_bytes(tail, n, "page")?;
                (bytes.to_vec(), tail)
            }
            n => return Err(CodecError::PageSize { pfn, len: n }),
        };
        pages.push((pfn, bytes));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes { count: rest.len() });
    }
    Ok(Checkpoint {
        at: header.icount,
        rip: header.rip,
        full: header.full,
        digest: header.digest,
        state: state.to_vec(),
        pages,
    })
}

/// Decompresses `compressed`, which must yield exactly `declared` bytes. Output is read at most
/// one byte past `declared`, so a decompression bomb costs no more than its header admits.
fn decompress_exact(compressed: &[u8], declared: u64) -> Result<Vec<u8>, CodecError> {
    let err = |source| CodecError::Decompress { source };
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(err)?;
    decoder.window_log_max(MAX_ZSTD_WINDOW_LOG).map_err(err)?;
    // Reserve at most the chunk cap up front; a larger (checkpoint) payload grows as it arrives.
    let mut out = Vec::with_capacity(declared.min(MAX_CHUNK_UNCOMPRESSED.into()) as usize);
    decoder
        .take(declared.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(err)?;
    if out.len() as u64 != declared {
        return Err(CodecError::SizeMismatch {
            declared,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

/// Appends `value` as a postcard varint (unsigned LEB128: 7 bits per byte, low bits first, high
/// bit set on every byte but the last). postcard encodes `usize` lengths the same way.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Bytes [`put_varint`] uses for `value`.
fn varint_len(value: u64) -> u64 {
    u64::from((64 - value.leading_zeros()).max(1).div_ceil(7))
}

/// Reads a postcard varint from the front of `bytes`.
fn take_varint<'a>(bytes: &'a [u8], what: &'static str) -> Result<(u64, &'a [u8]), CodecError> {
    postcard::take_from_bytes::<u64>(bytes).map_err(|source| CodecError::Decode { what, source })
}

/// Splits `len` bytes off the front of `bytes`, if there are that many.
fn take_bytes<'a>(
    bytes: &'a [u8],
    len: u64,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), CodecError> {
    match usize::try_from(len) {
        Ok(n) if n <= bytes.len() => Ok(bytes.split_at(n)),
        _ => Err(CodecError::Truncated {
            what,
            len,
            left: bytes.len(),
        }),
    }
}

fn cap(what: &'static str, value: u64, max: u64) -> Result<(), CodecError> {
    if value > max {
        return Err(CodecError::TooLarge { what, value, max });
    }
    Ok(())
}

fn length_u32(len: usize) -> io::Result<u32> {
    u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "chunk payload exceeds 4 GiB"))
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{ClockKind, EventKind};

    #[test]
    fn varints_match_postcard() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut ours = Vec::new();
            put_varint(&mut ours, v);
            assert_eq!(ours, postcard::to_stdvec(&v).unwrap(), "value {v}");
            assert_eq!(varint_len(v), ours.len() as u64, "value {v}");
            assert_eq!(take_varint(&ours, "v").unwrap(), (v, &[][..]));
        }
    }

    #[test]
    fn event_wire_format_is_as_documented() {
        // FORMAT.md: icount varint, rip varint, variant index, fields. Pinned here because
        // reordering enum variants would silently change the format.
        let event = Event {
            at: 300,
            rip: 1,
            kind: EventKind::HostValue {
                insn: crate::format::HostInsn::Rdtscp,
                value: 5,
                aux: 7,
            },
        };
        assert_eq!(
            postcard::to_stdvec(&event).unwrap(),
            [0xac, 0x02, 0x01, 4, 1, 5, 7]
        );
        let stop = Event {
            at: 1,
            rip: 2,
            kind: EventKind::Stop {
                reason: crate::format::StopReason::GuestExit { status: 3 },
            },
        };
        assert_eq!(postcard::to_stdvec(&stop).unwrap(), [1, 2, 5, 0, 3]);
        let rx = Event {
            at: 0,
            rip: 0,
            kind: EventKind::SerialRx {
                bytes: b"hi".to_vec(),
            },
        };
        assert_eq!(postcard::to_stdvec(&rx).unwrap(), [0, 0, 0, 2, b'h', b'i']);
    }

    #[test]
    fn chunk_payload_is_a_postcard_vec_of_events() {
        let events = vec![
            Event {
                at: 5,
                rip: 0x1000,
                kind: EventKind::Irq { line: 0 },
            },
            Event {
                at: 9,
                rip: 0x1004,
                kind: EventKind::Clock {
                    kind: ClockKind::Wall,
                    ns: 77,
                },
            },
        ];
        let mut encoded = Vec::new();
        for e in &events {
            encoded.extend(postcard::to_stdvec(e).unwrap());
        }
        let frame = encode_chunk(10, 2, &encoded).unwrap();
        let header = ChunkHeader::decode(frame[..CHUNK_HEADER_LEN].try_into().unwrap()).unwrap();
        let compressed = &frame[CHUNK_HEADER_LEN..];
        let raw = zstd::bulk::decompress(compressed, 1 << 20).unwrap();
        assert_eq!(raw, postcard::to_stdvec(&events).unwrap());
        assert_eq!(decode_chunk_payload(&header, compressed).unwrap(), events);
    }

    #[test]
    fn checkpoint_payload_is_postcard_of_state_and_pages() {
        let page = vec![7u8; PAGE_SIZE];
        let cp = Checkpoint {
            at: 1,
            rip: 2,
            full: false,
            digest: [3; 32],
            state: vec![1, 2, 3],
            pages: Vec::new(),
        };
        let pages: Vec<PageRef<'_>> = vec![(4, Some(&page[..])), (300, None)];
        let len = checkpoint_payload_len(cp.state.len(), &pages);
        let file = encode_checkpoint(&cp, &pages, len).unwrap();
        let raw = zstd::bulk::decompress(&file[CHECKPOINT_HEADER_LEN..], 1 << 20).unwrap();
        let expected: (Vec<u8>, Vec<(u64, Vec<u8>)>) =
            (cp.state.clone(), vec![(4, page.clone()), (300, Vec::new())]);
        assert_eq!(raw, postcard::to_stdvec(&expected).unwrap());
        assert_eq!(raw.len() as u64, len);
        let back = decode_checkpoint(&file, &limits(301)).unwrap();
        assert!(matches!(
            decode_checkpoint(&file, &limits(300)),
            Err(CodecError::BadPfn { pfn: 300, .. })
        ));
        assert_eq!(back.pages, vec![(4, page), (300, vec![0; PAGE_SIZE])]);

        // Lengths beyond what the machine justifies are refused from the fixed header alone.
        let tight = CheckpointLimits {
            max_payload: len - 1,
            ..limits(301)
        };
        let fixed: &[u8; CHECKPOINT_HEADER_LEN] = file[..CHECKPOINT_HEADER_LEN].try_into().unwrap();
        assert!(matches!(
            CheckpointHeader::decode(fixed, &tight),
            Err(CodecError::TooLarge { .. })
        ));
        let small_state = CheckpointLimits {
            max_state: 2,
            ..limits(301)
        };
        assert!(matches!(
            decode_checkpoint(&file, &small_state),
            Err(CodecError::TooLarge {
                value: 3,
                max: 2,
                ..
            })
        ));
    }

    fn limits(ram_pages: u64) -> CheckpointLimits {
        CheckpointLimits {
            ram_pages,
            max_payload: 1 << 30,
            max_state: 1 << 20,
            version: crate::format::FORMAT_VERSION,
        }
    }

    #[test]
    fn a_long_serial_rx_is_refused_before_it_is_decoded() {
        let rx = |len: usize| Event {
            at: 300,
            rip: 0x1234_5678,
            kind: EventKind::SerialRx {
                bytes: vec![b'x'; len],
            },
        };
        for (len, ok) in [
            (0, true),
            (MAX_SERIAL_RX_BYTES, true),
            (MAX_SERIAL_RX_BYTES + 1, false),
        ] {
            let encoded = postcard::to_stdvec(&rx(len)).unwrap();
            assert_eq!(check_serial_rx_len(&encoded, 0).is_ok(), ok, "length {len}");
        }
        // Only the declared length matters: the bytes need not be there (they are never read).
        let mut lying = postcard::to_stdvec(&rx(0)).unwrap();
        lying.pop();
        lying.extend([0x80, 0x80, 0x80, 0x80, 0x04]); // 2^30
        assert!(matches!(
            check_serial_rx_len(&lying, 7),
            Err(CodecError::SerialRxTooLong {
                index: 7,
                len: 0x4000_0000
            })
        ));
        // Other kinds pass through.
        let irq = Event {
            at: 1,
            rip: 2,
            kind: EventKind::Irq { line: 0xff },
        };
        assert!(check_serial_rx_len(&postcard::to_stdvec(&irq).unwrap(), 0).is_ok());
    }

    #[test]
    fn decompression_stops_past_the_declared_size() {
        let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
        match decompress_exact(&bomb, 100) {
            Err(CodecError::SizeMismatch {
                declared: 100,
                actual: 101,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
