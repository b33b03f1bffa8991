//! `retrovisor`: record a KVM guest, replay it exactly, and inspect traces.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
