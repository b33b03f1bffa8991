/* smprace.elf: a real data race between two CPUs on a shared counter (needs a machine with 2 CPUs).
 *
 * The BSP (the CPU the loader enters) prints `smprace: start iters=N`, then starts the AP the way
 * hardware requires. It copies a 16-bit real-mode trampoline to physical 0x8000, software-enables
 * its local APIC (xAPIC MMIO at 0xFEE00000, spurious vector register bit 8) and sends INIT, then
 * STARTUP with vector 0x08 twice, to APIC ID 1. The AP starts in real mode at CS:IP = 0x0800:0000
 * (linear 0x8000). The trampoline sets DS = CS, loads its own flat GDT (code 0x08, data 0x10, the
 * same as boot32.S's) with `lgdtl`, sets CR0.PE and far-jumps (`ljmpl`, 0x66 prefix) to
 * `ap_entry32` inside this image at 1 MiB. That 32-bit code loads the data segments and the AP's
 * own 4 KiB stack and calls ap_main(). Everything stays in ring 0, 32-bit, no paging, interrupts
 * off: no IDT and no `iret` anywhere.
 *
 * Both CPUs then run race(): `iters` iterations (20,000 each unless the command line says
 * `iters=N`) of a plain load of `counter`, an out-of-line helper call (it widens the window), and a
 * plain store of the loaded value plus one, with no lock prefix. An increment by the other CPU that
 * lands inside the window is lost. Each CPU also stores its own iteration count.
 *
 * Only the BSP prints, so the serial output never interleaves. The AP records its APIC ID (from
 * 0xFEE00020, bits 31:24) and sets `ap_started` before its loop and `ap_done` after it; then it
 * stops in `cli; hlt`. The BSP waits for ap_started (a bounded spin: `smprace: AP did not start`,
 * exit 3, e.g. with -smp 1), runs its own loop, waits for ap_done, and prints the AP's APIC ID, both
 * iteration counts and `smprace: cpus=2 expected=2N counter=C lost=2N-C`. It exits 0 if no update
 * was lost and 1 if some were, so the exit status says whether the race fired.
 *
 * The loop is 15 instructions per iteration (3 of them in mix()): with the default 20,000 iterations
 * per CPU that is 300k instructions on each CPU. Add about 4,600 on the BSP for booting, printing and
 * starting the AP, about 70 on the AP outside its loop, and whatever the BSP spends waiting for the
 * AP (pause loops, whose length depends on scheduling). Under QEMU TCG (-accel tcg,thread=single) the
 * whole run took about 605k instructions from the guest entry. When the AP never starts, the BSP's
 * bounded wait costs about 200M instructions before it gives up. */
#include "lib.h"

#define ITERS        20000        /* per CPU, unless the command line says iters=N */
#define START_SPINS  50000000u    /* how long the BSP waits for the AP to start */

/* ---- local APIC (xAPIC, MMIO) ---- */
#define LAPIC_BASE   0xFEE00000u
#define LAPIC_ID     0x020        /* APIC ID in bits 31:24 */
#define LAPIC_SVR    0x0F0        /* spurious interrupt vector register: bit 8 = APIC software enable */
#define LAPIC_ICR_LO 0x300        /* writing it sends the IPI */
#define LAPIC_ICR_HI 0x310        /* destination APIC ID in bits 31:24 */
#define ICR_BUSY     (1u << 12)   /* delivery status: send pending */
#define ICR_INIT     0x00004500u  /* INIT, level assert, physical destination */
#define ICR_STARTUP  0x00004600u  /* STARTUP, level assert; the low byte is the vector (start page) */

#define AP_APIC_ID   1
#define TRAMP_ADDR   0x8000u      /* where the trampoline runs: page aligned, below 1 MiB */
#define SIPI_VECTOR  (TRAMP_ADDR >> 12)   /* 0x08: the AP starts at CS=0x0800, IP=0 */

static inline u32 lapic_read(u32 reg)
{
    return *(volatile u32 *)(LAPIC_BASE + reg);
}

static inline void lapic_write(u32 reg, u32 v)
{
    *(volatile u32 *)(LAPIC_BASE + reg) = v;
}

