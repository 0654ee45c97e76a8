/*
 * The `fuse.*` parameters of the kernel command line.
 *
 * The kernel passes unknown `key=value` words to init as environment variables, but only
 * while they contain no dot; `fuse.*` words are deliberately not passed, so read them from
 * /proc/cmdline. Quoting is not supported: fuse never puts spaces in these values.
 */
#define _GNU_SOURCE
#include "init.h"

#include <string.h>
#include <stdlib.h>

void read_boot_params(struct boot_params *p)
{
	p->root = xstrdup("/dev/vda");
	p->rootfstype = xstrdup("squashfs");
	p->app = NULL;
	p->debug = false;

	char *buf;
	size_t len;
	if (read_file("/proc/cmdline", 64 * 1024, &buf, &len) < 0)
		return; /* defaults are right for the usual runner */
	char *save = NULL;
	for (char *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(w, "fuse.root=", 10) == 0) {
			free(p->root);
			p->root = xstrdup(w + 10);
		} else if (strncmp(w, "fuse.app=", 9) == 0) {
			free(p->app);
			p->app = xstrdup(w + 9);
		} else if (strncmp(w, "fuse.rootfstype=", 16) == 0) {
			free(p->rootfstype);
			p->rootfstype = xstrdup(w + 16);
		} else if (strcmp(w, "fuse.debug") == 0 || strcmp(w, "fuse.debug=1") == 0) {
			p->debug = true;
		}
	}
	free(buf);
}
