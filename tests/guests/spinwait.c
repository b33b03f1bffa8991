/* spinwait.elf: waits for timer ticks by spinning on a flag that only the IRQ0 handler sets.
 *
 * `while (!tick_seen);` runs with interrupts enabled and makes no exit at all, so only the timer interrupt
 * can end it: under the landmark clock a kick has to deliver it in the middle of the loop, where every
 * pass is in the same state, so replay may deliver it at any pass. After each tick it prints a line; after
 * TICKS ticks it prints a checksum and exits with value 0 (status 1). About 3,000 instructions plus the
 * spinning; the output is the same every run. */
#include "lib.h"

#define TICKS 12

static volatile u32 tick_seen;
static volatile u32 spins;

static void on_tick(void)
{
    tick_seen = 1;
}

void main(void)
{
    u32 i, check = 0;

    serial_init();
    puts("spinwait: start\n");
    idt_init();
    pic_init();
    irq_register(0, on_tick);
    pit_init(11932);            /* about 100 Hz */
    pic_unmask(0);
    sti();
    for (i = 0; i < TICKS; i++) {
        tick_seen = 0;
        while (!tick_seen)
            ;
        spins = spins * 2654435761u + i;
        check = check * 31u + (spins >> 7);
        puts("spinwait: tick ");
        put_dec(i);
        putc('\n');
    }
    cli();
    puts("spinwait: checksum ");
    put_hex32(check);
    puts("\nspinwait: done\n");
    guest_exit(0);
}
