/*
 * Kernel modules listed by the initramfs. fuse's own kernels have every driver built in and no
 * module support; a distribution kernel (the boot benchmark's Debian baseline, or a user's own
 * kernel) needs its virtio and filesystem modules loaded before the root disk can be found.
 */
#define _GNU_SOURCE
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

void load_modules(void)
{
	char *list;
	size_t len;
	if (read_file(MODULE_LIST_PATH, 64 * 1024, &list, &len) < 0)
		return; /* no list: nothing to load */
	char *save = NULL;
	for (char *path = strtok_r(list, "\n", &save); path; path = strtok_r(NULL, "\n", &save)) {
		if (*path == '\0')
			continue;
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die(EXIT_INIT_FAILURE, "cannot open kernel module %s listed in %s: %s", path,
			    MODULE_LIST_PATH, strerror(errno));
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			die(EXIT_INIT_FAILURE, "cannot load kernel module %s: %s", path, strerror(errno));
		close(fd);
		debug("loaded module %s", path);
	}
	free(list);
}
