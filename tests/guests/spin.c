/* spin.elf: prints "spinning" and then loops forever, printing a '.' every 20,000 iterations
 * (and a newline every 64 dots). Never exits: used for Ctrl-C / kill tests. */
#include "lib.h"

void main(void)
{
    volatile u32 n = 0;
    u32 dots = 0;

    serial_init();
    puts("spinning\n");
    for (;;) {
        n = n + 1;
        if (n == 20000) {
            n = 0;
            putc('.');
            if (++dots % 64 == 0)
                putc('\n');
        }
    }
}
