/* demo.elf: the bundled reverse-debugging demo (compiled -O0 -g).
 *
 * `history` (8 ints) is immediately followed in memory by `guard` (the linker script orders the
 * sections .data.demo_history, .data.demo_guard). Early in the run record_history() writes one
 * element too many and clobbers guard. Then comes unrelated work (string checksums, primes, a
 * few timer interrupts under a slow enough clock), and only at the very end is guard checked:
 * it prints "BUG: guard clobbered: 0x00000047" and exits with value 1 (status 3).
 *
 * In gdb: continue to the end, `watch guard`, `reverse-continue` -> stops on the BUG line. */
#include "lib.h"

#define GUARD_VALUE 0xC0FFEE

static int history[8] __attribute__((section(".data.demo_history")));
volatile unsigned int guard __attribute__((section(".data.demo_guard"))) = GUARD_VALUE;

static volatile unsigned int ticks;

static void on_tick(void)
{
    ticks++;
}

static int checksum(const char *s)
{
    int sum = 0;
    while (*s) {
        sum = sum * 31 + *s;
        s++;
    }
    return sum;
}

static void record_history(int seed)
{
    int i;
    for (i = 0; i <= 8; i++)
        history[i] = seed + i * i; /* BUG: off-by-one store */
}

static int is_prime(int n)
{
    int d;
    if (n < 2)
        return 0;
    if (n % 2 == 0)
        return n == 2;
    for (d = 3; d * d <= n; d += 2) {
        if (n % d == 0)
            return 0;
    }
    return 1;
}

static int sum_history(void)
{
    int i, total = 0;
    for (i = 0; i < 8; i++)
        total += history[i];
    return total;
}

void main(void)
{
    int n, count, last, c1, c2;

    serial_init();
    puts("demo: start\n");

    idt_init();
    pic_init();
    irq_register(0, on_tick);
    pit_init(65535);
    pic_unmask(0);
    sti();

    record_history(7);
    puts("demo: history recorded\n");

    c1 = checksum("retrovisor");
    c2 = checksum("time travel debugging");
    puts("demo: checksums ");
    put_hex32((u32)c1);
    putc(' ');
    put_hex32((u32)c2);
    putc('\n');

    count = 0;
    last = 0;
    puts("demo: primes:");
    for (n = 2; n < 1000; n++) {
        if (is_prime(n)) {
            count++;
            last = n;
            if (count <= 10) {
                putc(' ');
                put_dec((u32)n);
            }
        }
    }
    puts("\ndemo: ");
    put_dec((u32)count);
    puts(" primes below 1000, largest ");
    put_dec((u32)last);
    putc('\n');

    puts("demo: history sum ");
    put_dec((u32)sum_history());
    putc('\n');

    cli();
    pic_mask(0);

    if (guard != GUARD_VALUE) {
        puts("BUG: guard clobbered: ");
        put_hex32(guard);
        putc('\n');
        guest_exit(1);
    }
    puts("demo: guard intact\n");
    guest_exit(0);
}
