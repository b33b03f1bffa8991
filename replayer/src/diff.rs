//! Where two recordings of the same guest part, and what differed there (`retrovisor diff`).
//!
//! Two recordings of one guest image on one machine run the same instructions until an input differs,
//! since everything nondeterministic is in their event streams. So the search first compares the
//! streams: the first event that differs (host clock readings aside, whose values differ between any
//! two runs and reach the guest only through other events or its registers) bounds the parting from
//! above. One replay of each to that event's landmark checks that the guests are still alike there
//! (registers and RAM); then stepping each to where it takes its first differing input gives the
//! instruction where they part. Should the guests already differ at that landmark (different disk
//! contents, or a clock reading that reached a register), a bisection by replays over positions finds
//! the first one where they differ: O(log n) replays, each from the nearest checkpoint.

use crate::{ReplayError, Timeline};
use machine::{Clock, Machine};
use std::path::{Path, PathBuf};
use thiserror::Error;
use traces::{Event, EventKind, Header};
use vocab::Position;

/// Errors from a diff.
#[derive(Debug, Error)]
pub enum DiffError {
    /// The two traces are not recordings of the same guest on the same machine.
    #[error("{} and {} are not recordings of the same guest: {what}; diff compares two runs of one guest", a.display(), b.display())]
    NotSameGuest {
        /// The first trace.
        a: PathBuf,
        /// The second trace.
        b: PathBuf,
        /// What differs.
        what: String,
    },
    /// One of the traces cannot be opened or replayed.
    #[error("{}: {source}", path.display())]
    Replay {
        /// The trace.
        path: PathBuf,
        /// Why.
        source: ReplayError,
    },
    /// The user stopped the search.
    #[error("the search was stopped before it found where the recordings part")]
    Interrupted,
}

/// One recording's first event that differs from the other's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Differing {
    /// Its index in the event stream.
    pub index: usize,
    /// The position it names (a landmark or an instruction count: a kick point lies after it).
    pub at: Position,
    /// The rip it was logged at.
    pub rip: u64,
    /// What it is, as a user reads it ("interrupt vector 0x20", "serial input \"ab\"").
    pub what: String,
}

/// Why the recordings part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// An input's value differs (serial bytes, a random number, a vector).
    Input,
    /// The same inputs, delivered elsewhere: an interrupt's position, or the interleaving of vCPUs.
    Placement,
    /// The guests differ before any event does (their disks differ, or a host clock reading reached
    /// the guest).
    State,
}

/// A page of RAM that differs between the two recordings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDifference {
    /// Page frame number.
    pub pfn: u64,
    /// Bytes that differ.
    pub bytes: usize,
    /// Physical address of the first that differs, and its value in each recording.
    pub first: (u64, u8, u8),
}

/// Where two recordings part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parting {
    /// The last position where both guests are alike (the same in both recordings): the instruction
    /// there, or the input delivered there, makes them differ.
    pub at: Position,
    /// The position after it, where the state differences were taken.
    pub after: Position,
    /// Each recording's first differing event (None: no event differs, or the recording ends).
    pub a: Option<Differing>,
    /// See `a`.
    pub b: Option<Differing>,
    /// Why they part.
    pub cause: Cause,
    /// What differs at `after` in the CPUs and devices, A's value first ("regs.rip is 0x10 in A, 0x20
    /// in B"): only what was not already different at `at`.
    pub fields: Vec<String>,
    /// The pages of RAM that differ at `after`.
    pub pages: Vec<PageDifference>,
    /// For serial input: the first byte of the input streams that differs (counting from 0), and its
    /// value in each (None where that stream is shorter).
    pub serial_byte: Option<(u64, Option<u8>, Option<u8>)>,
}

