/* Retrovisor test guests: Multiboot v1 entry for the 64-bit guest.
 *
 * Entered exactly like the 32-bit guests (32-bit protected mode, paging off, EAX = 0x2BADB002,
 * EBX = multiboot info). The 32-bit code here loads a GDT with a 64-bit code segment, builds
 * identity-mapped page tables (2 MiB pages covering the first 1 GiB), enables PAE, sets
 * EFER.LME, turns on paging, and far-jumps to 64-bit code that calls main().
 * Also holds the 64-bit exception/IRQ stubs (ending in iretq).
 *
 * Linked as elf64-x86-64 (long64.sym.elf, for gdb), then converted with
 * objcopy -O elf32-i386 (long64.elf) because Multiboot loaders refuse ELF64. */

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
    .quad 0x00CF9A000000FFFF           /* 0x08: 32-bit code, flat */
    .quad 0x00CF92000000FFFF           /* 0x10: data, flat */
    .quad 0x00AF9A000000FFFF           /* 0x18: 64-bit code (L=1) */
gdt_end:
    .align 4
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt                          /* lgdt in 32-bit mode reads 4 bytes of base; fine below 4 GiB */

    .section .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096

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
    /* Clear .bss (the page tables are in it). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx                      /* __bss_start and __bss_end are 4-byte aligned */
    xorl %eax, %eax
    rep stosl

    /* Page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB (present, writable, PS). */
    movl $pdpt, %eax
    orl $0x3, %eax
    movl %eax, pml4
    movl $pd, %eax
    orl $0x3, %eax
    movl %eax, pdpt
    movl $pd, %edi
    movl $0x83, %eax                   /* present | writable | 2 MiB page */
    movl $512, %ecx
2:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 2b

    movl %cr4, %eax
    orl $0x20, %eax                    /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx             /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                   /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax              /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp $0x18, $long_entry
    .size _start, . - _start

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movq $stack_top, %rsp
    xorl %ebp, %ebp
    call main
    xorl %edi, %edi
    call guest_exit
3:  cli
    hlt
    jmp 3b

/* ---------------- exception stubs (vectors 0-31) ---------------- */
/* Stack at exc_common: vector, error code, rip, cs, rflags, rsp, ss. */

#define EXC_NOERR(n) \
    .globl exc##n; exc##n: pushq $0; pushq $n; jmp exc_common
#define EXC_ERR(n) \
    .globl exc##n; exc##n: pushq $n; jmp exc_common

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
    movq 0(%rsp), %rdi                 /* vector */
    movq 8(%rsp), %rsi                 /* error code */
    movq 16(%rsp), %rdx                /* rip */
    andq $-16, %rsp
    call exception_report              /* does not return */
1:  cli
    hlt
    jmp 1b

/* ---------------- IRQ stubs (vectors 0x20-0x2f) ---------------- */
/* The CPU aligned RSP to 16 and pushed 5 qwords; the irq number, 9 saved registers and 8 bytes
 * of padding make 16 qwords in all, so irq_dispatch is called with RSP 16-byte aligned. */

#define IRQ(n) \
    .globl irq##n; irq##n: pushq $n; jmp irq_common

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
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    cld
    movq 72(%rsp), %rdi                /* the irq number pushed by the stub */
    subq $8, %rsp
    call irq_dispatch
    addq $8, %rsp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp                      /* drop the irq number */
    iretq

    .section .rodata
    .align 8
    .globl isr_stub_table
isr_stub_table:
    .quad exc0,  exc1,  exc2,  exc3,  exc4,  exc5,  exc6,  exc7
    .quad exc8,  exc9,  exc10, exc11, exc12, exc13, exc14, exc15
    .quad exc16, exc17, exc18, exc19, exc20, exc21, exc22, exc23
    .quad exc24, exc25, exc26, exc27, exc28, exc29, exc30, exc31
    .quad irq0,  irq1,  irq2,  irq3,  irq4,  irq5,  irq6,  irq7
    .quad irq8,  irq9,  irq10, irq11, irq12, irq13, irq14, irq15

    .section .note.GNU-stack, "", @progbits
