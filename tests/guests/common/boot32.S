/* Retrovisor test guests: Multiboot v1 entry for the 32-bit (i386) guests.
 *
 * Loaded as an ELF32 image at 1 MiB by a Multiboot loader (QEMU -kernel, GRUB, our VMM):
 * entry in 32-bit protected mode, paging off, interrupts off, EAX = 0x2BADB002,
 * EBX = multiboot info. Nothing else is assumed: we load our own GDT and stack,
 * clear .bss, and call main(). Also holds the exception and IRQ entry stubs. */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000002           /* bit 1: request memory info. No a.out kludge (bit 16). */

    .section .multiboot, "a"
    .align 4
    .globl multiboot_header
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .data
    .align 4
    .globl mb_magic, mb_info
mb_magic: .long 0
mb_info:  .long 0

    .align 8
gdt:
    .quad 0x0000000000000000           /* null */
    .quad 0x00CF9A000000FFFF           /* 0x08: code, base 0, 4 GiB, 32-bit, ring 0 */
    .quad 0x00CF92000000FFFF           /* 0x10: data, base 0, 4 GiB, ring 0 */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .section .bss

    /* The stack lives in its own NOLOAD section after .bss: it is not cleared at boot
     * (clearing 16 KiB would cost thousands of single-steps under a stepping VMM). */
    .section .stack, "aw", @nobits
    .align 16
stack_bottom:
    .skip 16384
stack_top:

    .section .text
    .code32
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    movl %eax, mb_magic
    movl %ebx, mb_info
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl $stack_top, %esp
    /* Clear .bss. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx                      /* __bss_start and __bss_end are 4-byte aligned */
    xorl %eax, %eax
    rep stosl
    xorl %ebp, %ebp
    call main
    /* main returned: exit with status 1 (value 0). */
    pushl $0
    call guest_exit
2:  cli
    hlt
    jmp 2b
    .size _start, . - _start

/* ---------------- exception stubs (vectors 0-31) ---------------- */
/* Stack on entry to exc_common: vector, error code, eip, cs, eflags. */

#define EXC_NOERR(n) \
    .globl exc##n; exc##n: pushl $0; pushl $n; jmp exc_common
#define EXC_ERR(n) \
    .globl exc##n; exc##n: pushl $n; jmp exc_common

EXC_NOERR(0)
EXC_NOERR(1)
EXC_NOERR(2)
EXC_NOERR(3)
EXC_NOERR(4)
EXC_NOERR(5)
EXC_NOERR(6)
EXC_NOERR(7)
EXC_ERR(8)
EXC_NOERR(9)
EXC_ERR(10)
EXC_ERR(11)
EXC_ERR(12)
EXC_ERR(13)
EXC_ERR(14)
EXC_NOERR(15)
EXC_NOERR(16)
EXC_ERR(17)
EXC_NOERR(18)
EXC_NOERR(19)
EXC_NOERR(20)
EXC_ERR(21)
EXC_NOERR(22)
EXC_NOERR(23)
EXC_NOERR(24)
EXC_NOERR(25)
EXC_NOERR(26)
EXC_NOERR(27)
EXC_NOERR(28)
EXC_ERR(29)
EXC_ERR(30)
EXC_NOERR(31)

exc_common:
    cld
    movl 0(%esp), %eax                 /* vector */
    movl 4(%esp), %edx                 /* error code */
    movl 8(%esp), %ecx                 /* eip */
    pushl $0                           /* ip, high half */
    pushl %ecx                         /* ip, low half */
    pushl %edx
    pushl %eax
    call exception_report              /* does not return */
1:  cli
    hlt
    jmp 1b

/* ---------------- IRQ stubs (vectors 0x20-0x2f) ---------------- */
/* Save the registers, call irq_dispatch(irq) (which runs the handler and sends the EOI),
 * restore, and return with a plain 32-bit iret. */

#define IRQ(n) \
    .globl irq##n; irq##n: pushl $n; jmp irq_common

IRQ(0)
IRQ(1)
IRQ(2)
IRQ(3)
IRQ(4)
IRQ(5)
IRQ(6)
IRQ(7)
IRQ(8)
IRQ(9)
IRQ(10)
IRQ(11)
IRQ(12)
IRQ(13)
IRQ(14)
IRQ(15)

irq_common:
    pushal
    cld
    pushl 32(%esp)                     /* the irq number pushed by the stub */
    call irq_dispatch
    addl $4, %esp
    popal
    addl $4, %esp                      /* drop the irq number */
    iret

/* Table of the 48 stub addresses, used by idt_init(). */
    .section .rodata
    .align 4
    .globl isr_stub_table
isr_stub_table:
    .long exc0,  exc1,  exc2,  exc3,  exc4,  exc5,  exc6,  exc7
    .long exc8,  exc9,  exc10, exc11, exc12, exc13, exc14, exc15
    .long exc16, exc17, exc18, exc19, exc20, exc21, exc22, exc23
    .long exc24, exc25, exc26, exc27, exc28, exc29, exc30, exc31
    .long irq0,  irq1,  irq2,  irq3,  irq4,  irq5,  irq6,  irq7
    .long irq8,  irq9,  irq10, irq11, irq12, irq13, irq14, irq15

    .section .note.GNU-stack, "", @progbits
