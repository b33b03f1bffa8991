//! The trace's data model: the JSON header and summary, events, checkpoints, and the constants that
//! fix the on-disk layout (file names, magics, size caps). `FORMAT.md` next to this crate describes
//! the bytes; this module is the single place the numbers in it come from.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
pub use vocab::{Fingerprint, HostCpu, HostInsn, StopReason};

/// Version of the on-disk format this crate writes. Version 2 added the landmark clock (its positions,
/// and `Kick` events).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this crate still reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Size of a guest page; checkpoint pages are exactly this long.
pub const PAGE_SIZE: usize = 4096;

/// Name of the JSON header inside a trace directory.
pub const HEADER_FILE: &str = "header.json";
/// Name of the event stream inside a trace directory.
pub const EVENTS_FILE: &str = "events.bin";
/// Name of the directory holding checkpoint files inside a trace directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Name of the JSON summary written at a clean end.
pub const SUMMARY_FILE: &str = "summary.json";
/// Name of the waypoint file inside a trace directory (landmark traces; optional).
pub const WAYPOINTS_FILE: &str = "waypoints.bin";
/// Magic at the start of `waypoints.bin`.
pub const WAYPOINTS_MAGIC: [u8; 8] = *b"RVTWPT01";
/// Length of the `waypoints.bin` file header: magic, u32 version (1), u32 reserved.
pub const WAYPOINTS_FILE_HEADER_LEN: usize = 16;
/// Extension of checkpoint files (`NNNNNNNNNNNNNNNNNNNN.ckpt`, the icount zero-padded to 20 digits).
pub const CHECKPOINT_EXT: &str = "ckpt";

/// Magic at the start of `events.bin` (its last digit is the format version: see [`events_magic`]).
pub const EVENTS_MAGIC: [u8; 8] = *b"RVTEVT02";
/// Length of the `events.bin` file header: magic, u32 version, u32 reserved.
pub const EVENTS_FILE_HEADER_LEN: usize = 16;
/// Magic at the start of every event chunk frame ("CHNK" read as a little-endian u32).
pub const CHUNK_MAGIC: u32 = 0x4B4E_4843;
/// Length of an event chunk frame header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Largest compressed payload of one event chunk a reader accepts.
pub const MAX_CHUNK_COMPRESSED: u32 = 64 << 20;
/// Largest uncompressed payload of one event chunk a reader accepts.
pub const MAX_CHUNK_UNCOMPRESSED: u32 = 64 << 20;
/// Largest number of events in one chunk. Bounds the memory a hostile chunk can make the reader
/// spend on `Event` values (each is several times larger in memory than its smallest encoding).
pub const MAX_EVENTS_PER_CHUNK: u32 = 1 << 20;

/// Magic at the start of every checkpoint file (its last digit is the format version: see
/// [`checkpoint_magic`]).
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"RVTCKP02";

/// The magic of `events.bin` in format `version` (the magics' digits move with the version).
pub fn events_magic(version: u32) -> [u8; 8] {
    with_version_digit(EVENTS_MAGIC, version)
}

/// The magic of checkpoint files in format `version`.
pub fn checkpoint_magic(version: u32) -> [u8; 8] {
    with_version_digit(CHECKPOINT_MAGIC, version)
}

