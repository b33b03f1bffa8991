//! Breakpoint- and watchpoint-aware execution over a [`Timeline`], forward and backward.
//!
//! A *position* ([`Position`]) is the machine state at an instruction boundary, before the next
//! instruction runs: instructions since boot (step traces), or a landmark and the instructions since it.
//! - A breakpoint at address A is hit at a position whose RIP is A (checked before the instruction runs;
//!   breakpoints are never written into guest memory).
//! - A watchpoint is hit by the instruction that accesses the watched bytes. Writes are found by comparing the
//!   watched bytes before and after each step, so a device (DMA) write applied in that step counts too; reads
//!   are found by decoding the instruction about to run and computing its memory operands from the registers.
//!   Going forward the stop is right after the accessing instruction; going backward it is right before it
//!   (the state the access is about to change), which is where gdb expects a reverse watchpoint stop and
//!   where it shows the source line that did the access.
//!
//! Backward execution only uses [`Timeline::seek`] and [`Timeline::step`]: a reverse continue scans the
//! intervals between restore points (in-memory snapshots and trace checkpoints, see
//! [`Timeline::restore_point_before`]) before the current position one by one, latest first, running each
//! forward and keeping the last hit; so the denser the restore points near the position, the shorter the scans.
//!
//! Caveat of the step clock on this host (see PLATFORM.md): the step that delivers an interrupt also runs the
//! handler's first instruction, and `iretq` runs together with the instruction after it. Those pairs are one
//! position apart; the address of the second instruction of each pair is never a position's RIP, so a breakpoint
//! there is not hit, and read watchpoints in those steps look at the instruction that was at RIP before the step.

use super::Timeline;
use crate::{Halt, ReplayError};
use iced_x86::{Instruction, InstructionInfoFactory, OpAccess, Register};
use machine::{Machine, DEBUG_REGISTERS};
use std::collections::BTreeSet;
use std::io::Write;
use thiserror::Error;
use vocab::{Position, Shown};

/// How many steps run between two calls of the interrupt callback: rare enough to cost nothing next to a
/// KVM single-step, frequent enough that Ctrl-C answers within a few tens of milliseconds.
const POLL_EVERY: u64 = 2048;
/// How often free runs call the interrupt callback.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Errors from breakpoint-aware execution.
#[derive(Debug, Error)]
pub enum SearchError {
    /// The replay itself failed (divergence, machine or trace error).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// A seek stopped before the position it was asked for: the recording ended earlier than it claims.
    #[error("replay cannot reach {target}: it stops at {reached}")]
    Unreachable {
        /// The position asked for.
        target: Shown,
        /// Where the replay stopped.
        reached: Shown,
    },
}

/// Which accesses a watchpoint catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Writes that change the watched bytes (gdb `watch`).
    Write,
    /// Reads (gdb `rwatch`).
    Read,
    /// Reads and changing writes (gdb `awatch`).
    Any,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::Any)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::Any)
    }
}

/// A watched range of guest-linear addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// First watched byte.
    pub addr: u64,
    /// Number of watched bytes (all of them are compared at every step: keep it small).
    pub len: u64,
    /// Which accesses stop.
    pub access: Access,
}

impl Watch {
    fn overlaps(&self, addr: u64, len: u64) -> bool {
        addr < self.addr.saturating_add(self.len) && self.addr < addr.saturating_add(len)
    }
}

/// Where execution stops: breakpoint addresses and watched ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopSet {
    /// Addresses compared with RIP before each instruction.
    pub breakpoints: BTreeSet<u64>,
    /// Watched ranges.
    pub watches: Vec<Watch>,
}

impl StopSet {
    /// Whether nothing can ever stop a run.
    pub fn is_empty(&self) -> bool {
        self.breakpoints.is_empty() && self.watches.is_empty()
    }

    fn has_read_watches(&self) -> bool {
        self.watches.iter().any(|w| w.access.reads())
    }
}

/// What stopped a run at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// RIP is at this breakpoint address.
    Breakpoint(u64),
    /// The instruction next to this position (the one just run going forward, the one about to run going
    /// backward) accessed this watched range.
    Watch(Watch),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on a breakpoint or watchpoint.
    Hit(Hit),
    /// Did what was asked: one instruction, or left the address range of a range step.
    Done,
    /// At the end of the recording: nothing more to run forward.
    End,
    /// At the start of the recording: nothing more to run backward.
    Begin,
    /// The interrupt callback asked to stop. Forward runs stop where they are; backward runs stop at a
    /// position from which no stop lies between it and where the run began, so a repeated request is exact.
    Interrupted,
}

