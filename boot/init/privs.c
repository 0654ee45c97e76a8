/*
 * Privileges: the app runs as its own unprivileged user with no capabilities, and the kernel
 * settings that make that livable (low ports) and that hide what an unprivileged user should
 * not see (kernel log, kernel pointers).
 */
#define _GNU_SOURCE
#include "init.h"

#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static const struct {
	const char *path, *value;
} sysctls[] = {
	/* Binding port 80 needs no capability, as in Docker (its default since 20.10). */
	{"/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"},
	/* The kernel log (/dev/kmsg, syslog(2)) and kernel addresses are for CAP_SYSLOG only. */
	{"/proc/sys/kernel/dmesg_restrict", "1"},
	{"/proc/sys/kernel/kptr_restrict", "2"},
};

void harden_kernel(void)
{
	for (size_t i = 0; i < sizeof(sysctls) / sizeof(sysctls[0]); i++) {
		int r = write_file(sysctls[i].path, sysctls[i].value, strlen(sysctls[i].value), 0644);
		if (r < 0)
			die(EXIT_INIT_FAILURE, "cannot set %s to %s: %s", sysctls[i].path + 10,
			    sysctls[i].value, strerror(-r));
	}
	debug("kernel settings for an unprivileged app applied");
}

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt,
							 ...)
{
	int e = errno;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n < errlen)
		snprintf(err + n, errlen - (size_t)n, ": %s", strerror(e));
	return -1;
}

/* The highest capability number this kernel knows. */
static int last_cap(void)
{
	char *buf;
	size_t len;
	int last = CAP_LAST_CAP;
	if (read_file("/proc/sys/kernel/cap_last_cap", 32, &buf, &len) == 0) {
		last = atoi(buf);
		free(buf);
	}
	return last;
}

int drop_privileges(uid_t uid, gid_t gid, const uint64_t *caps, char *err, size_t errlen)
{
	if (uid == 0 && caps) {
		/* Root with a chosen few: the bounding set is what an exec as uid 0 gets (its
		 * inheritable set is emptied below), so only those survive the exec. */
		int last = last_cap();
		for (int cap = 0; cap <= last; cap++)
			if (cap >= 64 || !(*caps & (1ULL << cap)))
				if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
					return fail(err, errlen,
						    "cannot drop capability %d from the bounding set", cap);
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
			return fail(err, errlen, "cannot clear the ambient capabilities");
	}
	if (uid != 0) {
		/* The bounding set first: dropping from it takes CAP_SETPCAP, which setuid
		 * below takes away. Then nothing the app execs can regain a capability. */
		int last = last_cap();
		for (int cap = 0; cap <= last; cap++)
			if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
				return fail(err, errlen, "cannot drop capability %d from the bounding set",
					    cap);
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
			return fail(err, errlen, "cannot clear the ambient capabilities");
	}
	/* Groups, gid, then uid: after setuid nothing else could be changed. */
	if (setgroups(0, NULL) < 0)
		return fail(err, errlen, "cannot clear the supplementary groups");
	if (setgid(gid) < 0)
		return fail(err, errlen, "cannot set gid %u", (unsigned)gid);
	if (setuid(uid) < 0)
		return fail(err, errlen, "cannot set uid %u", (unsigned)uid);
	if (uid != 0) {
		/* setuid away from 0 empties the permitted and effective sets, not the
		 * inheritable one: clear all three explicitly. */
		struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
		struct __user_cap_data_struct data[2];
		memset(data, 0, sizeof(data));
		if (syscall(SYS_capset, &hdr, data) < 0)
			return fail(err, errlen, "cannot clear the capability sets");
		if (setuid(0) == 0) {
			errno = EPERM;
			return fail(err, errlen, "uid 0 could be regained after dropping it");
		}
	} else if (caps) {
		/* The same few in the permitted and effective sets now, none inheritable. */
		struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
		struct __user_cap_data_struct data[2];
		memset(data, 0, sizeof(data));
		data[0].permitted = data[0].effective = (uint32_t)*caps;
		data[1].permitted = data[1].effective = (uint32_t)(*caps >> 32);
		if (syscall(SYS_capset, &hdr, data) < 0)
			return fail(err, errlen, "cannot limit the capability sets");
	}
	/* No setuid binary or file capability can raise what the app has. */
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return fail(err, errlen, "cannot set no_new_privs");
	return 0;
}
