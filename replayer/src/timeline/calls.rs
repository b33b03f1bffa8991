//! Every call of one function over a whole recording, with its arguments, its return value and where it
//! returned: the question time-travel debuggers answer with a query rather than with stepping.
//!
//! One forward pass from the start of the recording, with breakpoints on the function's entry and on the
//! return addresses of the calls still open ([`run_forward`], so debug registers and a free run where
//! the clock allows). A call's return is the first time RIP reaches its return address with the stack
//! pointer just above the one it was entered with: the return address popped (and the bytes a `ret n`
//! drops). Matching by the stack pointer rather than by nesting keeps recursion, interrupts and other
//! tasks' calls apart, and a task that sleeps inside the call and returns on another vCPU is still
//! matched, its stack being its own.

use super::search::{
    run_forward, seek_exact, step_forward, Hit, ListingEnd, Outcome, SearchError, StopSet,
};
use super::Timeline;
use machine::{arch, Machine};
use std::collections::BTreeSet;
use std::io::Write;
use vocab::Position;

/// Instructions stepped after a stop before running free to the next: calls of a small function in a
/// loop come a few hundred instructions apart, and stepping to the next (about 10 µs a step here) is far
/// cheaper than a free run, whose stop must then be located by stepping from its landmark again.
const STEP_BEFORE_RUNNING: u32 = 4096;

/// At most this many bytes a `ret n` may drop beyond the return address (Windows' stdcall callees, some
/// firmware): a return found farther up the stack belongs to an outer call.
const MAX_RET_POP: u64 = 256;

/// How a call passes its arguments and returns its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// x86-64 System V: RDI, RSI, RDX, RCX, R8, R9, then the stack; the value in RAX.
    SysV64,
    /// i386 cdecl: every argument on the stack; the value in EAX.
    Cdecl32,
    /// i386 `regparm(3)` (the Linux kernel's): EAX, EDX, ECX, then the stack; the value in EAX.
    Regparm32,
    /// 16-bit code, which has no convention to assume: the raw registers AX, BX, CX, DX, SI, DI.
    Raw16,
}

impl Abi {
    /// The convention of code of `bits` (64, 32 or 16: [`arch::code_bits`]): 32-bit code is taken as
    /// cdecl unless `regparm` says the image was built with `-mregparm=3`.
    pub fn of_code_bits(bits: u32, regparm: bool) -> Abi {
        match bits {
            64 => Abi::SysV64,
            32 if regparm => Abi::Regparm32,
            32 => Abi::Cdecl32,
            _ => Abi::Raw16,
        }
    }

    /// The name `calls` prints.
    pub fn name(self) -> &'static str {
        match self {
            Abi::SysV64 => "x86-64 System V",
            Abi::Cdecl32 => "i386 cdecl",
            Abi::Regparm32 => "i386 regparm(3)",
            Abi::Raw16 => "16-bit (raw registers)",
        }
    }

    /// `value` cut to the mode's word (EAX of RAX, AX of RAX).
    fn narrow(self, value: u64) -> u64 {
        value & (u64::MAX >> (64 - 8 * self.word()))
    }

    /// Bytes of a return address (and of a stack slot).
    fn word(self) -> u64 {
        match self {
            Abi::SysV64 => 8,
            Abi::Cdecl32 | Abi::Regparm32 => 4,
            Abi::Raw16 => 2,
        }
    }
}

/// What to look for.
#[derive(Debug, Clone, Copy)]
pub struct CallQuery {
    /// The function's entry address.
    pub entry: u64,
    /// How many arguments to read (from the image's debug information, or a default).
    pub args: usize,
    /// 32-bit code passes its first arguments in registers (`-mregparm=3`).
    pub regparm: bool,
    /// Stop listing after this many calls (their returns are still looked for).
    pub limit: usize,
}

/// A return: where it happened and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Return {
    /// The position at the return address, just after the `ret`.
    pub position: Position,
    /// The vCPU it returned on (another than the call's if the task moved).
    pub cpu: u8,
    /// RAX (EAX, AX in narrower modes).
    pub value: u64,
}

/// One call of the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The position at the function's first instruction.
    pub position: Position,
    /// The vCPU that made it.
    pub cpu: u8,
    /// The convention its arguments were read by.
    pub abi: Abi,
    /// The arguments (for [`Abi::Raw16`], the registers it names), None where a stack slot is unmapped.
    pub args: Vec<Option<u64>>,
    /// The stack pointer at entry (pointing at the return address).
    pub sp: u64,
    /// Where it returns to (None if the stack slot could not be read: then its return is not looked for).
    pub return_address: Option<u64>,
    /// Its return, if it returned before the recording ended.
    pub returned: Option<Return>,
}

/// Where a search is, for a progress line: the position of its last stop and the calls found so far.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The position of the last breakpoint hit (the start before the first).
    pub position: Position,
    /// Calls found.
    pub calls: usize,
}

/// Reads a little-endian word of `bytes` bytes at a guest-virtual address.
fn read_word(m: &Machine, addr: u64, bytes: u64) -> Option<u64> {
    let mut buf = [0u8; 8];
    m.read_virtual(addr, &mut buf[..bytes as usize]).ok()?;
    Some(u64::from_le_bytes(buf))
}