/// What a diff found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Where the recordings part; None if they do not (the same run twice).
    pub parting: Option<Parting>,
    /// What the positions count.
    pub clock: Clock,
    /// Host clock readings that differ before the parting (expected: two runs read the host clock at
    /// different moments).
    pub time_readings: usize,
    /// Each recording's last position.
    pub ends: (Position, Position),
    /// Replays made: each restores a checkpoint or snapshot and runs forward to a position.
    pub replays: u32,
    /// Notes for the user (disks that differ, a recording cut off).
    pub notes: Vec<String>,
}

/// Longest stretch the search single-steps to find where a recording takes its first differing input
/// after the landmark it names: past this it reports the landmark.
const MAX_STEPS: u64 = 2_000_000;
/// At most this many CPU and device fields in a report.
const MAX_FIELDS: usize = 24;

/// One recording under the search.
struct Side {
    dir: PathBuf,
    timeline: Timeline,
}

impl Side {
    fn open(dir: &Path, image: Option<&Path>) -> Result<Side, DiffError> {
        let fail = |source| DiffError::Replay {
            path: dir.to_path_buf(),
            source,
        };
        let mut timeline = Timeline::open(dir, image).map_err(fail)?;
        if timeline.replay().positions() == Clock::Landmark {
            timeline.step_within_landmarks().map_err(fail)?;
        }
        Ok(Side {
            dir: dir.to_path_buf(),
            timeline,
        })
    }

    fn fail(&self, source: ReplayError) -> DiffError {
        DiffError::Replay {
            path: self.dir.clone(),
            source,
        }
    }

    fn events(&self) -> &[Event] {
        self.timeline.replay().trace().events()
    }

    fn machine(&self) -> &Machine {
        self.timeline.replay().machine()
    }

    /// Replays to `target` (or the end); returns where it got.
    fn seek(&mut self, target: Position) -> Result<Position, DiffError> {
        self.timeline
            .seek(target, &mut std::io::sink())
            .map_err(|e| self.fail(e))?;
        Ok(self.timeline.position())
    }

