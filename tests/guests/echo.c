/* echo.elf: interrupt-driven serial input.
 *
 * Enables the UART receive-data interrupt (IER bit 0; OUT2 set in MCR), unmasks IRQ4 on the PIC.
 * The IRQ4 handler drains every available byte (LSR bit 0) into a ring buffer. The main loop
 * waits with `sti; hlt` and echoes each line back as "got: <line>\n". A line ends at '\n' or
 * '\r' ("\r\n" counts as one line end). Stops after the line "quit" or after MAX_LINES lines,
 * prints the number of lines and of bytes consumed, exits 0.
 *
 * No byte is lost when input arrives faster than it is processed: if the ring buffer fills up,
 * the handler leaves the remaining bytes in the UART and turns the receive interrupt off; the
 * main loop turns it back on once it has drained half the buffer. */
#include "lib.h"

#define RBUF      1024            /* power of two */
#define MAX_LINES 8
#define MAX_LINE  120

static volatile u8  rbuf[RBUF];
static volatile u32 rhead;        /* written by the IRQ handler */
static volatile u32 rtail;        /* written by the main loop */
static volatile u32 rx_paused;
static volatile u32 rx_irqs;

static void uart_rx_irq(void)
{
    rx_irqs++;
    while (inb(UART_LSR) & UART_LSR_DR) {
        if (rhead - rtail >= RBUF) {
            /* Buffer full: stop taking interrupts, leave the rest in the UART. */
            outb(UART_IER, 0x00);
            rx_paused = 1;
            return;
        }
        rbuf[rhead & (RBUF - 1)] = inb(UART_RBR);
        rhead++;
    }
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

void main(void)
{
    char line[MAX_LINE + 1];
    u32 len = 0, lines = 0, consumed = 0;
    int prev_cr = 0, done = 0;
    u8 c;

    serial_init();
    idt_init();
    pic_init();
    irq_register(4, uart_rx_irq);
    pic_unmask(4);
    outb(UART_MCR, 0x0B);         /* DTR, RTS, OUT2 */
    outb(UART_IER, 0x01);         /* receive-data-available interrupt */
    puts("echo: ready\n");

    while (!done) {
        cli();
        if (rtail == rhead) {
            sti_hlt();            /* woken by the next interrupt */
            continue;
        }
        c = rbuf[rtail & (RBUF - 1)];
        rtail++;
        if (rx_paused && rhead - rtail <= RBUF / 2) {
            rx_paused = 0;
            outb(UART_IER, 0x01); /* the UART raises IRQ4 again if bytes are waiting */
        }
        sti();

        consumed++;
        if (c == '\n' && prev_cr) {
            prev_cr = 0;
            continue;             /* second half of "\r\n" */
        }
        prev_cr = (c == '\r');
        if (c == '\n' || c == '\r') {
            line[len] = 0;
            puts("got: ");
            puts(line);
            putc('\n');
            lines++;
            if (streq(line, "quit") || lines >= MAX_LINES)
                done = 1;
            len = 0;
        } else if (len < MAX_LINE) {
            line[len++] = (char)c;
        }
    }

    cli();
    outb(UART_IER, 0x00);
    pic_mask(4);
    puts("echo: ");
    put_dec(lines);
    puts(" lines, ");
    put_dec(consumed);
    puts(" bytes\n");
    guest_exit(0);
}
