/* fault.elf: triple faults on purpose. Prints "about to triple fault", loads an empty IDT
 * (limit 0) and executes ud2: #UD cannot be delivered -> #GP -> #DF -> triple fault (shutdown).
 * Under QEMU with -no-reboot the emulator exits (status 0); no isa-debug-exit write happens.
 *
 * ud2 rather than int3: on our kvm_pvm host the in-kernel emulator cannot emulate a software
 * interrupt (int3/int n) in 32-bit protected mode and QEMU -accel kvm ends in
 * KVM_EXIT_INTERNAL_ERROR instead of a shutdown; with ud2 KVM itself raises #UD and reports a
 * triple fault as KVM_EXIT_SHUTDOWN, the same as TCG. */
#include "lib.h"

struct idt_ptr32 {
    u16 limit;
    u32 base;
} __attribute__((packed));

void main(void)
{
    struct idt_ptr32 empty = { 0, 0 };

    serial_init();
    puts("about to triple fault\n");
    cli();
    __asm__ volatile("lidt %0" : : "m"(empty));
    __asm__ volatile("ud2");
    /* Not reached. */
    puts("still alive?!\n");
    guest_exit(0x7d);
}
