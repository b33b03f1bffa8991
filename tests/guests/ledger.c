/* ledger.elf: the long guest, for long-recording tests and the benchmarks.
 *
 * A small key-value ledger driven by commands over the serial port. Input is interrupt-driven (IRQ4
 * into a ring buffer, as in echo.c) and stays enabled while the ledger computes, so receive
 * interrupts land in the middle of long computations; the PIT ticks at about 100 Hz (IRQ0) all the
 * time. One command per line:
 *
 *   put K V    table[K] = V, and count the update in `updates`
 *   get K      print table[K]
 *   hash N     N rounds of mixing the table into a 1 KiB work buffer (about 3,300 instructions a
 *              round), then print the buffer's digest
 *   sum        print the sum of the table
 *   ticks      print how many timer ticks the guest has seen (varies from run to run)
 *   check      call check_guard(): if `guard` is not GUARD_VALUE, print "BUG: guard clobbered: V"
 *              and exit with value 1 (status 3)
 *   quit       print "ledger: N commands, U updates" and exit with value 0 (status 1)
 *
 * The planted bug: table_put() checks `key > TABLE_SIZE` instead of `>=`, so `put 64 V` writes
 * table[64], which is `guard` (the linker script places .ledger.guard right after
 * .ledger.table). An input that does that early and `check`s late has its bug written long
 * before anything notices it: the case reverse debugging is for (`watch guard`, reverse-continue).
 *
 * tests/guests/ledger-short.txt runs a few hundred thousand instructions (tests);
 * bench/ledger-long.txt about 90 million (benchmarks). */
#include "lib.h"

#define TABLE_SIZE  64
#define GUARD_VALUE 0x600DF00Du
#define RBUF        1024            /* power of two */
#define MAX_LINE    120
#define WORK_WORDS  256

static u32 table[TABLE_SIZE] __attribute__((section(".ledger.table"), aligned(4096)));
volatile u32 guard __attribute__((section(".ledger.guard"), aligned(4))) = GUARD_VALUE;
/* The rest of their page: nothing else may share it (see hash_rounds). */
static u8 ledger_pad[4096 - 4 * (TABLE_SIZE + 1)] __attribute__((section(".ledger.pad"), used));

/* Every put counts here: a word written once per update over the whole run. */
volatile u32 updates;
static u32 work[WORK_WORDS];

static volatile u8  rbuf[RBUF];
static volatile u32 rhead;          /* written by the IRQ4 handler */
static volatile u32 rtail;          /* written by the main loop */
static volatile u32 rx_paused;
static volatile u32 ticks;

static void on_tick(void)
{
    ticks++;
}

static void uart_rx_irq(void)
{
    while (inb(UART_LSR) & UART_LSR_DR) {
        if (rhead - rtail >= RBUF) {
            /* Full: stop taking interrupts and leave the rest in the UART (see echo.c). */
            outb(UART_IER, 0x00);
            rx_paused = 1;
            return;
        }
        rbuf[rhead & (RBUF - 1)] = inb(UART_RBR);
        rhead++;
    }
}

/* The next input byte, waiting with `sti; hlt` while there is none. */
static u8 getc(void)
{
    u8 c;
    for (;;) {
        cli();
        if (rtail != rhead)
            break;
        sti_hlt();
    }
    c = rbuf[rtail & (RBUF - 1)];
    rtail++;
    if (rx_paused && rhead - rtail <= RBUF / 2) {
        rx_paused = 0;
        outb(UART_IER, 0x01);
    }
    sti();
    return c;
}

/* Reads one line (without its terminator) into `line`. */
static void read_line(char *line)
{
    u32 len = 0;
    for (;;) {
        u8 c = getc();
        if (c == '\r')
            continue;
        if (c == '\n')
            break;
        if (len < MAX_LINE)
            line[len++] = (char)c;
    }
    line[len] = 0;
}

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix) {
        if (*s++ != *prefix++)
            return 0;
    }
    return 1;
}

/* Parses a decimal number at *s, skipping leading spaces; advances *s. */
static u32 parse_num(const char **s)
{
    u32 v = 0;
    while (**s == ' ')
        (*s)++;
    while (**s >= '0' && **s <= '9') {
        v = v * 10 + (u32)(**s - '0');
        (*s)++;
    }
    return v;
}

void table_put(u32 key, u32 value)
{
    if (key > TABLE_SIZE) {         /* BUG: should be >=; key 64 writes guard */
        puts("put: key out of range\n");
        return;
    }
    table[key] = value;
    updates = updates + 1;
}

static u32 rotl(u32 v, int n)
{
    return (v << n) | (v >> (32 - n));
}

/* N rounds: mix the table into the work buffer. The table itself only changes by `put`: the linker
 * script gives it and `guard` a page of their own, so a watchpoint on `guard` can skip every stretch of
 * the recording that made no `put` (see the README on reverse-continue). */
static u32 hash_rounds(u32 rounds)
{
    u32 r, i, h = 0x811C9DC5u;
    for (r = 0; r < rounds; r++) {
        for (i = 0; i < WORK_WORDS; i++) {
            h = (h ^ work[i] ^ table[i & (TABLE_SIZE - 1)]) * 0x01000193u;
            work[i] = rotl(h, (int)(i & 15) + 1) + r;
        }
    }
    return h;
}

void check_guard(void)
{
    if (guard != GUARD_VALUE) {
        puts("BUG: guard clobbered: ");
        put_hex32(guard);
        putc('\n');
        guest_exit(1);
    }
    puts("check: guard intact\n");
}

void main(void)
{
    char line[MAX_LINE + 1];
    u32 commands = 0;
    u32 i, sum;

    serial_init();
    idt_init();
    pic_init();
    irq_register(0, on_tick);
    irq_register(4, uart_rx_irq);
    pit_init(11932);                /* about 100 Hz */
    outb(UART_MCR, 0x0B);           /* DTR, RTS, OUT2 */
    outb(UART_IER, 0x01);           /* receive-data-available interrupt */
    pic_unmask(0);
    pic_unmask(4);
    puts("ledger: ready\n");

    for (;;) {
        const char *p = line;
        read_line(line);
        commands++;
        if (starts_with(line, "put ")) {
            u32 k, v;
            p += 4;
            k = parse_num(&p);
            v = parse_num(&p);
            table_put(k, v);
        } else if (starts_with(line, "get ")) {
            p += 4;
            i = parse_num(&p);
            puts("get ");
            put_dec(i);
            puts(" = ");
            put_dec(i < TABLE_SIZE ? table[i] : 0);
            putc('\n');
        } else if (starts_with(line, "hash ")) {
            p += 5;
            i = parse_num(&p);
            puts("hash ");
            put_dec(i);
            puts(": ");
            put_hex32(hash_rounds(i));
            putc('\n');
        } else if (starts_with(line, "sum")) {
            sum = 0;
            for (i = 0; i < TABLE_SIZE; i++)
                sum += table[i];
            puts("sum = ");
            put_hex32(sum);
            putc('\n');
        } else if (starts_with(line, "ticks")) {
            puts("ticks = ");
            put_dec(ticks);
            putc('\n');
        } else if (starts_with(line, "check")) {
            check_guard();
        } else if (starts_with(line, "quit")) {
            break;
        } else {
            puts("unknown command: ");
            puts(line);
            putc('\n');
        }
    }
    cli();
    puts("ledger: ");
    put_dec(commands);
    puts(" commands, ");
    put_dec(updates);
    puts(" updates\n");
    guest_exit(0);
}