/// The call the machine stands at the first instruction of.
fn call_here(t: &Timeline, q: &CallQuery) -> Call {
    let m = t.replay().machine();
    let (r, abi) = (
        m.regs(),
        Abi::of_code_bits(arch::code_bits(m.sregs()), q.regparm),
    );
    let word = abi.word();
    let stack = |i: u64| read_word(m, r.rsp + word * (1 + i), word);
    let registers: &[u64] = match abi {
        Abi::SysV64 => &[r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9],
        Abi::Regparm32 => &[r.rax, r.rdx, r.rcx],
        Abi::Cdecl32 => &[],
        Abi::Raw16 => &[r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi],
    };
    let count = if abi == Abi::Raw16 {
        registers.len()
    } else {
        q.args
    };
    let args = (0..count)
        .map(|i| match registers.get(i) {
            Some(&v) => Some(abi.narrow(v)),
            None => stack((i - registers.len()) as u64),
        })
        .collect();
    Call {
        position: t.position(),
        cpu: m.current_cpu(),
        abi,
        args,
        sp: r.rsp,
        return_address: read_word(m, r.rsp, word),
        returned: None,
    }
}

/// The open call that a stop at `rip` returns from, if any: the one with this return address whose entry
/// stack pointer lies just below the stack pointer now (the innermost such, for recursion).
fn returning(calls: &[Call], open: &[usize], m: &Machine) -> Option<usize> {
    let (rip, sp) = (m.rip(), m.regs().rsp);
    open.iter()
        .copied()
        .filter(|&i| {
            let c = &calls[i];
            c.return_address == Some(rip) && sp > c.sp && sp - c.sp <= c.abi.word() + MAX_RET_POP
        })
        .max_by_key(|&i| calls[i].sp)
}

/// Steps up to [`STEP_BEFORE_RUNNING`] instructions toward the next breakpoint: its hit, the end of the
/// recording, or None if it is farther.
fn step_to(
    t: &mut Timeline,
    stops: &StopSet,
    out: &mut dyn Write,
) -> Result<Option<Outcome>, SearchError> {
    for _ in 0..STEP_BEFORE_RUNNING {
        match step_forward(t, stops, out)? {
            Outcome::Done => {
                let rip = t.replay().machine().rip();
                if stops.breakpoints.contains(&rip) {
                    return Ok(Some(Outcome::Hit(Hit::Breakpoint(rip))));
                }
            }
            other => return Ok(Some(other)),
        }
    }
    Ok(None)
}

/// Every call of `q.entry` from the start of the recording, in order, with their returns. `poll` is
/// called now and then with the progress; it returns true to stop the search ([`ListingEnd::Interrupted`]).
/// The replay comes back to where it was.
pub fn calls(
    t: &mut Timeline,
    q: &CallQuery,
    out: &mut dyn Write,
    poll: &mut dyn FnMut(Progress) -> bool,
) -> Result<(Vec<Call>, ListingEnd), SearchError> {
    let here = t.position();
    let start = t
        .replay()
        .checkpoint_positions()
        .first()
        .copied()
        .unwrap_or(Position::START);
    seek_exact(t, start, out)?;
    let mut calls: Vec<Call> = Vec::new();
    // Indexes of the calls whose return is still looked for.
    let mut open: Vec<usize> = Vec::new();
    let mut end = ListingEnd::Complete;
    // The recording may start at the entry itself.
    if t.replay().machine().rip() == q.entry && q.limit > 0 {
        open.push(0);
        calls.push(call_here(t, q));
    }
    loop {
        let listing = calls.len() < q.limit;
        if !listing {
            end = ListingEnd::Limit;
            if open.is_empty() {
                break;
            }
        }
        let mut breakpoints: BTreeSet<u64> = open
            .iter()
            .filter_map(|&i| calls[i].return_address)
            .collect();
        if listing {
            breakpoints.insert(q.entry);
        }
        let stops = StopSet {
            breakpoints,
            watches: Vec::new(),
        };
        let progress = Progress {
            position: t.position(),
            calls: calls.len(),
        };
        let outcome = match step_to(t, &stops, out)? {
            Some(outcome) => outcome,
            None => run_forward(t, &stops, None, out, &mut || poll(progress))?,
        };
        match outcome {
            Outcome::Hit(Hit::Breakpoint(_)) => {
                let m = t.replay().machine();
                if let Some(i) = returning(&calls, &open, m) {
                    calls[i].returned = Some(Return {
                        position: t.position(),
                        cpu: m.current_cpu(),
                        value: calls[i].abi.narrow(m.regs().rax),
                    });
                    open.retain(|&j| j != i);
                }
                // A return address may be the entry itself (a call that tail-loops into it).
                if listing && t.replay().machine().rip() == q.entry {
                    let call = call_here(t, q);
                    if call.return_address.is_some() {
                        open.push(calls.len());
                    }
                    calls.push(call);
                }
            }
            Outcome::Interrupted => {
                end = ListingEnd::Interrupted;
                break;
            }
            // The end of the recording (Done and Begin do not come from a forward run without a range).
            _ => break,
        }
    }
    seek_exact(t, here, out)?;
    Ok((calls, end))
}
