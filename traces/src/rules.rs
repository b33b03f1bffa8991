//! What the recorded machine can produce: the rules every event of a trace follows, checked as
//! `events.bin` is read (FORMAT.md, "What events may say").
//!
//! The codec only checks that the bytes decode. An attacker who fixes up the CRCs can still write
//! events that decode but that no recording could hold (an IRQ on a line the PIC pair does not have,
//! a stop in the middle of the stream), and replay would then apply them to the machine, or stop on
//! them, far from where the trace was read. These checks refuse such a trace when it is opened.

use thiserror::Error;

use crate::format::{
    ClockKind, Event, EventKind, Header, HostInsn, StopReason, IRQ_LINES, UART_RX_FIFO_BYTES,
};

/// RFLAGS bits that exist (CF, the always-one bit 1, PF, AF, ZF, SF, TF, IF, DF, OF, IOPL, NT, VM, AC,
/// VIF, VIP, ID), less RF, which a fingerprint leaves out: every other bit reads as zero.
const FINGERPRINT_RFLAGS: u64 = 0x003E_7FD7;
/// RFLAGS bit 1, which always reads as one.
const RFLAGS_FIXED: u64 = 1 << 1;

/// Why an event cannot have been recorded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EventError {
    /// A vCPU the machine does not have.
    #[error("the event names vCPU {cpu}, but the machine has {cpus} (numbered from 0)")]
    NoSuchCpu {
        /// The vCPU the event names.
        cpu: u8,
        /// How many the header says the machine has.
        cpus: usize,
    },
    /// A vCPU switch or APIC timer in the trace of a uniprocessor machine.
    #[error(
        "a vCPU switch or APIC timer event in the trace of a machine with one vCPU (and no APIC)"
    )]
    SwitchWithOneCpu,
    /// An IRQ on a line the interrupt controllers do not have.
    #[error("IRQ line {line} does not exist: the PIC pair has lines 0 to {}", IRQ_LINES - 1)]
    NoSuchIrqLine {
        /// The line the event names.
        line: u8,
    },
    /// Serial input of no bytes: the recorder logs input only when the UART took some.
    #[error("it carries no bytes, but serial input is logged only when the UART took some")]
    EmptySerialRx,
    /// More serial input at once than the UART's receive FIFO holds.
    #[error("it carries {len} bytes, more than the {UART_RX_FIFO_BYTES} the UART's receive FIFO takes at once")]
    SerialRxOverflow {
        /// The bytes it carries.
        len: usize,
    },
    /// A reading of the monotonic clock below an earlier one.
    #[error("the monotonic clock reads {ns} ns, less than its earlier reading of {previous} ns; it never goes back")]
    ClockBackward {
        /// This reading.
        ns: u64,
        /// The highest reading before it.
        previous: u64,
    },
    /// An auxiliary value for an instruction that has none.
    #[error("a {insn:?} result comes with aux {aux:#x}, but only RDTSCP returns a second value (TSC_AUX)")]
    UnexpectedAux {
        /// The instruction.
        insn: HostInsn,
        /// The value it carries.
        aux: u64,
    },
    /// A TSC_AUX wider than the 32-bit register it is read from.
    #[error("its TSC_AUX is {aux:#x}, wider than the 32-bit register RDTSCP reads it from")]
    WideTscAux {
        /// The value it carries.
        aux: u64,
    },
    /// An even exit status: isa-debug-exit gives `(value << 1) | 1`.
    #[error("guest exit status {status} is even, but isa-debug-exit gives (value << 1) | 1, an odd number")]
    EvenExitStatus {
        /// The status.
        status: u32,
    },
    /// An event after the stop event, which ends the recording.
    #[error("it follows the stop event (event {stop}), which is the recording's last")]
    AfterStop {
        /// Index of the stop event in the stream.
        stop: u64,
    },
    /// A kick in a trace whose clock never kicks.
    #[error("only the landmark clock kicks, and this trace was recorded with the {clock:?} clock")]
    KickWithoutLandmarks {
        /// The clock the header names.
        clock: String,
    },
    /// A fingerprint whose RFLAGS no CPU can hold.
    #[error("its fingerprint's rflags {rflags:#x} cannot be: bit 1 always reads as one, RF is left out of \
             fingerprints, and the bits outside {FINGERPRINT_RFLAGS:#x} always read as zero")]
    BadRflags {
        /// The value it carries.
        rflags: u64,
    },
    /// An instruction pointer no x86-64 CPU can hold.
    #[error("{what} {rip:#x} is not a canonical address (bits 63 to 56 must all equal bit 56)")]
    NonCanonical {
        /// Which value: the event's rip or its fingerprint's.
        what: &'static str,
        /// The value.
        rip: u64,
    },
}

