/* tickrace.elf: a 1 kHz timer interrupt races the main loop's read-modify-write of a shared counter.
 *
 * PIT channel 0, mode 2, divisor 1193 (about 1 kHz). The IRQ0 handler adds one to `shared` and
 * returns with a plain 32-bit `iret` (which this host's KVM cannot emulate: the VMM completes it).
 * The main loop reads `shared`, calls an out-of-line helper inside the read-modify-write window,
 * and stores the value plus one back: a tick that lands inside the window is lost. The loop is
 * bounded (30,000 iterations unless the command line says `iters=N`; about 12 instructions each). It prints how many ticks came, how many
 * of their increments were lost, and a checksum of where they landed. Exits 0.
 *
 * Recorded with the landmark clock, most ticks fall due while the guest computes without exits, so
 * they are delivered at kicks; many of those land on the helper's `ret`, right after the previous
 * tick's `iret` returned there: the case that made recordings under load fail to replay. */
#include "lib.h"

#define TIMER_DIVISOR 1193
#define ITERS         30000   /* unless the command line says iters=N */
static u32 iters;

static volatile u32 shared;
static volatile u32 ticks;
static u32 landing;

/* Out of line, so that the window holds a call and a `ret` the kicks land on. */
static __attribute__((noinline)) u32 mix(u32 v, u32 i)
{
    return (v ^ i) * 2654435761u;
}

static void timer_tick(void)
{
    shared++;
    ticks++;
    landing = landing * 31u + shared;
}

void main(void)
{
    u32 i, v, acc = 0;

    iters = cmdline_num("iters", ITERS);
    serial_init();
    puts("tickrace: start divisor=");
    put_dec(TIMER_DIVISOR);
    puts(" iterations=");
    put_dec(iters);
    putc('\n');

    idt_init();
    pic_init();
    irq_register(0, timer_tick);
    pit_init(TIMER_DIVISOR);
    pic_unmask(0);
    sti();

    for (i = 0; i < iters; i++) {
        v = shared;          /* read */
        acc += mix(v, i);    /* the window: a call and a ret */
        shared = v + 1;      /* write: a tick in between is lost */
    }

    cli();
    pic_mask(0);
    puts("tickrace: ticks=");
    put_dec(ticks);
    puts(" lost=");
    put_dec(iters + ticks - shared);
    puts(" landing=");
    put_hex32(landing);
    puts(" acc=");
    put_hex32(acc);
    puts("\ntickrace: done\n");
    guest_exit(0);
}
