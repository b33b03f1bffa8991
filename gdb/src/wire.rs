//! The gdb connection as gdbstub sees it. gdbstub ends a session, without a reply, on anything it cannot parse
//! or handle: a byte outside a packet, a bad checksum, an address wider than the register layout, a `G` of the
//! wrong length, a `vCont` action or a `qXfer` annex it does not know, hex that is not hex. And it grows its
//! packet buffer for as long as a packet goes on. So the [`Wire`] between the socket and gdbstub frames the
//! packets itself: it drops bytes outside packets, asks for a packet with a bad checksum again, closes the
//! connection on a packet longer than [`PACKET_SIZE`], and hands gdbstub whole packets. A packet gdbstub
//! still fails on is answered with an error by [`Wire::reject`], and the session goes on with a new gdbstub on
//! the same wire, which first gets gdb's qSupported and QStartNoAckMode replayed to it so that it speaks as the
//! last one did (the same features, acks or none).

use gdbstub::conn::{Connection, ConnectionExt};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// The longest packet taken, from `$` to checksum, and the size gdbstub advertises (qSupported's
/// `PacketSize`), within which gdb keeps every packet it sends. It is gdb's own ceiling for the size (larger
/// ones are cut to it), far above the biggest register set (a 64-bit `G` packet is 1108 bytes), and lets a
/// memory read move 8 KiB per packet.
pub(crate) const PACKET_SIZE: usize = 16 * 1024;

/// The reply to a request gdbstub cannot handle. The protocol names E00 for a malformed `qXfer` request and
/// takes any `E NN` for others.
const MALFORMED: &[u8] = b"E00";

/// The connection under gdbstub: packets framed and checked, and what gdb negotiated kept for a new gdbstub.
pub(crate) struct Wire {
    stream: TcpStream,
    /// The packet being received, from its `$`; empty between packets.
    partial: Vec<u8>,
    /// Whole packets and single bytes (acks, Ctrl-C) received and not yet handed to gdbstub.
    inbox: VecDeque<Vec<u8>>,
    /// The packet or byte gdbstub is being handed, and how many of its bytes it took.
    current: Vec<u8>,
    taken: usize,
    /// Whether gdbstub wrote anything since it took the last byte of `current` (its ack, in ack mode).
    answered: bool,
    /// The last qSupported packet, which set up the session's features, to replay into a new gdbstub.
    features: Option<Vec<u8>>,
    /// Whether gdb turned acks off (QStartNoAckMode, which gdbstub always accepts), to do it again for a
    /// new gdbstub.
    no_ack: bool,
    /// Replies of a new gdbstub to the replayed negotiation still to discard: gdb had them already.
    muted: usize,
}