/// Checks a trace's events in stream order against what the machine can produce; it remembers what
/// the rules that span events need (the last monotonic reading, whether the stop has been seen).
pub(crate) struct EventRules {
    /// The header's vCPU count.
    cpus: usize,
    /// The header's clock: only the landmark clock kicks.
    clock: String,
    /// The highest monotonic clock reading so far.
    monotonic: Option<u64>,
    /// Index of the stop event, once seen.
    stop: Option<u64>,
    /// Index of the next event.
    index: u64,
}

impl EventRules {
    /// Rules for the events of the trace `header` describes.
    pub fn new(header: &Header) -> EventRules {
        EventRules {
            cpus: header.cpus,
            clock: header.clock.clone(),
            monotonic: None,
            stop: None,
            index: 0,
        }
    }

    /// Checks the next event of the stream.
    pub fn check(&mut self, event: &Event) -> Result<(), EventError> {
        let index = self.index;
        self.index += 1;
        if let Some(stop) = self.stop {
            return Err(EventError::AfterStop { stop });
        }
        canonical("rip", event.rip)?;
        match &event.kind {
            EventKind::SerialRx { bytes } if bytes.is_empty() => Err(EventError::EmptySerialRx),
            EventKind::SerialRx { bytes } if bytes.len() > UART_RX_FIFO_BYTES => {
                Err(EventError::SerialRxOverflow { len: bytes.len() })
            }
            EventKind::Irq { line } if *line >= IRQ_LINES => {
                Err(EventError::NoSuchIrqLine { line: *line })
            }
            EventKind::Clock {
                kind: ClockKind::Monotonic,
                ns,
            } => {
                // Wall time may step back (the host's clock is set); monotonic time never does.
                if let Some(previous) = self.monotonic.filter(|&p| *ns < p) {
                    return Err(EventError::ClockBackward { ns: *ns, previous });
                }
                self.monotonic = Some(*ns);
                Ok(())
            }
            EventKind::HostValue {
                insn: HostInsn::Rdtscp,
                aux,
                ..
            } if *aux > u64::from(u32::MAX) => Err(EventError::WideTscAux { aux: *aux }),
            EventKind::HostValue { insn, aux, .. } if *insn != HostInsn::Rdtscp && *aux != 0 => {
                Err(EventError::UnexpectedAux {
                    insn: *insn,
                    aux: *aux,
                })
            }
            EventKind::Stop { reason } => {
                if let StopReason::GuestExit { status } = reason {
                    if status % 2 == 0 {
                        return Err(EventError::EvenExitStatus { status: *status });
                    }
                }
                self.stop = Some(index);
                Ok(())
            }
            // Points between positions exist only where positions are landmarks: exits (the landmark
            // clock) or retired conditional branches (the pmu clock).
            EventKind::Kick { .. } if !matches!(self.clock.as_str(), "landmark" | "pmu") => {
                Err(EventError::KickWithoutLandmarks {
                    clock: self.clock.clone(),
                })
            }
            EventKind::Kick { fingerprint } => {
                let rflags = fingerprint.rflags;
                if rflags & RFLAGS_FIXED == 0 || rflags & !FINGERPRINT_RFLAGS != 0 {
                    return Err(EventError::BadRflags { rflags });
                }
                canonical("its fingerprint's rip", fingerprint.rip)
            }
            // Any vector can come from the PIC pair: the guest programs their vector bases (ICW2), and
            // replay checks each against what the PIC delivers at that point. Wall-clock readings,
            // random numbers and TSC values are whatever the host gave.
            EventKind::Switch { cpu } | EventKind::ApicTimer { cpu, .. }
                if usize::from(*cpu) >= self.cpus =>
            {
                Err(EventError::NoSuchCpu {
                    cpu: *cpu,
                    cpus: self.cpus,
                })
            }
            EventKind::Switch { .. } | EventKind::ApicTimer { .. } if self.cpus == 1 => {
                Err(EventError::SwitchWithOneCpu)
            }
            EventKind::SerialRx { .. }
            | EventKind::Switch { .. }
            | EventKind::ApicTimer { .. }
            | EventKind::Irq { .. }
            | EventKind::Interrupt { .. }
            | EventKind::Clock { .. }
            | EventKind::HostValue { .. } => Ok(()),
        }
    }
}

