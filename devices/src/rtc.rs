//! The MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71 (data).
//!
//! The clock registers are not stored and ticked: a read computes them from the wall time the caller
//! passes in plus an offset, and a guest setting the clock only changes that offset. The rest of the 128
//! bytes is plain RAM, pre-filled with the memory sizes a PC BIOS records there.
//!
//! No interrupts: the periodic, alarm and update-ended interrupts (IRQ 8) are not implemented, so status
//! register C always reads 0, and the update-in-progress bit never shows.

use serde::{Deserialize, Serialize};

/// Index port; bit 7 of the written value disables NMI on a PC, which we have no use for.
const INDEX_PORT: u16 = 0x70;
/// Data port.
const DATA_PORT: u16 = 0x71;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

/// Status A: update in progress (read-only).
const A_UIP: u8 = 0x80;
/// Status B: the clock is being set; updates are inhibited and the time registers are plain RAM.
const B_SET: u8 = 0x80;
/// Status B: binary rather than BCD register values.
const B_BINARY: u8 = 0x04;
/// Status B: 24-hour rather than 12-hour mode.
const B_24H: u8 = 0x02;
/// Hours register in 12-hour mode: PM.
const HOUR_PM: u8 = 0x80;
/// Status D: valid RAM and time (the battery is fine).
const D_VRT: u8 = 0x80;

/// Status A at power-on: 32.768 kHz time base, 1024 Hz periodic rate.
const DEFAULT_A: u8 = 0x26;
/// Status B at power-on: 24-hour mode, BCD.
const DEFAULT_B: u8 = B_24H;

/// CMOS 0x15/0x16: base memory in KiB.
const CMOS_BASE_MEM: usize = 0x15;
/// CMOS 0x17/0x18: extended memory above 1 MiB in KiB.
const CMOS_EXT_MEM: usize = 0x17;
/// CMOS 0x30/0x31: the same, as the POST reports it.
const CMOS_EXT_MEM_POST: usize = 0x30;
/// CMOS 0x34/0x35: memory above 16 MiB in 64 KiB units.
const CMOS_MEM_ABOVE_16M: usize = 0x34;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECS_PER_DAY: i64 = 86_400;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Days from 1970-01-01 to `year`-`month`-`day` in the proleptic Gregorian calendar. Out-of-range
/// months and days roll over into the neighbouring months and years instead of failing, so whatever a
/// guest writes into the clock registers gives some time.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's algorithm: count years from March so that the leap day ends the year.
    let year = year + (month - 1).div_euclid(12);
    let month = (month - 1).rem_euclid(12) + 1;
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468 + (day - 1)
}

/// The date (year, month 1-12, day 1-31) `days` days after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400;
    (if month <= 2 { year + 1 } else { year }, month, day)
}

/// Day of the week, 0 = Sunday, of the day `days` after 1970-01-01 (a Thursday).
fn weekday_from_days(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

/// The MC146818 RTC with its 128 bytes of CMOS RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rtc {
    /// CMOS RAM. The time registers hold the last time computed or, while status B's SET bit is on,
    /// whatever the guest writes.
    #[serde(with = "cmos_serde")]
    ram: [u8; 128],
    /// The register selected through port 0x70.
    index: u8,
    /// Guest time minus host wall time, in seconds.
    offset_s: i64,
}

/// Serializes the CMOS RAM as a sequence (serde has no impls for 128-element arrays) and rejects a
/// sequence of any other length, since checkpoints are untrusted input.
mod cmos_serde {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the RAM as a sequence of bytes.
    pub fn serialize<S: Serializer>(ram: &[u8; 128], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(ram)
    }

    /// Reads a sequence of exactly 128 bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 128], D::Error> {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        let len = bytes.len();
        bytes
            .try_into()
            .map_err(|_| D::Error::invalid_length(len, &"128 bytes of CMOS RAM"))
    }
}

impl Rtc {
    /// An RTC with the guest clock equal to the host wall clock and the CMOS memory-size bytes filled in
    /// for `ram_bytes` of RAM the way a PC BIOS (and QEMU) does.
    pub fn new(ram_bytes: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = DEFAULT_A;
        ram[usize::from(REG_B)] = DEFAULT_B;
        let mut put16 = |at: usize, value: u64| {
            // Each field is 16 bits; the BIOS saturates rather than wrapping on large machines.
            let [lo, hi] = u16::try_from(value).unwrap_or(u16::MAX).to_le_bytes();
            ram[at] = lo;
            ram[at + 1] = hi;
        };
        put16(CMOS_BASE_MEM, (ram_bytes / KIB).min(640));
        let extended_kib = ram_bytes.saturating_sub(MIB) / KIB;
        put16(CMOS_EXT_MEM, extended_kib);
        put16(CMOS_EXT_MEM_POST, extended_kib);
        put16(
            CMOS_MEM_ABOVE_16M,
            ram_bytes.saturating_sub(16 * MIB) / (64 * KIB),
        );
        Rtc {
            ram,
            index: 0,
            offset_s: 0,
        }
    }

