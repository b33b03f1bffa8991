/* disk.elf: a minimal virtio-mmio block driver (virtio 1.x, MMIO version 2, one split virtqueue).
 *
 * Probes the four disk windows (0xd0000000 + i*0x1000), then drives disk 0 (IRQ 5):
 *   - normal mode: GET_ID; reads the whole disk 8 sectors per request (polling, with
 *     VIRTQ_AVAIL_F_NO_INTERRUPT) and checksums it; with interrupts on, writes sectors 5-6 from a
 *     buffer split over two descriptors, flushes, reads them back and compares; then reads the whole
 *     disk again and checksums it.
 *   - `--cmdline bad`: programs the device wrongly on purpose (buffers outside RAM, sectors past
 *     the end, wrong descriptor directions, a partial sector, an unknown request type, a looping
 *     chain, descriptor indexes past the table, an available index that jumps, invalid queue sizes)
 *     and prints what the device answered: an error status for bad requests, DEVICE_NEEDS_RESET for
 *     a broken ring, after which it resets the device and carries on.
 * The checksum is FNV-1a over little-endian 32-bit words. */
#include "lib.h"

#define VIRTIO_BASE(i)      (0xd0000000u + (u32)(i) * 0x1000u)
#define REG_MAGIC           0x000
#define REG_VERSION         0x004
#define REG_DEVICE_ID       0x008
#define REG_DEV_FEATURES    0x010
#define REG_DEV_FEATURES_SEL 0x014
#define REG_DRV_FEATURES    0x020
#define REG_DRV_FEATURES_SEL 0x024
#define REG_QUEUE_SEL       0x030
#define REG_QUEUE_NUM_MAX   0x034
#define REG_QUEUE_NUM       0x038
#define REG_QUEUE_READY     0x044
#define REG_QUEUE_NOTIFY    0x050
#define REG_INT_STATUS      0x060
#define REG_INT_ACK         0x064
#define REG_STATUS          0x070
#define REG_QUEUE_DESC_LO   0x080
#define REG_QUEUE_DESC_HI   0x084
#define REG_QUEUE_DRIVER_LO 0x090
#define REG_QUEUE_DRIVER_HI 0x094
#define REG_QUEUE_DEVICE_LO 0x0a0
#define REG_QUEUE_DEVICE_HI 0x0a4
#define REG_CONFIG          0x100

#define ST_ACK          1
#define ST_DRIVER       2
#define ST_DRIVER_OK    4
#define ST_FEATURES_OK  8
#define ST_NEEDS_RESET  64

#define F_NEXT  1
#define F_WRITE 2

#define T_IN     0
#define T_OUT    1
#define T_FLUSH  4
#define T_GET_ID 8

#define DISK_IRQ 5
#define QSZ 8
#define OUTSIDE_RAM 0x7ff00000u  /* far above the 32 MiB the tests give */

struct vq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vq_avail {
    u16 flags;
    u16 idx;
    u16 ring[QSZ];
    u16 used_event;
};
struct vq_used_elem {
    u32 id;
    u32 len;
};
struct vq_used {
    u16 flags;
    u16 idx;
    struct vq_used_elem ring[QSZ];
    u16 avail_event;
};
struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static volatile struct vq_desc desc[QSZ] __attribute__((aligned(16)));
static volatile struct vq_avail avail __attribute__((aligned(4)));
static volatile struct vq_used used __attribute__((aligned(4)));
static volatile struct blk_req req __attribute__((aligned(16)));
static volatile u8 status_byte;
static u8 buf[4096] __attribute__((aligned(16)));
static u8 buf2[512] __attribute__((aligned(16)));

static u32 base;
static u64 capacity;
static int qemu_microvm;          /* `qemu` on the command line: QEMU microvm's windows, polling only */
static u16 used_seen;
static int irq_mode;
static volatile u32 irq_count;
static volatile u32 irq_status_seen;

