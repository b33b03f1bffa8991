//! Numbers as gdb's users type them in monitor commands.

/// A decimal or 0x-prefixed hexadecimal number.
pub(crate) fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}