fn with_version_digit(mut magic: [u8; 8], version: u32) -> [u8; 8] {
    magic[7] = b'0' + (version % 10) as u8;
    magic[6] = b'0' + (version / 10 % 10) as u8;
    magic
}
/// Length of the fixed checkpoint file header that precedes the compressed payload.
pub const CHECKPOINT_HEADER_LEN: usize = 77;
/// Largest compressed or uncompressed checkpoint payload a reader accepts (4 GiB). A reader also
/// refuses one larger than its header justifies: see [`Header::max_checkpoint_payload`].
pub const MAX_CHECKPOINT_PAYLOAD: u64 = 4 << 30;
/// Most bytes of opaque machine state (CPU and devices, without the disks' overlays) a checkpoint
/// may hold: 1 MiB. A real one is about 2.4 KiB; this leaves room for more devices.
pub const MAX_MACHINE_STATE: u64 = 1 << 20;
/// Bytes a page or an overlay block may take in an encoding beyond its contents: at most 10 for
/// its varint number and 3 for its varint length, rounded up.
const ENCODED_BLOCK_OVERHEAD: u64 = 16;
/// Largest guest RAM a header may declare (3 GiB). Guest RAM is one block at physical address 0,
/// below the virtio MMIO window at 0xd0000000, and `record --ram` takes at most 3 GiB. Guest RAM
/// bounds how many pages a checkpoint can hold, and so how much memory restoring one can take.
pub const MAX_RAM_BYTES: u64 = 3 << 30;
/// Largest guest image a header may declare, and that `record` and `replay` read (1 GiB).
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;
/// Most bytes a `SerialRx` event may declare before it is decoded (256): checked on the encoded
/// length, so a hostile event cannot make the decoder allocate megabytes. Decoded events are then
/// held to what the machine takes at once, [`UART_RX_FIFO_BYTES`].
pub const MAX_SERIAL_RX_BYTES: usize = 256;
/// Lines of the machine's interrupt controllers (the 8259A pair): an `Irq` event names one of
/// `0 .. IRQ_LINES`.
pub const IRQ_LINES: u8 = 16;
/// Bytes the machine's UART (a 16550A) holds in its receive FIFO: the most one `SerialRx` event can
/// carry, since the recorder logs what the FIFO took at once.
pub const UART_RX_FIFO_BYTES: usize = 64;
/// The names of the kinds of event ([`EventKind::name`]), in the order of their variants: the keys
/// [`Summary::events_by_kind`] may have.
pub const EVENT_KINDS: [&str; 9] = [
    "serial_rx",
    "clock",
    "irq",
    "interrupt",
    "host_value",
    "stop",
    "kick",
    "switch",
    "apic_timer",
];
/// Most memory a trace's decoded events may take (1 GiB), counting [`EVENT_MEMORY_COST`] per
/// event and, for a `SerialRx` event, [`SERIAL_RX_MEMORY_COST`] plus its length. Event chunks
/// compress well, so this is what stops a small hostile file from decoding into unbounded memory.
/// It admits about 16 million events, hours of recording with a busy timer.
pub const MAX_EVENT_MEMORY: u64 = 1 << 30;
/// Memory one decoded event counts against [`MAX_EVENT_MEMORY`]: its in-memory size, rounded up.
pub const EVENT_MEMORY_COST: u64 = 64;
/// Memory the allocation of a `SerialRx` event's bytes counts beyond the bytes themselves.
pub const SERIAL_RX_MEMORY_COST: u64 = 32;

/// Largest `header.json` or `summary.json` a reader accepts; real ones are well under a kilobyte.
pub const MAX_JSON_FILE: u64 = 1 << 20;

/// Most CPUID entries a header may hold (KVM's own limit, KVM_MAX_CPUID_ENTRIES).
pub const MAX_CPUID_ENTRIES: usize = 256;
/// Name of the copy of the guest's initial ramdisk inside a trace directory (zstd).
pub const INITRD_FILE: &str = "initrd.zst";
/// Name of the directory holding the copies of the guest's disk images inside a trace directory.
pub const DISKS_DIR: &str = "disks";
/// Most disks a header may list.
pub const MAX_DISKS: usize = 4;
/// Smallest disk image: one 512-byte sector.
pub const MIN_DISK_BYTES: u64 = 512;
/// Largest disk image a header may declare (1 TiB). Replay holds the image in memory, so a reader
/// also refuses one it cannot allocate.
pub const MAX_DISK_BYTES: u64 = 1 << 40;

/// Largest zstd window (as a power of two) a reader accepts. zstd would otherwise allocate up to
/// 128 MiB of window for a frame that merely claims to need it; the writer's level uses far less.
pub const MAX_ZSTD_WINDOW_LOG: u32 = 24;

