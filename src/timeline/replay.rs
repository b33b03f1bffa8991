//! Replays a trace to learn what only a replay knows: where the guest printed each line of output, and
//! whether (and where) the replay diverged from the recording.

use replayer::{Halt, Position, ReplayError, Replayer};
use std::path::Path;

/// A line the guest printed, and the position at which its last byte had been written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Position (in the trace's unit) when the line was complete (for a last line without a newline,
    /// when its last byte was written).
    pub position: u64,
    /// The line without its newline, as lossy UTF-8.
    pub text: String,
}

/// How the replay went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It ran from boot to the clean end and every check passed, the whole output's hash included.
    Matched,
    /// It ran to where a cut-off recording stops; there is no recorded output hash to compare with.
    CutOff,
    /// It diverged here, for this reason.
    Diverged {
        /// Position where the divergence was noticed.
        position: u64,
        /// The replayer's message.
        message: String,
    },
    /// It could not run or stopped on an error other than a divergence (say, the guest image is missing).
    Failed(String),
    /// It was not attempted (`--no-replay`).
    Skipped,
}

/// What the replay found.
pub struct Replayed {
    /// Every output line, in order (a last line without a newline included).
    pub lines: Vec<OutputLine>,
    /// How it went.
    pub verdict: Verdict,
    /// Problems the replay worked around (a corrupt checkpoint), for the user.
    pub notices: Vec<String>,
}

/// Replays the trace in `dir` from boot, one position at a time, noting where output lines end.
pub fn replay(dir: &Path, image: Option<&Path>) -> Replayed {
    let mut found = Replayed {
        lines: Vec::new(),
        verdict: Verdict::Skipped,
        notices: Vec::new(),
    };
    let mut r = match Replayer::open(dir, image) {
        Ok(r) => r,
        Err(e) => {
            found.verdict = Verdict::Failed(e.to_string());
            return found;
        }
    };
    let mut written = Vec::new();
    let mut line = Vec::new();
    // Where the last byte of output was written: a last line without a newline ends there.
    let mut last_byte_at = 0;
    found.verdict = loop {
        // One position per call, so that each byte of output is placed where it was written.
        let halt = r.run_to(Position::at(r.position().count() + 1), &mut written);
        let position = r.position().count();
        if !written.is_empty() {
            last_byte_at = position;
        }
        for byte in written.drain(..) {
            if byte == b'\n' {
                found.lines.push(OutputLine {
                    position,
                    text: String::from_utf8_lossy(&line).into_owned(),
                });
                line.clear();
            } else {
                line.push(byte);
            }
        }
        match halt {
            Ok(Halt::Target) => continue,
            Ok(Halt::End(Some(_))) => break Verdict::Matched,
            Ok(Halt::End(None)) => break Verdict::CutOff,
            Err(ReplayError::Divergence(d)) => {
                break Verdict::Diverged {
                    position: d.at.count(),
                    message: d.to_string(),
                }
            }
            Err(e) => break Verdict::Failed(e.to_string()),
        }
    };
    if !line.is_empty() {
        found.lines.push(OutputLine {
            position: last_byte_at,
            text: String::from_utf8_lossy(&line).into_owned(),
        });
    }
    found.notices = r.take_notices();
    found
}
