/* minimal.c: the smallest guest retrovisor (and QEMU's -kernel) boots, to start your own from:
 * a Multiboot v1 header, a stack, a line on the serial port and an exit through isa-debug-exit.
 *
 *   gcc -m32 -ffreestanding -fno-pic -no-pie -nostdlib -O1 -fcf-protection=none \
 *       -Wl,-Ttext=0x100000,--build-id=none -o minimal.elf minimal.c
 *   retrovisor record --kernel minimal.elf -o minimal.rvt
 */

/* The loader looks for this header (magic, flags, checksum: the three sum to 0) in the first 8 KiB of the
 * file; flags 0 means "load the ELF as it is". It enters _start in 32-bit protected mode with paging and
 * interrupts off and no stack, so the first thing to do is set one up. */
__asm__(".align 4\n"
        ".long 0x1BADB002, 0, -0x1BADB002\n"
        ".globl _start\n"
        "_start: mov $stack + 4096, %esp\n"
        "        call kmain\n");

static unsigned char stack[4096] __attribute__((used, aligned(16)));

static void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static unsigned char inb(unsigned short port)
{
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* COM1, a 16550 UART at 0x3f8: wait until the line status register (base + 5) says the transmit holding
 * register is empty (bit 5), then write the byte to it (base + 0). No setup is needed under a VMM. */
static void putc(char c)
{
    while (!(inb(0x3f8 + 5) & 0x20))
        ;
    outb(0x3f8, c);
}

void kmain(void)
{
    for (const char *s = "hello from a minimal guest\n"; *s; s++)
        putc(*s);
    outb(0xf4, 0); /* QEMU's isa-debug-exit: writing v ends the VM with status (v << 1) | 1, here 1 */
    for (;;)
        __asm__ volatile("cli; hlt");
}