/// Problems with the values of a header or summary (as opposed to their syntax).
#[derive(Debug, Error)]
pub enum FormatError {
    /// A SHA-256 field is not 64 lowercase hex digits.
    #[error("{field} must be 64 lowercase hex digits (a SHA-256), got {value:?}")]
    BadSha256 {
        /// Which field.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// `wall_secs` is negative, NaN or infinite.
    #[error("wall_secs must be a finite, non-negative number of seconds, got {value}")]
    BadDuration {
        /// What it held.
        value: f64,
    },
    /// `machine.ram_bytes` is zero or above [`MAX_RAM_BYTES`].
    #[error("machine.ram_bytes is {value}; it must be between 1 and {MAX_RAM_BYTES}")]
    BadRamSize {
        /// What it held.
        value: u64,
    },
    /// `image_size` is above [`MAX_IMAGE_BYTES`].
    #[error("image_size is {value}; a guest image may be at most {MAX_IMAGE_BYTES} bytes")]
    BadImageSize {
        /// What it held.
        value: u64,
    },
    /// The header lists more disks than a machine has.
    #[error("the header lists {count} disks; a machine has at most {MAX_DISKS}")]
    TooManyDisks {
        /// How many it lists.
        count: usize,
    },
    /// A disk's size is outside [`MIN_DISK_BYTES`] ..= [`MAX_DISK_BYTES`].
    #[error(
        "disks[{index}].size is {value}; it must be between {MIN_DISK_BYTES} and {MAX_DISK_BYTES}"
    )]
    BadDiskSize {
        /// Which disk.
        index: usize,
        /// What it held.
        value: u64,
    },
    /// The CPUID table has more entries than KVM takes.
    #[error("cpuid has {count} entries; at most {MAX_CPUID_ENTRIES} are allowed")]
    TooManyCpuidEntries {
        /// How many it has.
        count: usize,
    },
    /// The initrd's size is 0 or above [`MAX_IMAGE_BYTES`].
    #[error("initrd.size is {value}; it must be between 1 and {MAX_IMAGE_BYTES}")]
    BadInitrdSize {
        /// What it held.
        value: u64,
    },
    /// A disk's hash is not 64 lowercase hex digits.
    #[error("disks[{index}].sha256 must be 64 lowercase hex digits (a SHA-256), got {value:?}")]
    BadDiskSha256 {
        /// Which disk.
        index: usize,
        /// What it held.
        value: String,
    },
    /// The header names another format version than the one being written or read.
    #[error(
        "header format_version is {found}, expected {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
    )]
    WrongVersion {
        /// The version in the header.
        found: u32,
    },
    /// A version-1 header names a clock other than `step` (the landmark clock came with version 2).
    #[error("a version-1 trace cannot be recorded with clock {clock:?}")]
    ClockNeedsNewerVersion {
        /// The clock the header names.
        clock: String,
    },
}

/// How guest timers are driven during the recording.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TimeMode {
    /// PIT and RTC follow the host clock; their readings and interrupts are logged.
    Host,
    /// Timers follow icount, so guest time is reproducible even without the log.
    Virtual,
}

/// The virtual machine's configuration, enough to rebuild the same machine for replay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// Kernel command line given to the guest.
    pub cmdline: String,
    /// The memory map the boot loader gave the guest: (base, length, type) with type 1 RAM and 2
    /// reserved, as E820 numbers them (absent in traces recorded before it was kept). Replay checks
    /// that it builds the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_map: Vec<(u64, u64, u32)>,
}

/// A disk the guest had (or its initrd), as `header.json` lists it. The trace holds a copy of the
/// image ([`disk_file_name`] in [`DISKS_DIR`], or [`INITRD_FILE`]), so replay needs nothing but the
/// trace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Path of the image as given on the command line (for information: replay uses the copy).
    pub path: String,
    /// Size of the image in bytes.
    pub size: u64,
    /// SHA-256 of the image, lowercase hex; replay refuses a copy that differs.
    pub sha256: String,
}

