/*
 * /init of the test initramfs: a static program that shows the guest reached user space, then runs
 * commands read from the console until `poweroff N`.
 *
 * It prints a line, mounts /proc and devtmpfs on /dev (where a virtio disk is /dev/vda), and reads one
 * command per line from the console:
 *   echo WORDS...     prints WORDS
 *   cat FILE          prints a file (say /proc/version)
 *   head FILE N       prints the first N bytes of a file (say /dev/vda), non-printing ones as '.'
 *   write FILE TEXT   writes TEXT at the start of FILE and syncs it (a disk write reaches the device)
 *   poweroff N        ends the machine through QEMU's isa-debug-exit (port 0xf4): status (N << 1) | 1
 * Anything else gets "init: unknown command". At the end of input it powers off with status 0.
 *
 * It runs as root in ring 3, so it asks the kernel for access to port 0xf4 (ioperm) before writing it.
 * Built with `gcc -static` by build.sh.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#define DEBUG_EXIT_PORT 0xf4

static void say(const char *s)
{
	/* Unbuffered: every line reaches the console before the next command is read. */
	if (write(1, s, strlen(s)) < 0)
		return;
}

static void power_off(int code)
{
	say("init: powering off\n");
	/* The console sends from its buffer at interrupts: let it finish before the machine goes. */
	tcdrain(1);
	if (ioperm(DEBUG_EXIT_PORT, 1, 1) != 0) {
		say("init: ioperm(0xf4) failed; cannot power off\n");
		for (;;)
			pause();
	}
	outb((unsigned char)code, DEBUG_EXIT_PORT);
	/* Not on a machine with isa-debug-exit: nothing else to do. */
	for (;;)
		pause();
}

static void head(const char *args)
{
	char path[128], buf[512];
	int n = 0, fd;
	ssize_t got;

	if (sscanf(args, "%127s %d", path, &n) != 2 || n <= 0 || n > (int)sizeof buf) {
		say("init: usage: head FILE N (N from 1 to 512)\n");
		return;
	}
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		say("init: cannot open ");
		say(path);
		say("\n");
		return;
	}
	got = read(fd, buf, (size_t)n);
	close(fd);
	for (ssize_t i = 0; i < got; i++)
		if (buf[i] < 32 || buf[i] > 126)
			buf[i] = '.';
	if (got > 0 && write(1, buf, (size_t)got) < 0)
		return;
	say("\n");
}

static void write_file(const char *args)
{
	char path[128];
	const char *text;
	int fd;

	if (sscanf(args, "%127s", path) != 1 || !(text = strchr(args, ' '))) {
		say("init: usage: write FILE TEXT\n");
		return;
	}
	text++;
	fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) {
		say("init: cannot write ");
		say(path);
		say("\n");
	}
	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
}

static void cat(const char *path)
{
	char buf[512];
	ssize_t n;
	int fd = open(path, O_RDONLY);

	if (fd < 0) {
		say("init: cannot open ");
		say(path);
		say("\n");
		return;
	}
	while ((n = read(fd, buf, sizeof buf)) > 0)
		if (write(1, buf, (size_t)n) < 0)
			break;
	close(fd);
}

/* Reads one line from the console into buf (without the newline); -1 at the end of input. */
static int read_line(char *buf, size_t size)
{
	size_t len = 0;
	char c;

	for (;;) {
		ssize_t n = read(0, &c, 1);

		if (n <= 0)
			return len ? (int)len : -1;
		if (c == '\n' || c == '\r') {
			if (len == 0)
				continue;
			buf[len] = 0;
			return (int)len;
		}
		if (len + 1 < size)
			buf[len++] = c;
	}
}

int main(void)
{
	char line[256];

	say("init: hello from user space\n");
	mkdir("/proc", 0555);
	if (mount("proc", "/proc", "proc", 0, NULL) != 0)
		say("init: cannot mount /proc\n");
	else
		say("init: /proc mounted\n");
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0)
		say("init: cannot mount /dev\n");
	while (read_line(line, sizeof line) >= 0) {
		if (strncmp(line, "echo ", 5) == 0) {
			say(line + 5);
			say("\n");
		} else if (strncmp(line, "cat ", 4) == 0) {
			cat(line + 4);
		} else if (strncmp(line, "head ", 5) == 0) {
			head(line + 5);
		} else if (strncmp(line, "write ", 6) == 0) {
			write_file(line + 6);
		} else if (strncmp(line, "poweroff", 8) == 0) {
			int code = 0;

			sscanf(line + 8, "%d", &code);
			power_off(code);
		} else {
			say("init: unknown command: ");
			say(line);
			say("\n");
		}
	}
	power_off(0);
	return 0;
}
