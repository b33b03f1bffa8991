/* hello.elf: deterministic hello world with a few computed values. Exits 0 (status 1). */
#include "lib.h"

static u32 fib(u32 n)
{
    u32 a = 0, b = 1, i;
    for (i = 0; i < n; i++) {
        u32 t = a + b;
        a = b;
        b = t;
    }
    return a;
}

static void reverse(char *s)
{
    int n = 0, i;
    while (s[n])
        n++;
    for (i = 0; i < n / 2; i++) {
        char t = s[i];
        s[i] = s[n - 1 - i];
        s[n - 1 - i] = t;
    }
}

void main(void)
{
    char word[] = "retrovisor";
    u32 sum = 0, sq = 0, i;

    serial_init();
    puts("hello from retrovisor guest\n");

    if (mb_magic == MULTIBOOT_BOOT_MAGIC) {
        puts("multiboot: ok\n");
    } else {
        puts("multiboot: bad magic ");
        put_hex32(mb_magic);
        putc('\n');
    }

    for (i = 1; i <= 100; i++) {
        sum += i;
        sq += i * i;
    }
    puts("sum(1..100) = ");
    put_dec(sum);
    puts("\nsumsq(1..100) = ");
    put_dec(sq);
    puts("\nfib(30) = ");
    put_dec(fib(30));
    puts("\n");

    reverse(word);
    puts("reversed: ");
    puts(word);
    puts("\nhex: ");
    put_hex32(0xC0FFEE);
    puts(" dec64: ");
    put_dec64(0x123456789ABCDEFull);
    puts("\nbye\n");
    guest_exit(0);
}