/// The contents of `header.json`, written when the recording starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Always [`FORMAT_VERSION`] for traces this crate writes.
    pub format_version: u32,
    /// Version of the retrovisor that recorded the trace.
    pub tool_version: String,
    /// Path of the guest image as given on the command line.
    pub image_path: String,
    /// SHA-256 of the guest image, lowercase hex; replay refuses an image that differs.
    pub image_sha256: String,
    /// Size of the guest image in bytes.
    pub image_size: u64,
    /// The machine the guest ran on.
    pub machine: MachineConfig,
    /// Name of the execution clock that recorded the trace, e.g. `"step"`.
    pub clock: String,
    /// How guest time was driven.
    pub time_mode: TimeMode,
    /// Between checkpoints: instructions (step clock) or milliseconds of wall time (landmark clock).
    pub checkpoint_every: u64,
    /// When the recording started, seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// The guest's disks, disk 0 first (absent in traces of guests without disks).
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// How checkpoint digests cover RAM (absent in traces recorded before there was a choice: `ram`).
    #[serde(default)]
    pub digest: DigestKind,
    /// The guest's CPUID, one entry per leaf and subleaf: [function, index, flags, eax, ebx, ecx, edx] as
    /// KVM_SET_CPUID2 takes them, so that replay builds the CPU the recording had (absent in traces
    /// recorded before it was kept: replay then gives what its host supports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid: Vec<[u32; 7]>,
    /// Whether checkpoint page references may also name a 4 KiB block of the trace's initrd or disk
    /// copies or of the guest image (FORMAT.md, "Checkpoints"); absent in traces recorded before they
    /// could.
    #[serde(default)]
    pub page_backing: bool,
    /// Whether the image's `rdtsc`, `rdtscp`, `rdrand` and `rdseed` instructions were trapped to the VMM
    /// (landmark-clock recordings made since the field exists; absent means no), so replay must trap them
    /// the same way.
    #[serde(default)]
    pub host_traps: bool,
    /// The initial ramdisk the loader gave the kernel, if any (absent in traces without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<DiskInfo>,
    /// The CPU model the guest was given: `portable` or `host` (absent in traces recorded before models
    /// existed, which gave the guest the host's CPUID: `host`).
    #[serde(default = "host_model", skip_serializing_if = "is_host_model")]
    pub cpu_model: String,
    /// Whether the VMM answered the guest's CPUID from `cpuid` itself (the portable model; absent means
    /// no: KVM answered, as in traces recorded before models existed), so replay must answer it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vmm_cpuid: bool,
    /// The CPU of the host that recorded the trace (absent in traces recorded before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_on: Option<HostCpu>,
    /// How many vCPUs the machine had (absent means one: every trace recorded before machines had
    /// several, and every uniprocessor one since).
    #[serde(default = "one_cpu", skip_serializing_if = "is_one_cpu")]
    pub cpus: usize,
    /// The seed of `record --chaos`, if the recording was made in chaos mode (replay does not need it:
    /// the schedule it drew is in the events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos_seed: Option<u64>,
    /// The recorder dropped KVM's cached translations at every checkpoint, so replay must too (absent
    /// in traces recorded before: their replays do not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold_checkpoints: bool,
    /// Where the recording branched off a replay of another (`go-live`): it starts from the state that
    /// replay reached there, not from boot (absent for a recording from boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branched_from: Option<BranchPoint>,
}

/// The trace and position a go-live recording branched from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BranchPoint {
    /// The trace directory replayed, as it was named then.
    pub trace: String,
    /// When that trace was recorded (its header's `created_unix_secs`), to tell it from a later one of
    /// the same name.
    pub trace_created_unix_secs: u64,
    /// The position there, as `replay --to` takes it: a count, or `LANDMARK+INSTRUCTIONS`.
    pub position: String,
}

fn one_cpu() -> usize {
    1
}

fn is_one_cpu(cpus: &usize) -> bool {
    *cpus == 1
}

fn host_model() -> String {
    "host".into()
}

fn is_host_model(model: &str) -> bool {
    model == "host"
}

