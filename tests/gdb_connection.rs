//! The gdb server's connection handling: malformed packets and noise on the wire, oversized packets,
//! dropped and repeated connections, Ctrl-C, detach and kill, and the loopback-only default.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A gdb remote-protocol packet with its checksum.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, u8::wrapping_add);
    format!("${body}#{sum:02x}").into_bytes()
}

/// A gdb in batch mode running in the background, writing to `log`.
fn spawn_gdb(port: u16, elf: &Path, cmds: &[&str], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    // Not under `timeout` as gdb_batch runs it: the Ctrl-C test signals gdb itself.
    Command::new("gdb")
        .args(gdb_args(port, elf, cmds))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("cannot run gdb")
}

/// Calls `check` every 20 ms until it returns a value, and returns that; fails with its last complaint
/// once `secs` seconds have passed.
fn poll<T>(secs: u64, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check() {
            Ok(value) => return value,
            Err(complaint) => assert!(Instant::now() < deadline, "{complaint}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `log` contains `needle`; returns its contents.
fn wait_for(log: &Path, needle: &str) -> String {
    poll(60, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            Ok(text)
        } else {
            Err(format!("no {needle:?} in gdb output:\n{text}"))
        }
    })
}

/// Waits until the server's stderr contains `needle` `times` times.
fn wait_for_server(server: &GdbServer, needle: &str, times: usize) {
    poll(30, || {
        let stderr = server.stderr();
        if stderr.matches(needle).count() >= times {
            Ok(())
        } else {
            Err(format!(
                "{needle:?} not {times} times in retrovisor's stderr:\n{stderr}"
            ))
        }
    });
}

/// demo.elf recorded (with checkpoints close together) in a fresh scratch directory `name`.
fn demo_trace(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    let (trace, rec) = record(&dir, "demo", &["--checkpoint-every", "2000"]);
    assert_eq!(status(&rec), 3, "{}", text(&rec.stderr));
    trace
}

/// Sends `request` on a raw connection and reads the reply: the acks that come before it (`+`, and `-` for a
/// packet with a bad checksum) and the reply packet's body, whose checksum it checks.
fn exchange(raw: &mut TcpStream, request: &[u8]) -> (String, String) {
    raw.write_all(request).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8];
    // The reply ends two checksum characters after its `#`.
    while got.len() < 3 || got[got.len() - 3] != b'#' {
        match raw.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            other => panic!(
                "no reply to {:?} ({other:?}) after {:?}",
                String::from_utf8_lossy(request),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let got = String::from_utf8(got).unwrap();
    let (acks, reply) = got.split_once('$').unwrap();
    let body = &reply[..reply.len() - 3];
    assert_eq!(
        packet(body),
        format!("${reply}").into_bytes(),
        "bad checksum"
    );
    (acks.to_string(), body.to_string())
}

/// Sends each request gdbstub cannot handle, or the noise it would end the session on, and checks the reply
/// (acks included when `acked`), and that `?` is answered with `stop` after it.
fn hostile_requests(raw: &mut TcpStream, x86_64: bool, stop: &str, acked: bool) {
    // An error for a register or memory request is E00, but that the 64-bit layout has room for the address:
    // there memory that is not there is EREMOTEIO (E79), and a breakpoint may be set anywhere.
    let (read_max, break_max) = if x86_64 {
        ("E79", "OK")
    } else {
        ("E00", "E00")
    };
    // One register byte short of the layout's `G` packet.
    let short_g = format!("G{}", "00".repeat(if x86_64 { 552 } else { 308 } - 1));
    let then_stop = |noise: &[u8]| [noise, &packet("?")[..]].concat();
    let cases: [(Vec<u8>, &str, &str); 13] = [
        (packet("mffffffffffffffff,4"), read_max, "+"),
        (packet("Z0,ffffffffffffffff,1"), break_max, "+"),
        (packet("vCont;t"), "E00", "+"),
        (packet(&short_g), "E00", "+"),
        (packet("qRcmd,zz"), "E00", "+"),
        (
            packet("qXfer:features:read:../../etc/passwd:0,fff"),
            "E00",
            "+",
        ),
        (packet("qXfer:features:read:target.xml:-1,fff"), "E00", "+"),
        (packet("qXfer:features:read:target.xml:zz"), "E00", "+"),
        (packet("m,zz"), "E00", "+"),
        (packet("Z0,notanumber,1"), "E00", "+"),
        (packet("vCont;x"), "E00", "+"),
        // Noise outside packets gets no reply; a bad checksum gets a request to send again (without acks,
        // nothing); the `?` after them is answered.
        (then_stop(b"\xff\xfe not a packet \x00\x7f"), stop, "+"),
        (then_stop(b"$garbage#00"), stop, "-+"),
    ];
    for (request, reply, acks) in cases {
        let answer = exchange(raw, &request);
        let acks = if acked { acks } else { "" };
        let what = String::from_utf8_lossy(&request);
        assert_eq!(answer, (acks.to_string(), reply.to_string()), "{what}");
        let after = exchange(raw, &packet("?"));
        assert_eq!(after.1, stop, "the session did not go on after {what}");
    }
}

#[test]
fn hostile_packets_get_error_replies_and_the_session_goes_on() {
    let trace = demo_trace("gdb-hostile");
    for x86_64 in [false, true] {
        let layout: &[&str] = if x86_64 {
            &["--gdb-arch", "x86-64"]
        } else {
            &[]
        };
        let mut server = GdbServer::start(&trace, layout);
        let mut raw = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        hostile_requests(&mut raw, x86_64, "T05thread:01;", true);
        // Again as gdb talks: with thread ids that name the process, and without acks. Each gdbstub started
        // after an error must do the same.
        let (acks, features) = exchange(&mut raw, &packet("qSupported:multiprocess+"));
        assert!(
            acks == "+" && features.starts_with("PacketSize=4000;"),
            "{features}"
        );
        let no_acks = exchange(&mut raw, &packet("QStartNoAckMode"));
        assert_eq!(no_acks, ("+".to_string(), "OK".to_string()));
        hostile_requests(&mut raw, x86_64, "T05thread:p01.01;", false);
        let (_, registers) = exchange(&mut raw, &packet("g"));
        assert!(
            !registers.is_empty() && !registers.starts_with('E'),
            "{registers}"
        );
        let stderr = server.stderr();
        assert!(!stderr.contains("session ended"), "{stderr}");
        assert_eq!(exchange(&mut raw, &packet("D")).1, "OK");
        assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
    }
}

#[test]
fn an_oversized_packet_drops_its_client_and_the_next_one_is_served() {
    let trace = demo_trace("gdb-oversized");
    let mut server = GdbServer::start(&trace, &[]);
    let mut big = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    big.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // 10 MiB of a packet that never ends. The server drops the client long before the end, which may fail
    // this write.
    let mut unterminated = vec![b'a'; 10 << 20];
    unterminated[0] = b'$';
    let _ = big.write_all(&unterminated);
    match big.read(&mut [0u8]) {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the client sending 10 MiB was not dropped: {other:?}"),
    }
    wait_for_server(&server, "a packet longer than 16384 bytes", 1);
    // The next one is served at once, instead of being told a debugger is attached.
    let mut next = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(exchange(&mut next, &packet("?")).1, "T05thread:01;");
    assert_eq!(exchange(&mut next, &packet("D")).1, "OK");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn a_new_gdb_carries_on_where_the_last_one_left() {
    let trace = demo_trace("gdb-reconnect");
    let mut server = GdbServer::start(&trace, &[]);
    let elf = guest("demo");
    // `disconnect` closes the connection without detaching.
    let out = gdb_batch(
        server.port,
        &elf,
        &["stepi 7", "monitor when", "disconnect"],
    );
    assert_eq!(when_answers(&out)[0].0, 7, "{out}");
    wait_for_server(&server, "waiting for the next connection", 1);
    assert!(server.running(), "{}", server.stderr());

    // A gdb killed outright while connected.
    let dir = scratch("gdb-reconnect-kill");
    let log = dir.join("gdb.log");
    let mut gdb = spawn_gdb(
        server.port,
        &elf,
        &["stepi", "monitor when", "echo READY\\n", "shell sleep 60"],
        &log,
    );
    let out = wait_for(&log, "READY");
    assert_eq!(when_answers(&out)[0].0, 8, "{out}");
    gdb.kill().unwrap();
    gdb.wait().unwrap();
    wait_for_server(&server, "waiting for the next connection", 2);
    assert!(server.running(), "{}", server.stderr());

    let out = gdb_batch(server.port, &elf, &["monitor when", "detach"]);
    assert_eq!(when_answers(&out)[0].0, 8, "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn kill_from_gdb_ends_the_server_with_status_0() {
    let trace = demo_trace("gdb-kill");
    let mut server = GdbServer::start(&trace, &[]);
    let out = gdb_batch(server.port, &guest("demo"), &["stepi", "kill"]);
    // gdb 13 reports the server closing the connection after `k` as "Remote connection closed".
    assert!(out.contains("Kill the program being debugged?"), "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn ctrl_c_interrupts_a_long_continue() {
    let dir = scratch("gdb-ctrl-c");
    // Default checkpoints: the whole recording is one long forward run from boot.
    let (trace, rec) = record(&dir, "timer", &[]);
    assert_eq!(status(&rec), 1, "{}", text(&rec.stderr));
    let mut server = GdbServer::start(&trace, &[]);
    let log = dir.join("gdb.log");
    let mut gdb = spawn_gdb(
        server.port,
        &guest("timer"),
        &["continue", "monitor when", "detach"],
        &log,
    );
    // Connected (gdb shows the first frame), then `continue` runs: interrupt it as a user's Ctrl-C would.
    wait_for(&log, "boot32.S");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(gdb.id() as i32, libc::SIGINT) };
    poll(60, || match gdb.try_wait().unwrap() {
        Some(_) => Ok(()),
        None => Err("gdb did not finish".to_string()),
    });
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("Program received signal SIGINT"), "{out}");
    let (now, end) = when_answers(&out)[0];
    assert!(0 < now && now < end, "interrupted at {now} of {end}: {out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn the_server_refuses_non_loopback_addresses_unless_allowed() {
    let trace = demo_trace("gdb-loopback");
    let t = trace.to_str().unwrap();
    let out = rv(&["replay", t, "--gdb", "0.0.0.0:0"]);
    assert_eq!(status(&out), 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--gdb-allow-remote"),
        "{err}"
    );
    let out = rv(&["replay", t, "--gdb-allow-remote"]);
    assert_eq!(status(&out), 2, "--gdb-allow-remote needs --gdb");
}

#[test]
fn a_second_gdb_is_refused_while_one_is_attached_and_served_after() {
    let trace = demo_trace("gdb-second");
    let mut server = GdbServer::start(&trace, &[]);
    let elf = guest("demo");
    let dir = scratch("gdb-second-log");
    let log = dir.join("first.log");
    let mut first = spawn_gdb(
        server.port,
        &elf,
        &[
            "stepi 3",
            "echo READY\\n",
            "shell sleep 3",
            "monitor when",
            "disconnect",
        ],
        &log,
    );
    wait_for(&log, "READY");
    // The second gdb is told who holds the replay, instead of waiting in silence.
    let second = gdb_batch(server.port, &elf, &["monitor when"]);
    assert!(
        second.contains("a debugger is already attached from 127.0.0.1:"),
        "{second}"
    );
    assert!(when_answers(&second).is_empty(), "{second}");
    wait_for_server(&server, "refused gdb from", 1);
    poll(30, || match first.try_wait().unwrap() {
        Some(_) => Ok(()),
        None => Err("the first gdb did not finish".to_string()),
    });
    // The first session was not disturbed, and once it is gone the next gdb is served.
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(when_answers(&out)[0].0, 3, "{out}");
    let third = gdb_batch(server.port, &elf, &["monitor when", "detach"]);
    assert_eq!(when_answers(&third)[0].0, 3, "{third}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
}

#[test]
fn seeking_past_a_corrupt_checkpoint_falls_back_to_the_one_before() {
    let trace = demo_trace("gdb-corrupt-checkpoint");
    // Flip a byte in the payload of a later checkpoint: its header still reads, its contents do not.
    let files = checkpoint_files(&trace);
    assert!(files.len() >= 5, "{files:?}");
    let victim = &files[3];
    let icount: u64 = victim
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(victim, bytes).unwrap();

    let mut server = GdbServer::start(&trace, &[]);
    let target = icount + 500;
    let out = gdb_batch(
        server.port,
        &guest("demo"),
        &[&format!("monitor seek {target}"), "monitor when", "detach"],
    );
    assert!(
        out.contains("warning: checkpoint 3 cannot be used")
            && out.contains("starting from checkpoint 2"),
        "{out}"
    );
    assert_eq!(when_answers(&out)[0].0, target, "{out}");
    assert_eq!(server.wait_exit(10), Some(0), "{}", server.stderr());
    // A replay from boot passes the damaged checkpoint's position and still matches the recording.
    let r = replay(&trace, &[]);
    assert_eq!(status(&r), 3, "{}", text(&r.stderr));
    // And `info --verify` names it.
    let v = rv(&["info", "--verify", trace.to_str().unwrap()]);
    assert_eq!(status(&v), 2);
    assert!(
        text(&v.stdout).contains(victim.file_name().unwrap().to_str().unwrap()),
        "{}",
        text(&v.stdout)
    );
}
