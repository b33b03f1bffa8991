//! Checking a trace without running its guest (`retrovisor info --verify`): everything a replay
//! checks before it runs, done by the same code, and every checkpoint restored into the recorded
//! machine, as a replay starting from it would, with what it stores held to the digest it records.

use std::path::{Path, PathBuf};

use machine::{Machine, MachineError};
use thiserror::Error;
use traces::{ReadError, TraceReader};

use crate::{build_machine, load_image, ReplayError};

/// A problem [`verify`] found: what a replay of the trace would stop on, before it runs or when it
/// starts from a checkpoint. Each names the file at fault.
#[derive(Debug, Error)]
pub enum Problem {
    /// A file of the trace cannot be read or is corrupt (the error names it).
    #[error(transparent)]
    Trace(#[from] ReadError),
    /// The guest image is missing, unreadable or not the one recorded (the error names it).
    #[error(transparent)]
    Image(ReplayError),
    /// The header describes a machine this retrovisor does not build.
    #[error("{}: {source}", path.display())]
    Machine {
        /// The header file.
        path: PathBuf,
        /// Why the machine cannot be built.
        source: ReplayError,
    },
    /// A checkpoint whose state the machine does not take.
    #[error("{}: this checkpoint cannot be restored: {source}", path.display())]
    Restore {
        /// The checkpoint file.
        path: PathBuf,
        /// What the machine refused.
        source: MachineError,
    },
    /// A checkpoint whose state and memory do not hash to the digest it records.
    #[error("{}: what this checkpoint stores (its CPU and device state, and the memory restoring it gives) does not hash to the digest it records: the file was damaged, altered or written wrong, and a replay from it would diverge at once", path.display())]
    Digest {
        /// The checkpoint file.
        path: PathBuf,
    },
}

/// Checks the trace `trace` holds, with the guest image `image` (default: the path its header
/// names): the image against the header's hash, every checkpoint and disk copy read in full
/// ([`TraceReader::verify`]), the recorded machine built as replay builds it, and every checkpoint
/// restored into that machine, its stored state and memory hashed and compared with the digest it
/// records. Returns every problem found; none means a replay has nothing to refuse. An error is
/// returned only when the check itself cannot run (no KVM to build the machine with).
pub fn verify(trace: &mut TraceReader, image: Option<&Path>) -> Result<Vec<Problem>, ReplayError> {
    let mut problems = Vec::new();
    // Checkpoint pages of a trace with `page_backing` may refer to blocks of the image.
    let image = match load_image(trace, image) {
        Ok(bytes) => {
            trace.set_image(bytes.clone());
            Some(bytes)
        }
        Err(e) => {
            problems.push(Problem::Image(e));
            None
        }
    };
    problems.extend(trace.verify().into_iter().map(Problem::Trace));
    if trace.checkpoints().is_empty() {
        // A recording cut off before its first checkpoint: replay has nowhere to start.
        problems.push(Problem::Trace(ReadError::NoCheckpoints {
            dir: trace.dir().to_owned(),
        }));
    }
    let Some(image) = image else {
        return Ok(problems);
    };
    let mut machine = match build_machine(trace, &image) {
        Ok(machine) => machine,
        Err(e @ ReplayError::Machine(MachineError::NoKvm(_))) => return Err(e),
        // A damaged disk or initrd copy: listed by the trace's own check above.
        Err(ReplayError::Trace(_)) => return Ok(problems),
        Err(source) => {
            problems.push(Problem::Machine {
                path: trace.dir().join(traces::HEADER_FILE),
                source,
            });
            return Ok(problems);
        }
    };
    restore_each(trace, &mut machine, &mut problems);
    Ok(problems)
}

/// Restores every checkpoint of `trace` into `machine` in order (the memory of a full one whole, of
/// an incremental one the pages it stores, over the checkpoint before it) and compares the digest
/// of what it stores with the one it records. Checkpoints that cannot be read were listed by
/// [`TraceReader::verify`]: they, and those building on them, are passed over.
fn restore_each(trace: &TraceReader, machine: &mut Machine, problems: &mut Vec<Problem>) {
    let mut cursor = trace.chain_cursor(0);
    while cursor.next() < trace.checkpoints().len() {
        let path = trace.checkpoints()[cursor.next()].path.clone();
        let Ok(cp) = trace.read_next(&mut cursor) else {
            continue;
        };
        let mut pages = cp.pages.iter().map(|(pfn, data)| (*pfn, data.as_slice()));
        let restored = if cp.full {
            machine.restore(&cp.state, pages)
        } else {
            pages
                .try_for_each(|(pfn, data)| machine.restore_page(pfn, Some(data)))
                .and_then(|()| machine.restore_state(&cp.state))
        };
        // Memory is restored even when the state is refused, so later checkpoints are checked.
        match restored.and_then(|()| machine.digest_with_state(&cp.state)) {
            Ok(digest) if digest == cp.digest => {}
            Ok(_) => problems.push(Problem::Digest { path }),
            Err(source) => problems.push(Problem::Restore { path, source }),
        }
    }
}