/// The watched bytes of every write-catching watchpoint (None where not mapped).
fn watched_bytes(m: &Machine, stops: &StopSet) -> Vec<Option<Vec<u8>>> {
    stops
        .watches
        .iter()
        .map(|w| {
            if !w.access.writes() {
                return None;
            }
            let mut buf = vec![0u8; w.len as usize];
            m.read_virtual(w.addr, &mut buf).ok().map(|_| buf)
        })
        .collect()
}

/// The first write-catching watchpoint whose bytes changed.
fn changed(
    stops: &StopSet,
    before: &[Option<Vec<u8>>],
    after: &[Option<Vec<u8>>],
) -> Option<Watch> {
    stops
        .watches
        .iter()
        .zip(before.iter().zip(after))
        .find(|(_, (b, a))| matches!((b, a), (Some(b), Some(a)) if b != a))
        .map(|(w, _)| *w)
}

/// The value of a register iced asks for when computing a memory operand's address.
fn register_value(m: &Machine, insn: &Instruction, reg: Register) -> Option<u64> {
    let (t, s) = (m.regs(), m.sregs());
    let value = match reg.full_register() {
        Register::RAX => t.rax,
        Register::RCX => t.rcx,
        Register::RDX => t.rdx,
        Register::RBX => t.rbx,
        Register::RSP => t.rsp,
        Register::RBP => t.rbp,
        Register::RSI => t.rsi,
        Register::RDI => t.rdi,
        Register::R8 => t.r8,
        Register::R9 => t.r9,
        Register::R10 => t.r10,
        Register::R11 => t.r11,
        Register::R12 => t.r12,
        Register::R13 => t.r13,
        Register::R14 => t.r14,
        Register::R15 => t.r15,
        Register::RIP => insn.next_ip(),
        Register::ES => s.es.base,
        Register::CS => s.cs.base,
        Register::SS => s.ss.base,
        Register::DS => s.ds.base,
        Register::FS => s.fs.base,
        Register::GS => s.gs.base,
        _ => return None,
    };
    Some(match reg.size() {
        1 => value & 0xff,
        2 => value & 0xffff,
        4 => value & 0xffff_ffff,
        _ => value,
    })
}

/// The first read-catching watchpoint that the instruction at RIP reads.
fn read_hit(m: &Machine, stops: &StopSet, info: &mut InstructionInfoFactory) -> Option<Watch> {
    if !stops.has_read_watches() {
        return None;
    }
    let insn = m.decode_at(m.rip())?;
    let used = info.info(&insn).used_memory().to_vec();
    used.iter()
        .filter(|u| {
            matches!(
                u.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            )
        })
        .find_map(|u| {
            let addr = u.virtual_address(0, |reg, _, _| register_value(m, &insn, reg))?;
            let len = u.memory_size().size().max(1) as u64;
            stops
                .watches
                .iter()
                .find(|w| w.access.reads() && w.overlaps(addr, len))
                .copied()
        })
}

/// One instruction executed with its accesses checked.
struct Checked {
    /// Whether an instruction ran (false: the recording ended here).
    advanced: bool,
    /// The watchpoint the instruction accessed.
    watch: Option<Watch>,
}

/// What a forward step ends a run with, if anything: the end of the recording, the watchpoint the
/// instruction accessed, or a breakpoint where it left RIP.
fn step_outcome(t: &Timeline, stops: &StopSet, step: Checked) -> Option<Outcome> {
    if !step.advanced {
        return Some(Outcome::End);
    }
    if let Some(w) = step.watch {
        return Some(Outcome::Hit(Hit::Watch(w)));
    }
    let rip = t.replay().machine().rip();
    stops
        .breakpoints
        .contains(&rip)
        .then_some(Outcome::Hit(Hit::Breakpoint(rip)))
}

