/*
 * The power button of machines without ACPI.
 *
 * On x86 the kernel's tiny ACPI power button driver sends SIGTERM to the init. QEMU's arm64
 * `virt` machine booted without firmware has no ACPI: its power button (QMP system_powerdown)
 * is a GPIO line the kernel's gpio-keys driver reports as KEY_POWER on an evdev device. The
 * init watches that device and treats a press exactly like SIGTERM. Under UEFI with ACPI
 * (Graviton, `virt,acpi=on`) the tiny ACPI power button driver signals the init as on x86, and
 * there is no such device.
 */
#define _GNU_SOURCE
#include "init.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/input.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define LONG_BITS (8 * sizeof(unsigned long))

int power_key_open(void)
{
	/* No /dev/input on kernels without evdev (x86: the ACPI driver signals directly). */
	DIR *dir = opendir("/dev/input");
	if (!dir)
		return -1;
	int found = -1;
	struct dirent *e;
	while (found < 0 && (e = readdir(dir)) != NULL) {
		if (strncmp(e->d_name, "event", 5) != 0)
			continue;
		int fd = openat(dirfd(dir), e->d_name, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			continue;
		unsigned long keys[KEY_MAX / LONG_BITS + 1];
		memset(keys, 0, sizeof(keys));
		if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof(keys)), keys) >= 0 &&
		    ((keys[KEY_POWER / LONG_BITS] >> (KEY_POWER % LONG_BITS)) & 1)) {
			debug("power button: /dev/input/%s", e->d_name);
			found = fd;
		} else {
			close(fd);
		}
	}
	closedir(dir);
	return found;
}

bool power_key_pressed(int fd)
{
	bool pressed = false;
	struct input_event ev[16];
	ssize_t n;
	/* Drain everything queued (press, release, sync): the fd is non-blocking. */
	while ((n = read(fd, ev, sizeof(ev))) > 0) {
		for (size_t i = 0; i < (size_t)n / sizeof(ev[0]); i++)
			if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1)
				pressed = true;
	}
	return pressed;
}
