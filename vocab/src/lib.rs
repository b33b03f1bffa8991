//! The words the machine, the trace and the tools share, defined once: where in the guest's execution
//! something happens ([`Position`], counted by a [`Clock`]), how a point between landmarks is named
//! ([`Fingerprint`]), which host instructions give values ([`HostInsn`]), why a run ended
//! ([`StopReason`]) and which CPU made a trace ([`HostCpu`]).
//!
//! The machine knows nothing of traces and the trace nothing of KVM; both speak these. Their serde
//! forms are the trace's on-disk forms (`traces/FORMAT.md`), so changing one is a format change.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How the machine is driven, and so what its positions count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Clock {
    /// Single-step every instruction: positions are instructions retired since boot.
    Step,
    /// Run free between the guest's own exits: positions are landmarks (exits the guest caused), and
    /// within one, the instructions since it.
    Landmark,
}

impl Clock {
    /// The name traces and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Clock::Step => "step",
            Clock::Landmark => "landmark",
        }
    }

    /// What its positions are called in messages: "icount" or "landmark".
    pub fn unit(self) -> &'static str {
        match self {
            Clock::Step => "icount",
            Clock::Landmark => "landmark",
        }
    }

    /// Whether the guest runs free between positions, so that what it reads from the host without an
    /// exit (RDTSC, RDRAND, RDSEED, RDTSCP) never reaches the VMM unless the VMM traps it, and a guest
    /// must not be told it has RDRAND, RDSEED or RDTSCP.
    pub fn runs_free(self) -> bool {
        self == Clock::Landmark
    }

    /// The clock a trace header names, if it is one this version knows. A `pmu` trace's positions are
    /// landmarks too: retired conditional branches rather than exits (see [`Landmarks`]).
    pub fn from_name(name: &str) -> Option<Clock> {
        match name {
            "step" => Some(Clock::Step),
            "landmark" | Landmarks::PMU_CLOCK => Some(Clock::Landmark),
            _ => None,
        }
    }
}

/// What a landmark is, in a trace whose positions count landmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Landmarks {
    /// An exit the guest itself caused (the landmark clock).
    #[default]
    Exits,
    /// A conditional branch the guest retired (the pmu clock), as a performance counter counts them.
    Branches,
}

impl Landmarks {
    /// The clock name a trace header gives a trace whose landmarks are branches.
    pub const PMU_CLOCK: &'static str = "pmu";

    /// What the landmarks of a trace recorded with the clock named `name` are.
    pub fn of_clock(name: &str) -> Landmarks {
        if name == Landmarks::PMU_CLOCK {
            Landmarks::Branches
        } else {
            Landmarks::Exits
        }
    }
}

/// A point in the guest's execution, in the unit of the trace's [`Clock`]: `count` instructions retired
/// since boot (step), or `count` landmarks and `offset` instructions since the last of them (landmark;
/// a step trace's offset is always 0). Positions order as the execution does. With several vCPUs the
/// count is of the one serialized execution they share (the vCPU that runs there is named beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    count: u64,
    offset: u64,
}

impl Position {
    /// The offset of a point a free run stopped at before it is located: past every instruction of its
    /// landmark, so that moving to any of them restores and replays rather than counting on where the
    /// machine is.
    pub const UNKNOWN_OFFSET: u64 = u64::MAX;
    /// Boot.
    pub const START: Position = Position {
        count: 0,
        offset: 0,
    };
    /// After everything.
    pub const END: Position = Position {
        count: u64::MAX,
        offset: u64::MAX,
    };

    /// The position `count` units in (an instruction count, or landmark `count` itself).
    pub const fn at(count: u64) -> Position {
        Position { count, offset: 0 }
    }

    /// `offset` instructions after landmark `landmark`.
    pub const fn within(landmark: u64, offset: u64) -> Position {
        Position {
            count: landmark,
            offset,
        }
    }

    /// Instructions (step) or landmarks (landmark) before this point.
    pub const fn count(self) -> u64 {
        self.count
    }

    /// Instructions since the landmark ([`Position::UNKNOWN_OFFSET`] if a free run did not count them).
    pub const fn offset(self) -> u64 {
        self.offset
    }

    /// Whether the instructions since the landmark are known.
    pub const fn located(self) -> bool {
        self.offset != Self::UNKNOWN_OFFSET
    }

    /// The next instruction boundary (offset + 1: a step never crosses a landmark by counting).
    pub const fn next_instruction(self, clock: Clock) -> Position {
        match clock {
            Clock::Step => Position::at(self.count + 1),
            Clock::Landmark => Position::within(self.count, self.offset.saturating_add(1)),
        }
    }

    /// The latest position before this one (which must be past [`Position::START`]), for searches that
    /// look for the last thing at or before it: one instruction back within a landmark; at a landmark,
    /// past every instruction of the landmark before.
    pub const fn just_before(self) -> Position {
        if self.offset > 0 {
            Position::within(self.count, self.offset - 1)
        } else {
            Position::within(self.count - 1, u64::MAX)
        }
    }

    /// This position as `clock` names it, for messages: `icount 1234`, `landmark 44 + 102`.
    pub fn show(self, clock: Clock) -> Shown {
        Shown {
            position: self,
            clock,
        }
    }
}

/// The bare form the command line and `monitor seek` take: `1234`, or `44+102` within a landmark.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.offset == 0 || !self.located() {
            write!(f, "{}", self.count)
        } else {
            write!(f, "{}+{}", self.count, self.offset)
        }
    }
}