/// Runs the instruction at the current position, checking it against the watchpoints.
fn step_checked(
    t: &mut Timeline,
    stops: &StopSet,
    info: &mut InstructionInfoFactory,
    out: &mut dyn Write,
) -> Result<Checked, SearchError> {
    let start = t.position();
    if start >= t.replay().end() {
        return Ok(Checked {
            advanced: false,
            watch: None,
        });
    }
    let read = read_hit(t.replay().machine(), stops, info);
    let before = watched_bytes(t.replay().machine(), stops);
    t.step(out)?;
    let after = watched_bytes(t.replay().machine(), stops);
    Ok(Checked {
        advanced: t.position() > start,
        watch: read.or_else(|| changed(stops, &before, &after)),
    })
}

/// Moves to exactly `target`, which must lie within the recording.
pub(super) fn seek_exact(
    t: &mut Timeline,
    target: Position,
    out: &mut dyn Write,
) -> Result<(), SearchError> {
    t.seek(target, out)?;
    if t.position() != target {
        return Err(SearchError::Unreachable {
            target: t.replay().show(target),
            reached: t.replay().show(t.position()),
        });
    }
    Ok(())
}

/// Executes one instruction forward: [`Outcome::Hit`] if it accessed a watchpoint, [`Outcome::End`] if the
/// recording ends here, else [`Outcome::Done`]. (A breakpoint at the new position is not a hit: like a
/// hardware single-step, the stop is the step's.)
pub fn step_forward(
    t: &mut Timeline,
    stops: &StopSet,
    out: &mut dyn Write,
) -> Result<Outcome, SearchError> {
    let mut info = InstructionInfoFactory::new();
    let step = step_checked(t, stops, &mut info, out)?;
    Ok(match step {
        Checked {
            advanced: false, ..
        } => Outcome::End,
        Checked { watch: Some(w), .. } => Outcome::Hit(Hit::Watch(w)),
        Checked { .. } => Outcome::Done,
    })
}

/// Runs forward until a breakpoint or watchpoint is hit, the end of the recording, or (with `range`) RIP
/// leaves `range` ([`Outcome::Done`]). The current position's own breakpoint does not stop the run: it is
/// where the run resumes from. `interrupted` is asked every few thousand steps whether to stop.
pub fn run_forward(
    t: &mut Timeline,
    stops: &StopSet,
    range: Option<std::ops::Range<u64>>,
    out: &mut dyn Write,
    interrupted: &mut dyn FnMut() -> bool,
) -> Result<Outcome, SearchError> {
    if range.is_none() {
        if let Some(hw) = hardware_stops(t, stops) {
            return run_forward_free(t, stops, &hw, out, interrupted);
        }
    }
    let mut info = InstructionInfoFactory::new();
    let mut steps = 0u64;
    loop {
        let step = step_checked(t, stops, &mut info, out)?;
        if let Some(outcome) = step_outcome(t, stops, step) {
            return Ok(outcome);
        }
        let rip = t.replay().machine().rip();
        if range.as_ref().is_some_and(|range| !range.contains(&rip)) {
            return Ok(Outcome::Done);
        }
        steps += 1;
        if steps.is_multiple_of(POLL_EVERY) && interrupted() {
            return Ok(Outcome::Interrupted);
        }
    }
}

/// The breakpoints as debug registers can watch them while the landmark clock runs free, if a free run can
/// serve these stops: stepping within the landmarks of a landmark trace, no read watchpoints (a free run
/// sees no reads), and no more breakpoints than the debug registers a kick search leaves. Write watchpoints
/// are not given to debug registers: PVM never reports a data breakpoint (a probe writing to a watched
/// address ran on unstopped), so a free run compares the watched bytes at every landmark instead.
fn hardware_stops(t: &Timeline, stops: &StopSet) -> Option<Vec<u64>> {
    let fits = t.replay().steps_within_landmarks()
        && !stops.has_read_watches()
        && stops.breakpoints.len() < DEBUG_REGISTERS;
    fits.then(|| stops.breakpoints.iter().copied().collect())
}