impl Wire {
    /// The wire over a gdb's connection.
    pub(crate) fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            partial: Vec::new(),
            inbox: VecDeque::new(),
            current: Vec::new(),
            taken: 0,
            answered: false,
            features: None,
            no_ack: false,
            muted: 0,
        }
    }

    /// The socket, for text gdb's console gets between a resume and its stop reply.
    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Answers the packet gdbstub failed on (the last one it took) with an error, and replays what gdb
    /// negotiated to the next gdbstub. Returns the packet as text for the log; None if gdbstub failed on
    /// something else, such as the replayed negotiation itself, and the session cannot go on.
    pub(crate) fn reject(&mut self) -> io::Result<Option<String>> {
        if self.muted > 0 || !self.current.starts_with(b"$") || self.taken < self.current.len() {
            return Ok(None);
        }
        let mut reply = Vec::new();
        if !self.answered && !self.no_ack {
            reply.push(b'+');
        }
        reply.extend(frame(MALFORMED));
        Write::write_all(&mut self.stream, &reply)?;
        let packet = std::mem::take(&mut self.current);
        self.taken = 0;
        // A qSupported gdbstub fails on must not be replayed.
        if self.features.as_ref() == Some(&packet) {
            self.features = None;
        }
        let no_ack = self.no_ack.then(|| frame(b"QStartNoAckMode"));
        let replay: Vec<Vec<u8>> = self.features.iter().cloned().chain(no_ack).collect();
        self.muted = replay.len();
        for p in replay.into_iter().rev() {
            self.inbox.push_front(p);
        }
        Ok(Some(
            packet[..packet.len().min(80)].escape_ascii().to_string(),
        ))
    }

    /// Reads what gdb sent, waiting for it if `wait`, and frames it. An error at the end of the stream, and
    /// on a packet longer than [`PACKET_SIZE`] (gdb keeps within it: such a client is dropped).
    fn receive(&mut self, wait: bool) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        let n = if wait {
            loop {
                match Read::read(&mut self.stream, &mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    read => break read?,
                }
            }
        } else {
            match recv_now(&self.stream, &mut buf, 0)? {
                Some(n) => n,
                None => return Ok(()),
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        for &byte in &buf[..n] {
            self.frame(byte)?;
        }
        Ok(())
    }

    /// Takes one byte from gdb.
    fn frame(&mut self, byte: u8) -> io::Result<()> {
        if self.partial.is_empty() {
            match byte {
                b'$' => self.partial.push(byte),
                b'+' | 0x03 => self.inbox.push_back(vec![byte]),
                // Noise, and `-`: gdbstub cannot send its last packet again, and would end the session.
                _ => {}
            }
            return Ok(());
        }
        self.partial.push(byte);
        if self.partial.len() > PACKET_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "gdb sent a packet longer than {PACKET_SIZE} bytes, the most it may send here"
                ),
            ));
        }
        // A packet ends two checksum characters after its first `#` (the body has `#` escaped).
        let len = self.partial.len();
        if len < 4 || self.partial[len - 3] != b'#' {
            return Ok(());
        }
        let packet = std::mem::take(&mut self.partial);
        let sum = std::str::from_utf8(&packet[len - 2..])
            .ok()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if sum == Some(checksum(body(&packet))) {
            if body(&packet).starts_with(b"qSupported") {
                self.features = Some(packet.clone());
            }
            self.no_ack |= body(&packet) == b"QStartNoAckMode";
            self.inbox.push_back(packet);
        } else if !self.no_ack {
            // The protocol's request to send it again.
            Write::write_all(&mut self.stream, b"-")?;
        }
        Ok(())
    }
}

impl Connection for &mut Wire {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.write_all(&[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.muted > 0 {
            return Ok(());
        }
        self.answered = true;
        Write::write_all(&mut self.stream, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Each reply ends with a flush.
        if self.muted > 0 {
            self.muted -= 1;
            return Ok(());
        }
        Write::flush(&mut self.stream)
    }

    fn on_session_start(&mut self) -> io::Result<()> {
        // gdbstub writes replies a byte at a time: Nagle's algorithm would hold each byte back until the
        // last one is acknowledged.
        self.stream.set_nodelay(true)
    }
}

impl ConnectionExt for &mut Wire {
    fn read(&mut self) -> io::Result<u8> {
        loop {
            if let Some(&byte) = self.current.get(self.taken) {
                self.taken += 1;
                return Ok(byte);
            }
            if let Some(next) = self.inbox.pop_front() {
                self.current = next;
                self.taken = 0;
                self.answered = false;
                continue;
            }
            self.receive(true)?;
        }
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        if self.taken == self.current.len() && self.inbox.is_empty() {
            self.receive(false)?;
        }
        Ok(self
            .current
            .get(self.taken)
            .or_else(|| self.inbox.front().and_then(|next| next.first()))
            .copied())
    }
}

/// A packet's body: between its `$` and its `#`.
fn body(packet: &[u8]) -> &[u8] {
    &packet[1..packet.len() - 3]
}

/// The remote protocol's checksum of a packet body.
fn checksum(body: &[u8]) -> u8 {
    body.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

/// `body` as a packet, with `$` and its checksum.
pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(body.len() + 4);
    packet.push(b'$');
    packet.extend_from_slice(body);
    packet.extend_from_slice(format!("#{:02x}", checksum(body)).as_bytes());
    packet
}

/// Receives into `buf` what `stream` holds now, without waiting (and leaving it there too if `flags` has
/// MSG_PEEK): None if nothing has arrived, Some(0) at the end of the stream.
pub(crate) fn recv_now(
    stream: &TcpStream,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<Option<usize>> {
    // SAFETY: recv writes at most buf.len() bytes into buf, which we own; MSG_DONTWAIT returns at once
    // without changing the socket's blocking mode, which the blocking reads rely on.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(error),
    }
}
