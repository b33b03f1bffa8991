//! Keeping the gdb session when the replay fails under it: a divergence from the recording, or a trace file
//! that cannot be read, ends the command that met it instead of the session. The replay goes back to a
//! position it reached intact, and the user is told what failed and where they are.

use replayer::search::{self, SearchError};
use replayer::{Position, Timeline};
use std::io::Write;

/// Which way the command that failed was moving: where it is best to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Motion {
    /// Running or stepping forward: the last position replayed intact, just before the failure.
    Forward,
    /// Running or stepping backward: where the command started, since the failure lies behind it and the
    /// positions in between were searched.
    Backward,
    /// `monitor seek`: as near the target as the replay got intact.
    Seek,
}

/// After `error` ended a command that started at position `started`, moves the replay to a position it
/// reached intact and returns the lines that tell the user (each ending in a newline). Err with `error`
/// if no such position can be reached again: then the replay cannot go on.
pub(crate) fn recover(
    t: &mut Timeline,
    error: SearchError,
    motion: Motion,
    started: Position,
    out: &mut dyn Write,
) -> Result<String, SearchError> {
    let last = t.replay().last_intact();
    let target = match motion {
        Motion::Forward if last >= started => last,
        Motion::Seek => last,
        Motion::Forward | Motion::Backward => started,
    };
    // Where the command started was reached once already, so it is the fallback.
    let reached = [target, started]
        .into_iter()
        .find(|&p| search::seek(t, p, out).is_ok() && t.position() == p);
    let Some(at) = reached else {
        return Err(error);
    };
    let here = t.replay().show(at);
    let whereabouts = match motion {
        Motion::Forward if at == target => format!(
            "stopped at {here}, the last position the replay reached intact; it cannot run on past the \
             failure, and everything before it can be examined and replayed"
        ),
        Motion::Seek if at == target && at != started => {
            format!("now at {here}, the last position replayed intact on the way there")
        }
        // Where the command started, the one other place it can be.
        _ => format!(
            "still at {here}, where the command started; the replay cannot {} past the failure",
            if motion == Motion::Backward {
                "run backward"
            } else {
                "get"
            }
        ),
    };
    eprintln!("retrovisor: gdb: {error}; {whereabouts}");
    Ok(format!("retrovisor: {error}\nretrovisor: {whereabouts}\n"))
}