/// How a checkpoint's digest covers guest RAM (see FORMAT.md, "Checkpoints").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DigestKind {
    /// xxh3-128 over the state blob and then all of RAM, byte for byte.
    #[default]
    Ram,
    /// xxh3-128 over the state blob and then the xxh3-128 of every page, in frame order: a machine that
    /// keeps its page hashes rehashes only the pages written since, so checkpoints cost little.
    Pages,
}

impl Header {
    /// Checks the values a reader relies on: the format version, the RAM size and the shape of the
    /// image hash.
    pub fn validate(&self) -> Result<(), FormatError> {
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(FormatError::WrongVersion {
                found: self.format_version,
            });
        }
        if self.format_version == 1 && self.clock != "step" {
            return Err(FormatError::ClockNeedsNewerVersion {
                clock: self.clock.clone(),
            });
        }
        let ram = self.machine.ram_bytes;
        if ram == 0 || ram > MAX_RAM_BYTES {
            return Err(FormatError::BadRamSize { value: ram });
        }
        check_sha256("image_sha256", &self.image_sha256)?;
        if self.image_size > MAX_IMAGE_BYTES {
            return Err(FormatError::BadImageSize {
                value: self.image_size,
            });
        }
        if self.disks.len() > MAX_DISKS {
            return Err(FormatError::TooManyDisks {
                count: self.disks.len(),
            });
        }
        if self.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(FormatError::TooManyCpuidEntries {
                count: self.cpuid.len(),
            });
        }
        if let Some(initrd) = &self.initrd {
            if !(1..=MAX_IMAGE_BYTES).contains(&initrd.size) {
                return Err(FormatError::BadInitrdSize { value: initrd.size });
            }
            check_sha256("initrd.sha256", &initrd.sha256)?;
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&disk.size) {
                return Err(FormatError::BadDiskSize {
                    index,
                    value: disk.size,
                });
            }
            if check_sha256("sha256", &disk.sha256).is_err() {
                return Err(FormatError::BadDiskSha256 {
                    index,
                    value: disk.sha256.clone(),
                });
            }
        }
        Ok(())
    }

    /// Pages of guest RAM (a partial last page counts, as the machine rounds RAM up to whole
    /// pages); every checkpoint page frame number is below this.
    pub fn ram_pages(&self) -> u64 {
        self.machine.ram_bytes.div_ceil(PAGE_SIZE as u64)
    }

    /// Most bytes of opaque state a checkpoint of this machine can hold: [`MAX_MACHINE_STATE`] for
    /// the CPU and devices, plus each disk's copy-on-write overlay at its largest (every 4 KiB block
    /// of the disk written, with its encoding overhead).
    pub fn max_state_bytes(&self) -> u64 {
        let overlays: u64 = self
            .disks
            .iter()
            .map(|d| {
                d.size.div_ceil(PAGE_SIZE as u64) * (PAGE_SIZE as u64 + ENCODED_BLOCK_OVERHEAD)
            })
            .sum();
        MAX_MACHINE_STATE + overlays
    }

    /// Most bytes a checkpoint payload of this machine can decompress to: the largest state, and
    /// every page of RAM stored in full, each with its encoding overhead (varint lengths and page
    /// numbers), capped by [`MAX_CHECKPOINT_PAYLOAD`].
    pub fn max_checkpoint_payload(&self) -> u64 {
        let varints = 2 * 10;
        let pages = self.ram_pages() * (PAGE_SIZE as u64 + ENCODED_BLOCK_OVERHEAD);
        (varints + self.max_state_bytes() + pages).min(MAX_CHECKPOINT_PAYLOAD)
    }
}

/// Which host clock a device read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClockKind {
    /// A monotonic clock (interval timers such as the PIT).
    Monotonic,
    /// Wall-clock time (the RTC).
    Wall,
}

