/* Retrovisor test guests: 32-bit IDT. */
#include "lib.h"

struct idt_gate32 {
    u16 off_lo;
    u16 sel;
    u8  zero;
    u8  type_attr;
    u16 off_hi;
} __attribute__((packed));

struct idt_ptr32 {
    u16 limit;
    u32 base;
} __attribute__((packed));

extern const u32 isr_stub_table[48];
static struct idt_gate32 idt[256] __attribute__((aligned(8)));

void idt_init(void)
{
    struct idt_ptr32 p;
    int i;
    for (i = 0; i < 48; i++) {
        u32 h = isr_stub_table[i];
        idt[i].off_lo = (u16)(h & 0xffff);
        idt[i].sel = 0x08;
        idt[i].zero = 0;
        idt[i].type_attr = 0x8E;        /* present, ring 0, 32-bit interrupt gate (IF cleared) */
        idt[i].off_hi = (u16)(h >> 16);
    }
    p.limit = sizeof(idt) - 1;
    p.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(p));
}
