/* Retrovisor test guests: 64-bit IDT (16-byte interrupt gates; the stubs end in iretq). */
#include "lib.h"

struct idt_gate64 {
    u16 off_lo;
    u16 sel;
    u8  ist;
    u8  type_attr;
    u16 off_mid;
    u32 off_hi;
    u32 reserved;
} __attribute__((packed));

struct idt_ptr64 {
    u16 limit;
    u64 base;
} __attribute__((packed));

extern const u64 isr_stub_table[48];
static struct idt_gate64 idt[256] __attribute__((aligned(16)));

void idt_init(void)
{
    struct idt_ptr64 p;
    int i;
    for (i = 0; i < 48; i++) {
        u64 h = isr_stub_table[i];
        idt[i].off_lo = (u16)(h & 0xffff);
        idt[i].sel = 0x18;              /* 64-bit code segment */
        idt[i].ist = 0;
        idt[i].type_attr = 0x8E;        /* present, ring 0, 64-bit interrupt gate */
        idt[i].off_mid = (u16)(h >> 16);
        idt[i].off_hi = (u32)(h >> 32);
        idt[i].reserved = 0;
    }
    p.limit = sizeof(idt) - 1;
    p.base = (u64)idt;
    __asm__ volatile("lidt %0" : : "m"(p));
}
