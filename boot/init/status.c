/*
 * The exit status channel: a virtio-serial port named STATUS_PORT_NAME that the runner gives
 * every VM (`-device virtserialport,name=fuse.status`, backed by a file on the host). The init
 * opens it once, first thing, and unlinks its device node: a virtio port has one opener at a
 * time, so while PID 1 holds it nothing else can write to it, whatever its uid. The app's
 * console output therefore cannot fake an exit status, as a marker line on the console could.
 *
 * Without the port (the disk booted by a cloud or a plain QEMU) the status goes to the console
 * as `<<fuse:exit N>>`, for people reading it; fuse itself never reads that line.
 */
#define _GNU_SOURCE
#include "init.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PORTS_DIR "/sys/class/virtio-ports"
/* The port's name reaches the guest in a control message after the device is probed: give
 * it this long to show up when the device is there but the name is not yet. */
#define STATUS_WAIT_MS 2000

static int status_fd = -1;

/* The vportNpM whose name is STATUS_PORT_NAME; returns 1 when found, 0 when not (yet), -1
 * when the machine has no virtio ports at all. */
static int find_port(char *dev, size_t devlen)
{
	DIR *d = opendir(PORTS_DIR);
	if (!d)
		return -1;
	int found = 0, any = 0;
	struct dirent *e;
	while (!found && (e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		any = 1;
		char path[512], *name;
		size_t len;
		snprintf(path, sizeof(path), PORTS_DIR "/%s/name", e->d_name);
		if (read_file(path, 256, &name, &len) < 0)
			continue;
		while (len > 0 && (name[len - 1] == '\n' || name[len - 1] == '\0'))
			name[--len] = '\0';
		if (strcmp(name, STATUS_PORT_NAME) == 0) {
			snprintf(dev, devlen, "/dev/%s", e->d_name);
			found = 1;
		}
		free(name);
	}
	closedir(d);
	return found ? 1 : (any ? 0 : -1);
}

void status_open(void)
{
	char dev[300];
	long long deadline = now_ms() + STATUS_WAIT_MS;
	int r;
	/* No ports directory: no virtio-serial device, so no channel (not run by fuse). */
	while ((r = find_port(dev, sizeof(dev))) == 0 && now_ms() < deadline)
		sleep_ms(5);
	if (r <= 0) {
		if (r == 0)
			warn("virtio port %s not found: the exit status goes to the console only",
			     STATUS_PORT_NAME);
		return;
	}
	/* devtmpfs creates the node a moment after sysfs shows the port. */
	while ((status_fd = open(dev, O_WRONLY | O_CLOEXEC | O_NOCTTY)) < 0 && errno == ENOENT &&
	       now_ms() < deadline)
		sleep_ms(5);
	if (status_fd < 0) {
		warn("cannot open %s (%s): %s", dev, STATUS_PORT_NAME, strerror(errno));
		return;
	}
	/* Nobody needs the node again: the init holds the only opening there will be. */
	(void)unlink(dev);
	debug("exit status port %s opened", dev);
}

bool status_report(int code)
{
	if (status_fd < 0)
		return false;
	char line[32];
	int n = snprintf(line, sizeof(line), "exit %d\n", code);
	/* A blocking write to a virtio port returns once the host has taken the data. */
	const char *p = line;
	while (n > 0) {
		ssize_t w = write(status_fd, p, (size_t)n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return false;
		}
		p += w;
		n -= (int)w;
	}
	return true;
}
