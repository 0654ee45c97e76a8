/*
 * Mounts: the early pseudo-filesystems in the initramfs, the switch to the read-only root and
 * the run-time mounts of that root.
 *
 * The switch keeps PID 1 running (no exec): the init binary exists only in the initramfs, and
 * the new root holds nothing but the app. This is what busybox's switch_root does, minus the
 * exec: move the new root over /, chroot into it.
 */
#define _GNU_SOURCE
#include "init.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

/* How long to wait for the root device to appear: virtio probing is normally done before
 * init starts, but the kernel may probe asynchronously. */
#define ROOT_WAIT_MS 5000

static void must_mount(const char *src, const char *target, const char *fstype,
		       unsigned long flags, const char *data)
{
	if (mount(src, target, fstype, flags, data) == 0)
		return;
	int e = errno;
	if (e == ENOENT)
		die(EXIT_INIT_FAILURE, "cannot mount %s on %s: there is no %s directory", fstype,
		    target, target);
	if (e == ENODEV)
		die(EXIT_INIT_FAILURE, "cannot mount %s on %s: the kernel has no %s support", fstype,
		    target, fstype);
	die(EXIT_INIT_FAILURE, "cannot mount %s on %s: %s", fstype, target, strerror(e));
}

void mount_early(void)
{
	/* noexec: /dev is writable (devtmpfs), so nothing copied there may run. EBUSY: the
	 * kernel already mounted it (CONFIG_DEVTMPFS_MOUNT on some configs); then only this
	 * mount's flags are changed. */
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755") < 0) {
		if (errno != EBUSY ||
		    mount(NULL, "/dev", NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC, NULL) < 0)
			die(EXIT_INIT_FAILURE, "cannot mount devtmpfs on /dev: %s", strerror(errno));
	}
	/* The kernel opens /dev/console as fds 0-2 of init only if the initramfs has that node;
	 * make sure the init can always report. */
	if (fcntl(STDERR_FILENO, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR | O_NOCTTY);
		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
			if (fd > 2)
				close(fd);
		}
	}
	must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	/* sysfs: to find a root given by PARTUUID. */
	must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

/* Read exactly `len` bytes at `off`; false on error or short read. */
static bool pread_all(int fd, void *buf, size_t len, off_t off)
{
	ssize_t n = pread(fd, buf, len, off);
	return n == (ssize_t)len;
}

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
	return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* A GPT GUID as the kernel and blkid print it (first three fields little endian). */
static void format_guid(const uint8_t *g, char *out, size_t outlen)
{
	snprintf(out, outlen,
		 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", g[3], g[2],
		 g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14],
		 g[15]);
}

/* The number (1-based) of the partition with this unique GUID in the GPT of a whole disk,
 * or 0. The kernel does not export PARTUUID in uevent files, so read the table: it is what
 * the kernel itself does for root=PARTUUID=. */
static unsigned gpt_find(const char *disk, const char *uuid)
{
	char path[512];
	snprintf(path, sizeof(path), "/sys/class/block/%s/queue/logical_block_size", disk);
	char *buf;
	size_t len;
	long sector = 512;
	if (read_file(path, 64, &buf, &len) == 0) {
		sector = atol(buf);
		free(buf);
	}
	if (sector < 512 || sector > 65536)
		return 0;
	snprintf(path, sizeof(path), "/dev/%s", disk);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	unsigned found = 0;
	uint8_t hdr[92];
	if (pread_all(fd, hdr, sizeof(hdr), sector) && memcmp(hdr, "EFI PART", 8) == 0) {
		uint64_t entries_lba = le64(hdr + 72);
		uint32_t count = le32(hdr + 80), size = le32(hdr + 84);
		if (count > 1024)
			count = 1024; /* larger tables are not what fuse writes */
		uint8_t entry[128];
		for (uint32_t i = 0; size >= 128 && size <= 4096 && i < count; i++) {
			off_t off = (off_t)(entries_lba * (uint64_t)sector + (uint64_t)i * size);
			if (!pread_all(fd, entry, sizeof(entry), off))
				break;
			char guid[40];
			format_guid(entry + 16, guid, sizeof(guid));
			if (strcasecmp(guid, uuid) == 0) {
				found = i + 1;
				break;
			}
		}
	}
	close(fd);
	return found;
}