/// Checks that `rip` is canonical with 5-level paging, the widest virtual addresses x86-64 has (so
/// every address canonical with 4-level paging, and every 32-bit one, is too): bits 63 to 57 copy
/// bit 56.
fn canonical(what: &'static str, rip: u64) -> Result<(), EventError> {
    if ((rip << 7) as i64 >> 7) as u64 == rip {
        Ok(())
    } else {
        Err(EventError::NonCanonical { what, rip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Fingerprint;

    fn header(clock: &str) -> Header {
        Header {
            format_version: crate::format::FORMAT_VERSION,
            tool_version: "test".into(),
            image_path: "guest.elf".into(),
            image_sha256: crate::format::sha256_hex(b"guest"),
            image_size: 5,
            machine: crate::format::MachineConfig {
                ram_bytes: 1 << 20,
                cmdline: String::new(),
                memory_map: Vec::new(),
            },
            clock: clock.into(),
            time_mode: crate::format::TimeMode::Host,
            checkpoint_every: 1000,
            created_unix_secs: 0,
            disks: vec![],
            digest: Default::default(),
            host_traps: false,
            page_backing: false,
            cpuid: Vec::new(),
            initrd: None,
            cpu_model: "host".into(),
            vmm_cpuid: false,
            recorded_on: None,
            cpus: 1,
            cold_checkpoints: false,
            chaos_seed: None,
            branched_from: None,
        }
    }

    fn check(clock: &str, kinds: Vec<EventKind>) -> Result<(), EventError> {
        let mut rules = EventRules::new(&header(clock));
        kinds.into_iter().try_for_each(|kind| {
            rules.check(&Event {
                at: 1,
                rip: 0x10_0000,
                kind,
            })
        })
    }

    fn kick(rip: u64, rflags: u64) -> EventKind {
        EventKind::Kick {
            fingerprint: Fingerprint {
                rip,
                rsp: 0x8000,
                rflags,
                regs: 1,
                memory: 2,
            },
        }
    }

    #[test]
    fn what_a_recording_holds_passes() {
        let monotonic = |ns| EventKind::Clock {
            kind: ClockKind::Monotonic,
            ns,
        };
        check(
            "landmark",
            vec![
                EventKind::SerialRx {
                    bytes: vec![b'x'; 64],
                },
                EventKind::Irq { line: 15 },
                EventKind::Interrupt { vector: 0 },
                monotonic(5),
                monotonic(5),
                EventKind::Clock {
                    kind: ClockKind::Wall,
                    ns: 0,
                },
                EventKind::HostValue {
                    insn: HostInsn::Rdtscp,
                    value: 1,
                    aux: u64::from(u32::MAX),
                },
                kick(0xffff_ffff_8100_0000, 0x246),
                kick(0x00ff_ffff_ffff_f000, 0x2),
                EventKind::Stop {
                    reason: StopReason::GuestExit { status: 3 },
                },
            ],
        )
        .unwrap();
    }

    #[test]
    fn what_the_machine_cannot_do_is_named() {
        let stop = EventKind::Stop {
            reason: StopReason::Halted,
        };
        let cases = [
            (
                vec![EventKind::Irq { line: 16 }],
                "IRQ line 16 does not exist",
            ),
            (vec![EventKind::SerialRx { bytes: vec![] }], "no bytes"),
            (
                vec![EventKind::SerialRx { bytes: vec![0; 65] }],
                "65 bytes, more than the 64",
            ),
            (
                vec![
                    EventKind::Clock {
                        kind: ClockKind::Monotonic,
                        ns: 7,
                    },
                    EventKind::Clock {
                        kind: ClockKind::Monotonic,
                        ns: 6,
                    },
                ],
                "reads 6 ns, less than its earlier reading of 7 ns",
            ),
            (
                vec![EventKind::HostValue {
                    insn: HostInsn::Rdrand,
                    value: 1,
                    aux: 1,
                }],
                "a Rdrand result comes with aux 0x1",
            ),
            (
                vec![EventKind::HostValue {
                    insn: HostInsn::Rdtscp,
                    value: 1,
                    aux: 1 << 32,
                }],
                "wider than the 32-bit register",
            ),
            (
                vec![EventKind::Stop {
                    reason: StopReason::GuestExit { status: 4 },
                }],
                "status 4 is even",
            ),
            (
                vec![stop.clone(), EventKind::Irq { line: 0 }],
                "follows the stop event (event 0)",
            ),
            (vec![stop.clone(), stop], "follows the stop event"),
            (vec![kick(0x1000, 0x246)], "only the landmark clock kicks"),
        ];
        for (kinds, needle) in cases {
            let err = check("step", kinds).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        for (rip, rflags, needle) in [
            (0x1000, 0x244, "rflags 0x244"),
            (0x1000, 0x1_0246, "rflags 0x10246"),
            (0x1000, 1 << 40 | 2, "rflags"),
            (0x0100_0000_0000_0000, 2, "not a canonical address"),
            (0xfe00_0000_0000_0000, 2, "not a canonical address"),
        ] {
            let err = check("landmark", vec![kick(rip, rflags)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
