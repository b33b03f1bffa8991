//! The `--clock` value the commands that run a guest or a replay share.

/// Which clock drives a run or a replay.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ClockArg {
    /// Run free between the guest's own exits ("landmarks"), at the host's speed; host time only.
    #[value(alias = "free")]
    Landmark,
    /// Single-step every instruction: exact instruction counts on any KVM, about 10x slower here.
    Step,
    /// Count the guest's retired conditional branches, as a performance counter does (rr's clock): needs
    /// a PMU that counts a guest's (see `retrovisor doctor`), or `record --simulated-counter`, which
    /// counts them by single-stepping.
    Pmu,
}

impl ClockArg {
    /// The machine's clock it names.
    pub(crate) fn clock(self) -> machine::Clock {
        match self {
            // The pmu clock's positions are landmarks too: branches rather than exits.
            ClockArg::Landmark | ClockArg::Pmu => machine::Clock::Landmark,
            ClockArg::Step => machine::Clock::Step,
        }
    }
}