/// [`run_forward`] at free-run speed: the landmark clock runs with the breakpoints in the debug registers,
/// comparing the watched bytes at every landmark; only the stretch from the last landmark to a stop is
/// single-stepped, to find its exact position.
fn run_forward_free(
    t: &mut Timeline,
    stops: &StopSet,
    hw: &[u64],
    out: &mut dyn Write,
    interrupted: &mut dyn FnMut() -> bool,
) -> Result<Outcome, SearchError> {
    // The first instruction is stepped: the current position's own breakpoint does not stop the run, and
    // on PVM a breakpoint armed where the guest stands would fire at once.
    let mut info = InstructionInfoFactory::new();
    let step = step_checked(t, stops, &mut info, out)?;
    if let Some(outcome) = step_outcome(t, stops, step) {
        return Ok(outcome);
    }
    // Where the watched bytes were last seen, and what they were.
    let (mut from, mut before) = (t.position(), watched_bytes(t.replay().machine(), stops));
    let free_from = from;
    let mut last_poll = std::time::Instant::now();
    loop {
        if t.position() >= t.replay().end() {
            return Ok(Outcome::End);
        }
        let fired = t.run_free_with(hw, out)?;
        let after = watched_bytes(t.replay().machine(), stops);
        if changed(stops, &before, &after).is_some() {
            // Written since `from` (by an instruction, or by a device's DMA): step there to the write.
            seek_exact(t, from, out)?;
            loop {
                let step = step_checked(t, stops, &mut info, out)?;
                if let Some(w) = step.watch {
                    return Ok(Outcome::Hit(Hit::Watch(w)));
                }
                if !step.advanced {
                    return Ok(Outcome::End);
                }
            }
        }
        if let Some(i) = fired {
            t.locate(out)?;
            // No breakpoint fired from where the free run began to here: later searches need not look.
            t.note_clear(hw, free_from, t.position());
            return Ok(Outcome::Hit(Hit::Breakpoint(hw[i])));
        }
        (from, before) = (t.position(), after);
        if last_poll.elapsed() >= POLL_INTERVAL {
            last_poll = std::time::Instant::now();
            if interrupted() {
                return Ok(Outcome::Interrupted);
            }
        }
    }
}

/// Moves one instruction backward: [`Outcome::Begin`] at the start, [`Outcome::Hit`] if the instruction
/// stepped back over accessed a watchpoint, else [`Outcome::Done`].
pub fn step_backward(
    t: &mut Timeline,
    stops: &StopSet,
    out: &mut dyn Write,
) -> Result<Outcome, SearchError> {
    let now = t.position();
    if now == Position::START {
        return Ok(Outcome::Begin);
    }
    let after = watched_bytes(t.replay().machine(), stops);
    let previous = t.previous(now, out)?;
    seek_exact(t, previous, out)?;
    let before = watched_bytes(t.replay().machine(), stops);
    let mut info = InstructionInfoFactory::new();
    let watch = read_hit(t.replay().machine(), stops, &mut info)
        .or_else(|| changed(stops, &before, &after));
    Ok(watch.map_or(Outcome::Done, |w| Outcome::Hit(Hit::Watch(w))))
}

/// The start of the interval of positions that a backward search scans before position `before` (past the start): the
/// last restore point (in-memory snapshot or trace checkpoint) strictly before it.
fn interval_start(t: &Timeline, before: Position) -> Position {
    t.restore_point_before(before.just_before())
}

/// Result of scanning one interval forward.
enum Scan {
    /// The last hit in the interval: its position and what it was.
    Found(Position, Hit),
    /// No hit in the interval.
    Nothing,
    /// The interrupt callback asked to stop.
    Interrupted,
}

/// Scans positions `from..to` (forward from `from`) and returns the last one that hits, with backward
/// semantics: a breakpoint at the position's RIP, or a watchpoint accessed by the instruction run from it.
fn scan(
    t: &mut Timeline,
    stops: &StopSet,
    (from, to): (Position, Position),
    out: &mut dyn Write,
    poll: &mut Poll<'_>,
) -> Result<Scan, SearchError> {
    let mut info = InstructionInfoFactory::new();
    seek_exact(t, from, out)?;
    let mut last = None;
    while t.position() < to {
        let position = t.position();
        let rip = t.replay().machine().rip();
        let step = step_checked(t, stops, &mut info, out)?;
        if let Some(w) = step.watch {
            last = Some((position, Hit::Watch(w)));
        } else if stops.breakpoints.contains(&rip) {
            last = Some((position, Hit::Breakpoint(rip)));
        }
        if !step.advanced {
            break;
        }
        if poll.due() {
            return Ok(Scan::Interrupted);
        }
    }
    Ok(last.map_or(Scan::Nothing, |(p, hit)| Scan::Found(p, hit)))
}

