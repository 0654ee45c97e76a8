/*
 * The app's console when fuse runs the VM: a pseudo-terminal whose output the init relays to
 * a virtio-serial port (`fuse.console`, which the runner puts on the same QEMU stdout as the
 * serial console).
 *
 * Why: under TCG the emulated 8250 costs an exit per byte (0.27 MB/s measured); a virtio
 * port takes up to 32 KiB per write. Why not a virtio console (hvc0) directly: QEMU drops a
 * virtconsole's output when its chardev would block (hw/char/virtio-console.c, "silently
 * dropping console data on EAGAIN"), where a plain port is throttled, so nothing is lost when
 * whoever reads fuse's output is slow. The pty keeps the app on a terminal, as on the serial
 * console: line-buffered stdio, `\r\n` line ends.
 *
 * Without the port (a cloud, a plain QEMU) the app gets /dev/console as before.
 */
#define _GNU_SOURCE
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

/* How long the init waits for the app's last output once it has exited, while something it
 * left behind still holds the terminal open (otherwise the end of its output is seen at once). */
#define QUIET_MS 100
/* How long the init keeps relaying output the runner does not take (it always does; this only
 * bounds the power-off should the host side stall). */
#define STALL_MS 5000

static int port_fd = -1;    /* the virtio port, non-blocking */
static int master_fd = -1;  /* the pty's master side, non-blocking; -1 once the app side closed */
static char slave_path[64]; /* the pty's app side */
static char buf[64 * 1024];
static size_t start, end; /* buf[start..end) read from the pty, not yet written to the port */

void console_open_port(void)
{
	const char *dev = status_console_port();
	if (!dev)
		return;
	long long deadline = now_ms() + 2000;
	/* devtmpfs creates the node a moment after sysfs shows the port. */
	while ((port_fd = open(dev, O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)) < 0 &&
	       errno == ENOENT && now_ms() < deadline)
		sleep_ms(5);
	if (port_fd < 0) {
		warn("cannot open %s (%s): %s; the app writes to the slower serial console", dev,
		     CONSOLE_PORT_NAME, strerror(errno));
		return;
	}
	/* As the status port: the init holds the only opening there will be. */
	(void)unlink(dev);
	debug("console port %s opened", dev);
}

int console_open_app_side(void)
{
	if (port_fd < 0)
		return -1;
	if (master_fd < 0) {
		master_fd = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
		int unlock = 0, n = -1;
		if (master_fd < 0 || ioctl(master_fd, TIOCSPTLCK, &unlock) < 0 ||
		    ioctl(master_fd, TIOCGPTN, &n) < 0) {
			warn("cannot make the app's terminal: %s; the app writes to the slower serial "
			     "console",
			     strerror(errno));
			if (master_fd >= 0)
				close(master_fd);
			master_fd = -1;
			close(port_fd);
			port_fd = -1;
			return -1;
		}
		snprintf(slave_path, sizeof(slave_path), "/dev/pts/%d", n);
	}
	/* Without O_CLOEXEC: the app inherits it; the init closes its copy after the fork. */
	int fd = open(slave_path, O_RDWR | O_NOCTTY);
	struct termios t;
	if (fd >= 0 && tcgetattr(fd, &t) == 0) {
		t.c_oflag &= ~(tcflag_t)OPOST;
		(void)tcsetattr(fd, TCSANOW, &t);
	}
	return fd;
}

int console_pollfds(struct pollfd *p)
{
	int n = 0;
	if (master_fd >= 0 && end < sizeof(buf))
		p[n++] = (struct pollfd){.fd = master_fd, .events = POLLIN};
	if (port_fd >= 0 && end > start)
		p[n++] = (struct pollfd){.fd = port_fd, .events = POLLOUT};
	return n;
}

/* Moves what can move without blocking: pty -> buffer -> port. Returns whether anything
 * reached the port. */
static bool relay(void)
{
	bool out = false;
	for (;;) {
		bool moved = false;
		if (master_fd >= 0 && end < sizeof(buf)) {
			ssize_t r = read(master_fd, buf + end, sizeof(buf) - end);
			if (r > 0) {
				end += (size_t)r;
				moved = true;
			} else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
				/* EIO: every opening of the app side is closed and its output read. */
				close(master_fd);
				master_fd = -1;
			}
		}
		if (end > start) {
			ssize_t w = write(port_fd, buf + start, end - start);
			if (w > 0) {
				start += (size_t)w;
				moved = out = true;
			} else if (w < 0 && errno != EAGAIN && errno != EINTR) {
				/* The host side is gone: nothing more can be shown. */
				start = end;
			}
			if (start == end)
				start = end = 0;
		}
		if (!moved)
			return out;
	}
}

void console_service(void)
{
	if (port_fd >= 0)
		(void)relay();
}

void console_drain(void)
{
	if (port_fd < 0)
		return;
	long long stall = now_ms() + STALL_MS;
	for (;;) {
		if (relay())
			stall = now_ms() + STALL_MS;
		/* Done: the app side is closed and everything it wrote is out. */
		if (master_fd < 0 && end == start)
			return;
		if (now_ms() >= stall)
			return;
		struct pollfd p[2];
		int n = console_pollfds(p);
		/* A process the app left still holds the terminal: wait only while output flows. */
		if (poll(p, (nfds_t)n, QUIET_MS) == 0 && end == start)
			return;
	}
}