    /// A guest read of `port` (0x70 or 0x71) with the host wall clock at `wall_ns`.
    pub fn io_read(&mut self, port: u16, wall_ns: u64) -> u8 {
        self.io_read_with(port, &mut || wall_ns)
    }

    /// A guest write of `value` to `port` (0x70 or 0x71) with the host wall clock at `wall_ns`.
    pub fn io_write(&mut self, port: u16, value: u8, wall_ns: u64) {
        self.io_write_with(port, value, &mut || wall_ns);
    }

    /// Like [`Rtc::io_read`], but calls `wall` for the time only when a running clock register is read.
    pub fn io_read_with(&mut self, port: u16, wall: &mut dyn FnMut() -> u64) -> u8 {
        if port != DATA_PORT {
            // The index register is write-only.
            return 0xFF;
        }
        match self.register() {
            reg if is_time_register(reg) => {
                if !self.setting() {
                    self.store_time(self.guest_secs(wall()));
                }
                self.ram[usize::from(reg)]
            }
            // Nothing ever sets an interrupt flag, so there is nothing for the read to clear.
            REG_C => 0,
            REG_D => D_VRT,
            reg => self.ram[usize::from(reg)],
        }
    }

    /// Like [`Rtc::io_write`], but calls `wall` for the time only when the write sets the clock (a clock
    /// register written while running, or the SET bit changing).
    pub fn io_write_with(&mut self, port: u16, value: u8, wall: &mut dyn FnMut() -> u64) {
        match port {
            INDEX_PORT => {
                self.index = value & 0x7F;
                return;
            }
            DATA_PORT => {}
            _ => return,
        }
        let reg = self.register();
        match reg {
            _ if is_time_register(reg) => {
                if self.setting() {
                    // Frozen while SET: the registers are RAM until SET is cleared.
                    self.ram[usize::from(reg)] = value;
                } else {
                    // A running clock takes the new field at once; the others keep counting.
                    let wall_ns = wall();
                    self.store_time(self.guest_secs(wall_ns));
                    self.ram[usize::from(reg)] = value;
                    self.commit(wall_ns);
                }
            }
            // The divider bits are kept for reading back but do not stop the clock.
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                let was_setting = self.setting();
                let now_setting = value & B_SET != 0;
                if was_setting && !now_setting {
                    // Read what the guest wrote in the format it wrote it in, before B changes.
                    self.commit(wall());
                }
                self.ram[usize::from(REG_B)] = value;
                if now_setting && !was_setting {
                    // Freeze the current time into the registers, in the new format.
                    self.store_time(self.guest_secs(wall()));
                }
            }
            // Read-only.
            REG_C | REG_D => {}
            _ => self.ram[usize::from(reg)] = value,
        }
    }

    /// The selected register. The index is masked when written, but checkpoints are untrusted input,
    /// so mask again rather than index out of the RAM.
    fn register(&self) -> u8 {
        self.index & 0x7F
    }

    /// Status B's SET bit: the guest is setting the clock.
    fn setting(&self) -> bool {
        self.ram[usize::from(REG_B)] & B_SET != 0
    }

    /// The guest's time in seconds since the Unix epoch at host wall time `wall_ns`.
    fn guest_secs(&self, wall_ns: u64) -> i64 {
        wall_secs(wall_ns).saturating_add(self.offset_s)
    }

    /// A register value in the current format. Callers pass values below 100; the reduction only makes
    /// sure a two-digit BCD encoding exists whatever they pass.
    fn encode(&self, value: i64) -> u8 {
        let value = u8::try_from(value.rem_euclid(100)).unwrap_or(0);
        if self.ram[usize::from(REG_B)] & B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// A register value read in the current format; invalid BCD digits are taken at face value.
    fn decode(&self, raw: u8) -> i64 {
        let value = if self.ram[usize::from(REG_B)] & B_BINARY != 0 {
            raw
        } else {
            (raw >> 4) * 10 + (raw & 0x0F)
        };
        i64::from(value)
    }

    /// Writes the broken-down time `secs` (since the epoch) into the clock registers.
    fn store_time(&mut self, secs: i64) {
        let days = secs.div_euclid(SECS_PER_DAY);
        let second_of_day = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let hour = second_of_day / 3600;
        let hours = if self.ram[usize::from(REG_B)] & B_24H != 0 {
            self.encode(hour)
        } else {
            let pm = if hour >= 12 { HOUR_PM } else { 0 };
            // 12-hour clocks run 12, 1, ..., 11.
            self.encode((hour + 11) % 12 + 1) | pm
        };
        // The weekday follows the date, as in QEMU: a weekday the guest writes does not stick.
        let weekday = weekday_from_days(days) + 1;
        let fields = [
            (REG_SECONDS, self.encode(second_of_day % 60)),
            (REG_MINUTES, self.encode(second_of_day / 60 % 60)),
            (REG_HOURS, hours),
            (REG_WEEKDAY, self.encode(weekday)),
            (REG_DAY, self.encode(day)),
            (REG_MONTH, self.encode(month)),
            (REG_YEAR, self.encode(year.rem_euclid(100))),
            (
                REG_CENTURY,
                self.encode(year.div_euclid(100).rem_euclid(100)),
            ),
        ];
        for (reg, value) in fields {
            self.ram[usize::from(reg)] = value;
        }
    }

    /// Makes the time in the clock registers the guest's time at host wall time `wall_ns`.
    fn commit(&mut self, wall_ns: u64) {
        let reg = |r: u8| self.decode(self.ram[usize::from(r)]);
        let raw_hours = self.ram[usize::from(REG_HOURS)];
        let hour = if self.ram[usize::from(REG_B)] & B_24H != 0 {
            self.decode(raw_hours)
        } else {
            let pm = if raw_hours & HOUR_PM != 0 { 12 } else { 0 };
            self.decode(raw_hours & !HOUR_PM) % 12 + pm
        };
        let year = reg(REG_CENTURY) * 100 + reg(REG_YEAR);
        let days = days_from_civil(year, reg(REG_MONTH), reg(REG_DAY));
        let secs = days * SECS_PER_DAY + hour * 3600 + reg(REG_MINUTES) * 60 + reg(REG_SECONDS);
        self.offset_s = secs.saturating_sub(wall_secs(wall_ns));
    }
}

