/* insns64.elf: ring-0 instructions this host's KVM (PVM) cannot emulate, which retrovisor's VMM
 * completes itself (machine/src/emulate.rs), each with a result the guest prints:
 *   popcnt, cmpxchg16b (equal, then unequal), fnclex and fwait (with no x87 exception pending: PVM
 *   cannot emulate the x87 arithmetic that would raise one, nor fldcw), and last int3, whose #BP the
 *   exception handler reports (exit status 0x7e, as every exception in these guests).
 * The numbers are fixed; tests/landmark.rs checks them under run, record and replay. */
#include "lib.h"

static volatile u64 pair[2] __attribute__((aligned(16))) = { 1, 2 };

static void cmpxchg16b(u64 expect_lo, u64 expect_hi)
{
    u64 a = expect_lo, d = expect_hi, b = 0x33, c = 0x44;
    u8 zf;

    __asm__ volatile("lock cmpxchg16b %0; setz %1"
                     : "+m"(*(volatile __int128 *)pair), "=q"(zf), "+a"(a), "+d"(d)
                     : "b"(b), "c"(c)
                     : "cc", "memory");
    puts("cmpxchg16b: zf=");
    put_dec(zf);
    puts(" rdx:rax=");
    put_hex64(d);
    putc(':');
    put_hex64(a);
    puts(" memory=");
    put_hex64(pair[1]);
    putc(':');
    put_hex64(pair[0]);
    putc('\n');
}

void main(void)
{
    u64 v = 0xf0f0f0f0f00000ffull, n;

    serial_init();
    idt_init();
    __asm__ volatile("popcnt %1, %0" : "=r"(n) : "r"(v) : "cc");
    puts("popcnt: ");
    put_dec((u32)n);
    putc('\n');

    cmpxchg16b(1, 2);
    cmpxchg16b(1, 2);

    __asm__ volatile("fninit; fnclex; fwait" ::: "memory");
    puts("x87: fnclex and fwait passed\n");

    puts("int3 next\n");
    __asm__ volatile("int3");
    puts("not reached\n");
    guest_exit(1);
}
