/*
 * fuse-init: the PID 1 of a fuse image.
 *
 * Declarations shared by the init's translation units. The init is a static binary with no
 * dependencies beyond libc; it runs from the initramfs, switches to the read-only squashfs
 * root, configures the machine, starts the app described by /etc/fuse/spec and powers the VM
 * off when the app exits, reporting the exit code through a port only it holds (status.c).
 */
#ifndef FUSE_INIT_H
#define FUSE_INIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Exit codes reported for the init's own failures (same meaning as in a POSIX shell). */
#define EXIT_INIT_FAILURE 125
#define EXIT_NOT_EXECUTABLE 126
#define EXIT_NOT_FOUND 127

/* Where things are: the contract with the image builder (rootfs) and the runner (QEMU). */
#define SPEC_PATH "/etc/fuse/spec"
#define OVERLAY_PATH "/sys/firmware/qemu_fw_cfg/by_name/opt/fuse/run/raw"
#define SPEC_MAX_BYTES (1024 * 1024)
/* Baked environments (see spec.c select_environment): one overlay file per environment, the
 * default's name, each environment's config files, and the link the image's config paths go
 * through to reach the selected environment's files. */
#define ENV_DIR "/etc/fuse/env"
#define DEFAULT_ENV_PATH "/etc/fuse/environment"
#define FILES_DIR "/etc/fuse/files"
#define CURRENT_DIR "/run/fuse"
#define CURRENT_LINK "/run/fuse/current"
#define ENV_NAME_MAX 63

/* ---- util.c ---------------------------------------------------------------------------- */

/* Set by `fuse.debug=1` on the kernel command line: progress lines with timestamps. */
extern bool debug_enabled;

/* `fuse-init: error: ...` on the console, then power off reporting `code`. */
__attribute__((noreturn, format(printf, 2, 3))) void die(int code, const char *fmt, ...);
/* `fuse-init: error: ...` on the console, nothing else (for the app's child process). */
__attribute__((format(printf, 1, 2))) void error_line(const char *fmt, ...);
/* `fuse-init: warning: ...` on the console; the boot continues. */
__attribute__((format(printf, 1, 2))) void warn(const char *fmt, ...);
/* `fuse-init: ...` on the console: what whoever reads a cloud instance's console needs. */
__attribute__((format(printf, 1, 2))) void info(const char *fmt, ...);
/* `fuse-init: debug: ...` with the time since boot, only with fuse.debug=1. */
__attribute__((format(printf, 1, 2))) void debug(const char *fmt, ...);
/* Sync, report `code` (status.c), and power the machine off. Never returns. */
__attribute__((noreturn)) void power_off(int code);
/* Where an initramfs lists kernel modules to load before the root is mounted, one path a
 * line, in load order (see boot/src/initramfs.rs). */
#define MODULE_LIST_PATH "/lib/modules/load"
/* Load the modules of MODULE_LIST_PATH, if the initramfs has one. */
void load_modules(void);

/* Read a whole file (at most `max` bytes) into a malloc'ed, NUL-terminated buffer.
 * Returns 0, or -errno (-EFBIG when larger than max). */
int read_file(const char *path, size_t max, char **out, size_t *len);
/* Create or truncate `path` with `len` bytes of `data`. Returns 0 or -errno. */
int write_file(const char *path, const char *data, size_t len, mode_t mode);
/* Monotonic clock in milliseconds. */
long long now_ms(void);
/* Sleep for `ms` milliseconds (restarted on EINTR). */
void sleep_ms(long ms);
/* malloc/strdup/realloc that never return NULL (they die instead). */
void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);

/* ---- status.c -------------------------------------------------------------------------- */

/* The virtio-serial port the runner reads the exit status from (see status.c). */
#define STATUS_PORT_NAME "fuse.status"
/* Find and open the status port, then unlink its node; without one, statuses go to the
 * console. Call once, early (needs /sys and /dev). */
void status_open(void);
/* Write `exit N` to the status port; false when there is none (or the write failed). */
bool status_report(int code);
/* The virtio port carrying the app's console (see console.c), found by status_open; NULL
 * when the machine has none. */
const char *status_console_port(void);

/* ---- console.c ------------------------------------------------------------------------- */

#define CONSOLE_PORT_NAME "fuse.console"
struct pollfd;
/* Open the console port, if the machine has one, and unlink its node. After status_open. */
void console_open_port(void);
/* A new opening of the app's terminal (a pty relayed to the console port; it needs
 * /dev/pts), or -1 when the app writes to /dev/console. */
int console_open_app_side(void);
/* The descriptors to poll for the relay (at most 2), and the relay's turn after a poll. */
int console_pollfds(struct pollfd *p);
void console_service(void);
/* Relay what the app wrote until its terminal is closed (or quiet, when something it left
 * still holds it open). */
void console_drain(void);

/* ---- privs.c --------------------------------------------------------------------------- */

/* The kernel settings an unprivileged app lives with: ports below 1024 bindable by any user
 * (as Docker does), kernel log and pointers hidden from it. Dies when one cannot be set. */
void harden_kernel(void);
/* In the app's child, before exec: drop to uid/gid with no groups and no capabilities at all
 * (bounding, ambient, inheritable sets emptied) and set no_new_privs. uid 0 (the opt-out)
 * keeps its capabilities, or with `caps` (bit N: capability N) only those, and still gets
 * no_new_privs. Returns 0, or -1 with a reason in `err`. */
int drop_privileges(uid_t uid, gid_t gid, const uint64_t *caps, char *err, size_t errlen);

/* ---- cmdline.c ------------------------------------------------------------------------- */

