//! The words retrovisor shows users for what a trace holds: what each kind of event means, what a
//! trace's positions count, how it kept time and how the guest stopped; and how they reach standard
//! error. `info` and `timeline` say the same thing the same way, in the command line's own spelling.

use machine::Clock;
use std::io::Write;
use traces::TimeMode;

/// What an event of `kind` (an [`traces::EventKind::name`], or `checkpoint`) stands for.
pub fn event_meaning(kind: &str) -> &'static str {
    match kind {
        "serial_rx" => "bytes the UART received from outside (serial input)",
        "clock" => "readings of a host clock by the PIT or the RTC",
        "irq" => "edges on a PIC line raised by a timer (the PIT); the guest takes them later as interrupts",
        "interrupt" => "vectors injected into the vCPU: the moments the guest took an interrupt",
        "host_value" => "RDTSC, RDTSCP, RDRAND or RDSEED results the host gave",
        "kick" => "points between landmarks where a guest computing without exits was stopped to get input",
        "stop" => "the end of the recording",
        "switch" => "vCPU switches: where the scheduler let another vCPU run (several vCPUs run one at a time)",
        "apic_timer" => "local APIC timer expiries, each on its vCPU",
        "checkpoint" => "saved machine states that replay and reverse execution start from",
        _ => "events of a kind this retrovisor does not know",
    }
}

/// The clock a trace header names, if this retrovisor knows it.
pub fn clock_of(header: &traces::Header) -> Option<Clock> {
    Clock::from_name(&header.clock)
}

/// What positions count, in the plural: "instructions" (step clock) or "landmarks" (landmark clock).
pub fn counted(clock: Option<Clock>) -> &'static str {
    match clock {
        Some(Clock::Landmark) => "landmarks",
        Some(Clock::Step) | None => "instructions",
    }
}

/// What the positions of a trace recorded with the clock named `clock` count, in the plural: as
/// [`counted`], and "branches" for the pmu clock (retired conditional branches).
pub fn counted_by(clock: &str) -> &'static str {
    match clock {
        machine::Landmarks::PMU_CLOCK => "branches",
        name => counted(Clock::from_name(name)),
    }
}

/// What a position is called: "icount" or "landmark" ([`Clock::unit`]).
pub fn unit(clock: Option<Clock>) -> &'static str {
    clock.unwrap_or(Clock::Step).unit()
}

/// How the clock a trace header names (`step`, `landmark`, `pmu`) names positions, for someone who has
/// not read the README.
pub fn clock_meaning(name: &str) -> &'static str {
    if name == machine::Landmarks::PMU_CLOCK {
        return "positions are conditional branches the guest retired, as a performance counter counts \
                them (recorded on a simulated counter), and the instructions since";
    }
    match Clock::from_name(name) {
        Some(Clock::Step) => "positions are instruction counts: every instruction single-stepped",
        Some(Clock::Landmark) => {
            "positions are landmarks: exits the guest itself caused, run free in between"
        }
        None => "a clock this retrovisor does not know",
    }
}

/// `--time` as the command line spells it: "host" or "virtual".
pub fn time_mode(mode: &TimeMode) -> &'static str {
    match mode {
        TimeMode::Host => "host",
        TimeMode::Virtual => "virtual",
    }
}

/// What a time mode meant for the guest.
pub fn time_meaning(mode: &TimeMode) -> &'static str {
    match mode {
        TimeMode::Host => "the PIT, RTC and TSC followed the host's clocks",
        TimeMode::Virtual => "the PIT, RTC and TSC followed the instruction count",
    }
}

/// How often checkpoints were taken: `checkpoint_every` holds instructions for the step clock and
/// milliseconds of wall time for the landmark clock.
pub fn checkpoint_interval(header: &traces::Header) -> String {
    match clock_of(header) {
        Some(Clock::Landmark) => format!(
            "every {} ms (at the first landmark after)",
            header.checkpoint_every
        ),
        _ => format!("every {} instructions", header.checkpoint_every),
    }
}

pub(crate) fn describe_stop(stop: &traces::StopReason) -> String {
    match stop {
        traces::StopReason::GuestExit { status } => format!("exited with status {status}"),
        traces::StopReason::TripleFault => "triple-faulted".into(),
        traces::StopReason::Halted => "halted with nothing left to wake it".into(),
        traces::StopReason::UserStop => "was stopped by the user".into(),
        traces::StopReason::InstructionLimit => {
            "was stopped at the instruction limit (--max-instructions)".into()
        }
    }
}

/// Writes a line to standard error. Unlike `eprintln!`, it does not panic when standard error
/// cannot be written (say it is a file on a full disk): the exit status still tells what happened.
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A time in seconds since the Unix epoch as a UTC date and time: `2026-12-07 21:05:12 UTC`.
pub fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // The civil date of a day count (the proleptic Gregorian calendar, eras of 400 years).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod utc_tests {
    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_679_783), "2026-12-07 21:43:03 UTC");
    }
}