/// What an event feeds into the guest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes pushed into the UART receive FIFO.
    SerialRx {
        /// The bytes, in arrival order.
        bytes: Vec<u8>,
    },
    /// A host clock reading a device used.
    Clock {
        /// Which clock.
        kind: ClockKind,
        /// The reading in nanoseconds.
        ns: u64,
    },
    /// An IRQ edge from a time-driven source (the PIT).
    Irq {
        /// The IRQ line.
        line: u8,
    },
    /// A vector injected into the vCPU.
    Interrupt {
        /// The interrupt vector.
        vector: u8,
    },
    /// The result of an instruction whose value comes from the host.
    HostValue {
        /// The instruction.
        insn: HostInsn,
        /// The value it returned (for RDTSC/RDTSCP, the full 64-bit counter).
        value: u64,
        /// TSC_AUX for RDTSCP, 0 otherwise.
        aux: u64,
    },
    /// The end of the recording.
    Stop {
        /// Why it ended.
        reason: StopReason,
    },
    /// Landmark clock only: the events after this one (until the next event of another position) apply
    /// at a point between landmark `at` and the next, which a kick stopped at; the point is named by
    /// the state there.
    Kick {
        /// The state at the point.
        fingerprint: Fingerprint,
    },
    /// A machine with several vCPUs: from here on vCPU `cpu` runs (the recording's scheduler chose it).
    Switch {
        /// The vCPU (its index, which is its APIC ID).
        cpu: u8,
    },
    /// A machine with several vCPUs: vCPU `cpu`'s local APIC timer counted up to `ns` of monotonic time
    /// and expired.
    ApicTimer {
        /// The vCPU.
        cpu: u8,
        /// Monotonic time the timer counted to.
        ns: u64,
    },
}

impl EventKind {
    /// Short snake_case name of the kind, as used in [`Summary::events_by_kind`].
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SerialRx { .. } => "serial_rx",
            EventKind::Clock { .. } => "clock",
            EventKind::Irq { .. } => "irq",
            EventKind::Interrupt { .. } => "interrupt",
            EventKind::HostValue { .. } => "host_value",
            EventKind::Stop { .. } => "stop",
            EventKind::Kick { .. } => "kick",
            EventKind::Switch { .. } => "switch",
            EventKind::ApicTimer { .. } => "apic_timer",
        }
    }
}

/// One input from outside the guest, pinned to the moment it applies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Where the event applies, counted by the trace's clock: instructions retired before it (step),
    /// or landmarks passed (landmark; a kick event right before it names the point after that
    /// landmark). The serialized field keeps its old name.
    #[serde(rename = "icount")]
    pub at: u64,
    /// Guest rip at that moment; replay checks it to detect divergence.
    pub rip: u64,
    /// What happened.
    pub kind: EventKind,
}

/// A machine checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Where the checkpoint was taken, counted by the trace's clock (instructions retired, or
    /// landmarks passed). The serialized field keeps its old name.
    #[serde(rename = "icount")]
    pub at: u64,
    /// Guest rip at that moment.
    pub rip: u64,
    /// True if `pages` holds every non-zero page of RAM; false if only pages changed since the
    /// previous checkpoint.
    pub full: bool,
    /// The machine's 32-byte state digest, compared on replay.
    pub digest: [u8; 32],
    /// CPU and device state, serialized by the machine; opaque to the trace.
    pub state: Vec<u8>,
    /// (guest page frame number, [`PAGE_SIZE`] bytes) pairs.
    pub pages: Vec<(u64, Vec<u8>)>,
}

/// The contents of `summary.json`, written only when a recording ends cleanly.
///
/// Only `PartialEq`: `wall_secs` is an `f64`, which cannot honestly be `Eq`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Summary {
    /// Where the recording ended, counted by the trace's clock (instructions retired, or landmarks
    /// passed). The JSON field keeps its old name.
    #[serde(rename = "end_icount")]
    pub end: u64,
    /// Why it ended.
    pub stop: StopReason,
    /// Number of events per [`EventKind::name`].
    pub events_by_kind: BTreeMap<String, u64>,
    /// Number of checkpoints written.
    pub checkpoints: u64,
    /// Bytes of serial output the guest produced.
    pub output_bytes: u64,
    /// SHA-256 of all serial output the guest produced, lowercase hex.
    pub output_sha256: String,
    /// Wall-clock duration of the recording in seconds.
    pub wall_secs: f64,
}