/* The /dev path of the partition with this PARTUUID, if the kernel knows it yet. */
static bool find_partuuid(const char *uuid, char *dev, size_t devlen)
{
	DIR *d = opendir("/sys/class/block");
	if (!d)
		return false;
	bool found = false;
	struct dirent *e;
	while (!found && (e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		/* Whole disks only: partitions have a `partition` attribute. */
		char path[512];
		snprintf(path, sizeof(path), "/sys/class/block/%s/partition", e->d_name);
		if (access(path, F_OK) == 0)
			continue;
		unsigned n = gpt_find(e->d_name, uuid);
		if (n == 0)
			continue;
		/* Kernel naming: vda -> vda1, nvme0n1 -> nvme0n1p1. */
		size_t l = strlen(e->d_name);
		bool digit = l > 0 && e->d_name[l - 1] >= '0' && e->d_name[l - 1] <= '9';
		snprintf(dev, devlen, "/dev/%s%s%u", e->d_name, digit ? "p" : "", n);
		struct stat st;
		found = stat(dev, &st) == 0 && S_ISBLK(st.st_mode);
	}
	closedir(d);
	return found;
}

/* Resolve fuse.root to a block device path, waiting for it to appear. */
static void wait_root(const char *spec, char *dev, size_t devlen)
{
	bool by_uuid = strncmp(spec, "PARTUUID=", 9) == 0;
	if (!by_uuid && strncmp(spec, "/dev/", 5) != 0)
		die(EXIT_INIT_FAILURE,
		    "bad fuse.root=%s on the kernel command line: use /dev/NAME or PARTUUID=<uuid>",
		    spec);
	long long deadline = now_ms() + ROOT_WAIT_MS;
	for (;;) {
		if (by_uuid) {
			if (find_partuuid(spec + 9, dev, devlen))
				return;
		} else {
			struct stat st;
			if (stat(spec, &st) == 0) {
				if (!S_ISBLK(st.st_mode))
					die(EXIT_INIT_FAILURE, "cannot use root device %s: not a block device",
					    spec);
				snprintf(dev, devlen, "%s", spec);
				return;
			}
		}
		/* A dm device (the dm-verity root) is made by the kernel before the init runs
		 * (dm-mod.create=): if it is not there, waiting will not bring it. */
		if (strncmp(spec, "/dev/dm-", 8) == 0)
			die(EXIT_INIT_FAILURE,
			    "no root device %s: the kernel did not create the dm-verity root that "
			    "dm-mod.create= on the command line describes (a partition it names is missing, "
			    "or the table is wrong): run `fuse verify` on the image",
			    spec);
		if (now_ms() >= deadline)
			die(EXIT_INIT_FAILURE,
			    "no root device %s after %d s: is the root image attached as the first disk "
			    "(virtio or NVMe)?",
			    spec, ROOT_WAIT_MS / 1000);
		sleep_ms(10);
	}
}

void switch_root(const struct boot_params *p)
{
	char dev[512];
	wait_root(p->root, dev, sizeof(dev));
	debug("root device %s is there", dev);

	if (mount(dev, "/newroot", p->rootfstype, MS_RDONLY, NULL) < 0) {
		int e = errno;
		const char *why = strerror(e);
		if (e == ENODEV)
			why = "the kernel does not support this filesystem type";
		else if (e == EINVAL)
			why = "not a valid filesystem image of that type";
		die(EXIT_INIT_FAILURE, "cannot mount root filesystem %s (%s): %s", dev, p->rootfstype,
		    why);
	}

	/* The app's own filesystem (its own partition, so a new version of the app leaves the
	 * root's bytes alone): read-only like the root, mounted before the switch so the app
	 * never sees /app empty. */
	if (p->app) {
		char appdev[512];
		wait_root(p->app, appdev, sizeof(appdev));
		if (mount(appdev, "/newroot/app", p->rootfstype, MS_RDONLY | MS_NODEV | MS_NOSUID,
			  NULL) < 0)
			die(EXIT_INIT_FAILURE, "cannot mount the app filesystem %s (%s) on /app: %s",
			    appdev, p->rootfstype, strerror(errno));
		debug("app device %s mounted on /app", appdev);
	}

	/* Carry the early mounts into the new root rather than remounting them: devtmpfs keeps
	 * its nodes and nothing has to be unmounted from under the initramfs. */
	static const char *const carried[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < sizeof(carried) / sizeof(carried[0]); i++) {
		char target[64];
		snprintf(target, sizeof(target), "/newroot%s", carried[i]);
		if (mount(carried[i], target, NULL, MS_MOVE, NULL) < 0) {
			int e = errno;
			if (e == ENOENT)
				die(EXIT_INIT_FAILURE,
				    "cannot switch to the root filesystem: it has no %s directory",
				    carried[i]);
			die(EXIT_INIT_FAILURE, "cannot move %s into the root filesystem: %s",
			    carried[i], strerror(e));
		}
	}

	/* The initramfs is not freed (it is the rootfs, which cannot be unmounted) but its
	 * files can be: the binary's pages go once nothing maps them. */
	unlink("/init");

	if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		die(EXIT_INIT_FAILURE, "cannot switch to the root filesystem: %s", strerror(errno));
	debug("switched to the root filesystem");
}

/* Create a directory on a writable filesystem (devtmpfs); it may already exist. */
static void must_mkdir(const char *path, mode_t mode)
{
	if (mkdir(path, mode) < 0 && errno != EEXIST)
		die(EXIT_INIT_FAILURE, "cannot create %s: %s", path, strerror(errno));
}

void mount_runtime(void)
{
	/* Everything writable is noexec: the app can write files but never run them. */
	const unsigned long nsd = MS_NOSUID | MS_NODEV | MS_NOEXEC;

	must_mkdir("/dev/pts", 0755);
	must_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		   "ptmxmode=0666,mode=0620");
	must_mkdir("/dev/shm", 01777);
	must_mount("tmpfs", "/dev/shm", "tmpfs", nsd, "mode=1777");
	must_mount("tmpfs", "/tmp", "tmpfs", nsd, "mode=1777");
	must_mount("tmpfs", "/run", "tmpfs", nsd, "mode=0755");

	/* The conventional /dev links that devtmpfs does not create: shells and runtimes use
	 * /dev/fd and /dev/std*. Failure only means the link is already there. */
	(void)symlink("/proc/self/fd", "/dev/fd");
	(void)symlink("/proc/self/fd/0", "/dev/stdin");
	(void)symlink("/proc/self/fd/1", "/dev/stdout");
	(void)symlink("/proc/self/fd/2", "/dev/stderr");
	debug("run-time mounts done");
}

