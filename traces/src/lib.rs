//! The Retrovisor trace on disk: a directory holding a JSON header, an append-only event stream in
//! checksummed zstd chunks, checkpoints, and a summary written at a clean end.
//!
//! [`TraceWriter`] produces traces during recording; [`TraceReader`] opens and validates them for
//! replay. Traces are untrusted input: the reader answers a corrupt or hostile trace with a
//! [`ReadError`] naming the file (and chunk) at fault, never a panic or an allocation sized by a
//! length read from disk. A recording cut off by a crash or `kill -9` reads as a valid prefix.
//! `FORMAT.md` in this crate describes the bytes precisely.

#![warn(missing_docs)]

mod codec;
mod disks;
mod files;
mod format;
mod reader;
mod rules;
mod waypoints;
mod writer;

pub use codec::CodecError;
pub use files::{host_memory, open_regular, read_regular_file};
pub use format::*;
pub use reader::{
    ChainCursor, ChainError, CheckpointInfo, ReadError, RestorePoint, TornTail, TraceReader,
};
pub use rules::EventError;
pub use waypoints::{Waypoint, WaypointError};
pub use writer::{TraceWriter, WriteError};
