/* rtc.elf: reads the CMOS RTC (waits for UIP clear, reads twice until stable, honours the BCD/binary
 * and 12/24-hour bits of status register B, uses the century register 0x32) and prints
 * "rtc: YYYY-MM-DD HH:MM:SS". Exits 0, or 1 (status 3) if UIP never cleared. */
#include "lib.h"

static void put2(u32 v)
{
    putc((char)('0' + (v / 10) % 10));
    putc((char)('0' + v % 10));
}

void main(void)
{
    struct rtc_time t;

    serial_init();
    if (rtc_read(&t)) {
        puts("rtc: update-in-progress never cleared\n");
        guest_exit(1);
    }
    puts("rtc: ");
    put_dec(t.year);
    putc('-');
    put2(t.month);
    putc('-');
    put2(t.day);
    putc(' ');
    put2(t.hour);
    putc(':');
    put2(t.minute);
    putc(':');
    put2(t.second);
    putc('\n');
    guest_exit(0);
}
