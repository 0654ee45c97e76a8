/*
 * Console reporting, power-off and small file helpers.
 *
 * Everything the init prints goes to fd 2, the console the kernel opened for PID 1. Each
 * message is formatted into one buffer and written with a single write(2) so that lines from
 * the init never interleave with the app's output mid-line.
 */
#define _GNU_SOURCE
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

bool debug_enabled;

/* Write all of `buf` to fd, retrying short writes; errors are ignored (nowhere to report). */
static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void vreport(const char *level, const char *fmt, va_list ap)
{
	char line[1024];
	int n = level ? snprintf(line, sizeof(line), "fuse-init: %s: ", level)
		      : snprintf(line, sizeof(line), "fuse-init: ");
	if (n < 0)
		return;
	int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	if (m < 0)
		return;
	size_t len = (size_t)n + (size_t)m;
	if (len > sizeof(line) - 2)
		len = sizeof(line) - 2; /* truncated: still end the line */
	line[len++] = '\n';
	write_all(STDERR_FILENO, line, len);
}

void die(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("error", fmt, ap);
	va_end(ap);
	power_off(code);
}

void error_line(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("error", fmt, ap);
	va_end(ap);
}

void warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("warning", fmt, ap);
	va_end(ap);
}

void info(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport(NULL, fmt, ap);
	va_end(ap);
}

void debug(const char *fmt, ...)
{
	if (!debug_enabled)
		return;
	/* CLOCK_BOOTTIME counts from kernel start: directly comparable with dmesg timestamps. */
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	char prefixed[256];
	snprintf(prefixed, sizeof(prefixed), "debug: [%ld.%03ld]", (long)ts.tv_sec,
		 ts.tv_nsec / 1000000);
	va_list ap;
	va_start(ap, fmt);
	vreport(prefixed, fmt, ap);
	va_end(ap);
}

/* In quiet runs (console loglevel 1, as fuse boots), the app's output must be the last thing
 * on the console, but the kernel prints "reboot: Power down" at emergency level, which loglevel
 * cannot hide: turn the console log off entirely. Verbose runs keep their messages. */
static void quiet_kernel(void)
{
	char *buf;
	size_t len;
	if (debug_enabled || read_file("/proc/sys/kernel/printk", 256, &buf, &len) < 0)
		return;
	int level = atoi(buf);
	free(buf);
	if (level <= 1)
		(void)write_file("/proc/sys/kernel/printk", "0", 1, 0644);
}

void power_off(int code)
{
	if (code < 0 || code > 255)
		code = EXIT_INIT_FAILURE;
	/* Flush the page cache first: the root is read-only but an app may have written to a
	 * writable disk the runner attached. */
	sync();
	/* The runner reads the status from its port (status.c), never from the console. */
	if (!status_report(code)) {
		char line[32];
		int n = snprintf(line, sizeof(line), "<<fuse:exit %d>>\n", code);
		write_all(STDOUT_FILENO, line, (size_t)n);
	}
	/* Wait for the serial line to drain so the host sees the app's last output before the
	 * VM disappears. */
	tcdrain(STDOUT_FILENO);
	quiet_kernel();
	reboot(RB_POWER_OFF);
	/* No power-off support (no ACPI, say): a reboot also ends the VM under -no-reboot. */
	reboot(RB_AUTOBOOT);
	/* PID 1 must never exit (the kernel would panic): wait to be switched off. */
	for (;;)
		pause();
}

int read_file(const char *path, size_t max, char **out, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	/* Grow as we go: sysfs files (fw_cfg) report sizes that are not always right. */
	size_t cap = 4096, used = 0;
	char *buf = xmalloc(cap + 1);
	for (;;) {
		if (used == cap) {
			if (cap >= max) {
				free(buf);
				close(fd);
				return -EFBIG;
			}
			cap *= 2;
			buf = xrealloc(buf, cap + 1);
		}
		ssize_t n = read(fd, buf + used, cap - used);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			int e = errno;
			free(buf);
			close(fd);
			return -e;
		}
		if (n == 0)
			break;
		used += (size_t)n;
	}
	close(fd);
	if (used > max) {
		free(buf);
		return -EFBIG;
	}
	buf[used] = '\0';
	*out = buf;
	*len = used;
	return 0;
}

int write_file(const char *path, const char *data, size_t len, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0)
		return -errno;
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			int e = errno;
			close(fd);
			return -e;
		}
		data += n;
		len -= (size_t)n;
	}
	if (close(fd) < 0)
		return -errno;
	return 0;
}

long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sleep_ms(long ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		die(EXIT_INIT_FAILURE, "out of memory: allocating %zu bytes", n);
	return p;
}

void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q)
		die(EXIT_INIT_FAILURE, "out of memory: allocating %zu bytes", n);
	return q;
}

char *xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char *p = xmalloc(n);
	memcpy(p, s, n);
	return p;
}
