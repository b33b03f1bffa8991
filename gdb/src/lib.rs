//! The gdb remote target over the replayer: `target remote` into a replay, then run, step, break and watch
//! forward and backward through the recording.
//!
//! - Registers: i386 or x86-64 (see [`ArchChoice`] for how the layout is chosen), with a complete target
//!   description, so gdb needs no `set architecture`.
//! - Memory is read by guest-virtual address through the guest's page tables; writes to memory or registers
//!   are refused (gdb reports an error, the reason follows on its console, and the replay is untouched).
//! - Breakpoints (`break` and `hbreak` alike) and watchpoints are checked by the replayer
//!   ([`replayer::search`]); reverse step and continue stop with gdb's "no more history" at either end.
//! - Positions are instruction counts, so `stepi` and `reverse-stepi` move exactly one recorded step. On this
//!   host's KVM the step that delivers an interrupt also runs the handler's first instruction, and `iretq` runs
//!   together with the instruction after it: gdb sees each such pair as one `stepi`, and a breakpoint on the
//!   second instruction of a pair is never hit.
//! - One gdb at a time: a second one that connects while a session runs is refused with a message naming
//!   the attached peer. A malformed packet gets an error reply and the session goes on ([`wire`]). A dropped
//!   connection, or a packet longer than gdb may send, ends only that session: the replay keeps its position
//!   and the next gdb that connects carries on from it. `detach` or `kill` ends the server.
//! - A replay that fails under gdb (a divergence from the recording, a checkpoint that cannot be read) ends
//!   only the command: gdb's console says why, and the replay stops at a position it reached intact.
//! - `monitor seek` moves by position; [`script`] is the gdb command file whose `rv-seek` also makes gdb
//!   re-read registers and memory, and whose `source` line the server prints when it starts.

mod arch;
pub mod calls;
mod console;
pub mod live;
mod number;
mod recover;
pub mod script;
mod target;
mod wire;

use arch::{GuestArch, I386, X86_64};
use boot::symbols::Symbols;
use gdbstub::stub::{DisconnectReason, GdbStub};
use replayer::search::SearchError;
use replayer::{Replayer, Timeline};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use target::{EventLoop, ReplayTarget};
use thiserror::Error;
use wire::{Wire, PACKET_SIZE};

/// The address gdb's `target remote :1234` means.
pub const DEFAULT_ADDR: &str = "127.0.0.1:1234";

/// Errors from serving a replay to gdb.
#[derive(Debug, Error)]
pub enum GdbError {
    /// The listen address does not resolve.
    #[error("cannot resolve gdb address {addr:?}: {source}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listen address is not on this machine and remote access was not allowed.
    #[error(
        "refusing to serve gdb on {addr}: it is not a loopback address, and anyone who can reach it could read \
         the guest's memory (pass --gdb-allow-remote to allow it)"
    )]
    NotLoopback {
        /// The resolved address.
        addr: SocketAddr,
    },
    /// The listening socket cannot be created.
    #[error("cannot listen for gdb on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listening socket cannot tell its own address (to announce it).
    #[error("cannot tell which address the gdb socket listens on: {source}")]
    LocalAddr {
        /// Why.
        source: std::io::Error,
    },
    /// The guest image cannot be read to choose the register layout.
    #[error("cannot read guest image {path} to choose gdb's register layout: {source}")]
    Image {
        /// The image path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The replay failed while gdb drove it and could not be put back at a position it reached intact.
    #[error(transparent)]
    Replay(#[from] SearchError),
}

/// Which register layout gdb gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchChoice {
    /// x86-64 if the guest image is an ELF64, or if the guest is in long mode at the end of the recording
    /// (a Multiboot image is an ELF32 container even when it switches to 64-bit code, like long64.elf);
    /// i386 otherwise. gdb then needs the matching ELF: for a 64-bit guest booted from an ELF32 container,
    /// its ELF64 build with symbols (long64.sym.elf for long64.elf).
    Auto,
    /// 32-bit registers (gdb `i386`).
    I386,
    /// 64-bit registers (gdb `i386:x86-64`).
    X86_64,
}

/// How to serve gdb.
pub struct GdbOptions {
    /// Where to listen: `HOST:PORT`, `:PORT` or `PORT` (the last two on 127.0.0.1). Port 0 picks a free port,
    /// which the announcement on stderr names.
    pub addr: String,
    /// Allow a non-loopback listen address.
    pub allow_remote: bool,
    /// Register layout.
    pub arch: ArchChoice,
    /// The trace directory (to examine the end of the recording for [`ArchChoice::Auto`]).
    pub trace: PathBuf,
    /// The guest image, if not the path the trace names.
    pub image: Option<PathBuf>,
    /// What `monitor go-live` takes.
    pub live: live::LiveSetup,
}

