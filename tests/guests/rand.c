/* rand.elf: executes RDTSC (3 times), RDTSCP, RDRAND and RDSEED (each only if CPUID says the CPU has
 * it) and prints every value. Output is nondeterministic by nature. Exits 0.
 * With `always` on the command line it executes them whatever CPUID says (a guest may: Linux's early
 * boot code uses RDRAND and RDSEED if the host has them, and on this host's KVM the guest can).
 * With `jit` on the command line it instead copies an `rdtsc; ret` into RAM at run time, calls it and
 * prints the value: code the VMM cannot trap when it loads the image, so a landmark recording of it
 * does not replay. */
#include "lib.h"

static int rdrand32(u32 *v)
{
    u8 ok;
    __asm__ volatile("rdrand %0; setc %1" : "=r"(*v), "=qm"(ok) : : "cc");
    return ok;
}

static int rdseed32(u32 *v)
{
    u8 ok;
    __asm__ volatile("rdseed %0; setc %1" : "=r"(*v), "=qm"(ok) : : "cc");
    return ok;
}

/* rdtsc; ret: filled in at run time. */
static u8 jit_code[4];

void main(void)
{
    u64 tsc[3];
    u32 a, b, c, d, max_leaf, max_ext, v;
    int i, tries, always = cmdline_has("always");

    serial_init();
    puts("rand: start\n");
    if (cmdline_has("jit")) {
        jit_code[0] = 0x0f;
        jit_code[1] = 0x31;
        jit_code[2] = 0xc3;
        puts("rand: jit rdtsc ");
        put_hex32(((u32 (*)(void))(unsigned long)jit_code)());
        putc('\n');
        guest_exit(0);
    }

    for (i = 0; i < 3; i++)
        tsc[i] = rdtsc();
    for (i = 0; i < 3; i++) {
        puts("rdtsc: ");
        put_hex64(tsc[i]);
        putc('\n');
    }
    if (tsc[0] < tsc[1] && tsc[1] < tsc[2]) {
        puts("rdtsc: increasing, deltas ");
        put_dec64(tsc[1] - tsc[0]);
        putc(' ');
        put_dec64(tsc[2] - tsc[1]);
        putc('\n');
    } else {
        puts("rdtsc: NOT increasing\n");
    }

    cpuid(0, 0, &max_leaf, &b, &c, &d);
    cpuid(0x80000000u, 0, &max_ext, &b, &c, &d);

    /* RDTSCP: CPUID.80000001H:EDX bit 27 */
    d = 0;
    if (max_ext >= 0x80000001u)
        cpuid(0x80000001u, 0, &a, &b, &c, &d);
    if ((d & (1u << 27)) || always) {
        u32 lo, hi, aux;
        __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(aux));
        puts("rdtscp: ");
        put_hex64(((u64)hi << 32) | lo);
        puts(" aux=");
        put_hex32(aux);
        putc('\n');
    } else {
        puts("rdtscp: absent\n");
    }

    /* RDRAND: CPUID.1:ECX bit 30 */
    cpuid(1, 0, &a, &b, &c, &d);
    if ((c & (1u << 30)) || always) {
        for (tries = 0; tries < 10 && !rdrand32(&v); tries++)
            ;
        if (tries < 10) {
            puts("rdrand: ");
            put_hex32(v);
            putc('\n');
        } else {
            puts("rdrand: failed\n");
        }
    } else {
        puts("rdrand: absent\n");
    }

    /* RDSEED: CPUID.(EAX=7,ECX=0):EBX bit 18 */
    b = 0;
    if (max_leaf >= 7)
        cpuid(7, 0, &a, &b, &c, &d);
    if ((b & (1u << 18)) || always) {
        for (tries = 0; tries < 10 && !rdseed32(&v); tries++)
            ;
        if (tries < 10) {
            puts("rdseed: ");
            put_hex32(v);
            putc('\n');
        } else {
            puts("rdseed: failed\n");
        }
    } else {
        puts("rdseed: absent\n");
    }

    puts("rand: done\n");
    guest_exit(0);
}