    /// From landmark (or icount) `at`: steps until the replay takes event `index`, and returns the
    /// position it took it at (None after `MAX_STEPS`, or if the recording ends first).
    fn point_of(
        &mut self,
        index: usize,
        at: u64,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Position>, DiffError> {
        self.seek(Position::at(at))?;
        for n in 0..MAX_STEPS {
            if self.timeline.replay().finished() {
                return Ok(None);
            }
            if n % 4096 == 4095 && interrupted() {
                return Err(DiffError::Interrupted);
            }
            let before = self.timeline.position();
            self.timeline
                .step(&mut std::io::sink())
                .map_err(|e| self.fail(e))?;
            if self.timeline.replay().events_consumed() > index {
                return Ok(Some(before));
            }
        }
        Ok(None)
    }
}

/// Why two headers are not of the same guest on the same machine, if they are not.
fn not_same_guest(a: &Header, b: &Header) -> Option<String> {
    if a.image_sha256 != b.image_sha256 {
        return Some(format!(
            "they ran different guest images ({} with sha256 {}, {} with sha256 {})",
            a.image_path, a.image_sha256, b.image_path, b.image_sha256
        ));
    }
    if a.clock != b.clock {
        return Some(format!(
            "one was recorded with the {} clock and the other with the {} clock, whose positions count \
             different things",
            a.clock, b.clock
        ));
    }
    let differing = [
        (a.machine.ram_bytes != b.machine.ram_bytes, "guest RAM"),
        (a.machine.cmdline != b.machine.cmdline, "command line"),
        (a.cpus != b.cpus, "number of vCPUs"),
        (a.cpuid != b.cpuid, "CPUID"),
        (a.time_mode != b.time_mode, "time mode (--time)"),
        (
            a.host_traps != b.host_traps,
            "trapping of host instructions",
        ),
        (a.disks.len() != b.disks.len(), "number of disks"),
        (
            a.initrd.as_ref().map(|i| &i.sha256) != b.initrd.as_ref().map(|i| &i.sha256),
            "initrd",
        ),
    ];
    differing
        .iter()
        .find(|(differs, _)| *differs)
        .map(|(_, what)| format!("their machines differ in {what}"))
}

/// Whether two events are the same input at the same point. Host clock readings compare by kind alone
/// (their values differ between any two runs); a kick point by its registers, and by the digest of the
/// pages written since the checkpoint before only when both recordings took that checkpoint at the
/// same position (otherwise the digests cover different pages).
fn same_event(a: &Event, b: &Event, same_checkpoints: bool) -> bool {
    if a.at != b.at || a.rip != b.rip {
        return false;
    }
    match (&a.kind, &b.kind) {
        (EventKind::Clock { kind: x, .. }, EventKind::Clock { kind: y, .. }) => x == y,
        (EventKind::ApicTimer { cpu: x, .. }, EventKind::ApicTimer { cpu: y, .. }) => x == y,
        (EventKind::Kick { fingerprint: x }, EventKind::Kick { fingerprint: y }) => {
            (x.rip, x.rsp, x.rflags, x.regs) == (y.rip, y.rsp, y.rflags, y.regs)
                && (x.memory == y.memory || !same_checkpoints)
        }
        (x, y) => x == y,
    }
}

/// Whether two time events differ in value (see [`same_event`]).
fn time_value_differs(a: &Event, b: &Event) -> bool {
    matches!(
        (&a.kind, &b.kind),
        (EventKind::Clock { ns: x, .. }, EventKind::Clock { ns: y, .. })
            | (EventKind::ApicTimer { ns: x, .. }, EventKind::ApicTimer { ns: y, .. }) if x != y
    )
}

/// An event as a user reads it. A kick is named by what it delivered: the events after it at its point.
fn describe(events: &[Event], index: usize) -> String {
    let e = &events[index];
    match &e.kind {
        EventKind::Kick { fingerprint } => {
            let delivered: Vec<String> = events[index + 1..]
                .iter()
                .take_while(|d| d.at == e.at && !matches!(d.kind, EventKind::Kick { .. }))
                .map(|d| describe_kind(&d.kind))
                .collect();
            format!(
                "{} at a point after the landmark (rip {:#x}, rsp {:#x})",
                if delivered.is_empty() {
                    "a kick".to_string()
                } else {
                    delivered.join(", ")
                },
                fingerprint.rip,
                fingerprint.rsp
            )
        }
        kind => describe_kind(kind),
    }
}

fn describe_kind(kind: &EventKind) -> String {
    match kind {
        EventKind::SerialRx { bytes } => format!(
            "serial input {:?}",
            String::from_utf8_lossy(bytes).into_owned()
        ),
        EventKind::Clock { kind, ns } => format!("a {kind:?} clock reading ({ns} ns)"),
        EventKind::Irq { line } => format!("IRQ {line}"),
        EventKind::Interrupt { vector } => format!("interrupt vector {vector:#x}"),
        EventKind::HostValue { insn, value, .. } => format!("{insn:?} returning {value:#x}"),
        EventKind::Stop { reason } => format!("the end of the recording ({reason:?})"),
        EventKind::Kick { .. } => "a kick".to_string(),
        EventKind::Switch { cpu } => format!("a switch to vCPU {cpu}"),
        EventKind::ApicTimer { cpu, .. } => format!("vCPU {cpu}'s APIC timer"),
    }
}

/// A byte of serial input as a user reads it: `'c' (0x63)`, `0x0a`, or that the input had ended.
pub fn show_byte(b: Option<u8>) -> String {
    match b {
        Some(b) if b.is_ascii_graphic() || b == b' ' => format!("{:?} ({b:#04x})", b as char),
        Some(b) => format!("{b:#04x}"),
        None => "nothing (the input ended)".into(),
    }
}

/// The serial input a recording received, in order.
fn serial_stream(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::SerialRx { bytes } => Some(bytes.as_slice()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

/// The search, over two recordings open at once.
struct Search<'a> {
    a: Side,
    b: Side,
    replays: u32,
    interrupted: &'a mut dyn FnMut() -> bool,
    progress: &'a mut dyn FnMut(&str),
}

impl Search<'_> {
    /// Replays both to `target`; returns where each got.
    fn seek(&mut self, target: Position) -> Result<(Position, Position), DiffError> {
        if (self.interrupted)() {
            return Err(DiffError::Interrupted);
        }
        self.replays += 2;
        Ok((self.a.seek(target)?, self.b.seek(target)?))
    }

    /// Whether both guests are alike at `target`: both got there, with the same registers on every
    /// vCPU and the same RAM. (Device state is not compared: two runs' devices keep different host
    /// times, which reach the guest only through its registers or RAM.)
    fn alike_at(&mut self, target: Position) -> Result<bool, DiffError> {
        let (pa, pb) = self.seek(target)?;
        Ok(pa == pb && alike(self.a.machine(), self.b.machine()))
    }

    /// The last position at or after `lo` and before `hi` where the guests are alike, given they are
    /// at `lo` and are not at `hi`: a bisection over landmarks (or instruction counts), then, for a
    /// landmark trace, over the instructions within the landmark.
    fn bisect(&mut self, mut lo: Position, mut hi: Position) -> Result<Position, DiffError> {
        while hi.count() > lo.count() + 1 {
            let mid = Position::at(lo.count() + (hi.count() - lo.count()) / 2);
            (self.progress)(&format!(
                "bisecting between {} and {}",
                lo.count(),
                hi.count()
            ));
            if self.alike_at(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if self.a.timeline.replay().positions() == Clock::Step {
            return Ok(lo);
        }
        // Within landmark `lo`: its length is unknown, so double the offset until the guests differ or
        // the landmark ends (a position past its end lands on the next landmark, where they differ).
        let landmark = lo.count();
        let (mut good, mut bad) = (lo.offset(), (hi.count() == landmark).then_some(hi.offset()));
        let mut step = 1u64;
        while bad.is_none() {
            let probe = Position::within(landmark, good + step);
            let (pa, _) = self.seek(probe)?;
            if pa != probe || !alike(self.a.machine(), self.b.machine()) {
                bad = Some(good + step);
            } else {
                good += step;
                step *= 2;
            }
        }
        let mut bad = bad.expect("set above");
        while bad > good + 1 {
            let mid = good + (bad - good) / 2;
            if self.alike_at(Position::within(landmark, mid))? {
                good = mid;
            } else {
                bad = mid;
            }
        }
        Ok(Position::within(landmark, good))
    }

    /// What differs between the two guests at the position after `at`, leaving out what already
    /// differed at `at`.
    fn differences(
        &mut self,
        at: Position,
    ) -> Result<(Position, Vec<String>, Vec<PageDifference>), DiffError> {
        self.seek(at)?;
        let before = field_differences(self.a.machine(), self.b.machine());
        let clock = self.a.timeline.replay().positions();
        let next = at.next_instruction(clock);
        let (after, _) = self.seek(next)?;
        let fields = field_differences(self.a.machine(), self.b.machine())
            .into_iter()
            .filter(|f| !before.contains(f))
            .take(MAX_FIELDS)
            .collect();
        Ok((
            after,
            fields,
            page_differences(self.a.machine(), self.b.machine()),
        ))
    }
}

/// Whether two machines' guests are alike: registers of every vCPU and RAM.
fn alike(a: &Machine, b: &Machine) -> bool {
    let cpus_alike = (0..a.cpus() as u8).all(|cpu| a.cpu_regs(cpu) == b.cpu_regs(cpu));
    let (ma, mb) = (a.memory(), b.memory());
    cpus_alike && (0..ma.pages()).all(|pfn| ma.page(pfn) == mb.page(pfn))
}

/// The CPU and device fields that differ, A's value first.
fn field_differences(a: &Machine, b: &Machine) -> Vec<String> {
    let Ok(blob) = b.state_blob() else {
        return vec!["B's CPU state cannot be read".into()];
    };
    a.state_differences(&blob, usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .map(|line| {
            // The machine words it as "X is A, recorded B" (what a divergence report says).
            match line.split_once(", recorded ") {
                Some((now, then)) => format!("{now} in A, {then} in B"),
                None => line.replace(", not recorded", " in A, absent in B"),
            }
        })
        .collect()
}

/// The pages of RAM that differ.
fn page_differences(a: &Machine, b: &Machine) -> Vec<PageDifference> {
    let (ma, mb) = (a.memory(), b.memory());
    (0..ma.pages())
        .filter_map(|pfn| {
            let (x, y) = (ma.page(pfn), mb.page(pfn));
            let first = x.iter().zip(y).position(|(p, q)| p != q)?;
            Some(PageDifference {
                pfn: pfn as u64,
                bytes: x.iter().zip(y).filter(|(p, q)| p != q).count(),
                first: ((pfn * memory::PAGE_SIZE + first) as u64, x[first], y[first]),
            })
        })
        .collect()
}

/// Finds where the recordings in `a` and `b` part (see the module's description). `interrupted` is
/// asked now and then whether to stop; `progress` hears what the search is doing.
pub fn diff(
    a: &Path,
    b: &Path,
    image: Option<&Path>,
    interrupted: &mut dyn FnMut() -> bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, DiffError> {
    let side_a = Side::open(a, image)?;
    let side_b = Side::open(b, image)?;
    let (ha, hb) = (
        side_a.timeline.replay().trace().header(),
        side_b.timeline.replay().trace().header(),
    );
    if let Some(what) = not_same_guest(ha, hb) {
        return Err(DiffError::NotSameGuest {
            a: a.to_path_buf(),
            b: b.to_path_buf(),
            what,
        });
    }
    let mut notes = Vec::new();
    for (i, (x, y)) in ha.disks.iter().zip(&hb.disks).enumerate() {
        if x.sha256 != y.sha256 {
            notes.push(format!(
                "disk {i} differs between the recordings ({} and {}): the guests may part where one reads it",
                x.path, y.path
            ));
        }
    }
    let clock = side_a.timeline.replay().positions();
    let ends = (
        side_a.timeline.replay().end(),
        side_b.timeline.replay().end(),
    );
    for (side, name) in [(&side_a, "A"), (&side_b, "B")] {
        if let Some(cut) = side.timeline.replay().trace().cut_off_description() {
            notes.push(format!("{name} is cut off: {cut}"));
        }
    }
    let mut search = Search {
        a: side_a,
        b: side_b,
        replays: 0,
        interrupted,
        progress,
    };
    let same_checkpoints = |at: u64, s: &Search<'_>| {
        let before = |side: &Side| {
            let cps = side.timeline.replay().checkpoint_positions();
            cps[..cps.partition_point(|c| c.count() <= at)]
                .last()
                .copied()
        };
        before(&s.a) == before(&s.b)
    };
    // 1. The event streams.
    let (ea, eb) = (search.a.events(), search.b.events());
    let mut time_readings = 0;
    let mut first = None;
    for i in 0..ea.len().max(eb.len()) {
        match (ea.get(i), eb.get(i)) {
            (Some(x), Some(y)) if same_event(x, y, same_checkpoints(x.at, &search)) => {
                time_readings += usize::from(time_value_differs(x, y));
            }
            _ => {
                first = Some(i);
                break;
            }
        }
    }
    let differing = |events: &[Event], i: usize| {
        events.get(i).map(|e| Differing {
            index: i,
            at: Position::at(e.at),
            rip: e.rip,
            what: describe(events, i),
        })
    };
    let (da, db) = match first {
        Some(i) => (differing(ea, i), differing(eb, i)),
        None => (None, None),
    };
    // The first byte where the serial inputs differ, if they do; it is the cause only if the first
    // differing events carry it.
    let (sa, sb) = (serial_stream(ea), serial_stream(eb));
    let n = sa
        .iter()
        .zip(&sb)
        .position(|(x, y)| x != y)
        .unwrap_or(sa.len().min(sb.len()));
    let differing_byte =
        (sa.get(n) != sb.get(n)).then(|| (n as u64, sa.get(n).copied(), sb.get(n).copied()));
    let before: usize = first.map_or(0, |i| serial_stream(&ea[..i.min(ea.len())]).len());
    let carried = |events: &[Event], d: &Option<Differing>| {
        d.as_ref().is_some_and(|d| match &events[d.index].kind {
            EventKind::SerialRx { bytes } => (before..before + bytes.len()).contains(&n),
            _ => false,
        })
    };
    let serial_byte = differing_byte.filter(|_| carried(ea, &da) || carried(eb, &db));
    if let (Some((n, x, y)), None) = (differing_byte, serial_byte) {
        notes.push(format!(
            "their serial inputs differ too, from byte {n} on ({} in A, {} in B), which the guests \
             took in later",
            show_byte(x),
            show_byte(y)
        ));
    }
    let cause = match (&da, &db) {
        (Some(x), Some(y)) if serial_byte.is_none() => {
            let (ex, ey) = (&ea[x.index], &eb[y.index]);
            // The same kind of input at the same point with another value, or the same input (or a
            // kick, or a switch) elsewhere.
            let same_point = ex.at == ey.at && ex.rip == ey.rip;
            // Serial input that differs only in how it was cut into pieces is the same input.
            let valued = !matches!(
                ex.kind,
                EventKind::Kick { .. } | EventKind::Switch { .. } | EventKind::SerialRx { .. }
            );
            if same_point
                && valued
                && std::mem::discriminant(&ex.kind) == std::mem::discriminant(&ey.kind)
            {
                Cause::Input
            } else {
                Cause::Placement
            }
        }
        _ => Cause::Input,
    };
    // The events bound the parting: up to the first differing one the runs are one.
    let bound = match (&da, &db) {
        (Some(x), Some(y)) => x.at.min(y.at),
        (Some(d), None) | (None, Some(d)) => d.at.min(ends.0.min(ends.1)),
        (None, None) => ends.0.min(ends.1),
    };
    (search.progress)(&format!(
        "the event streams part at {}; replaying both there",
        bound.show(clock)
    ));
    // 2. Are the guests alike there? Then the parting is where the first to take its differing input
    // takes it.
    let parting = if search.alike_at(bound)? {
        if first.is_none() {
            None
        } else {
            let mut at = None;
            for (side, d) in [(0, &da), (1, &db)] {
                let Some(d) = d.as_ref().filter(|d| d.at == bound) else {
                    continue;
                };
                (search.progress)("stepping to the first differing input");
                let interrupted = &mut *search.interrupted;
                let found = match side {
                    0 => search.a.point_of(d.index, d.at.count(), interrupted)?,
                    _ => search.b.point_of(d.index, d.at.count(), interrupted)?,
                };
                search.replays += 1;
                let found = found.unwrap_or(bound);
                at = Some(at.map_or(found, |p: Position| p.min(found)));
            }
            Some((at.unwrap_or(bound), cause))
        }
    } else {
        // 3. They are not: bisect by replays from the start.
        (search.progress)("the guests differ before any input does: bisecting");
        let start = Position::START;
        if !search.alike_at(start)? {
            Some((start, Cause::State))
        } else {
            Some((search.bisect(start, bound)?, Cause::State))
        }
    };
    let parting = match parting {
        None => None,
        Some((at, cause)) => {
            let (after, fields, pages) = search.differences(at)?;
            Some(Parting {
                at,
                after,
                a: da,
                b: db,
                cause,
                fields,
                pages,
                serial_byte,
            })
        }
    };
    Ok(Report {
        parting,
        clock,
        time_readings,
        ends,
        replays: search.replays,
        notes,
    })
}