/// [`scan`] at free-run speed: the landmark clock runs through the interval with the breakpoints in the
/// debug registers, noting every breakpoint stop and every stretch between two landmarks that wrote a
/// watched page (by KVM's dirty log, so a value changed and changed back is not missed) or changed the
/// watched bytes; then only those stretches, latest first, and the interval's last stretch up to `to`,
/// are single-stepped (by [`scan`]) to find the last hit.
fn scan_free(
    t: &mut Timeline,
    stops: &StopSet,
    hw: &[u64],
    (from, to): (Position, Position),
    out: &mut dyn Write,
    poll: &mut Poll<'_>,
) -> Result<Scan, SearchError> {
    let to_landmark = Position::at(to.count());
    seek_exact(t, from, out)?;
    let pages = watched_page_list(t.replay().machine(), stops);
    t.wrote_since_probe(&pages)?;
    // The last breakpoint stop seen, and the stretches [start, end) that may hold a watch hit.
    let mut breakpoint = None;
    let mut candidates = Vec::new();
    let mut info = InstructionInfoFactory::new();
    let (mut start, mut before) = (t.position(), watched_bytes(t.replay().machine(), stops));
    while t.position() < to_landmark {
        // A breakpoint at the very position the run resumes from would fire at once: step over it first.
        if stops.breakpoints.contains(&t.replay().machine().rip()) {
            breakpoint = Some((t.position(), t.replay().machine().rip()));
            let step = step_checked(t, stops, &mut info, out)?;
            if !step.advanced {
                break;
            }
        }
        let fired = t.run_free_with(hw, out)?;
        if let Some(i) = fired {
            t.locate(out)?;
            if t.position() < to {
                breakpoint = Some((t.position(), hw[i]));
            }
        }
        let after = watched_bytes(t.replay().machine(), stops);
        if t.wrote_since_probe(&pages)? || changed(stops, &before, &after).is_some() {
            candidates.push((start, t.position().min(to)));
        }
        (start, before) = (t.position(), after);
        if t.position() >= t.replay().end() {
            break;
        }
        if poll.due_now() {
            return Ok(Scan::Interrupted);
        }
    }
    // The interval's last landmark stretch, up to `to`, stepped.
    if t.position() < to {
        if let found @ (Scan::Found(..) | Scan::Interrupted) =
            scan(t, stops, (t.position(), to), out, poll)?
        {
            return Ok(found);
        }
    }
    // Stretches that may hold a watch hit, latest first, down to the last breakpoint stop.
    for &(start, end) in candidates.iter().rev() {
        if breakpoint.is_some_and(|(at, _)| at >= end) {
            break;
        }
        if let found @ (Scan::Found(..) | Scan::Interrupted) =
            scan(t, stops, (start, end), out, poll)?
        {
            return Ok(found);
        }
    }
    Ok(breakpoint.map_or(Scan::Nothing, |(at, rip)| {
        Scan::Found(at, Hit::Breakpoint(rip))
    }))
}

/// [`watched_pages`] as a list (empty when a page is unmapped: then values are compared alone).
fn watched_page_list(m: &Machine, stops: &StopSet) -> Vec<u64> {
    watched_pages(m, stops).map_or_else(Vec::new, |p| p.into_iter().collect())
}

/// One change of watched bytes (see [`history`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The position just before the instruction that made it.
    pub position: Position,
    /// That instruction's address.
    pub rip: u64,
    /// The bytes before.
    pub old: Vec<u8>,
    /// The bytes after.
    pub new: Vec<u8>,
}

/// How a search that lists what it finds over the whole recording ([`history`], `calls`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingEnd {
    /// The whole recording was searched.
    Complete,
    /// The limit was reached: there may be more after the last one listed.
    Limit,
    /// The interrupt callback asked to stop.
    Interrupted,
}