/// Host wall time `wall_ns` in whole seconds.
fn wall_secs(wall_ns: u64) -> i64 {
    // u64 nanoseconds / 1e9 always fits an i64.
    i64::try_from(wall_ns / NS_PER_SEC).unwrap_or(i64::MAX)
}

/// Whether `reg` is one of the clock registers computed from the time.
fn is_time_register(reg: u8) -> bool {
    matches!(
        reg,
        REG_SECONDS
            | REG_MINUTES
            | REG_HOURS
            | REG_WEEKDAY
            | REG_DAY
            | REG_MONTH
            | REG_YEAR
            | REG_CENTURY
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    /// 2026-11-24T13:45:07Z, a Tuesday.
    const TUESDAY_AFTERNOON: u64 = 1_795_527_907 * SEC;

    fn read(rtc: &mut Rtc, reg: u8, wall_ns: u64) -> u8 {
        rtc.io_write(0x70, reg, wall_ns);
        rtc.io_read(0x71, wall_ns)
    }

    fn write(rtc: &mut Rtc, reg: u8, value: u8, wall_ns: u64) {
        rtc.io_write(0x70, reg, wall_ns);
        rtc.io_write(0x71, value, wall_ns);
    }

    /// Seconds, minutes, hours, weekday, day, month, year, century.
    fn clock(rtc: &mut Rtc, wall_ns: u64) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|reg| read(rtc, reg, wall_ns))
    }

    #[test]
    fn known_dates() {
        // (days since epoch, y, m, d, weekday with 0 = Sunday)
        let cases = [
            (0, 1970, 1, 1, 4),
            (11_016, 2000, 2, 29, 2),
            (10_956, 1999, 12, 31, 5),
            (20_781, 2026, 11, 24, 2),
            (24_855, 2038, 1, 19, 2),
            (47_541, 2100, 3, 1, 1),
            (-25_509, 1900, 2, 28, 3),
        ];
        for (days, y, m, d, wd) in cases {
            assert_eq!(civil_from_days(days), (y, m, d), "{days}");
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            assert_eq!(weekday_from_days(days), wd, "{y}-{m}-{d}");
        }
        // 2000 is a leap year, 2100 and 1900 are not.
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28),
            1
        );
        assert_eq!(
            days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28),
            1
        );
        // Round trip over a wide range, and overflowing months roll over.
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(2025, 13, 1), days_from_civil(2026, 1, 1));
        assert_eq!(days_from_civil(2026, 2, 30), days_from_civil(2026, 3, 2));
    }

    #[test]
    fn bcd_24h_by_default() {
        let mut rtc = Rtc::new(0);
        assert_eq!(
            clock(&mut rtc, TUESDAY_AFTERNOON),
            [0x07, 0x45, 0x13, 0x03, 0x24, 0x11, 0x26, 0x20]
        );
        assert_eq!(
            clock(&mut rtc, 0),
            [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x70, 0x19]
        );
        // The Y2038 second, and the time moving on.
        let y2038 = (1u64 << 31) * SEC;
        assert_eq!(
            clock(&mut rtc, y2038),
            [0x08, 0x14, 0x03, 0x03, 0x19, 0x01, 0x38, 0x20]
        );
        assert_eq!(read(&mut rtc, 0x00, y2038 + 61 * SEC + SEC / 2), 0x09);
        assert_eq!(read(&mut rtc, 0x02, y2038 + 61 * SEC), 0x15);
    }

    #[test]
    fn binary_and_12h_modes() {
        let mut rtc = Rtc::new(0);
        write(&mut rtc, 0x0B, 0x06, 0);
        assert_eq!(
            clock(&mut rtc, TUESDAY_AFTERNOON),
            [7, 45, 13, 3, 24, 11, 26, 20]
        );
        // 12-hour binary: 13:45 is 1 PM.
        write(&mut rtc, 0x0B, 0x04, 0);
        assert_eq!(read(&mut rtc, 0x04, TUESDAY_AFTERNOON), 0x81);
        // 12-hour BCD around midnight and noon.
        write(&mut rtc, 0x0B, 0x00, 0);
        let midnight = 1_795_478_400 * SEC;
        assert_eq!(read(&mut rtc, 0x04, midnight), 0x12);
        assert_eq!(read(&mut rtc, 0x04, midnight + 3600 * SEC), 0x01);
        assert_eq!(read(&mut rtc, 0x04, midnight + 11 * 3600 * SEC), 0x11);
        assert_eq!(read(&mut rtc, 0x04, midnight + 12 * 3600 * SEC), 0x92);
        assert_eq!(read(&mut rtc, 0x04, midnight + 23 * 3600 * SEC), 0x91);
    }

    #[test]
    fn setting_the_clock_with_set() {
        let mut rtc = Rtc::new(0);
        let t0 = TUESDAY_AFTERNOON;
        // What Linux's mc146818_set_time does: SET, write the fields, clear SET.
        write(&mut rtc, 0x0B, 0x82, t0);
        assert_eq!(read(&mut rtc, 0x00, t0 + 5 * SEC), 0x07, "frozen while SET");
        for (reg, value) in [
            (0x00, 0x30),
            (0x02, 0x59),
            (0x04, 0x23),
            (0x07, 0x31),
            (0x08, 0x12),
            (0x09, 0x99),
            (0x32, 0x19),
        ] {
            write(&mut rtc, reg, value, t0 + 6 * SEC);
        }
        assert_eq!(
            read(&mut rtc, 0x02, t0 + 7 * SEC),
            0x59,
            "reads return what was written"
        );
        write(&mut rtc, 0x0B, 0x02, t0 + 10 * SEC);
        // 1999-12-31T23:59:30, a Friday; 45 s later it is 2000.
        assert_eq!(
            clock(&mut rtc, t0 + 10 * SEC),
            [0x30, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
        );
        assert_eq!(
            clock(&mut rtc, t0 + 55 * SEC),
            [0x15, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn setting_a_field_while_running() {
        let mut rtc = Rtc::new(0);
        let t0 = TUESDAY_AFTERNOON;
        write(&mut rtc, 0x04, 0x08, t0);
        assert_eq!(
            clock(&mut rtc, t0 + SEC),
            [0x08, 0x45, 0x08, 0x03, 0x24, 0x11, 0x26, 0x20]
        );
        // The weekday follows the date whatever the guest writes there.
        write(&mut rtc, 0x06, 0x05, t0 + SEC);
        assert_eq!(read(&mut rtc, 0x06, t0 + 2 * SEC), 0x03);
        assert_eq!(read(&mut rtc, 0x06, t0 + 5 * 24 * 3600 * SEC), 0x01);
        // Setting the day moves the date and the weekday with it; the clock keeps running.
        write(&mut rtc, 0x07, 0x28, t0 + 2 * SEC);
        assert_eq!(
            clock(&mut rtc, t0 + 62 * SEC),
            [0x09, 0x46, 0x08, 0x07, 0x28, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn status_registers() {
        let mut rtc = Rtc::new(0);
        assert_eq!(read(&mut rtc, 0x0A, 0), 0x26);
        assert_eq!(read(&mut rtc, 0x0B, 0), 0x02);
        assert_eq!(read(&mut rtc, 0x0C, 0), 0x00);
        assert_eq!(read(&mut rtc, 0x0D, 0), 0x80);
        write(&mut rtc, 0x0A, 0xA6, 0);
        assert_eq!(read(&mut rtc, 0x0A, 0), 0x26, "UIP is read-only");
        write(&mut rtc, 0x0C, 0xFF, 0);
        write(&mut rtc, 0x0D, 0x00, 0);
        assert_eq!(read(&mut rtc, 0x0C, 0), 0x00);
        assert_eq!(read(&mut rtc, 0x0D, 0), 0x80);
        // NMI-disable bit in the index is ignored; general RAM reads back.
        write(&mut rtc, 0x80 | 0x40, 0x5A, 0);
        assert_eq!(read(&mut rtc, 0x40, 0), 0x5A);
        assert_eq!(rtc.io_read(0x70, 0), 0xFF);
    }

    #[test]
    fn memory_sizes() {
        let mut rtc = Rtc::new(32 * MIB);
        let word =
            |rtc: &mut Rtc, reg: u8| u16::from_le_bytes([read(rtc, reg, 0), read(rtc, reg + 1, 0)]);
        assert_eq!(word(&mut rtc, 0x15), 640);
        assert_eq!(word(&mut rtc, 0x17), 31 * 1024);
        assert_eq!(word(&mut rtc, 0x30), 31 * 1024);
        assert_eq!(word(&mut rtc, 0x34), 256);
        let mut big = Rtc::new(8 * 1024 * MIB);
        assert_eq!(word(&mut big, 0x17), 0xFFFF);
        assert_eq!(word(&mut big, 0x34), 0xFFFF);
        let mut tiny = Rtc::new(512 * KIB);
        assert_eq!(word(&mut tiny, 0x15), 512);
        assert_eq!(word(&mut tiny, 0x17), 0);
        assert_eq!(word(&mut tiny, 0x34), 0);
    }

    #[test]
    fn clock_read_only_when_needed() {
        let mut rtc = Rtc::new(0);
        let mut no_clock = || -> u64 { panic!("the clock was read") };
        rtc.io_write_with(0x70, 0x0A, &mut no_clock);
        rtc.io_read_with(0x71, &mut no_clock);
        rtc.io_write_with(0x70, 0x10, &mut no_clock);
        rtc.io_write_with(0x71, 0x33, &mut no_clock);
        assert_eq!(rtc.io_read_with(0x71, &mut no_clock), 0x33);
        write(&mut rtc, 0x0B, 0x82, 0);
        rtc.io_write_with(0x70, 0x00, &mut no_clock);
        rtc.io_write_with(0x71, 0x12, &mut no_clock);
        assert_eq!(rtc.io_read_with(0x71, &mut no_clock), 0x12, "frozen clock");
    }

    #[test]
    fn garbage_is_safe_and_state_round_trips() {
        let mut rtc = Rtc::new(64 * MIB);
        let mut t = 0u64;
        for reg in 0..=0xFFu8 {
            for value in (0..=0xFFu8).step_by(7) {
                t += 1_234_567_891;
                write(&mut rtc, reg, value, t);
                read(&mut rtc, reg, t);
                write(&mut rtc, 0x0B, value | 0x80, t);
                write(&mut rtc, reg, !value, t);
                write(&mut rtc, 0x0B, value & 0x7F, t);
                clock(&mut rtc, u64::MAX);
            }
        }
        let bytes = postcard::to_allocvec(&rtc).unwrap();
        let back: Rtc = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, rtc);
        // A hostile checkpoint with an out-of-range index still reads within the RAM.
        let mut hostile = back.clone();
        hostile.index = 0xFF;
        hostile.io_read(0x71, 0);
        hostile.io_write(0x71, 0, 0);
        // A CMOS image of the wrong size is rejected, not accepted or panicked on.
        let mut short = postcard::to_allocvec(&rtc).unwrap();
        short[0] = 127;
        assert!(postcard::from_bytes::<Rtc>(&short).is_err());
    }
}
