//! Reverse execution under a real gdb, by QEMU's reverse-debugging test method: from a position, `stepi` N
//! times recording each PC and icount; `reverse-stepi` N times checking they come back in exact reverse order;
//! forward again checking the same PCs; then breakpoints at all those PCs and `reverse-continue` N times,
//! hitting them in reverse order. On a 32-bit guest, a 64-bit guest, and across timer interrupts (delivery and
//! return from the handler) on both.

mod common;
use common::*;
use std::path::Path;

/// The gdb side of the method (gdb's Python), parameterized by the global `N`.
const SCRIPT: &str = r#"
import gdb

def pc():
    return int(gdb.parse_and_eval("(unsigned long long)$pc"))

def when():
    return gdb.execute("monitor when", to_string=True).strip()

def where(p):
    return gdb.execute("info symbol %#x" % p, to_string=True).split()[0]

def expect(what, i, pcs, whens):
    if pc() != pcs[i] or when() != whens[i]:
        raise gdb.GdbError("%s to step %d: pc %#x (%s), expected %#x (%s)"
                           % (what, i, pc(), when(), pcs[i], whens[i]))

n = int(N)
pcs = [pc()]
whens = [when()]
for i in range(n):
    gdb.execute("stepi", to_string=True)
    pcs.append(pc())
    whens.append(when())
print("FUNCS " + " ".join(where(p) for p in pcs))
print("WHENS " + " | ".join(whens))
for i in range(n - 1, -1, -1):
    gdb.execute("reverse-stepi", to_string=True)
    expect("reverse-stepi", i, pcs, whens)
for i in range(1, n + 1):
    gdb.execute("stepi", to_string=True)
    expect("stepi", i, pcs, whens)
for p in sorted(set(pcs)):
    gdb.execute("break *%#x" % p, to_string=True)
for i in range(n - 1, -1, -1):
    gdb.execute("reverse-continue", to_string=True)
    expect("reverse-continue", i, pcs, whens)
print("REVERSE-DEBUGGING-OK")
"#;

/// Records `guest` with the step clock, serves it to gdb, runs `setup` then the method with `n` steps;
/// returns the functions of the PCs visited, in order (asserting the method passed).
fn reverse_debugging(guest_name: &str, elf: &Path, setup: &[&str], n: usize) -> Vec<String> {
    reverse_debugging_with(
        guest_name,
        elf,
        setup,
        n,
        &["--clock", "step", "--checkpoint-every", "2000"],
    )
}

/// [`reverse_debugging`] of a recording made with `record_args`.
fn reverse_debugging_with(
    guest_name: &str,
    elf: &Path,
    setup: &[&str],
    n: usize,
    record_args: &[&str],
) -> Vec<String> {
    let dir = scratch(&format!("gdb-reverse-{guest_name}"));
    let (trace, _) = record(&dir, guest_name, record_args);
    let script = dir.join("reverse.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let server = GdbServer::start(&trace, &[]);
    let n_cmd = format!("python N = {n}");
    let source = format!("source {}", script.display());
    let mut cmds = setup.to_vec();
    cmds.extend([n_cmd.as_str(), source.as_str(), "detach"]);
    let out = gdb_batch(server.port, elf, &cmds);
    assert!(
        out.contains("REVERSE-DEBUGGING-OK"),
        "the reverse-debugging check failed; gdb printed:\n{out}\nretrovisor stderr:\n{}",
        server.stderr()
    );
    let funcs: Vec<String> = out
        .lines()
        .find_map(|l| l.strip_prefix("FUNCS "))
        .unwrap()
        .split(' ')
        .map(String::from)
        .collect();
    assert_eq!(funcs.len(), n + 1);
    // The positions are consecutive: one stepi is one instruction of the recording (in a landmark trace,
    // the next instruction since the landmark, or the start of the next landmark).
    let whens = when_answers(&out.replace(" | ", "\n").replace("WHENS ", ""));
    assert_eq!(whens.len(), n + 1, "{out}");
    let next = |a: u64, b: u64| b == a + 1 || (b & 0xffff_ffff == 0 && b >> 32 == (a >> 32) + 1);
    assert!(
        whens.windows(2).all(|w| next(w[0].0, w[1].0)),
        "stepi did not advance one instruction at a time: {whens:?}"
    );
    funcs
}

/// Whether `funcs` goes from `from` into `via` and back to `from`, in that order.
fn crosses(funcs: &[String], from: &str, via: &str) -> bool {
    let Some(start) = funcs.iter().position(|f| f == from) else {
        return false;
    };
    let Some(inside) = funcs[start..].iter().position(|f| f == via) else {
        return false;
    };
    funcs[start + inside..].iter().any(|f| f == from)
}

#[test]
fn reverse_steps_and_continues_retrace_a_32_bit_guest_exactly() {
    let funcs = reverse_debugging(
        "demo",
        &guest("demo"),
        &["break checksum", "continue", "delete"],
        20,
    );
    assert!(funcs.iter().all(|f| f == "checksum"), "{funcs:?}");
}

#[test]
fn reverse_steps_and_continues_retrace_a_64_bit_guest_exactly() {
    // gdb loads the ELF64 with symbols; retrovisor picks x86-64 registers by itself (the recorded image is an
    // ELF32 container that switches to long mode).
    let funcs = reverse_debugging(
        "long64",
        &guests().join("long64.sym.elf"),
        &["break main", "continue", "delete"],
        20,
    );
    assert!(funcs.iter().any(|f| f == "serial_init"), "{funcs:?}");
}

/// Going back 30 instructions from the timer handler lands before the interrupt; 80 steps from there run
/// through delivery, the handler, the EOI and the return into the interrupted loop.
const ACROSS_A_TICK: &[&str] = &[
    "break timer_tick",
    "continue",
    "delete",
    "python [gdb.execute('reverse-stepi', to_string=True) for _ in range(30)]",
];

#[test]
fn reverse_steps_cross_interrupt_delivery_and_return_on_a_32_bit_guest() {
    let funcs = reverse_debugging("timer", &guest("timer"), ACROSS_A_TICK, 80);
    assert!(crosses(&funcs, "main", "timer_tick"), "{funcs:?}");
    assert!(funcs.iter().any(|f| f == "irq0"), "{funcs:?}");
}

#[test]
fn reverse_steps_cross_interrupt_delivery_and_return_on_a_64_bit_guest() {
    let funcs = reverse_debugging(
        "long64",
        &guests().join("long64.sym.elf"),
        ACROSS_A_TICK,
        80,
    );
    assert!(crosses(&funcs, "main", "timer_tick"), "{funcs:?}");
}

#[test]
fn reverse_steps_cross_interrupt_delivery_on_a_landmark_trace() {
    // The landmark clock delivered the ticks at kicks; gdb's positions are landmarks and the instructions
    // since them.
    let funcs = reverse_debugging_with(
        "timer",
        &guest("timer"),
        ACROSS_A_TICK,
        80,
        &["--clock", "landmark", "--checkpoint-ms", "20"],
    );
    assert!(crosses(&funcs, "main", "timer_tick"), "{funcs:?}");
}