/* How long to wait for a volume's disk to appear (probed with the root, normally there). */
#define VOLUME_WAIT_MS 5000

/* Split `/dev/NAME:/PATH` (checked by spec_parse) into its two parts. */
static void volume_parts(const char *v, char *dev, size_t devlen, const char **path)
{
	const char *colon = strchr(v, ':');
	snprintf(dev, devlen, "%.*s", (int)(colon - v), v);
	*path = colon + 1;
}

void mount_volumes(const struct app_spec *s)
{
	for (size_t i = 0; i < s->volc; i++) {
		char dev[128];
		const char *path;
		volume_parts(s->volumes[i], dev, sizeof(dev), &path);
		long long deadline = now_ms() + VOLUME_WAIT_MS;
		struct stat st;
		while (stat(dev, &st) < 0) {
			if (now_ms() >= deadline)
				die(EXIT_INIT_FAILURE, "no volume disk %s for %s after %d s", dev, path,
				    VOLUME_WAIT_MS / 1000);
			sleep_ms(10);
		}
		/* The root is read-only: the mount point must be in the image (the runner checks
		 * this before boot; this is the last line of defence). */
		if (stat(path, &st) < 0 || !S_ISDIR(st.st_mode))
			die(EXIT_INIT_FAILURE,
			    "cannot mount volume %s on %s: there is no %s directory in the image", dev,
			    path, path);
		if (mount(dev, path, "ext4", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
			die(EXIT_INIT_FAILURE, "cannot mount volume %s (ext4) on %s: %s", dev, path,
			    strerror(errno));
		/* A volume made before the app ran unprivileged (or by mkfs without root_owner)
		 * has a root-owned top directory: give it to the app's user. */
		if (s->uid != 0 && stat(path, &st) == 0 && st.st_uid == 0 &&
		    chown(path, s->uid, s->gid) < 0)
			die(EXIT_INIT_FAILURE, "cannot give volume %s on %s to uid %u: %s", dev, path,
			    (unsigned)s->uid, strerror(errno));
		debug("volume %s mounted on %s", dev, path);
	}
}

void unmount_volumes(const struct app_spec *s)
{
	for (size_t i = s->volc; i-- > 0;) {
		char dev[128];
		const char *path;
		volume_parts(s->volumes[i], dev, sizeof(dev), &path);
		/* The app and its children are gone, so nothing keeps it busy; on failure the
		 * journal makes the next mount consistent anyway. */
		if (umount(path) < 0)
			warn("cannot unmount volume %s: %s", path, strerror(errno));
	}
}