/// A [`Position`] with its unit, displayed as the trace names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    position: Position,
    clock: Clock,
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.position;
        match self.clock {
            Clock::Step => write!(f, "icount {}", p.count),
            Clock::Landmark if p.offset == 0 || !p.located() => write!(f, "landmark {}", p.count),
            Clock::Landmark => write!(f, "landmark {} + {}", p.count, p.offset),
        }
    }
}

/// Why a position given as text does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPosition(pub String);

impl fmt::Display for BadPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a position: give an instruction count (step traces), or a landmark with \
             optionally the instructions since it, as `44` or `44+102` (landmark traces)",
            self.0
        )
    }
}

impl std::error::Error for BadPosition {}

impl std::str::FromStr for Position {
    type Err = BadPosition;

    /// `N` or `N+M` (spaces allowed around `+`; numbers decimal or `0x` hexadecimal), with an optional
    /// unit word first (`icount`, `landmark`), as [`Shown`] prints them.
    fn from_str(s: &str) -> Result<Position, BadPosition> {
        let bad = || BadPosition(s.to_string());
        let t = s.trim();
        let t = t
            .strip_prefix("landmark")
            .or_else(|| t.strip_prefix("icount"))
            .unwrap_or(t)
            .trim();
        let number = |n: &str| {
            let n = n.trim();
            match n.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => n.parse::<u64>(),
            }
            .map_err(|_| bad())
        };
        match t.split_once('+') {
            Some((count, offset)) => Ok(Position::within(number(count)?, number(offset)?)),
            None => Ok(Position::at(number(t)?)),
        }
    }
}

/// A point between two landmarks, named by the state there: the general registers, RFLAGS (without
/// RF, which only says how the point was reached) and a digest of every page written since the last
/// checkpoint. Two points with the same fingerprint after the same landmark have the same future, so
/// replay runs from the landmark to the first point with the same fingerprint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// Guest RIP.
    pub rip: u64,
    /// Guest RSP.
    pub rsp: u64,
    /// Guest RFLAGS without RF.
    pub rflags: u64,
    /// xxh3-64 of the general registers, RIP, RFLAGS and the segment and control registers.
    pub regs: u64,
    /// xxh3-64 of the pages written since the last checkpoint (frame number and contents).
    pub memory: u64,
}

/// An instruction whose result comes from the host.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostInsn {
    /// RDTSC.
    Rdtsc,
    /// RDTSCP (the event's `aux` holds TSC_AUX).
    Rdtscp,
    /// RDRAND.
    Rdrand,
    /// RDSEED.
    Rdseed,
}

/// Why a run or a recording ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote to isa-debug-exit; `status` is the process status `(v << 1) | 1`.
    GuestExit {
        /// Exit status as the host process reports it.
        status: u32,
    },
    /// The vCPU triple-faulted.
    TripleFault,
    /// `hlt` with interrupts disabled: the guest can never run again.
    Halted,
    /// The user stopped the recording (Ctrl-C or SIGTERM).
    UserStop,
    /// The recording reached the instruction limit it was given (`--max-instructions`). Last, so that
    /// traces written before it existed read as they always did.
    InstructionLimit,
}

/// A host CPU: the one a trace was recorded on, or this one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HostCpu {
    /// The vendor string, e.g. "GenuineIntel" or "AuthenticAMD".
    pub vendor: String,
    /// Display family (base plus extended family).
    pub family: u32,
    /// Display model (with the extended model).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// The brand string, e.g. "AMD EPYC 7B13".
    #[serde(default)]
    pub brand: String,
}

impl HostCpu {
    /// Whether `other` is the same kind of CPU (vendor, family, model, stepping).
    pub fn same_kind(&self, other: &HostCpu) -> bool {
        (&self.vendor, self.family, self.model, self.stepping)
            == (&other.vendor, other.family, other.model, other.stepping)
    }
}

impl fmt::Display for HostCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} family {} model {} stepping {}",
            self.vendor, self.family, self.model, self.stepping
        )?;
        if !self.brand.is_empty() {
            write!(f, ", {}", self.brand)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_as_the_execution_does() {
        assert!(Position::within(7, 12) < Position::within(7, 13));
        assert!(Position::within(7, 4_000_000) < Position::at(8));
        assert!(Position::within(7, Position::UNKNOWN_OFFSET) < Position::at(8));
        assert!(Position::at(8) < Position::END);
        for p in [Position::at(8), Position::within(8, 3)] {
            assert!(p.just_before() < p);
            assert!(Position::within(7, 4_000_000) <= p.just_before());
        }
        assert_eq!(Position::within(8, 3).just_before(), Position::within(8, 2));
    }

    #[test]
    fn positions_print_and_parse_in_the_trace_unit() {
        let p = Position::within(44, 102);
        assert_eq!(p.show(Clock::Landmark).to_string(), "landmark 44 + 102");
        assert_eq!(
            Position::at(44).show(Clock::Landmark).to_string(),
            "landmark 44"
        );
        assert_eq!(
            Position::at(1234).show(Clock::Step).to_string(),
            "icount 1234"
        );
        for text in ["44+102", "44 + 102", "landmark 44 + 102"] {
            assert_eq!(text.parse::<Position>(), Ok(p), "{text}");
        }
        assert_eq!("icount 1234".parse::<Position>(), Ok(Position::at(1234)));
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        assert_eq!("0x3039".parse::<Position>(), Ok(Position::at(12345)));
        assert!("44+".parse::<Position>().is_err());
        assert!("-3".parse::<Position>().is_err());
    }
}