static inline void cpu_pause(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* ---- the AP trampoline and 32-bit entry ----
 *
 * ap_tramp_start..ap_tramp_end is copied to TRAMP_ADDR and runs there, in real mode with
 * CS = 0x0800 (base 0x8000) and IP = 0. It only uses offsets within the copy (through DS = CS) and
 * absolute addresses: the GDT descriptor holds the GDT's linear address in the copy, and the far
 * jump goes to ap_entry32 at its link address in this image. */
#define STR_(x) #x
#define STR(x)  STR_(x)
__asm__(
    "    .pushsection .text\n"
    "    .balign 16\n"
    "    .globl ap_tramp_start, ap_tramp_end\n"
    "    .code16\n"
    "ap_tramp_start:\n"
    "    cli\n"
    "    cld\n"
    "    movw %cs, %ax\n"                       /* 0x0800 */
    "    movw %ax, %ds\n"
    "    lgdtl ap_tramp_gdtr - ap_tramp_start\n" /* DS-relative offset into the copy */
    "    movl %cr0, %eax\n"
    "    orl $1, %eax\n"                        /* CR0.PE */
    "    movl %eax, %cr0\n"
    "    ljmpl $0x08, $ap_entry32\n"            /* 66 EA imm32 sel16: into 32-bit protected mode */
    "    .balign 8\n"
    "ap_tramp_gdt:\n"
    "    .quad 0x0000000000000000\n"            /* null */
    "    .quad 0x00CF9A000000FFFF\n"            /* 0x08: code, base 0, 4 GiB, 32-bit, ring 0 */
    "    .quad 0x00CF92000000FFFF\n"            /* 0x10: data, base 0, 4 GiB, ring 0 */
    "ap_tramp_gdtr:\n"
    "    .word ap_tramp_gdtr - ap_tramp_gdt - 1\n"
    "    .long " STR(TRAMP_ADDR) " + (ap_tramp_gdt - ap_tramp_start)\n"  /* linear address in the copy */
    "ap_tramp_end:\n"
    "    .code32\n"
    /* Runs from the image, in 32-bit protected mode with CS = 0x08. */
    "ap_entry32:\n"
    "    movw $0x10, %ax\n"
    "    movw %ax, %ds\n"
    "    movw %ax, %es\n"
    "    movw %ax, %fs\n"
    "    movw %ax, %gs\n"
    "    movw %ax, %ss\n"
    "    movl $ap_stack_top, %esp\n"
    "    xorl %ebp, %ebp\n"
    "    call ap_main\n"
    "1:  cli\n"
    "    hlt\n"
    "    jmp 1b\n"
    "    .popsection\n"
    /* The AP's stack: 4 KiB in the NOLOAD .stack section (next to boot32.S's), so the BSP does not
     * spend instructions clearing it with .bss. */
    "    .pushsection .stack, \"aw\", @nobits\n"
    "    .balign 16\n"
    "ap_stack_bottom:\n"
    "    .skip 4096\n"
    "ap_stack_top:\n"
    "    .popsection\n");

extern const u8 ap_tramp_start[], ap_tramp_end[];
void ap_main(void) __attribute__((noreturn, used));

/* ---- shared state ---- */
static u32 iters;                      /* written by the BSP before it starts the AP */
static volatile u32 counter;           /* the raced-on counter */
static volatile u32 ap_started, ap_done;
static volatile u32 ap_apic_id = 0xffffffffu;
static volatile u32 bsp_count, ap_count;   /* each CPU's own iteration count */
static volatile u32 bsp_acc, ap_acc;       /* keep the helper's results alive */

/* Out of line, so that the window between the load and the store holds a call and a `ret`.
 * regparm(2): v in EAX, i in EDX, which keeps the loop short. */
static __attribute__((noinline, regparm(2))) u32 mix(u32 v, u32 i)
{
    return (v ^ i) * 2654435761u;
}

/* The racy loop, run by both CPUs (the same code at the same addresses). */
static __attribute__((noinline)) u32 race(u32 n, volatile u32 *mine)
{
    u32 i, v, acc = 0;
    for (i = 0; i < n; i++) {
        v = counter;           /* plain load */
        acc += mix(v, i);      /* the window */
        counter = v + 1;       /* plain store: the other CPU's increments since the load are lost */
        *mine = i + 1;
    }
    return acc;
}

void ap_main(void)
{
    ap_apic_id = lapic_read(LAPIC_ID) >> 24;
    ap_started = 1;
    ap_acc = race(iters, &ap_count);
    ap_done = 1;
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* A tiny stand-in for the INIT/SIPI delays (no timer calibration). */
static void short_delay(void)
{
    u32 i;
    for (i = 0; i < 100; i++)
        cpu_pause();
}

static void send_ipi(u32 dest, u32 icr_lo)
{
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
        cpu_pause();
}

static void start_ap(void)
{
    const u8 *s = ap_tramp_start;
    u8 *d = (u8 *)TRAMP_ADDR;
    u32 n = (u32)(ap_tramp_end - ap_tramp_start);

    while (n--)
        *d++ = *s++;
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100);   /* software-enable the local APIC */
    send_ipi(AP_APIC_ID, ICR_INIT);
    short_delay();
    send_ipi(AP_APIC_ID, ICR_STARTUP | SIPI_VECTOR);
    short_delay();
    send_ipi(AP_APIC_ID, ICR_STARTUP | SIPI_VECTOR);
}

void main(void)
{
    u32 spins, expected, total;

    /* Read the command line before the trampoline is copied to low memory. */
    iters = cmdline_num("iters", ITERS);
    serial_init();
    puts("smprace: start iters=");
    put_dec(iters);
    putc('\n');

    start_ap();
    for (spins = 0; !ap_started; spins++) {
        if (spins >= START_SPINS) {
            puts("smprace: AP did not start\n");
            guest_exit(3);
        }
        cpu_pause();
    }

    bsp_acc = race(iters, &bsp_count);
    while (!ap_done)
        cpu_pause();

    puts("smprace: ap apic id=");
    put_dec(ap_apic_id);
    puts("\nsmprace: iterations bsp=");
    put_dec(bsp_count);
    puts(" ap=");
    put_dec(ap_count);
    expected = 2 * iters;
    total = counter;
    puts("\nsmprace: cpus=2 expected=");
    put_dec(expected);
    puts(" counter=");
    put_dec(total);
    puts(" lost=");
    put_dec(expected - total);
    putc('\n');
    guest_exit(total == expected ? 0 : 1);
}
