//! Text for gdb's console while the target runs: the remote protocol's `O` packets, which gdb prints as they
//! arrive while it waits for a stop. gdbstub offers console output only to monitor commands; between a
//! resume and its stop reply the event loop owns the connection, so it writes the packets itself.

use std::io::Write;

/// Bytes of text per packet: gdb grows its buffer for longer ones, but short packets keep every line whole
/// in a gdb that does not.
const CHUNK: usize = 256;

/// Sends `text` to gdb's console (gdb prints it as is: end lines with `\n`). Only valid while gdb waits
/// for a stop reply, that is between a resume and the reply.
pub(crate) fn send(conn: &mut impl Write, text: &str) -> std::io::Result<()> {
    for chunk in text.as_bytes().chunks(CHUNK) {
        conn.write_all(&packet(chunk))?;
    }
    conn.flush()
}

/// The `O` packet that carries `text`, hex-encoded, with its checksum.
fn packet(text: &[u8]) -> Vec<u8> {
    let body: String = std::iter::once("O".to_string())
        .chain(text.iter().map(|b| format!("{b:02x}")))
        .collect();
    crate::wire::frame(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_goes_out_as_checksummed_hex_packets() {
        assert_eq!(packet(b"hi\n"), b"$O68690a#bd");
        let mut wire = Vec::new();
        send(&mut wire, &"x".repeat(CHUNK + 1)).unwrap();
        assert_eq!(String::from_utf8(wire).unwrap().matches("$O").count(), 2);
    }
}
