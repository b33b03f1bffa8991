//! QEMU's isa-debug-exit device (as configured with `iobase=0xf4,iosize=0x04`): a guest write of `v`
//! ends the machine with process exit status `(v << 1) | 1`, so test guests can report success or
//! failure the same way under QEMU and under us.

use serde::{Deserialize, Serialize};

/// The isa-debug-exit device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugExit {
    /// The exit status requested and not yet taken by the machine.
    exit: Option<u32>,
}

impl DebugExit {
    /// A device with no exit requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// A guest write of `value` (the whole written value, whatever the access width).
    pub fn write(&mut self, value: u32) {
        // QEMU exits at the first write, so a later write before the machine reacts must not change
        // the status. The top bit of `value` is shifted out, as in QEMU's conversion to an exit code.
        self.exit.get_or_insert((value << 1) | 1);
    }

    /// The requested exit status, if the guest asked to exit since the last call.
    pub fn take_exit(&mut self) -> Option<u32> {
        self.exit.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_shifted_and_odd() {
        let mut dev = DebugExit::new();
        assert_eq!(dev.take_exit(), None);
        dev.write(0);
        assert_eq!(dev.take_exit(), Some(1));
        assert_eq!(dev.take_exit(), None);
        dev.write(0x10);
        dev.write(0x11);
        assert_eq!(dev.take_exit(), Some(0x21), "the first request wins");
        dev.write(u32::MAX);
        assert_eq!(dev.take_exit(), Some(u32::MAX));
    }
}
