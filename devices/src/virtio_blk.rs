//! A virtio block device on virtio-mmio: the "modern" register layout (version 2) with one split
//! virtqueue, as Linux's `virtio_mmio` and `virtio_blk` drivers and Firecracker use it.
//!
//! Requests are executed synchronously when the guest writes QueueNotify, inside the instruction
//! that wrote it, so the device is a deterministic function of the guest's own actions and the disk's
//! contents: replay needs no log of what it did, only the same image. Data moves between guest RAM
//! and the [`Disk`] (image plus copy-on-write overlay) through [`GuestMemory`], which marks every page
//! the device writes dirty for the next incremental checkpoint.
//!
//! Guest mistakes never stop the VMM. A malformed request (a buffer outside RAM, descriptors in the
//! wrong direction or of the wrong size, sectors past the end of the disk) completes with status
//! `VIRTIO_BLK_S_IOERR` and leaves the disk unchanged; an unknown request type gets
//! `VIRTIO_BLK_S_UNSUPP`. Damage to the ring itself (an available index that jumps by more than the
//! queue size, a descriptor index past the table, a chain longer than the queue, which is how a loop
//! shows, or a queue configured with an invalid size or placement) sets `DEVICE_NEEDS_RESET` in
//! Status and raises a configuration-change interrupt; the device then ignores the queue until the
//! driver resets it by writing 0 to Status.

use crate::disk::{Disk, SECTOR_SIZE};
use memory::GuestMemory;
use serde::{Deserialize, Serialize};

/// Bytes of MMIO space the device decodes: the registers (0x000-0x0ff) and config space (0x100-0x1ff).
pub const MMIO_SIZE: u64 = 0x200;
/// The largest queue the device accepts (QueueNumMax).
pub const QUEUE_NUM_MAX: u32 = 256;

/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) virtio-mmio register layout.
const MMIO_VERSION: u32 = 2;
/// virtio device type 2: block device.
const DEVICE_ID_BLOCK: u32 = 2;
/// Our vendor ID: "RVTV" as a little-endian u32.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"RVTV");

// Register offsets (virtio 1.2, section 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_BASE: u64 = 0x100;

// Feature bits.
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// What the device offers. No EVENT_IDX, no INDIRECT_DESC.
pub const DEVICE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
/// The most data segments per request the config space announces (a request also needs a header
/// and a status descriptor, and without indirect descriptors the whole chain must fit the queue).
const SEG_MAX: u32 = QUEUE_NUM_MAX - 2;

// Device status bits.
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error only a reset clears.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;

// InterruptStatus bits.
/// The device used a buffer.
pub const INT_USED_BUFFER: u32 = 1;
/// The configuration changed (here: the device needs a reset).
pub const INT_CONFIG_CHANGE: u32 = 2;

// Descriptor flags.
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver does not want used-buffer interrupts.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

// Request types and status values (virtio 1.2, section 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unknown request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Length of a request header: type, reserved, sector.
const REQ_HEADER_LEN: u64 = 16;

/// The split virtqueue (the device has one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Queue {
    /// QueueNum as last written (checked when the queue is made ready).
    num: u32,
    ready: bool,
    /// Descriptor table, available ring ("driver area") and used ring ("device area").
    desc: u64,
    driver: u64,
    device: u64,
    /// Next available-ring slot to consume, and next used-ring slot to fill (free-running u16s).
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            num: QUEUE_NUM_MAX,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// The queue size if it is one the device accepts: a power of two up to [`QUEUE_NUM_MAX`].
    fn size(&self) -> Option<u16> {
        (self.num.is_power_of_two() && self.num <= QUEUE_NUM_MAX).then_some(self.num as u16)
    }

    /// The queue size if the queue can be used with `ram` bytes of RAM: a valid size, and the three
    /// areas aligned as the spec requires and inside RAM.
    fn usable_size(&self, ram: u64) -> Option<u16> {
        let num = self.size()?;
        let n = u64::from(num);
        let inside = |addr: u64, len: u64| addr.checked_add(len).is_some_and(|end| end <= ram);
        (self.desc.is_multiple_of(16)
            && self.driver.is_multiple_of(2)
            && self.device.is_multiple_of(4)
            && inside(self.desc, 16 * n)
            && inside(self.driver, 6 + 2 * n)
            && inside(self.device, 6 + 8 * n))
        .then_some(num)
    }
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
}

