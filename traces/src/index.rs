//! `index.zst`: the instruction counts of a landmark trace, learned by one stepped replay.
//!
//! A landmark trace names positions by landmarks (exits the guest caused). A replay with the step clock
//! finds every one of them and counts instructions on the way; the index keeps what it counted: the icount
//! at which each event applied, at which each checkpoint was taken, and at which the recording ends. With
//! it, a landmark trace offers the same positions as a step trace (what gdb's reverse execution needs),
//! without stepping from boot again. It is derived data: deleting it loses nothing.
//!
//! ```text
//! offset 0   magic, ASCII "RVTIDX01"
//! offset 8   zstd of the postcard encoding of (events: Vec<u64>, checkpoints: Vec<u64>, end: u64)
//! ```
//! A reader checks that it has exactly one icount per event and per checkpoint of the trace, that they
//! never decrease, and that none lies past `end`.

use crate::files::read_regular_file;
use crate::reader::{ReadError, TraceReader};
use crate::writer::{write_atomic, WriteError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Name of the index file inside a trace directory.
pub const INDEX_FILE: &str = "index.zst";
/// Magic at the start of the index file.
const INDEX_MAGIC: [u8; 8] = *b"RVTIDX01";

/// The instruction counts of a landmark trace's positions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Index {
    /// The icount at which each event applied, in event order.
    pub events: Vec<u64>,
    /// The icount of each checkpoint, in checkpoint order.
    pub checkpoints: Vec<u64>,
    /// The icount at which the recording ends.
    pub end: u64,
}

impl Index {
    /// Writes the index into the trace directory `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<(), WriteError> {
        let payload = postcard::to_allocvec(self).map_err(|e| WriteError::Io {
            action: "encode",
            path: dir.join(INDEX_FILE),
            source: std::io::Error::other(e),
        })?;
        let compressed = zstd::bulk::compress(&payload, 3).map_err(|source| WriteError::Io {
            action: "compress",
            path: dir.join(INDEX_FILE),
            source,
        })?;
        let mut file = INDEX_MAGIC.to_vec();
        file.extend_from_slice(&compressed);
        write_atomic(&dir.join(INDEX_FILE), &file)
    }

    /// Reads the index of `trace`, if it has one, and checks that it fits the trace.
    pub fn read(trace: &TraceReader) -> Result<Option<Index>, ReadError> {
        let path = trace.dir().join(INDEX_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bad = |reason: String| ReadError::Inconsistent {
            path: path.clone(),
            reason,
        };
        // Eight bytes per icount and a little framing: anything larger is not this trace's index.
        let expected = (trace.events().len() + trace.checkpoints().len() + 1) as u64;
        let bytes =
            read_regular_file(&path, 64 + 10 * expected).map_err(|source| ReadError::Io {
                path: path.clone(),
                source,
            })?;
        if !bytes.starts_with(&INDEX_MAGIC) {
            return Err(bad("not a retrovisor index (bad magic)".into()));
        }
        let payload = zstd::bulk::decompress(&bytes[8..], (10 * expected + 64) as usize)
            .map_err(|e| bad(format!("does not decompress: {e}")))?;
        let index: Index =
            postcard::from_bytes(&payload).map_err(|e| bad(format!("does not decode: {e}")))?;
        if index.events.len() != trace.events().len()
            || index.checkpoints.len() != trace.checkpoints().len()
        {
            return Err(bad(format!(
                "it maps {} events and {} checkpoints, but the trace has {} and {} (delete it and run \
                 `retrovisor index` again)",
                index.events.len(),
                index.checkpoints.len(),
                trace.events().len(),
                trace.checkpoints().len()
            )));
        }
        let ordered =
            |v: &[u64]| v.windows(2).all(|w| w[0] <= w[1]) && v.iter().all(|&i| i <= index.end);
        if !ordered(&index.events) || !ordered(&index.checkpoints) {
            return Err(bad("its instruction counts are out of order".into()));
        }
        Ok(Some(index))
    }
}
