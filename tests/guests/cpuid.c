/* cpuid.elf: prints what CPUID says about the CPU: the vendor and brand strings, the signature and
 * the feature words of leaves 1, 7 and 0x80000001, and the address sizes. Under retrovisor's portable
 * CPU model (the default) the output is the same on every host; with --cpu host it is the host's.
 * Exits 0. */
#include "lib.h"

static void regs(const char *name, u32 leaf, u32 sub)
{
    u32 a, b, c, d;
    cpuid(leaf, sub, &a, &b, &c, &d);
    puts(name);
    puts(": ");
    put_hex32(a);
    putc(' ');
    put_hex32(b);
    putc(' ');
    put_hex32(c);
    putc(' ');
    put_hex32(d);
    putc('\n');
}

static void text(const char *name, const u32 *leaves, int n)
{
    u32 w[4];
    int i, j;
    puts(name);
    puts(": ");
    for (i = 0; i < n; i++) {
        cpuid(leaves[i], 0, &w[0], &w[1], &w[2], &w[3]);
        for (j = 0; j < 4; j++) {
            u32 v = w[j];
            int k;
            for (k = 0; k < 4; k++, v >>= 8)
                if ((v & 0xff) >= 0x20 && (v & 0xff) < 0x7f)
                    putc((char)(v & 0xff));
        }
    }
    putc('\n');
}

void main(void)
{
    static const u32 brand[] = {0x80000002u, 0x80000003u, 0x80000004u};
    u32 a, b, c, d;
    char vendor[13];

    serial_init();
    cpuid(0, 0, &a, &b, &c, &d);
    *(u32 *)&vendor[0] = b;
    *(u32 *)&vendor[4] = d;
    *(u32 *)&vendor[8] = c;
    vendor[12] = 0;
    puts("vendor: ");
    puts(vendor);
    putc('\n');
    text("brand", brand, 3);
    regs("leaf 1", 1, 0);
    regs("leaf 7", 7, 0);
    regs("leaf 0x80000001", 0x80000001u, 0);
    regs("leaf 0x80000008", 0x80000008u, 0);
    guest_exit(0);
}