static inline u32 rd(u32 reg) { return *(volatile u32 *)(unsigned long)(base + reg); }
static inline void wr(u32 reg, u32 v) { *(volatile u32 *)(unsigned long)(base + reg) = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u32 addr_of(const volatile void *p) { return (u32)(unsigned long)p; }

static void vblk_irq(void)
{
    u32 st = rd(REG_INT_STATUS);
    wr(REG_INT_ACK, st);
    irq_status_seen |= st;
    irq_count++;
}

/* Resets the device and sets it up with a queue of `qsz`; returns 0, or -1 if the queue was refused. */
static int vblk_init(u32 qsz)
{
    u32 i, hi, lo;
    wr(REG_STATUS, 0);
    wr(REG_STATUS, ST_ACK);
    wr(REG_STATUS, ST_ACK | ST_DRIVER);
    wr(REG_DEV_FEATURES_SEL, 1);
    hi = rd(REG_DEV_FEATURES);
    wr(REG_DEV_FEATURES_SEL, 0);
    lo = rd(REG_DEV_FEATURES);
    if (!(hi & 1)) {
        puts("disk: device does not offer VIRTIO_F_VERSION_1\n");
        guest_exit(2);
    }
    wr(REG_DRV_FEATURES_SEL, 1);
    wr(REG_DRV_FEATURES, 1);                 /* VIRTIO_F_VERSION_1 */
    wr(REG_DRV_FEATURES_SEL, 0);
    wr(REG_DRV_FEATURES, lo & (1u << 9));    /* VIRTIO_BLK_F_FLUSH if offered */
    wr(REG_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd(REG_STATUS) & ST_FEATURES_OK)) {
        puts("disk: features refused\n");
        guest_exit(2);
    }
    wr(REG_QUEUE_SEL, 0);
    if (rd(REG_QUEUE_READY) != 0 || rd(REG_QUEUE_NUM_MAX) < QSZ) {
        puts("disk: queue 0 unusable\n");
        guest_exit(2);
    }
    avail.flags = 0;
    avail.idx = 0;
    for (i = 0; i < QSZ; i++)
        avail.ring[i] = 0;
    used.flags = 0;
    used.idx = 0;
    used_seen = 0;
    wr(REG_QUEUE_NUM, qsz);
    wr(REG_QUEUE_DESC_LO, addr_of(desc));
    wr(REG_QUEUE_DESC_HI, 0);
    wr(REG_QUEUE_DRIVER_LO, addr_of(&avail));
    wr(REG_QUEUE_DRIVER_HI, 0);
    wr(REG_QUEUE_DEVICE_LO, addr_of(&used));
    wr(REG_QUEUE_DEVICE_HI, 0);
    wr(REG_QUEUE_READY, 1);
    if (rd(REG_QUEUE_READY) != 1)
        return -1;
    wr(REG_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    return 0;
}

/* Makes descriptor chain `head` available and notifies the device. In interrupt mode it sleeps
 * until the completion interrupt. Returns 1 if the device used the buffer. */
static int submit(u16 head)
{
    avail.ring[avail.idx % QSZ] = head;
    barrier();
    avail.idx = (u16)(avail.idx + 1);
    barrier();
    if (irq_mode) {
        u32 before;
        cli();
        before = irq_count;
        wr(REG_QUEUE_NOTIFY, 0);
        while (irq_count == before) {
            sti_hlt();
            cli();
        }
        sti();
    } else {
        wr(REG_QUEUE_NOTIFY, 0);
    }
    /* Retrovisor completes a request inside the notify; QEMU may take a while. */
    if (qemu_microvm) {
        u32 spins;
        for (spins = 0; used.idx == used_seen && spins < 50000000u; spins++)
            ;
    }
    if (used.idx == used_seen)
        return 0;
    used_seen = (u16)(used_seen + 1);
    return 1;
}

static void set_desc(u16 i, const volatile void *p, u32 len, u16 flags, u16 next)
{
    desc[i].addr = addr_of(p);
    desc[i].len = len;
    desc[i].flags = flags;
    desc[i].next = next;
}

/* One request: header, data (if len), status. Returns the status byte (0xff: not written). */
static u8 request(u32 type, u64 sector, const volatile void *data, u32 len, int device_writes)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    status_byte = 0xff;
    if (len) {
        set_desc(0, &req, sizeof req, F_NEXT, 1);
        set_desc(1, data, len, F_NEXT | (device_writes ? F_WRITE : 0), 2);
        set_desc(2, &status_byte, 1, F_WRITE, 0);
    } else {
        set_desc(0, &req, sizeof req, F_NEXT, 1);
        set_desc(1, &status_byte, 1, F_WRITE, 0);
    }
    submit(0);
    return status_byte;
}

static u32 fnv_words(u32 h, const u8 *p, u32 len)
{
    u32 i;
    for (i = 0; i + 4 <= len; i += 4) {
        h ^= *(const u32 *)(p + i);
        h *= 16777619u;
    }
    return h;
}