/// A request the ring delivered: its head index and descriptors, split by direction.
struct Chain {
    head: u16,
    readable: Vec<Desc>,
    writable: Vec<Desc>,
    /// The chain broke a rule that makes it a bad request (not a bad ring): a readable descriptor
    /// after a writable one, or an indirect descriptor (not negotiated).
    malformed: bool,
}

/// A virtio-mmio block device and its disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlk {
    /// Which disk this is (0-3): names it in GET_ID.
    index: u8,
    disk: Disk,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    queue_sel: u32,
    queue: Queue,
    /// An interrupt edge waiting to be moved to the PIC.
    irq: bool,
    /// Requests completed since boot (diagnostics; part of the state so replays compare it too).
    completed: u64,
}

impl VirtioBlk {
    /// Disk number `index` showing `disk`, in its reset state.
    pub fn new(index: u8, disk: Disk) -> VirtioBlk {
        VirtioBlk {
            index,
            disk,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            queue_sel: 0,
            queue: Queue::new(),
            irq: false,
            completed: 0,
        }
    }

    /// The disk (image and overlay).
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The disk, for taking its overlay.
    pub fn disk_mut(&mut self) -> &mut Disk {
        &mut self.disk
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Requests completed since boot.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Returns and clears a pending interrupt edge.
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq)
    }

    /// Takes the base image from `current` (the live device) and checks this restored state.
    pub fn adopt_image(&mut self, current: &VirtioBlk) -> Result<(), String> {
        if self.queue.ready && self.queue.size().is_none() {
            return Err(format!(
                "disk {}: the checkpoint's queue size {} is invalid",
                self.index, self.queue.num
            ));
        }
        self.disk
            .adopt_image(&current.disk)
            .map_err(|e| format!("disk {}: {e}", self.index))
    }

    /// Device reset (Status written with 0): everything but the disk's contents goes back to the
    /// power-on state.
    fn reset(&mut self) {
        let disk = std::mem::replace(&mut self.disk, Disk::new(Default::default()));
        let completed = self.completed;
        *self = VirtioBlk::new(self.index, disk);
        self.completed = completed;
    }

    /// A guest read of `data.len()` bytes at `offset` into the device's window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_BASE {
            let config = self.config();
            for (i, b) in data.iter_mut().enumerate() {
                let at = (offset - CONFIG_BASE) as usize + i;
                *b = config.get(at).copied().unwrap_or(0);
            }
            return;
        }
        // Registers take aligned 32-bit accesses only; anything else reads as zero.
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_register(offset)
        } else {
            0
        };
        for (b, v) in data
            .iter_mut()
            .zip(value.to_le_bytes().into_iter().chain([0; 4]))
        {
            *b = v;
        }
    }

    /// A guest write of `data` at `offset` into the device's window; `mem` is guest RAM, which a
    /// QueueNotify reads and writes (DMA).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], mem: &mut GuestMemory) {
        // Config space is read-only here (no writable fields are negotiated); registers take aligned
        // 32-bit writes only.
        if offset >= CONFIG_BASE || data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value, mem);
    }

    /// Config space: `struct virtio_blk_config` up to `seg_max`, zeros after.
    fn config(&self) -> [u8; (MMIO_SIZE - CONFIG_BASE) as usize] {
        let mut c = [0u8; (MMIO_SIZE - CONFIG_BASE) as usize];
        c[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        // size_max (bytes 8..12) is not offered; seg_max:
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q0 = self.queue_sel == 0;
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => DEVICE_ID_BLOCK,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => DEVICE_FEATURES as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX if q0 => QUEUE_NUM_MAX,
            REG_QUEUE_READY if q0 => u32::from(self.queue.ready),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            // The configuration never changes.
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32, mem: &mut GuestMemory) {
        // Queue registers address the selected queue; only queue 0 exists, and its layout is fixed
        // while it is ready.
        let configurable = self.queue_sel == 0 && !self.queue.ready;
        let set_low = |r: &mut u64| *r = (*r & !0xffff_ffff) | u64::from(value);
        let set_high = |r: &mut u64| *r = (*r & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features),
                    1 => set_high(&mut self.driver_features),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if configurable => self.queue.num = value,
            REG_QUEUE_DESC_LOW if configurable => set_low(&mut self.queue.desc),
            REG_QUEUE_DESC_HIGH if configurable => set_high(&mut self.queue.desc),
            REG_QUEUE_DRIVER_LOW if configurable => set_low(&mut self.queue.driver),
            REG_QUEUE_DRIVER_HIGH if configurable => set_high(&mut self.queue.driver),
            REG_QUEUE_DEVICE_LOW if configurable => set_low(&mut self.queue.device),
            REG_QUEUE_DEVICE_HIGH if configurable => set_high(&mut self.queue.device),
            REG_QUEUE_READY if self.queue_sel == 0 => {
                if value == 0 {
                    self.queue.ready = false;
                } else if !self.queue.ready {
                    if self.queue.usable_size(mem.size()).is_some() {
                        self.queue.ready = true;
                    } else {
                        self.needs_reset();
                    }
                }
            }
            // The value is the queue index; only queue 0 exists.
            REG_QUEUE_NOTIFY if value == 0 => self.notify(mem),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            // There are no shared memory regions to select.
            REG_SHM_SEL => {}
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Feature negotiation ends here: refuse features we never offered, and a driver that
            // does not speak virtio 1 (this is a modern-only device).
            let ok = self.driver_features & !DEVICE_FEATURES == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                value &= !STATUS_FEATURES_OK;
            }
        }
        self.status = value | (self.status & STATUS_DEVICE_NEEDS_RESET);
    }

    /// The device cannot go on until the driver resets it: the queue is broken (see the module
    /// documentation for how).
    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt_status |= INT_CONFIG_CHANGE;
            self.irq = true;
        }
    }

    /// QueueNotify for queue 0: executes every request made available since the last one.
    fn notify(&mut self, mem: &mut GuestMemory) {
        if !self.queue.ready
            || self.status & STATUS_DRIVER_OK == 0
            || self.status & STATUS_DEVICE_NEEDS_RESET != 0
        {
            return;
        }
        // The guest's queue was checked when it was made ready, but one a checkpoint restored was
        // not. A usable queue's rings lie inside RAM, so the ring accesses below cannot fail (nor
        // their addresses overflow); should one fail all the same, the ring counts as broken.
        let Some(num) = self.queue.usable_size(mem.size()) else {
            return self.needs_reset();
        };
        let q = self.queue.clone();
        let Some(avail_idx) = read_u16(mem, q.driver + 2) else {
            return self.needs_reset();
        };
        // Read once: a request may DMA into the ring itself, and must not make this loop endless.
        let pending = avail_idx.wrapping_sub(q.next_avail);
        if pending > num {
            return self.needs_reset(); // the available index moved by more than the queue size
        }
        let mut used_any = false;
        for _ in 0..pending {
            let slot = self.queue.next_avail % num;
            let Some(head) = read_u16(mem, q.driver + 4 + 2 * u64::from(slot)) else {
                return self.needs_reset();
            };
            self.queue.next_avail = self.queue.next_avail.wrapping_add(1);
            let Some(chain) = read_chain(mem, &q, num, head) else {
                return self.needs_reset();
            };
            let written = self.execute(&chain, mem);
            let slot = self.queue.next_used % num;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(chain.head).to_le_bytes());
            elem[4..].copy_from_slice(&written.to_le_bytes());
            self.queue.next_used = self.queue.next_used.wrapping_add(1);
            let ok = mem.write(q.device + 4 + 8 * u64::from(slot), &elem).is_ok()
                && mem
                    .write(q.device + 2, &self.queue.next_used.to_le_bytes())
                    .is_ok();
            if !ok {
                return self.needs_reset();
            }
            self.completed += 1;
            used_any = true;
        }
        let flags = read_u16(mem, q.driver).unwrap_or(0);
        if used_any && flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0 {
            self.interrupt_status |= INT_USED_BUFFER;
            self.irq = true;
        }
    }

    /// Executes one request; returns the bytes written into its device-writable buffers (the used
    /// element's `len`).
    fn execute(&mut self, chain: &Chain, mem: &mut GuestMemory) -> u32 {
        // The status byte is the last byte of the device-writable part. Without one there is no way
        // to report anything: the buffer is returned untouched.
        let Some(status_at) = chain
            .writable
            .iter()
            .rev()
            .find(|d| d.len > 0)
            .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1))
            .filter(|&a| a < mem.size())
        else {
            return 0;
        };
        let (status, data_written) = self.request(chain, mem);
        if mem.write(status_at, &[status]).is_err() {
            return 0;
        }
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    }

    /// Checks and performs a request; returns its status and the data bytes written to the guest.
    /// Everything is checked before anything moves, so a failed request changes nothing.
    fn request(&mut self, chain: &Chain, mem: &mut GuestMemory) -> (u8, u64) {
        const IOERR: (u8, u64) = (VIRTIO_BLK_S_IOERR, 0);
        let ram = mem.size();
        let inside = |d: &Desc| {
            d.addr
                .checked_add(u64::from(d.len))
                .is_some_and(|end| end <= ram)
        };
        if chain.malformed || !chain.readable.iter().chain(&chain.writable).all(inside) {
            return IOERR;
        }
        let readable: u64 = chain.readable.iter().map(|d| u64::from(d.len)).sum();
        let writable: u64 = chain.writable.iter().map(|d| u64::from(d.len)).sum();
        let data_in = writable - 1; // room before the status byte
        let mut header = [0u8; REQ_HEADER_LEN as usize];
        if readable < REQ_HEADER_LEN || !gather(mem, &chain.readable, 0, &mut header) {
            return IOERR;
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let range_ok = |len: u64| {
            len.is_multiple_of(SECTOR_SIZE)
                && sector
                    .checked_mul(SECTOR_SIZE)
                    .is_some_and(|start| self.disk.contains(start, len))
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                if readable != REQ_HEADER_LEN || !range_ok(data_in) {
                    return IOERR;
                }
                let mut offset = sector * SECTOR_SIZE;
                let disk = &self.disk;
                let ok = for_each_piece(&chain.writable, 0, data_in, |addr, len| {
                    let ok = disk
                        .read_with(offset, len, |at, bytes| mem.write(addr + at, bytes).is_ok());
                    offset += len;
                    ok
                });
                if ok {
                    (VIRTIO_BLK_S_OK, data_in)
                } else {
                    IOERR
                }
            }
            VIRTIO_BLK_T_OUT => {
                let data_out = readable - REQ_HEADER_LEN;
                if writable != 1 || !range_ok(data_out) {
                    return IOERR;
                }
                let mut offset = sector * SECTOR_SIZE;
                let disk = &mut self.disk;
                let ok = for_each_piece(&chain.readable, REQ_HEADER_LEN, data_out, |addr, len| {
                    let ok = disk
                        .write_with(offset, len, |at, bytes| mem.read(addr + at, bytes).is_ok());
                    offset += len;
                    ok
                });
                // Every range was checked above, so this cannot fail half-way.
                (
                    if ok {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    },
                    0,
                )
            }
            VIRTIO_BLK_T_FLUSH => {
                // Writes are in the overlay the moment they complete: nothing to flush.
                if readable != REQ_HEADER_LEN || writable != 1 {
                    return IOERR;
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if readable != REQ_HEADER_LEN {
                    return IOERR;
                }
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                let name = format!("retrovisor-disk{}", self.index);
                id[..name.len()].copy_from_slice(name.as_bytes());
                let n = data_in.min(VIRTIO_BLK_ID_BYTES as u64);
                let mut from = 0usize;
                let ok = for_each_piece(&chain.writable, 0, n, |addr, len| {
                    let ok = mem.write(addr, &id[from..from + len as usize]).is_ok();
                    from += len as usize;
                    ok
                });
                if ok {
                    (VIRTIO_BLK_S_OK, n)
                } else {
                    IOERR
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

/// The little-endian u16 at `addr` in guest RAM, if it is inside RAM.
fn read_u16(mem: &GuestMemory, addr: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    mem.read(addr, &mut b).ok()?;
    Some(u16::from_le_bytes(b))
}

/// Follows the chain starting at descriptor `head`; None if the ring is corrupt.
fn read_chain(mem: &GuestMemory, q: &Queue, num: u16, head: u16) -> Option<Chain> {
    if head >= num {
        return None; // an available ring entry names a descriptor past the table
    }
    let mut chain = Chain {
        head,
        readable: Vec::new(),
        writable: Vec::new(),
        malformed: false,
    };
    let mut index = head;
    for _ in 0..num {
        let mut raw = [0u8; 16];
        mem.read(q.desc + 16 * u64::from(index), &mut raw).ok()?;
        let desc = Desc {
            addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
        };
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            chain.malformed = true;
        } else if desc.flags & VIRTQ_DESC_F_WRITE != 0 {
            chain.writable.push(desc);
        } else if chain.writable.is_empty() {
            chain.readable.push(desc);
        } else {
            // Device-readable after device-writable: the spec forbids it.
            chain.malformed = true;
        }
        if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Some(chain);
        }
        if next >= num {
            return None; // the next index lies past the table
        }
        index = next;
    }
    None // the chain is longer than the queue: it loops
}

/// Calls `f(guest_addr, len)` for the pieces of guest memory that hold bytes
/// `[start, start + len)` of the stream the descriptors `descs` form, in order; stops at the first
/// false.
fn for_each_piece(
    descs: &[Desc],
    start: u64,
    len: u64,
    mut f: impl FnMut(u64, u64) -> bool,
) -> bool {
    let end = start + len;
    let mut pos = 0u64;
    for d in descs {
        let (d_start, d_end) = (pos, pos + u64::from(d.len));
        pos = d_end;
        let from = d_start.max(start);
        let to = d_end.min(end);
        if from < to && !f(d.addr + (from - d_start), to - from) {
            return false;
        }
        if pos >= end {
            break;
        }
    }
    true
}

/// Copies bytes `[start, start + buf.len())` of the descriptors' stream into `buf`.
fn gather(mem: &GuestMemory, descs: &[Desc], start: u64, buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for_each_piece(descs, start, buf.len() as u64, |addr, len| {
        let ok = mem.read(addr, &mut buf[at..at + len as usize]).is_ok();
        at += len as usize;
        ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskImage;

    const RAM: u64 = 1 << 20;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x10000;
    const QSIZE: u32 = 8;

    struct Rig {
        dev: VirtioBlk,
        mem: GuestMemory,
        next_desc: u16,
        avail_idx: u16,
    }

    fn image() -> Vec<u8> {
        (0..64 * 1024)
            .map(|i: usize| (i * 7 + i / 512) as u8)
            .collect()
    }

    impl Rig {
        fn new() -> Rig {
            let disk = Disk::new(DiskImage::new(image(), "test".into()));
            let mut rig = Rig {
                dev: VirtioBlk::new(0, disk),
                mem: GuestMemory::new(RAM).unwrap(),
                next_desc: 0,
                avail_idx: 0,
            };
            rig.init(QSIZE);
            rig
        }

        fn r(&mut self, off: u64) -> u32 {
            let mut d = [0u8; 4];
            self.dev.mmio_read(off, &mut d);
            u32::from_le_bytes(d)
        }

        fn w(&mut self, off: u64, v: u32) {
            self.dev.mmio_write(off, &v.to_le_bytes(), &mut self.mem);
        }

        fn init(&mut self, qsize: u32) {
            self.w(REG_STATUS, 0);
            self.w(REG_STATUS, 1);
            self.w(REG_STATUS, 3);
            self.w(REG_DRIVER_FEATURES_SEL, 1);
            self.w(REG_DRIVER_FEATURES, 1);
            self.w(REG_DRIVER_FEATURES_SEL, 0);
            self.w(REG_DRIVER_FEATURES, 0);
            self.w(REG_STATUS, 3 | STATUS_FEATURES_OK);
            assert_ne!(self.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
            self.w(REG_QUEUE_SEL, 0);
            self.w(REG_QUEUE_NUM, qsize);
            self.w(REG_QUEUE_DESC_LOW, DESC as u32);
            self.w(REG_QUEUE_DRIVER_LOW, AVAIL as u32);
            self.w(REG_QUEUE_DEVICE_LOW, USED as u32);
            self.w(REG_QUEUE_READY, 1);
            self.w(REG_STATUS, 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            self.mem.write(AVAIL, &[0; 4]).unwrap();
            self.mem.write(USED, &[0; 4]).unwrap();
            self.next_desc = 0;
            self.avail_idx = 0;
        }

        /// Writes descriptor `i`; returns `i`.
        fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> u16 {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(DESC + 16 * u64::from(i), &raw).unwrap();
            i
        }

        fn submit(&mut self, head: u16) {
            let slot = self.avail_idx % QSIZE as u16;
            self.mem
                .write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes())
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write(AVAIL + 2, &self.avail_idx.to_le_bytes())
                .unwrap();
            self.w(REG_QUEUE_NOTIFY, 0);
        }

        fn header(&mut self, at: u64, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write(at, &h).unwrap();
        }

        /// A request with a header, one data buffer and a status byte; returns (status, used len).
        fn simple(
            &mut self,
            kind: u32,
            sector: u64,
            data: u64,
            len: u32,
            write_data: bool,
        ) -> (u8, u32) {
            let hdr = BUF - 0x100;
            let status = BUF - 0x10;
            self.header(hdr, kind, sector);
            self.mem.write(status, &[0xAA]).unwrap();
            self.desc(0, hdr, 16, VIRTQ_DESC_F_NEXT, 1);
            let f = if write_data { VIRTQ_DESC_F_WRITE } else { 0 };
            self.desc(1, data, len, f | VIRTQ_DESC_F_NEXT, 2);
            self.desc(2, status, 1, VIRTQ_DESC_F_WRITE, 0);
            self.submit(0);
            self.last()
        }

        fn last(&mut self) -> (u8, u32) {
            let mut s = [0u8];
            self.mem.read(BUF - 0x10, &mut s).unwrap();
            let idx = read_u16(&self.mem, USED + 2).unwrap();
            let slot = idx.wrapping_sub(1) % QSIZE as u16;
            let len = self
                .mem
                .read_u32(USED + 4 + 8 * u64::from(slot) + 4)
                .unwrap();
            (s[0], len)
        }
    }

    #[test]
    fn identifies_as_a_modern_block_device() {
        let mut rig = Rig::new();
        assert_eq!(rig.r(REG_MAGIC), 0x7472_6976);
        assert_eq!(rig.r(REG_VERSION), 2);
        assert_eq!(rig.r(REG_DEVICE_ID), 2);
        rig.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rig.r(REG_DEVICE_FEATURES), 1);
        assert_eq!(rig.r(REG_QUEUE_NUM_MAX), 256);
        rig.w(REG_QUEUE_SEL, 1);
        assert_eq!(rig.r(REG_QUEUE_NUM_MAX), 0);
        let mut cap = [0u8; 8];
        rig.dev.mmio_read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        // Unaligned or narrow register accesses read as zero.
        let mut b = [0u8; 2];
        rig.dev.mmio_read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_a_legacy_driver() {
        let mut rig = Rig::new();
        rig.w(REG_STATUS, 0);
        rig.w(REG_STATUS, 3);
        rig.w(REG_DRIVER_FEATURES_SEL, 0);
        rig.w(REG_DRIVER_FEATURES, 1 << 28); // INDIRECT_DESC
        rig.w(REG_DRIVER_FEATURES_SEL, 1);
        rig.w(REG_DRIVER_FEATURES, 1);
        rig.w(REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(rig.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
        rig.w(REG_STATUS, 0);
        rig.w(REG_STATUS, 3);
        rig.w(REG_STATUS, 3 | STATUS_FEATURES_OK); // no VERSION_1
        assert_eq!(rig.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn reads_writes_and_interrupts() {
        let mut rig = Rig::new();
        assert_eq!(rig.simple(VIRTIO_BLK_T_IN, 3, BUF, 1024, true), (0, 1025));
        let mut got = vec![0u8; 1024];
        rig.mem.read(BUF, &mut got).unwrap();
        assert_eq!(got, &image()[3 * 512..5 * 512]);
        assert!(rig.dev.take_irq());
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        rig.w(REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), 0);

        // Write two sectors from a buffer split over two descriptors.
        rig.mem.write(BUF, &[0x11; 512]).unwrap();
        rig.mem.write(BUF + 0x2000, &[0x22; 512]).unwrap();
        rig.header(BUF - 0x100, VIRTIO_BLK_T_OUT, 10);
        rig.desc(0, BUF - 0x100, 16, VIRTQ_DESC_F_NEXT, 5);
        rig.desc(5, BUF, 512, VIRTQ_DESC_F_NEXT, 3);
        rig.desc(3, BUF + 0x2000, 512, VIRTQ_DESC_F_NEXT, 7);
        rig.desc(7, BUF - 0x10, 1, VIRTQ_DESC_F_WRITE, 0);
        rig.submit(0);
        assert_eq!(rig.last(), (0, 1));
        let mut sec = [0u8; 512];
        assert!(rig.dev.disk().read(10 * 512, &mut sec));
        assert_eq!(sec, [0x11; 512]);
        assert!(rig.dev.disk().read(11 * 512, &mut sec));
        assert_eq!(sec, [0x22; 512]);
        assert_eq!(rig.dev.disk().overlay().blocks(), 1);

        // Header and data in one readable descriptor (any layout), read back through the overlay.
        assert_eq!(
            rig.simple(VIRTIO_BLK_T_IN, 10, BUF + 0x4000, 1024, true),
            (0, 1025)
        );
        rig.mem.read(BUF + 0x4000, &mut got).unwrap();
        assert_eq!(&got[..512], &[0x11; 512][..]);
        assert_eq!(&got[512..], &[0x22; 512][..]);

        assert_eq!(rig.simple(VIRTIO_BLK_T_FLUSH, 0, BUF, 0, false).0, 0);
        assert_eq!(rig.simple(VIRTIO_BLK_T_GET_ID, 0, BUF, 20, true), (0, 21));
        let mut id = [0u8; 20];
        rig.mem.read(BUF, &mut id).unwrap();
        assert!(id.starts_with(b"retrovisor-disk0\0"));
        assert_eq!(rig.simple(0x1234, 0, BUF, 0, false).0, VIRTIO_BLK_S_UNSUPP);

        // NO_INTERRUPT in the available ring suppresses the interrupt.
        rig.dev.take_irq();
        rig.mem.write(AVAIL, &1u16.to_le_bytes()).unwrap();
        rig.simple(VIRTIO_BLK_T_IN, 0, BUF, 512, true);
        assert!(!rig.dev.take_irq());
    }

    #[test]
    fn bad_requests_get_ioerr_and_change_nothing() {
        let mut rig = Rig::new();
        let before = rig.dev.disk().clone();
        let ioerr = VIRTIO_BLK_S_IOERR;
        // Data outside RAM, in either direction.
        assert_eq!(
            rig.simple(VIRTIO_BLK_T_IN, 0, RAM - 256, 512, true).0,
            ioerr
        );
        assert_eq!(
            rig.simple(VIRTIO_BLK_T_OUT, 0, RAM - 256, 512, false).0,
            ioerr
        );
        assert_eq!(
            rig.simple(VIRTIO_BLK_T_OUT, 0, u64::MAX - 10, 512, false).0,
            ioerr
        );
        // Past the end of the disk, and straddling it.
        assert_eq!(rig.simple(VIRTIO_BLK_T_IN, 128, BUF, 512, true).0, ioerr);
        assert_eq!(rig.simple(VIRTIO_BLK_T_OUT, 127, BUF, 1024, false).0, ioerr);
        assert_eq!(
            rig.simple(VIRTIO_BLK_T_OUT, u64::MAX / 256, BUF, 512, false)
                .0,
            ioerr
        );
        // Not a whole number of sectors.
        assert_eq!(rig.simple(VIRTIO_BLK_T_OUT, 0, BUF, 100, false).0, ioerr);
        // Wrong directions: a read into a device-readable buffer, a write from a writable one.
        assert_eq!(rig.simple(VIRTIO_BLK_T_IN, 0, BUF, 512, false).0, ioerr);
        assert_eq!(rig.simple(VIRTIO_BLK_T_OUT, 0, BUF, 512, true).0, ioerr);
        // Readable after writable.
        rig.header(BUF - 0x100, VIRTIO_BLK_T_OUT, 0);
        rig.desc(0, BUF - 0x100, 16, VIRTQ_DESC_F_NEXT, 1);
        rig.desc(1, BUF - 0x10, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
        rig.desc(2, BUF, 512, 0, 0);
        rig.submit(0);
        assert_eq!(rig.last().0, ioerr);
        // No status byte at all: returned with nothing written.
        rig.desc(0, BUF - 0x100, 16, 0, 0);
        rig.submit(0);
        assert_eq!(rig.last().1, 0);
        assert_eq!(rig.dev.disk(), &before);
        assert_eq!(rig.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        // The device still works.
        assert_eq!(rig.simple(VIRTIO_BLK_T_IN, 1, BUF, 512, true).0, 0);
    }

    #[test]
    fn ring_corruption_needs_a_reset() {
        // A looping chain.
        let mut rig = Rig::new();
        rig.dev.take_irq();
        rig.header(BUF - 0x100, VIRTIO_BLK_T_IN, 0);
        rig.desc(0, BUF - 0x100, 16, VIRTQ_DESC_F_NEXT, 1);
        rig.desc(1, BUF, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0);
        rig.submit(0);
        assert_ne!(rig.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(rig.dev.take_irq());
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        // Ignored until reset.
        assert_eq!(rig.simple(VIRTIO_BLK_T_IN, 0, BUF, 512, true).0, 0xAA);
        rig.init(QSIZE);
        assert_eq!(rig.simple(VIRTIO_BLK_T_IN, 0, BUF, 512, true).0, 0);

        // A next index past the table; a head past the table; an index jump.
        rig.desc(0, BUF - 0x100, 16, VIRTQ_DESC_F_NEXT, 8);
        rig.submit(0);
        assert_ne!(rig.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        rig.init(QSIZE);
        rig.submit(9);
        assert_ne!(rig.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        rig.init(QSIZE);
        rig.mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
        rig.w(REG_QUEUE_NOTIFY, 0);
        assert_ne!(rig.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);

        // Bad queue sizes and placements are refused when the queue is made ready.
        for (num, desc) in [
            (6, DESC),
            (512, DESC),
            (0, DESC),
            (8, DESC + 8),
            (8, RAM - 64),
        ] {
            rig.w(REG_STATUS, 0);
            rig.w(REG_QUEUE_NUM, num);
            rig.w(REG_QUEUE_DESC_LOW, desc as u32);
            rig.w(REG_QUEUE_DRIVER_LOW, AVAIL as u32);
            rig.w(REG_QUEUE_DEVICE_LOW, USED as u32);
            rig.w(REG_QUEUE_READY, 1);
            assert_eq!(rig.r(REG_QUEUE_READY), 0, "queue {num} at {desc:#x}");
            assert_ne!(rig.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn dma_marks_pages_dirty() {
        let mut rig = Rig::new();
        rig.mem.take_vmm_dirty();
        rig.simple(VIRTIO_BLK_T_IN, 0, BUF + 0x3000, 4096, true);
        let dirty = rig.mem.take_vmm_dirty();
        let page = (BUF + 0x3000) as usize / 4096;
        assert_ne!(dirty[page / 64] & (1 << (page % 64)), 0);
    }
}