/// Every change of the `len` bytes at guest-virtual `addr` over the whole recording, oldest first, at most
/// `limit`; the replay is left where it was. Checkpoint intervals whose checkpoints list none of the
/// watched pages as written are skipped without replaying; the others run free (landmark traces) with
/// the dirty log read at every landmark, and only the stretches between landmarks that wrote a watched
/// page are single-stepped. Writes that leave the value as it was are not changes. With more than one
/// worker ([`Timeline::set_workers`]), the intervals are scanned at once, each worker a replay of its
/// own on its own core, and the answer is the same.
pub fn history(
    t: &mut Timeline,
    (addr, len): (u64, u64),
    limit: usize,
    out: &mut dyn Write,
    interrupted: &mut dyn FnMut() -> bool,
) -> Result<(Vec<Change>, ListingEnd), SearchError> {
    let here = t.position();
    let stops = StopSet {
        breakpoints: BTreeSet::new(),
        watches: vec![Watch {
            addr,
            len,
            access: Access::Write,
        }],
    };
    let pages = watched_page_list(t.replay().machine(), &stops);
    let mut bounds = t.replay().checkpoint_positions().to_vec();
    bounds.push(t.replay().end());
    let intervals: Vec<(Position, Position)> = bounds
        .windows(2)
        .map(|pair| (pair[0], pair[1]))
        .filter(|&(from, to)| {
            pages.is_empty()
                || !t
                    .pages_written(from, to)
                    .is_some_and(|written| pages.iter().all(|p| !written.contains(p)))
        })
        .collect();
    let scan = HistoryScan {
        stops: &stops,
        pages: &pages,
        limit,
    };
    if t.workers() > 1 && intervals.len() > 1 {
        let mut total = 0;
        let (found, interrupted) = super::workers::in_order(
            &t.recipe(),
            t.workers(),
            &intervals,
            interrupted,
            |(part, ended): &(Vec<Change>, Option<ListingEnd>)| {
                total += part.len();
                total >= limit || ended.is_some()
            },
            |t, interval, give_up| {
                scan.interval(t, interval, &mut std::io::sink(), &mut || give_up())
            },
        )?;
        let end = if interrupted {
            ListingEnd::Interrupted
        } else {
            ListingEnd::Complete
        };
        return Ok(merge_changes(found, end, limit));
    }
    let mut changes = Vec::new();
    let mut end = ListingEnd::Complete;
    for &interval in &intervals {
        let (found, ended) = scan.interval(t, interval, out, interrupted)?;
        changes.extend(found);
        if changes.len() >= limit {
            changes.truncate(limit);
            end = ListingEnd::Limit;
            break;
        }
        if let Some(ended) = ended {
            end = ended;
            break;
        }
    }
    seek_exact(t, here, out)?;
    Ok((changes, end))
}

/// The changes the intervals' scans found, in order, cut at `limit`, and how the listing ended.
fn merge_changes(
    found: Vec<(Vec<Change>, Option<ListingEnd>)>,
    end: ListingEnd,
    limit: usize,
) -> (Vec<Change>, ListingEnd) {
    let mut changes = Vec::new();
    for (part, ended) in found {
        changes.extend(part);
        if changes.len() >= limit {
            changes.truncate(limit);
            return (changes, ListingEnd::Limit);
        }
        if let Some(ended) = ended {
            return (changes, ended);
        }
    }
    (changes, end)
}

/// What a history scans one checkpoint interval for.
struct HistoryScan<'a> {
    stops: &'a StopSet,
    pages: &'a [u64],
    limit: usize,
}

impl HistoryScan<'_> {
    /// The changes in the interval `from..to`, at most `limit`; and, if the scan ended early, why.
    fn interval(
        &self,
        t: &mut Timeline,
        (from, to): (Position, Position),
        out: &mut dyn Write,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<(Vec<Change>, Option<ListingEnd>), SearchError> {
        let (stops, pages) = (self.stops, self.pages);
        let mut changes = Vec::new();
        seek_exact(t, from, out)?;
        t.wrote_since_probe(pages)?;
        let mut info = InstructionInfoFactory::new();
        while t.position() < to {
            // The stretch to step: one instruction (step traces), or up to the next landmark if it
            // wrote a watched page (landmark traces, run free first).
            let start = t.position();
            let before = watched_bytes(t.replay().machine(), stops);
            if t.replay().steps_within_landmarks() {
                t.run_free_with(&[], out)?;
                let after = watched_bytes(t.replay().machine(), stops);
                if !t.wrote_since_probe(pages)? && changed(stops, &before, &after).is_none() {
                    if interrupted() {
                        return Ok((changes, Some(ListingEnd::Interrupted)));
                    }
                    continue;
                }
                seek_exact(t, start, out)?;
            }
            // Both end where the next landmark (or instruction count) begins.
            let stop = Position::at(start.count() + 1).min(to);
            while t.position() < stop {
                let (position, rip) = (t.position(), t.replay().machine().rip());
                let old = watched_bytes(t.replay().machine(), stops);
                let step = step_checked(t, stops, &mut info, out)?;
                if step.watch.is_some() {
                    let new = watched_bytes(t.replay().machine(), stops);
                    changes.push(Change {
                        position,
                        rip,
                        old: old[0].clone().unwrap_or_default(),
                        new: new[0].clone().unwrap_or_default(),
                    });
                    if changes.len() >= self.limit {
                        return Ok((changes, Some(ListingEnd::Limit)));
                    }
                }
                if !step.advanced {
                    // The recording ends here.
                    return Ok((changes, Some(ListingEnd::Complete)));
                }
            }
            if interrupted() {
                return Ok((changes, Some(ListingEnd::Interrupted)));
            }
        }
        Ok((changes, None))
    }
}

