/* long64.elf / long64.sym.elf: the 64-bit guest.
 *
 * boot64.S enters long mode (identity map, 2 MiB pages) and calls main() in 64-bit code. Prints
 * "long mode ok", installs a 64-bit IDT whose IRQ stubs end in iretq, runs the PIT at the same
 * rate as timer.elf and counts ticks in a bounded loop, prints the tick count and a checksum.
 * The numbers depend on timer timing. Exits 0. */
#include "lib.h"

#define TIMER_DIVISOR 6000
#define LOOP_ITERS    20000
#define NREC          8

static volatile u32 ticks;

static void timer_tick(void)
{
    ticks++;
}

void main(void)
{
    u32 rec[NREC];
    u32 nrec = 0, since = 0, last = 0, i, t;
    u64 acc = 1, check;
    u64 cr0, cr4, efer;
    u32 lo, hi;

    serial_init();
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xC0000080u));
    efer = ((u64)hi << 32) | lo;
    if ((efer & 0x400) && (cr0 & 0x80000000u) && (cr4 & 0x20))
        puts("long mode ok\n");
    else
        puts("long mode NOT active?\n");

    idt_init();
    pic_init();
    irq_register(0, timer_tick);
    pit_init(TIMER_DIVISOR);
    pic_unmask(0);
    sti();

    for (i = 0; i < LOOP_ITERS; i++) {
        acc = acc * 6364136223846793005ull + 1442695040888963407ull;
        since++;
        t = ticks;
        if (t != last) {
            if (nrec < NREC)
                rec[nrec++] = since;
            since = 0;
            last = t;
        }
    }

    cli();
    pic_mask(0);
    t = ticks;

    check = acc;
    puts("long64: first intervals:");
    for (i = 0; i < nrec; i++) {
        putc(' ');
        put_dec(rec[i]);
        check = check * 31 + rec[i];
    }
    check = check * 31 + t;
    puts("\nlong64: ticks=");
    put_dec(t);
    puts(" acc=");
    put_hex64(acc);
    puts(" checksum=");
    put_hex64(check);
    puts("\nlong64: done\n");
    guest_exit(0);
}
