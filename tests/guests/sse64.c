/* sse64.elf / sse64.sym.elf: a 64-bit guest whose SSE state is in use across the whole run.
 *
 * It enables SSE (CR4.OSFXSR and OSXMMEXCPT, CR0.MP on and EM off) and loads a different pattern
 * into each of XMM0-XMM7 with `movdqu` (moves are all this host's KVM emulates of SSE in ring 0:
 * arithmetic, `ldmxcsr` and `stmxcsr` fail to emulate). Then it
 * runs the PIT and a bounded integer loop while those registers stay live, so every checkpoint and
 * interrupt of a recording holds SSE state that is not its initial one. At the end it stores the
 * registers back, checks them and prints the tick count. Exits 0. */
#include "lib.h"

#define TIMER_DIVISOR 6000
#define LOOP_ITERS    20000

static volatile u32 ticks;
static u64 patterns[16] __attribute__((aligned(16)));
static u64 back[16] __attribute__((aligned(16)));

static void timer_tick(void)
{
    ticks++;
}

void main(void)
{
    u64 cr0, cr4, acc = 1;
    u32 i;

    serial_init();
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0" : : "r"((cr0 & ~4ull) | 2));      /* EM off, MP on */
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | 0x200 | 0x400));   /* OSFXSR, OSXMMEXCPT */
    for (i = 0; i < 16; i++)
        patterns[i] = 0x0123456789abcdefull * (i + 1) ^ 0x5a5a5a5a00000000ull;
    __asm__ volatile("movdqu 0x00(%0), %%xmm0\n\tmovdqu 0x10(%0), %%xmm1\n\t"
                     "movdqu 0x20(%0), %%xmm2\n\tmovdqu 0x30(%0), %%xmm3\n\t"
                     "movdqu 0x40(%0), %%xmm4\n\tmovdqu 0x50(%0), %%xmm5\n\t"
                     "movdqu 0x60(%0), %%xmm6\n\tmovdqu 0x70(%0), %%xmm7"
                     : : "r"(patterns) : "memory");
    puts("sse64: xmm0-7 loaded\n");

    idt_init();
    pic_init();
    irq_register(0, timer_tick);
    pit_init(TIMER_DIVISOR);
    pic_unmask(0);
    sti();
    for (i = 0; i < LOOP_ITERS; i++)
        acc = acc * 6364136223846793005ull + 1442695040888963407ull;
    cli();
    pic_mask(0);

    __asm__ volatile("movdqu %%xmm0, 0x00(%0)\n\tmovdqu %%xmm1, 0x10(%0)\n\t"
                     "movdqu %%xmm2, 0x20(%0)\n\tmovdqu %%xmm3, 0x30(%0)\n\t"
                     "movdqu %%xmm4, 0x40(%0)\n\tmovdqu %%xmm5, 0x50(%0)\n\t"
                     "movdqu %%xmm6, 0x60(%0)\n\tmovdqu %%xmm7, 0x70(%0)"
                     : : "r"(back) : "memory");
    for (i = 0; i < 16; i++)
        if (back[i] != patterns[i]) {
            puts("sse64: xmm register changed: ");
            put_dec(i / 2);
            putc('\n');
            guest_exit(1);
        }
    puts("sse64: xmm0-7 intact, acc=");
    put_hex64(acc);
    puts(" ticks=");
    put_dec(ticks);
    puts("\nsse64: done\n");
    guest_exit(0);
}
