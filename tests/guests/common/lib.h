/* Retrovisor test guests: small freestanding support library.
 * Shared by the 32-bit (i386) guests and the 64-bit (x86-64) guest. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

typedef unsigned char      u8;
typedef unsigned short     u16;
typedef unsigned int       u32;
typedef unsigned long long u64;
typedef int                s32;

#define MULTIBOOT_BOOT_MAGIC 0x2BADB002u

/* Set by the entry code (boot32.S / boot64.S) before main(). */
extern u32 mb_magic;   /* EAX at entry */
extern u32 mb_info;    /* EBX at entry: multiboot info pointer */

/* ---- port I/O ---- */
static inline void outb(u16 port, u8 v)  { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8  inb(u16 port) { u8 v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* Enable interrupts and halt atomically (the interrupt shadow of sti covers the hlt). */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* ---- 16550 UART, COM1 ---- */
#define COM1      0x3f8
#define UART_RBR  (COM1 + 0)   /* receive buffer (read, DLAB=0) */
#define UART_THR  (COM1 + 0)   /* transmit holding (write, DLAB=0) */
#define UART_IER  (COM1 + 1)
#define UART_IIR  (COM1 + 2)   /* read */
#define UART_FCR  (COM1 + 2)   /* write */
#define UART_LCR  (COM1 + 3)
#define UART_MCR  (COM1 + 4)
#define UART_LSR  (COM1 + 5)
#define UART_LSR_DR   0x01     /* data ready */
#define UART_LSR_THRE 0x20     /* transmit holding register empty */

void serial_init(void);
void putc(char c);
void puts(const char *s);
void put_hex32(u32 v);         /* 0x%08x */
void put_hex64(u64 v);         /* 0x%016llx */
void put_dec(u32 v);
void put_dec64(u64 v);
void put_sdec(s32 v);

/* ---- multiboot information ---- */
/* The kernel command line the loader passed (flags bit 2), or "" if there is none. */
const char *mb_cmdline(void);
/* Whether `word` appears in the command line as a whole, space-separated word. */
int cmdline_has(const char *word);
/* The decimal number N of a word `key=N` in the command line, or `dflt` if there is none. */
u32 cmdline_num(const char *key, u32 dflt);

/* ---- exit through QEMU isa-debug-exit (port 0xf4): process status (v << 1) | 1 ---- */
#define DEBUG_EXIT_PORT 0xf4
void guest_exit(u32 v) __attribute__((noreturn));

/* ---- 8259 PIC pair: master at vector 0x20, slave at 0x28 ---- */
#define IRQ_BASE_MASTER 0x20
#define IRQ_BASE_SLAVE  0x28
void pic_init(void);           /* remap, all IRQs masked */
void pic_unmask(int irq);
void pic_mask(int irq);
void pic_eoi(int irq);

/* ---- IRQ dispatch (the assembly stubs call irq_dispatch, which sends the EOI) ---- */
typedef void (*irq_handler_t)(void);
void irq_register(int irq, irq_handler_t h);
void irq_dispatch(u32 irq);

/* ---- IDT: gates for exceptions 0-31 (print and exit 0x7e) and IRQs 0-15 (vectors 0x20-0x2f) ---- */
void idt_init(void);

/* ---- 8254 PIT ---- */
#define PIT_HZ 1193182u
void pit_init(u16 divisor);    /* channel 0, mode 2 (rate generator), lobyte/hibyte; 0 means 65536 */

/* ---- CMOS RTC ---- */
struct rtc_time {
    u32 year, month, day, hour, minute, second;
};
u8 cmos_read(u8 reg);
int rtc_read(struct rtc_time *t);   /* 0 on success, -1 if UIP never cleared */

/* Called by the exception stubs (never returns). */
void exception_report(u32 vector, u32 error, u64 ip) __attribute__((noreturn));

/* Exit code used when an unexpected CPU exception happens (status 0xfd). */
#define EXIT_EXCEPTION 0x7e

#endif
