/* Retrovisor test guests: serial, PIC, PIT, RTC, exit. Builds as i386 and as x86-64 code. */
#include "lib.h"

/* ---------------- serial (COM1, polled transmit) ---------------- */

void serial_init(void)
{
    outb(UART_IER, 0x00);          /* no UART interrupts (guests that want them enable them) */
    outb(UART_LCR, 0x80);          /* DLAB on */
    outb(COM1 + 0, 0x01);          /* divisor 1: 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(UART_LCR, 0x03);          /* 8N1, DLAB off */
    /* FCR is deliberately left alone (FIFOs off, as at reset): enabling or clearing the FIFOs
     * would throw away input bytes that arrived before the guest got here. */
    outb(UART_MCR, 0x0B);          /* DTR, RTS, OUT2 (OUT2 gates the IRQ line on PCs) */
}

void putc(char c)
{
    while (!(inb(UART_LSR) & UART_LSR_THRE))
        ;
    outb(UART_THR, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static const char hexdig[] = "0123456789abcdef";

void put_hex32(u32 v)
{
    int i;
    putc('0');
    putc('x');
    for (i = 28; i >= 0; i -= 4)
        putc(hexdig[(v >> i) & 0xf]);
}

void put_hex64(u64 v)
{
    int i;
    putc('0');
    putc('x');
    for (i = 60; i >= 0; i -= 4)
        putc(hexdig[(u32)(v >> i) & 0xf]);
}

void put_dec(u32 v)
{
    char buf[12];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(buf[--n]);
}

void put_sdec(s32 v)
{
    if (v < 0) {
        putc('-');
        put_dec((u32)0 - (u32)v);
    } else {
        put_dec((u32)v);
    }
}

/* Divide *v by 10 in place and return the remainder, without libgcc's __udivdi3 on i386. */
static u32 divmod10_u64(u64 *v)
{
#ifdef __x86_64__
    u32 r = (u32)(*v % 10);
    *v /= 10;
    return r;
#else
    u32 hi = (u32)(*v >> 32), lo = (u32)*v;
    u32 qhi = hi / 10, rem = hi % 10;
    u32 qlo;
    /* (rem:lo) / 10 with rem < 10 cannot overflow a 32-bit quotient. */
    __asm__("divl %4" : "=a"(qlo), "=d"(rem) : "a"(lo), "d"(rem), "r"(10u));
    *v = ((u64)qhi << 32) | qlo;
    return rem;
#endif
}

void put_dec64(u64 v)
{
    char buf[21];
    int n = 0;
    do {
        buf[n++] = (char)('0' + divmod10_u64(&v));
    } while (v);
    while (n)
        putc(buf[--n]);
}

/* ---------------- multiboot information ---------------- */

const char *mb_cmdline(void)
{
    const u32 *info = (const u32 *)(unsigned long)mb_info;
    if (mb_magic != MULTIBOOT_BOOT_MAGIC || !info || !(info[0] & (1u << 2)) || !info[4])
        return "";
    return (const char *)(unsigned long)info[4];
}

int cmdline_has(const char *word)
{
    const char *s = mb_cmdline();
    while (*s) {
        const char *w = word;
        const char *p = s;
        while (*w && *p == *w) {
            p++;
            w++;
        }
        if (!*w && (*p == 0 || *p == ' '))
            return 1;
        while (*s && *s != ' ')     /* next word */
            s++;
        while (*s == ' ')
            s++;
    }
    return 0;
}

u32 cmdline_num(const char *key, u32 dflt)
{
    const char *s = mb_cmdline();
    while (*s) {
        const char *k = key;
        const char *p = s;
        while (*k && *p == *k) {
            p++;
            k++;
        }
        if (!*k && *p == '=' && p[1] >= '0' && p[1] <= '9') {
            u32 v = 0;
            for (p++; *p >= '0' && *p <= '9'; p++)
                v = v * 10 + (u32)(*p - '0');
            return v;
        }
        while (*s && *s != ' ')     /* next word */
            s++;
        while (*s == ' ')
            s++;
    }
    return dflt;
}

/* ---------------- exit ---------------- */

void guest_exit(u32 v)
{
    outl(DEBUG_EXIT_PORT, v);
    /* No isa-debug-exit device: stop here for good. */
    for (;;)
        __asm__ volatile("cli; hlt");
}

void exception_report(u32 vector, u32 error, u64 ip)
{
    puts("\nEXCEPTION vector=");
    put_dec(vector);
    puts(" error=");
    put_hex32(error);
    puts(" ip=");
    put_hex64(ip);
    putc('\n');
    guest_exit(EXIT_EXCEPTION);
}

/* ---------------- 8259 PIC ---------------- */

#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xa0
#define PIC2_DATA 0xa1

static u8 pic_mask_master = 0xff, pic_mask_slave = 0xff;

void pic_init(void)
{
    outb(PIC1_CMD, 0x11);               /* ICW1: edge triggered, cascade, ICW4 needed */
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, IRQ_BASE_MASTER);   /* ICW2: vector base */
    outb(PIC2_DATA, IRQ_BASE_SLAVE);
    outb(PIC1_DATA, 0x04);              /* ICW3: slave on IRQ2 */
    outb(PIC2_DATA, 0x02);              /* ICW3: slave identity 2 */
    outb(PIC1_DATA, 0x01);              /* ICW4: 8086 mode, normal EOI */
    outb(PIC2_DATA, 0x01);
    pic_mask_master = 0xfb;             /* everything masked except the cascade line IRQ2 */
    pic_mask_slave = 0xff;
    outb(PIC1_DATA, pic_mask_master);
    outb(PIC2_DATA, pic_mask_slave);
}

void pic_unmask(int irq)
{
    if (irq < 8) {
        pic_mask_master &= (u8)~(1u << irq);
        outb(PIC1_DATA, pic_mask_master);
    } else {
        pic_mask_slave &= (u8)~(1u << (irq - 8));
        outb(PIC2_DATA, pic_mask_slave);
    }
}

void pic_mask(int irq)
{
    if (irq < 8) {
        pic_mask_master |= (u8)(1u << irq);
        outb(PIC1_DATA, pic_mask_master);
    } else {
        pic_mask_slave |= (u8)(1u << (irq - 8));
        outb(PIC2_DATA, pic_mask_slave);
    }
}

void pic_eoi(int irq)
{
    if (irq >= 8)
        outb(PIC2_CMD, 0x20);
    outb(PIC1_CMD, 0x20);
}

/* ---------------- IRQ dispatch ---------------- */

static irq_handler_t irq_handlers[16];

void irq_register(int irq, irq_handler_t h)
{
    irq_handlers[irq] = h;
}

void irq_dispatch(u32 irq)
{
    irq &= 15;
    if (irq_handlers[irq])
        irq_handlers[irq]();
    pic_eoi((int)irq);
}

/* ---------------- 8254 PIT ---------------- */

void pit_init(u16 divisor)
{
    outb(0x43, 0x34);                   /* channel 0, lobyte/hibyte, mode 2, binary */
    outb(0x40, (u8)(divisor & 0xff));
    outb(0x40, (u8)(divisor >> 8));
}

/* ---------------- CMOS RTC ---------------- */

u8 cmos_read(u8 reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static int rtc_wait_not_updating(void)
{
    u32 tries;
    for (tries = 0; tries < 20000; tries++)
        if (!(cmos_read(0x0a) & 0x80))
            return 0;
    return -1;
}

static u32 bcd(u32 v)
{
    return (v & 0x0f) + (v >> 4) * 10;
}

int rtc_read(struct rtc_time *t)
{
    u8 r[7], prev[7];
    u8 regs[7] = { 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32 };  /* sec min hour day mon year century */
    u8 stb;
    int i, same, attempts = 0;

    if (rtc_wait_not_updating())
        return -1;
    for (i = 0; i < 7; i++)
        r[i] = cmos_read(regs[i]);
    /* Read again until two consecutive reads agree (an update may have happened in between). */
    do {
        for (i = 0; i < 7; i++)
            prev[i] = r[i];
        if (rtc_wait_not_updating())
            return -1;
        for (i = 0; i < 7; i++)
            r[i] = cmos_read(regs[i]);
        same = 1;
        for (i = 0; i < 7; i++)
            if (r[i] != prev[i])
                same = 0;
    } while (!same && ++attempts < 5);

    stb = cmos_read(0x0b);
    {
        u32 sec = r[0], min = r[1], hour = r[2] & 0x7f, day = r[3], mon = r[4], year = r[5], cen = r[6];
        int pm = (r[2] & 0x80) != 0;
        if (!(stb & 0x04)) {            /* BCD mode */
            sec = bcd(sec); min = bcd(min); hour = bcd(hour);
            day = bcd(day); mon = bcd(mon); year = bcd(year); cen = bcd(cen);
        }
        if (!(stb & 0x02)) {            /* 12-hour mode: 12 AM is 0, 12 PM is 12 */
            if (hour == 12)
                hour = 0;
            if (pm)
                hour += 12;
        }
        if (cen < 19 || cen > 99)       /* no usable century register */
            cen = 20;
        t->second = sec;
        t->minute = min;
        t->hour = hour;
        t->day = day;
        t->month = mon;
        t->year = cen * 100 + year;
    }
    return 0;
}

/* ---------------- the few mem* functions the compiler may call on its own ---------------- */

void *memset(void *d, int c, unsigned long n)
{
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}