impl Summary {
    /// Checks the values a reader relies on: the shape of the output hash, and a duration JSON can
    /// hold (serde_json writes NaN and infinities as `null`, which would not read back).
    pub fn validate(&self) -> Result<(), FormatError> {
        if !self.wall_secs.is_finite() || self.wall_secs < 0.0 {
            return Err(FormatError::BadDuration {
                value: self.wall_secs,
            });
        }
        check_sha256("output_sha256", &self.output_sha256)
    }
}

/// The content hash of a page (xxh3-128): what a checkpoint's page reference names, and what
/// [`crate::ChainCursor::restored_hash`] gives.
pub fn page_hash(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// SHA-256 of `bytes` as lowercase hex, the form `image_sha256` and `output_sha256` take.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes` (for digests computed incrementally, like `output_sha256`).
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// File name, inside [`DISKS_DIR`], of the copy of disk `index`: `N.img.zst`.
pub fn disk_file_name(index: usize) -> String {
    format!("{index}.img.zst")
}

/// File name of the checkpoint taken at `icount`: the icount zero-padded to 20 digits (the width
/// of `u64::MAX`), so names sort in icount order.
pub fn checkpoint_file_name(icount: u64) -> String {
    format!("{icount:020}.{CHECKPOINT_EXT}")
}

/// File name of the list of pages written before the full checkpoint taken at `icount` (page frame
/// numbers, 64-bit little-endian; see `TraceWriter::write_pages_written`).
pub fn written_file_name(icount: u64) -> String {
    format!("{icount:020}.written")
}

/// The icount a checkpoint file name encodes, or `None` if `name` is not a checkpoint file name.
pub fn parse_checkpoint_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(CHECKPOINT_EXT)?.strip_suffix('.')?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn check_sha256(field: &'static str, value: &str) -> Result<(), FormatError> {
    let ok = value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(FormatError::BadSha256 {
            field,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_round_trip_and_sort() {
        assert_eq!(checkpoint_file_name(42), "00000000000000000042.ckpt");
        assert_eq!(
            parse_checkpoint_file_name(&checkpoint_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_checkpoint_file_name("42.ckpt"), None);
        assert_eq!(
            parse_checkpoint_file_name(".00000000000000000042.ckpt.tmp"),
            None
        );
        // 20 digits that overflow a u64.
        assert_eq!(
            parse_checkpoint_file_name("99999999999999999999.ckpt"),
            None
        );
        assert!(checkpoint_file_name(9) < checkpoint_file_name(10));
    }

    #[test]
    fn sha256_hex_is_lowercase_and_valid() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(check_sha256("x", &h).is_ok());
        assert!(check_sha256("x", &h.to_uppercase()).is_err());
        assert!(check_sha256("x", "abc").is_err());
    }

    #[test]
    fn every_kind_of_event_is_listed_under_its_name() {
        let kinds = [
            EventKind::SerialRx { bytes: vec![1] },
            EventKind::Clock {
                kind: ClockKind::Wall,
                ns: 0,
            },
            EventKind::Irq { line: 0 },
            EventKind::Interrupt { vector: 0x20 },
            EventKind::HostValue {
                insn: HostInsn::Rdtsc,
                value: 0,
                aux: 0,
            },
            EventKind::Stop {
                reason: StopReason::Halted,
            },
            EventKind::Kick {
                fingerprint: Fingerprint {
                    rip: 0,
                    rsp: 0,
                    rflags: 2,
                    regs: 0,
                    memory: 0,
                },
            },
            EventKind::Switch { cpu: 1 },
            EventKind::ApicTimer { cpu: 1, ns: 5 },
        ];
        let names: Vec<&str> = kinds.iter().map(EventKind::name).collect();
        assert_eq!(names, EVENT_KINDS);
    }

    #[test]
    fn time_mode_is_lowercase_in_json() {
        assert_eq!(
            serde_json::to_string(&TimeMode::Virtual).unwrap(),
            "\"virtual\""
        );
    }
}
