/* timer.elf: output depends on when timer interrupts arrive.
 *
 * PIT channel 0, mode 2, divisor TIMER_DIVISOR (1193182 / 6000 = ~199 Hz, one tick every ~5 ms).
 * Under Retrovisor's single-step clock (~87k instructions per second of host time) that is an
 * IRQ0 every ~400-450 guest instructions. A bounded loop of LOOP_ITERS iterations counts how many
 * iterations ran between consecutive ticks; the first NREC counts, the total number of ticks and
 * a checksum are printed. Two free runs under host time print different numbers. Exits 0. */
#include "lib.h"

#define TIMER_DIVISOR 6000
#define LOOP_ITERS    20000
#define NREC          20

static volatile u32 ticks;

static void timer_tick(void)
{
    ticks++;
}

void main(void)
{
    u32 rec[NREC];
    u32 nrec = 0, since = 0, last = 0, i, t;
    u32 acc = 1, check;

    serial_init();
    puts("timer: start divisor=");
    put_dec(TIMER_DIVISOR);
    puts(" iterations=");
    put_dec(LOOP_ITERS);
    putc('\n');

    idt_init();
    pic_init();
    irq_register(0, timer_tick);
    pit_init(TIMER_DIVISOR);
    pic_unmask(0);
    sti();

    for (i = 0; i < LOOP_ITERS; i++) {
        acc = acc * 1103515245u + 12345u;
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
    for (i = 0; i < nrec; i++) {
        puts("tick ");
        put_dec(i);
        puts(": ");
        put_dec(rec[i]);
        puts(" iterations\n");
        check = check * 31u + rec[i];
    }
    check = check * 31u + t;
    puts("timer: ticks=");
    put_dec(t);
    puts(" acc=");
    put_hex32(acc);
    puts(" checksum=");
    put_hex32(check);
    puts("\ntimer: done\n");
    guest_exit(0);
}