/// Serves `timeline` to gdb from its current position until gdb detaches or kills it. Guest serial output
/// produced while gdb runs the guest goes to `out` (each piece once, even when execution goes back over it).
pub fn serve(
    timeline: Timeline,
    mut opts: GdbOptions,
    out: Box<dyn Write>,
) -> Result<(), GdbError> {
    let live = std::mem::take(&mut opts.live);
    let opts = &opts;
    let addrs = resolve(&opts.addr, opts.allow_remote)?;
    let image = opts
        .image
        .clone()
        .unwrap_or_else(|| PathBuf::from(&timeline.replay().trace().header().image_path));
    let (elf64, symbols) = read_image(&image)?;
    let x86_64 = match opts.arch {
        ArchChoice::I386 => false,
        ArchChoice::X86_64 => true,
        ArchChoice::Auto => elf64 || ends_in_long_mode(opts),
    };
    // Listen only once the layout is known, so that a gdb connecting at once is answered at once.
    let listener = TcpListener::bind(&addrs[..]).map_err(|source| GdbError::Bind {
        addr: opts.addr.clone(),
        source,
    })?;
    let hint = if x86_64 && !elf64 {
        "; the image is a 32-bit container, so give gdb its ELF64 build with symbols"
    } else {
        ""
    };
    if x86_64 {
        serve_as::<X86_64>(
            ReplayTarget::new(timeline, out, symbols, image.clone(), live),
            &listener,
            &image,
            hint,
        )
    } else {
        serve_as::<I386>(
            ReplayTarget::new(timeline, out, symbols, image.clone(), live),
            &listener,
            &image,
            hint,
        )
    }
}

/// Resolves the listen address, refusing non-loopback ones unless allowed.
fn resolve(addr: &str, allow_remote: bool) -> Result<Vec<SocketAddr>, GdbError> {
    let spec = match addr.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None if addr.parse::<u16>().is_ok() => format!("127.0.0.1:{addr}"),
        None => addr.to_string(),
    };
    let resolve_err = |source| GdbError::Resolve {
        addr: addr.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = spec.to_socket_addrs().map_err(resolve_err)?.collect();
    if addrs.is_empty() {
        return Err(resolve_err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "it names no address",
        )));
    }
    if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        if !allow_remote {
            return Err(GdbError::NotLoopback { addr: *remote });
        }
        eprintln!(
            "retrovisor: warning: gdb server reachable from other machines on {remote}: anyone who can connect \
             can read the guest's memory"
        );
    }
    Ok(addrs)
}

/// Whether the image is an ELF64 (ELF class byte 2), and its symbols.
fn read_image(image: &Path) -> Result<(bool, Symbols), GdbError> {
    let bytes = std::fs::read(image).map_err(|source| GdbError::Image {
        path: image.to_path_buf(),
        source,
    })?;
    let elf64 = bytes.starts_with(b"\x7fELF") && bytes.get(4) == Some(&2);
    Ok((elf64, Symbols::from_elf(&bytes)))
}

/// Whether the guest is in long mode at the end of the recording: replays, on a separate machine with the
/// output discarded, from the last checkpoint to the end. If that fails the user is told, and gets i386.
fn ends_in_long_mode(opts: &GdbOptions) -> bool {
    let probe = || -> Result<bool, replayer::ReplayError> {
        let mut r = Replayer::open(&opts.trace, opts.image.as_deref())?;
        let last = r.trace().checkpoints().len().saturating_sub(1);
        r.restore_checkpoint(last)?;
        let end = r.end();
        r.run_to(end, &mut std::io::sink())?;
        Ok(arch::in_long_mode(r.machine()))
    };
    probe().unwrap_or_else(|e| {
        eprintln!(
            "retrovisor: warning: cannot tell whether the guest ends in long mode ({e}); giving gdb i386 \
             registers (choose with --gdb-arch)"
        );
        false
    })
}

/// Accepts gdb connections one after another until one detaches or kills.
///
/// One gdb at a time: a doorman thread accepts every connection. While no session is running it hands
/// the connection over; while one is, it answers the newcomer's first packet with an error that says
/// who is attached, and closes it, so a second gdb gets a clear refusal instead of silence.
fn serve_as<A: GuestArch>(
    mut target: ReplayTarget<A>,
    listener: &TcpListener,
    image: &Path,
    hint: &str,
) -> Result<(), GdbError> {
    let served = serve_sessions(&mut target, listener, image, hint);
    // A live run still going when the server ends is ended as if stopped, so its trace replays.
    target.end_live();
    served
}

