//! The same guest image behaves the same under QEMU (`-kernel`, TCG) as under retrovisor: the devices sit at
//! the standard PC ports with standard semantics. Only guests whose output is deterministic are compared.

mod common;
use common::*;
use std::process::{Command, Stdio};

/// Runs `kernel` under QEMU with `input` on the serial port; returns (exit status, serial output).
fn qemu(kernel: &str, input: &[u8], extra: &[&str]) -> (i32, Vec<u8>) {
    use std::io::Write;
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-kernel", kernel, "-serial", "stdio", "-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-accel", "tcg", "-m", "32"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 is needed for this test (Debian package qemu-system-x86; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

fn compare(name: &str, input: &[u8]) {
    compare_with(name, input, &[]);
}

/// [`compare`] with extra QEMU arguments.
fn compare_with(name: &str, input: &[u8], qemu_args: &[&str]) {
    let kernel = guest(name);
    let (qemu_status, qemu_out) = qemu(kernel.to_str().unwrap(), input, qemu_args);
    let dir = scratch(&format!("qemu-{name}"));
    let input_file = dir.join("input");
    std::fs::write(&input_file, input).unwrap();
    let ours = rv(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial-input",
        input_file.to_str().unwrap(),
    ]);
    assert_eq!(
        text(&ours.stdout),
        text(&qemu_out),
        "{name}: retrovisor and QEMU print differently"
    );
    // QEMU with -no-reboot exits 0 on a triple fault; retrovisor reports it as 6. Otherwise statuses agree.
    if qemu_status != 0 {
        assert_eq!(
            status(&ours),
            qemu_status,
            "{name}: exit status differs from QEMU's"
        );
    }
}

#[test]
fn hello_prints_the_same_as_under_qemu() {
    compare("hello", b"");
}

#[test]
fn minimal_prints_the_same_as_under_qemu() {
    compare("minimal", b"");
}

#[test]
fn demo_prints_the_same_as_under_qemu() {
    compare("demo", b"");
}

#[test]
fn echo_with_input_prints_the_same_as_under_qemu() {
    compare("echo", b"abc\nhello world\nquit\n");
}

#[test]
fn triple_fault_guest_prints_the_same_as_under_qemu() {
    compare("fault", b"");
}

#[test]
fn instructions_the_vmm_completes_give_what_qemu_gives() {
    // popcnt, cmpxchg16b, fnclex, fwait and int3 in ring 0: this host's KVM cannot emulate them, so
    // retrovisor completes them. QEMU's default CPU has no POPCNT: use its fullest model.
    compare_with("insns64", b"", &["-cpu", "max"]);
}
