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
/* The console port's device (see console.c), when the machine has one. */
static char console_dev[300];

/* What the ports directory shows now. */
struct ports {
	char status[300];  /* the status port's /dev node, or "" */
	char console[300]; /* the console port's, or "" */
	int count;	   /* ports present */
	int unnamed;	   /* ports whose name has not arrived yet */
};

/* Scans the virtio ports; returns -1 when the machine has no virtio ports at all. */
static int scan_ports(struct ports *p)
{
	memset(p, 0, sizeof(*p));
	DIR *d = opendir(PORTS_DIR);
	if (!d)
		return -1;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		p->count++;
		char path[512], *name;
		size_t len;
		snprintf(path, sizeof(path), PORTS_DIR "/%s/name", e->d_name);
		if (read_file(path, 256, &name, &len) < 0) {
			p->unnamed++;
			continue;
		}
		while (len > 0 && (name[len - 1] == '\n' || name[len - 1] == '\0'))
			name[--len] = '\0';
		/* The kernel prints a port without a name yet as "(null)". */
		if (len == 0 || strcmp(name, "(null)") == 0)
			p->unnamed++;
		else if (strcmp(name, STATUS_PORT_NAME) == 0)
			snprintf(p->status, sizeof(p->status), "/dev/%s", e->d_name);
		else if (strcmp(name, CONSOLE_PORT_NAME) == 0)
			snprintf(p->console, sizeof(p->console), "/dev/%s", e->d_name);
		free(name);
	}
	closedir(d);
	return p->count ? 0 : -1;
}

void status_open(void)
{
	struct ports ports;
	long long deadline = now_ms() + STATUS_WAIT_MS;
	int r;
	/* No ports: no virtio-serial device, so no channel (not run by fuse). Otherwise wait for
	 * the status port and for every port's name: the console port's arrives in the same
	 * burst of control messages, and missing it would only make the app's output slow. */
	while ((r = scan_ports(&ports)) == 0 && (!ports.status[0] || ports.unnamed > 0) &&
	       now_ms() < deadline)
		sleep_ms(5);
	if (r < 0)
		return;
	snprintf(console_dev, sizeof(console_dev), "%s", ports.console);
	if (!ports.status[0]) {
		warn("virtio port %s not found: the exit status goes to the console only",
		     STATUS_PORT_NAME);
		return;
	}
	const char *dev = ports.status;
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

const char *status_console_port(void)
{
	return console_dev[0] ? console_dev : NULL;
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
