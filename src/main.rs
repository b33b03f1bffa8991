//! `retrovisor`: record a KVM guest, replay it exactly, and inspect traces.

mod calls;
mod cli;
mod clock_arg;
mod diff;
mod doctor;
mod hunt;
mod timeline;
mod words;

fn main() {
    // Rust ignores SIGPIPE, which turns `retrovisor info T | head` into a panic on the closed pipe; restore
    // the default so retrovisor ends quietly like any other Unix tool.
    // SAFETY: setting a signal's disposition to SIG_DFL at the start of main, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    std::process::exit(cli::main());
}