/* Reads the whole disk, 8 sectors per request; returns the checksum. */
static u32 checksum_disk(void)
{
    u32 h = 2166136261u;
    u64 s;
    for (s = 0; s < capacity; s += 8) {
        u32 n = capacity - s < 8 ? (u32)(capacity - s) : 8;
        u8 st = request(T_IN, s, buf, n * 512, 1);
        if (st != 0) {
            puts("disk: read of sector ");
            put_dec((u32)s);
            puts(" failed, status ");
            put_dec(st);
            putc('\n');
            guest_exit(3);
        }
        h = fnv_words(h, buf, n * 512);
    }
    return h;
}

static u8 written_byte(u32 sector, u32 j)
{
    return (u8)((j * 3 + sector) ^ 0xA5);
}

static void show_status(const char *what, u8 st)
{
    puts(what);
    puts(": status ");
    put_dec(st);
    putc('\n');
}

static void normal_mode(void)
{
    u32 j, bad = 0, sum;

    /* GET_ID */
    for (j = 0; j < 21; j++)
        buf[j] = 0;
    show_status("disk: get id", request(T_GET_ID, 0, buf, 20, 1));
    puts("disk: id ");
    puts((const char *)buf);
    putc('\n');

    /* The whole disk, polling. */
    avail.flags = 1;             /* VIRTQ_AVAIL_F_NO_INTERRUPT */
    sum = checksum_disk();
    puts("disk: read ");
    put_dec((u32)capacity);
    puts(" sectors, checksum ");
    put_hex32(sum);
    putc('\n');
    request(T_IN, 0, buf, 512, 1);
    for (j = 0; j < 64 && buf[j] >= ' ' && buf[j] < 127; j++)
        ;
    buf[j] = 0;
    puts("disk: sector 0 says: ");
    puts((const char *)buf);
    putc('\n');

    /* Interrupt-driven from here (polling under QEMU microvm, whose IRQs go through an IOAPIC). */
    if (!qemu_microvm) {
        avail.flags = 0;
        irq_register(DISK_IRQ, vblk_irq);
        pic_unmask(DISK_IRQ);
        irq_mode = 1;
        sti();
    }

    for (j = 0; j < 512; j++) {
        buf[j] = written_byte(5, j);
        buf2[j] = written_byte(6, j);
    }
    req.type = T_OUT;
    req.reserved = 0;
    req.sector = 5;
    status_byte = 0xff;
    set_desc(0, &req, sizeof req, F_NEXT, 1);
    set_desc(1, buf, 512, F_NEXT, 2);
    set_desc(2, buf2, 512, F_NEXT, 3);
    set_desc(3, &status_byte, 1, F_WRITE, 0);
    submit(0);
    show_status("disk: wrote sectors 5-6", status_byte);
    show_status("disk: flush", request(T_FLUSH, 0, 0, 0, 0));

    for (j = 0; j < 1024; j++)
        buf[j] = 0;
    show_status("disk: read sectors 5-6", request(T_IN, 5, buf, 1024, 1));
    for (j = 0; j < 1024; j++)
        if (buf[j] != written_byte(5 + j / 512, j % 512))
            bad++;
    puts(bad ? "disk: read back MISMATCH\n" : "disk: read back ok\n");
    puts("disk: interrupts ");
    put_dec(irq_count);
    puts(", interrupt status seen ");
    put_hex32(irq_status_seen);
    putc('\n');

    cli();
    irq_mode = 0;
    pic_mask(DISK_IRQ);
    avail.flags = 1;
    sum = checksum_disk();
    puts("disk: checksum after writes ");
    put_hex32(sum);
    putc('\n');
}

static void expect_reset(const char *what)
{
    u32 st = rd(REG_STATUS);
    puts("bad: ");
    puts(what);
    puts(": ");
    puts(st & ST_NEEDS_RESET ? "device needs reset" : "device did NOT flag it");
    puts(", interrupt status ");
    put_hex32(rd(REG_INT_STATUS));
    putc('\n');
    wr(REG_INT_ACK, rd(REG_INT_STATUS));
}

static void reinit(void)
{
    if (vblk_init(QSZ) != 0) {
        puts("bad: re-initialisation failed\n");
        guest_exit(4);
    }
    avail.flags = 1;
}