/* The `fuse.*` parameters of the kernel command line. */
struct boot_params {
	char *root;      /* fuse.root: /dev/NAME or PARTUUID=<uuid>; default /dev/vda */
	char *rootfstype; /* fuse.rootfstype: default squashfs */
	char *app;       /* fuse.app: the app's squashfs (/dev/NAME or PARTUUID=), mounted on
			  * /app; NULL: the app is in the root filesystem */
	bool debug;      /* fuse.debug=1 */
};
/* Parse /proc/cmdline (proc must be mounted). */
void read_boot_params(struct boot_params *p);

/* ---- mounts.c -------------------------------------------------------------------------- */

/* Mount devtmpfs, proc and sysfs in the initramfs. */
void mount_early(void);
/* Wait for the root device, mount it read-only on /newroot (and the app's filesystem on
 * /newroot/app) and make it the root (PID 1 keeps running). /dev, /proc and /sys are moved
 * along. */
void switch_root(const struct boot_params *p);
/* The run-time mounts of the new root: devpts, /dev/shm, /tmp, /run. */
void mount_runtime(void);
struct app_spec;
/* Mount the spec's volumes (ext4, read-write) on their mount points; dies when one fails. */
void mount_volumes(const struct app_spec *s);
/* Unmount them again (before power-off), so their filesystems are clean. */
void unmount_volumes(const struct app_spec *s);

/* ---- spec.c ---------------------------------------------------------------------------- */

/* What to run: /etc/fuse/spec with the fw_cfg run overlay applied. */
struct app_spec {
	char *exe;
	char **argv; /* NULL-terminated */
	size_t argc;
	char **envp; /* NULL-terminated, `KEY=VALUE` */
	size_t envc;
	char *cwd;
	uid_t uid;
	gid_t gid;
	bool have_caps; /* `caps` given: uid 0 keeps only these capabilities */
	uint64_t caps;
	char *hostname;
	char **volumes; /* `/dev/NAME:/PATH` from the run overlay; NULL when there are none */
	size_t volc;
	size_t fixed_args; /* argv[1..=fixed_args]: the launcher's own, kept by user-data args */
};
/* Parse the baked spec (overlay=false) or apply a run overlay to `s` (overlay=true).
 * Returns 0, or -1 with a reason in `err`. */
int spec_parse(struct app_spec *s, const char *buf, size_t len, bool overlay, char *err,
	       size_t errlen);
/* Load /etc/fuse/spec and, when QEMU passed one, the fw_cfg run overlay (selecting its
 * environment or the default). Returns whether there was an overlay: without one the
 * configuration is still to come from the cloud (apply_userdata). Dies with a clear message on
 * any problem. */
bool load_spec(struct app_spec *s);
/* Apply fuse's user-data (JSON, see docs/config.md) found at `source` to the spec: select its
 * environment (or the image's default, saying so in *by_default), then its variables and
 * arguments. `buf` NULL: no user-data, the default environment. Returns the selected
 * environment's name (static), or NULL when the image has none. Dies on user-data that is not
 * valid fuse user-data. */
const char *apply_userdata(struct app_spec *s, const char *buf, size_t len, const char *source,
			   bool *by_default);

/* ---- app.c --------------------------------------------------------------------------- */

/* Check the spec's exe and cwd, then fork and exec the app in its own session on the console
 * with exactly the spec's environment. Returns the app's pid. */
pid_t start_app(const struct app_spec *s);

/* ---- net.c ----------------------------------------------------------------------------- */

/* Bring up lo, configure eth0 by DHCP if it exists (and /run/resolv.conf from the lease).
 * Returns whether eth0 got an address. */
bool net_up(void);
/* Write /run/hosts: localhost, and the host name (and its FQDN when not NULL) on our address. */
void net_write_hosts(const char *hostname, const char *fqdn);

/* ---- json.c ---------------------------------------------------------------------------- */

enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };
/* A parsed JSON value. Strings are NUL-free UTF-8; numbers keep their text. */
struct json {
	enum json_type type;
	bool boolean;
	char *str;           /* JSON_STRING, JSON_NUMBER */
	struct json **items; /* JSON_ARRAY, JSON_OBJECT */
	char **keys;         /* JSON_OBJECT */
	size_t n;
};
/* Parse a whole document; NULL with a reason in `err` when it is not valid JSON. */
struct json *json_parse(const char *buf, size_t len, char *err, size_t errlen);
void json_free(struct json *j);
/* The member `key` of an object, or NULL. */
const struct json *json_get(const struct json *obj, const char *key);

/* ---- cloud.c --------------------------------------------------------------------------- */

/* The run-time configuration a cloud hands over, when there is no fw_cfg overlay. */
struct cloud_config {
	char *userdata; /* NULL: none */
	size_t len;
	char *hostname; /* the instance's short host name from its metadata, or NULL */
	char *fqdn;     /* and its full name, or NULL */
	char source[96]; /* where it came from, for the console (never a value) */
	bool found;      /* a disk or the metadata service was there (maybe without user-data) */
};
/* A NoCloud (`cidata`) or config-drive (`config-2`) disk: vfat or iso9660, on any block
 * device. Returns whether one was found (its user-data may still be absent). */
bool cloud_disk(struct cloud_config *c);
/* EC2's instance metadata service, IMDSv2 only (a session token first; IMDSv1 never). Needs
 * the network up. Returns whether the service answered. */
bool cloud_imds(struct cloud_config *c);

/* ---- powerkey.c ------------------------------------------------------------------------ */

/* A non-blocking fd of the evdev device with a KEY_POWER key (arm64 virt's gpio-keys power
 * button), or -1 when there is none (x86: the ACPI power button sends SIGTERM itself). */
int power_key_open(void);
/* Drain the device's queued events; true when they include a KEY_POWER press. */
bool power_key_pressed(int fd);

#endif