/// [`serve_as`]'s loop over gdb's sessions.
fn serve_sessions<A: GuestArch>(
    target: &mut ReplayTarget<A>,
    listener: &TcpListener,
    image: &Path,
    hint: &str,
) -> Result<(), GdbError> {
    let local = listener
        .local_addr()
        .map_err(|source| GdbError::LocalAddr { source })?;
    // gdb's commands for moving by position: one more `-ex` in the line the user copies.
    let source = match script::install() {
        Ok(path) => format!(" -ex 'source {}'", path.display()),
        Err(e) => {
            eprintln!(
                "retrovisor: warning: {e}; `retrovisor gdb-script` prints the gdb commands (rv-seek, \
                 rv-when, rv-help) to save and source by hand"
            );
            String::new()
        }
    };
    eprintln!(
        "retrovisor: waiting for gdb on {local} ({} registers{hint}); attach with: gdb {} -ex 'target remote \
         {local}'{source}",
        A::NAME,
        image.display()
    );
    let attached: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let doorman = listener
        .try_clone()
        .map_err(|source| GdbError::LocalAddr { source })?;
    let (tx, rx) = mpsc::channel();
    let busy = attached.clone();
    std::thread::spawn(move || accept_loop(&doorman, &busy, &tx));
    loop {
        let Ok((stream, peer)) = rx.recv() else {
            // The doorman only stops if its listener fails for good.
            return Err(GdbError::LocalAddr {
                source: std::io::Error::other("the gdb listener stopped accepting connections"),
            });
        };
        eprintln!(
            "retrovisor: gdb connected from {peer} at {}",
            target.position()
        );
        target.new_session(stream.try_clone().ok());
        let mut wire = Wire::new(stream);
        // gdbstub ends its run on a packet it cannot handle: answer that packet and carry on with a new one.
        let ended = loop {
            let stub = GdbStub::builder(&mut wire)
                .packet_buffer_size(PACKET_SIZE)
                .build()
                .expect("a buffer gdbstub allocates itself always has the size asked for");
            match stub.run_blocking::<EventLoop<'_, A>>(target) {
                Err(e) if !e.is_target_error() && !e.is_connection_error() => match wire.reject() {
                    Ok(Some(packet)) => {
                        eprintln!("retrovisor: gdb: answered {packet} with an error ({e})");
                    }
                    _ => break Err(e),
                },
                ended => break ended,
            }
        };
        *lock(&attached) = None;
        // Close the connection now, not when the next session replaces the target's clone of it: a client
        // dropped for misbehaving must be told, and a hostile one must not keep sending into it.
        target.end_session();
        drop(wire);
        match ended {
            Ok(DisconnectReason::Disconnect) => {
                eprintln!("retrovisor: gdb detached at {}", target.position());
                return Ok(());
            }
            Ok(DisconnectReason::Kill) => {
                eprintln!("retrovisor: gdb killed the replay at {}", target.position());
                return Ok(());
            }
            // Only stop reasons this target never reports (exit, termination) end a session this way.
            Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => {
                return Ok(())
            }
            Err(e) if e.is_target_error() => {
                if let Some(e) = e.into_target_error() {
                    return Err(e.into());
                }
            }
            Err(e) => eprintln!(
                "retrovisor: gdb session ended ({e}); the replay stays at {}; waiting for the next \
                 connection on {local}",
                target.position()
            ),
        }
    }
}

/// The poison-tolerant lock of the attached peer (a panicking holder cannot leave it inconsistent).
fn lock(attached: &Mutex<Option<SocketAddr>>) -> std::sync::MutexGuard<'_, Option<SocketAddr>> {
    attached
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The doorman: hands each connection to the session loop when no gdb is attached, else refuses it.
fn accept_loop(
    listener: &TcpListener,
    attached: &Mutex<Option<SocketAddr>>,
    sessions: &mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // Such as running out of file descriptors: wait a little for it to pass.
                eprintln!("retrovisor: cannot accept a gdb connection: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let mut current = lock(attached);
        match *current {
            Some(holder) => {
                drop(current);
                eprintln!("retrovisor: refused gdb from {peer}: a debugger is already attached from {holder}");
                // Answer off this thread: a silent client must not hold up the next connection.
                std::thread::spawn(move || refuse(stream, holder));
            }
            None => {
                *current = Some(peer);
                if sessions.send((stream, peer)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Tells a second gdb why it cannot attach: its first packet gets an error reply (gdb prints the text
/// after "E."), then the connection closes.
fn refuse(mut stream: TcpStream, holder: SocketAddr) {
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    // gdb starts with `+` and a qSupported packet; wait for the packet's end before answering.
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !seen.contains(&b'#') && seen.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!(
        "E.retrovisor: a debugger is already attached from {holder}; only one gdb at a time can drive \
         the replay (detach or disconnect it first)"
    );
    let _ = stream.write_all(&[b"+", &wire::frame(body.as_bytes())[..]].concat());
    // Give gdb a moment to read the reply before the connection closes under it.
    std::thread::sleep(std::time::Duration::from_millis(200));
}