/// The guest-physical pages of the watched bytes, as the guest maps them now (None if one is unmapped).
fn watched_pages(m: &Machine, stops: &StopSet) -> Option<BTreeSet<u64>> {
    let mut pages = BTreeSet::new();
    for w in &stops.watches {
        let last = w.addr.checked_add(w.len.max(1) - 1)?;
        for page in (w.addr >> 12)..=(last >> 12) {
            let linear = (page << 12).max(w.addr);
            pages.insert(m.translate(linear).ok()? >> 12);
        }
    }
    Some(pages)
}

/// Counts steps and asks the interrupt callback every [`POLL_EVERY`] of them.
struct Poll<'a> {
    steps: u64,
    interrupted: &'a mut dyn FnMut() -> bool,
}

impl Poll<'_> {
    fn due(&mut self) -> bool {
        self.steps += 1;
        self.steps.is_multiple_of(POLL_EVERY) && (self.interrupted)()
    }

    /// For free runs, where a call covers many instructions: asks every time.
    fn due_now(&mut self) -> bool {
        (self.interrupted)()
    }
}

/// Runs backward to the latest earlier position that hits a breakpoint or watchpoint, or to the start
/// ([`Outcome::Begin`]). The intervals between restore points before the current position are scanned latest
/// first, each forward from its start, and the last hit in the first interval that has one wins.
/// `interrupted` is asked every few thousand steps whether to stop (see [`Outcome::Interrupted`]).
pub fn run_backward(
    t: &mut Timeline,
    stops: &StopSet,
    out: &mut dyn Write,
    interrupted: &mut dyn FnMut() -> bool,
) -> Result<Outcome, SearchError> {
    let start = t.position();
    let hw = hardware_stops(t, stops);
    // Pages the watchpoints watch: an interval that wrote none of them cannot change them.
    let watched_pages = (!stops.has_read_watches())
        .then(|| watched_pages(t.replay().machine(), stops))
        .flatten();
    let mut poll = Poll {
        steps: 0,
        interrupted,
    };
    // Positions from `clear` up to the start have been scanned and hold no hit.
    let mut clear = start;
    // The nearest interval is scanned here, where snapshots make it short; farther back, with more
    // than one worker, the checkpoint intervals are scanned at once.
    let mut near = true;
    let far = Far {
        stops,
        hw: hw.as_deref(),
        watched_pages: watched_pages.as_ref(),
    };
    if !stops.is_empty() {
        while clear > Position::START {
            if !near && t.workers() > 1 {
                return far.run_backward(t, clear, out, &mut poll);
            }
            near = false;
            let from = interval_start(t, clear);
            if far.skippable(t, from, clear) {
                clear = from;
                continue;
            }
            let scanned = match &hw {
                Some(hw) => scan_free(t, stops, hw, (from, clear), out, &mut poll)?,
                None => scan(t, stops, (from, clear), out, &mut poll)?,
            };
            match scanned {
                Scan::Found(position, hit) => {
                    seek_exact(t, position, out)?;
                    return Ok(Outcome::Hit(hit));
                }
                Scan::Interrupted => {
                    seek_exact(t, clear, out)?;
                    return Ok(Outcome::Interrupted);
                }
                Scan::Nothing => clear = from,
            }
        }
    }
    seek_exact(t, Position::START, out)?;
    Ok(Outcome::Begin)
}

/// What a reverse search looks for in the checkpoint intervals far back, on workers.
struct Far<'a> {
    stops: &'a StopSet,
    hw: Option<&'a [u64]>,
    watched_pages: Option<&'a BTreeSet<u64>>,
}

