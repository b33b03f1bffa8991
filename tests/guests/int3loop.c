/* int3loop.elf: a loop of int3 instructions, each returning through its own #BP handler, with some
 * work between them, while a ~1 kHz timer interrupts. Every int3 is a landmark (the VMM completes it: PVM cannot emulate it), so
 * timer interrupts fall due at int3s all the time. The recorder must not queue one beside the #BP it
 * injects there: KVM delivers the two at entries that depend on host exits, so the recording would
 * not replay (Linux's int3 self-test met this). Prints the counts, which depend on timing; exits 0. */
#include "lib.h"

#define ROUNDS 300
#define WORK  500

static volatile u64 breakpoints;
static volatile u32 ticks;
static volatile u32 work;

/* The #BP handler: count and return (an interrupt gate, so IF is clear inside). */
void bp_stub(void);
__asm__(".text\n"
        ".globl bp_stub\n"
        "bp_stub:\n"
        "    incq breakpoints(%rip)\n"
        "    iretq\n");

/* The int3, with the address after it (where the #BP returns) named for the test. */
static void __attribute__((noinline)) breakpoint(void)
{
    __asm__ volatile("int3\n"
                     ".globl after_int3\n"
                     ".type after_int3, @function\n"
                     "after_int3:\n" ::: "memory");
}

static void timer_tick(void)
{
    ticks++;
}

/* Points IDT entry 3 at bp_stub, keeping the selector and type idt_init gave it. */
static void install_bp_handler(void)
{
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } idtr;
    u64 h = (u64)bp_stub;
    u8 *gate;

    __asm__ volatile("sidt %0" : "=m"(idtr));
    gate = (u8 *)idtr.base + 3 * 16;
    *(u16 *)(gate + 0) = (u16)h;
    *(u16 *)(gate + 6) = (u16)(h >> 16);
    *(u32 *)(gate + 8) = (u32)(h >> 32);
}

void main(void)
{
    u32 i, j;

    serial_init();
    idt_init();
    install_bp_handler();
    pic_init();
    irq_register(0, timer_tick);
    pit_init(1193);
    pic_unmask(0);
    sti();
    for (i = 0; i < ROUNDS; i++) {
        for (j = 0; j < WORK; j++)
            work++;
        if (i % 4 == 0)
            breakpoint();
    }
    cli();
    puts("int3loop: breakpoints=");
    put_dec((u32)breakpoints);
    puts(" ticks=");
    put_dec(ticks);
    putc('\n');
    guest_exit(0);
}