static void bad_mode(void)
{
    u32 sum;

    puts("bad: start\n");
    avail.flags = 1;
    show_status("bad: read into a buffer outside RAM",
                request(T_IN, 0, (const volatile void *)OUTSIDE_RAM, 512, 1));
    show_status("bad: write from a buffer outside RAM",
                request(T_OUT, 0, (const volatile void *)OUTSIDE_RAM, 512, 0));
    show_status("bad: read past the end", request(T_IN, capacity, buf, 512, 1));
    show_status("bad: write across the end", request(T_OUT, capacity - 1, buf, 1024, 0));
    show_status("bad: read into a device-readable buffer", request(T_IN, 0, buf, 512, 0));
    show_status("bad: write of a partial sector", request(T_OUT, 0, buf, 100, 0));
    show_status("bad: unknown request type", request(0x77, 0, 0, 0, 0));

    /* A chain that loops: header -> data -> header -> ... */
    req.type = T_IN;
    req.sector = 0;
    status_byte = 0xff;
    set_desc(0, &req, sizeof req, F_NEXT, 1);
    set_desc(1, buf, 512, F_NEXT | F_WRITE, 0);
    puts(submit(0) ? "bad: looping chain was used\n" : "bad: looping chain not used\n");
    expect_reset("looping chain");
    show_status("bad: request while the device needs reset", request(T_IN, 0, buf, 512, 1));
    reinit();
    show_status("bad: after reset, a good read", request(T_IN, 0, buf, 512, 1));

    /* A head index past the descriptor table. */
    submit(QSZ + 1);
    expect_reset("head index past the table");
    reinit();
    /* A next index past the table. */
    set_desc(0, &req, sizeof req, F_NEXT, 200);
    submit(0);
    expect_reset("next index past the table");
    reinit();
    /* The available index jumps by more than the queue size. */
    avail.idx = 20;
    wr(REG_QUEUE_NOTIFY, 0);
    expect_reset("available index jump");
    reinit();
    /* Queue sizes the device must refuse. */
    puts(vblk_init(6) ? "bad: queue size 6 refused\n" : "bad: queue size 6 ACCEPTED\n");
    expect_reset("queue size 6");
    puts(vblk_init(512) ? "bad: queue size 512 refused\n" : "bad: queue size 512 ACCEPTED\n");
    expect_reset("queue size 512");
    reinit();

    sum = checksum_disk();
    puts("bad: checksum after all that ");
    put_hex32(sum);
    putc('\n');
}

void main(void)
{
    u32 i;

    serial_init();
    idt_init();
    pic_init();
    puts("disk: start\n");
    if (cmdline_has("qemu")) {
        /* For comparing with QEMU's virtio-blk: -M microvm has virtio-mmio windows of 0x200 bytes
         * from 0xfeb00000; use the first block device found. */
        qemu_microvm = 1;
        for (i = 0; i < 32; i++) {
            base = 0xfeb00000u + i * 0x200u;
            if (rd(REG_MAGIC) == 0x74726976 && rd(REG_DEVICE_ID) == 2)
                break;
        }
        if (i == 32) {
            puts("disk: no virtio block device in QEMU microvm's windows\n");
            guest_exit(2);
        }
        puts("disk: QEMU microvm virtio-mmio at ");
        put_hex32(base);
        puts(" version ");
        put_dec(rd(REG_VERSION));
        putc('\n');
        goto found;
    }
    for (i = 0; i < 4; i++) {
        base = VIRTIO_BASE(i);
        puts("disk: slot ");
        put_dec(i);
        if (rd(REG_MAGIC) != 0x74726976) {
            puts(": empty (magic ");
            put_hex32(rd(REG_MAGIC));
            puts(")\n");
            continue;
        }
        puts(": virtio-mmio version ");
        put_dec(rd(REG_VERSION));
        puts(" device ");
        put_dec(rd(REG_DEVICE_ID));
        puts(" capacity ");
        put_dec64(((u64)rd(REG_CONFIG + 4) << 32) | rd(REG_CONFIG));
        puts(" sectors\n");
    }
    base = VIRTIO_BASE(0);
    if (rd(REG_MAGIC) != 0x74726976) {
        puts("disk: no disk 0\n");
        guest_exit(2);
    }
found:
    capacity = ((u64)rd(REG_CONFIG + 4) << 32) | rd(REG_CONFIG);
    if (vblk_init(QSZ) != 0) {
        puts("disk: queue refused\n");
        guest_exit(2);
    }
    if (cmdline_has("bad"))
        bad_mode();
    else
        normal_mode();
    puts("disk: done\n");
    guest_exit(0);
}