impl Far<'_> {
    /// [`run_backward`] from `clear` back to the start, one checkpoint interval per worker at once,
    /// latest first; the first interval in that order with a hit holds the answer, as it would for a
    /// single replay scanning them one after another.
    fn run_backward(
        &self,
        t: &mut Timeline,
        mut clear: Position,
        out: &mut dyn Write,
        poll: &mut Poll<'_>,
    ) -> Result<Outcome, SearchError> {
        let checkpoints = t.replay().checkpoint_positions().to_vec();
        let mut intervals = Vec::new();
        let mut to = clear;
        for &from in checkpoints.iter().rev().filter(|&&c| c < clear) {
            if !self.skippable(t, from, to) {
                intervals.push((from, to));
            }
            to = from;
        }
        let (stops, hw) = (self.stops, self.hw);
        let (scanned, interrupted) = super::workers::in_order(
            &t.recipe(),
            t.workers(),
            &intervals,
            &mut *poll.interrupted,
            |scan: &Scan| !matches!(scan, Scan::Nothing),
            |wt, interval, give_up| {
                let mut give_up = || give_up();
                let mut poll = Poll {
                    steps: 0,
                    interrupted: &mut give_up,
                };
                let out = &mut std::io::sink();
                match hw {
                    Some(hw) => scan_free(wt, stops, hw, interval, out, &mut poll),
                    None => scan(wt, stops, interval, out, &mut poll),
                }
            },
        )?;
        for (scan, &(from, _)) in scanned.iter().zip(&intervals) {
            match scan {
                Scan::Found(position, hit) => {
                    seek_exact(t, *position, out)?;
                    return Ok(Outcome::Hit(*hit));
                }
                Scan::Interrupted => {
                    seek_exact(t, clear, out)?;
                    return Ok(Outcome::Interrupted);
                }
                Scan::Nothing => clear = from,
            }
        }
        if interrupted {
            seek_exact(t, clear, out)?;
            return Ok(Outcome::Interrupted);
        }
        seek_exact(t, Position::START, out)?;
        Ok(Outcome::Begin)
    }

    /// Whether `from..to` can hold no hit, known without replaying it: no watched page written in it,
    /// and every breakpoint known not to be hit there (a free run forward passed through it with them
    /// armed).
    fn skippable(&self, t: &mut Timeline, from: Position, to: Position) -> bool {
        let Some(pages) = self.watched_pages else {
            return false;
        };
        self.stops
            .breakpoints
            .iter()
            .all(|&rip| t.known_clear(rip, from, to))
            && t.pages_written(from, to)
                .is_some_and(|written| pages.is_disjoint(&written))
    }
}

/// Moves to `target` (clamped to the recording) and says whether that is the end of the recording.
pub fn seek(
    t: &mut Timeline,
    target: Position,
    out: &mut dyn Write,
) -> Result<Outcome, SearchError> {
    Ok(match t.seek(target, out)? {
        Halt::End(_) => Outcome::End,
        Halt::Target if t.position() >= t.replay().end() => Outcome::End,
        Halt::Target => Outcome::Done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_overlap_accesses_and_notice_changed_bytes() {
        let w = Watch {
            addr: 0x100d60,
            len: 4,
            access: Access::Write,
        };
        assert!(w.overlaps(0x100d63, 1) && w.overlaps(0x100d5c, 8));
        assert!(!w.overlaps(0x100d64, 4) && !w.overlaps(0x100d5c, 4));
        assert!(
            !w.overlaps(u64::MAX, 8),
            "no overflow at the top of the address space"
        );
        let read = Watch {
            access: Access::Read,
            ..w
        };
        let stops = StopSet {
            breakpoints: BTreeSet::new(),
            watches: vec![read, w],
        };
        assert!(stops.has_read_watches() && !stops.is_empty());
        let before = [None, Some(vec![0xee, 0xff, 0xc0, 0])];
        let same = [None, Some(vec![0xee, 0xff, 0xc0, 0])];
        let after = [None, Some(vec![0x47, 0, 0, 0])];
        let unmapped = [None, None];
        assert_eq!(changed(&stops, &before, &same), None);
        assert_eq!(changed(&stops, &before, &after), Some(w));
        // A page that became unmapped (or mapped) is no write.
        assert_eq!(changed(&stops, &before, &unmapped), None);
    }
}
