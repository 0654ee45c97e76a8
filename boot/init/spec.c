/*
 * The app spec: what to run, baked into the image at /etc/fuse/spec, and the run overlay
 * the runner injects per run through QEMU's fw_cfg.
 *
 * Format (both): a sequence of NUL-terminated strings read as (key, value) pairs. The first
 * pair is `fuse-spec` = `1`, the format version. Keys of the spec:
 *   exe       absolute path of the program to execute (once)
 *   arg       argv entries in order, argv[0] first (repeated, at least one)
 *   env       `KEY=VALUE`, the whole environment of the app (repeated; a later KEY wins)
 *   cwd       absolute working directory (once, default /)
 *   uid, gid  decimal ids to run as (once each, default 0)
 *   caps      decimal mask, bit N = capability N: all uid 0 keeps (once, uid 0 only; default
 *             every capability)
 *   hostname  the machine's host name (once, default "fuse")
 *   fixed-args  decimal count of argv[1..] that run-time args keep (the runtime launcher's
 *             own, e.g. `-jar /app/x.jar`; once, default 0)
 * Keys of the overlay:
 *   reset-args  `1`: argv[1..] of the spec is cleared (so an overlay can clear the args)
 *   arg         replaces argv[1..] of the spec (the first one clears them), argv[0] stays
 *   env         `KEY=VALUE`, added or overriding the spec's KEY
 *   environment the name of the baked environment to select (once; see select_environment)
 *   volume      `/dev/NAME:/PATH`: a data disk the init mounts read-write (ext4) at PATH
 * Any other key is an error: a newer format gets a new version number, it is never silently
 * half-understood. The Rust side (boot/src/spec.rs) writes this format.
 */
#define _GNU_SOURCE
#include "init.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#define HOSTNAME_MAX 64

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt,
							 ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return -1;
}

/* Append to a NULL-terminated string vector. */
static void vec_push(char ***vec, size_t *n, const char *s)
{
	*vec = xrealloc(*vec, (*n + 2) * sizeof(char *));
	(*vec)[(*n)++] = xstrdup(s);
	(*vec)[*n] = NULL;
}

/* Drop all entries from index `keep` on. */
static void vec_truncate(char **vec, size_t *n, size_t keep)
{
	while (*n > keep) {
		free(vec[--*n]);
		vec[*n] = NULL;
	}
}

/* Set KEY=VALUE, replacing an earlier entry with the same KEY. */
static void env_set(struct app_spec *s, const char *kv)
{
	size_t klen = (size_t)(strchr(kv, '=') - kv);
	for (size_t i = 0; i < s->envc; i++) {
		if (strncmp(s->envp[i], kv, klen) == 0 && s->envp[i][klen] == '=') {
			free(s->envp[i]);
			s->envp[i] = xstrdup(kv);
			return;
		}
	}
	vec_push(&s->envp, &s->envc, kv);
}

/* A uid/gid: plain decimal, at most 4294967294 ((uid_t)-1 means "unchanged" to the kernel). */
static bool parse_id(const char *v, unsigned int *out)
{
	if (*v == '\0' || strlen(v) > 10)
		return false;
	unsigned long long n = 0;
	for (const char *c = v; *c; c++) {
		if (*c < '0' || *c > '9')
			return false;
		n = n * 10 + (unsigned)(*c - '0');
	}
	if (n > 4294967294ULL)
		return false;
	*out = (unsigned int)n;
	return true;
}

/* A capability mask: plain decimal, 64 bits. */
static bool parse_mask(const char *v, uint64_t *out)
{
	if (*v == '\0' || strlen(v) > 20)
		return false;
	uint64_t n = 0;
	for (const char *c = v; *c; c++) {
		if (*c < '0' || *c > '9')
			return false;
		uint64_t digit = (uint64_t)(*c - '0');
		if (n > (UINT64_MAX - digit) / 10)
			return false;
		n = n * 10 + digit;
	}
	*out = n;
	return true;
}

static int set_once(char **field, const char *key, const char *val, char *err, size_t errlen)
{
	if (*field)
		return fail(err, errlen, "key '%s' is given twice", key);
	*field = xstrdup(val);
	return 0;
}

int spec_parse(struct app_spec *s, const char *buf, size_t len, bool overlay, char *err,
	       size_t errlen)
{
	if (len == 0)
		return fail(err, errlen, "it is empty");
	if (buf[len - 1] != '\0')
		return fail(err, errlen, "it is truncated (does not end with a NUL byte)");

	const char *p = buf, *end = buf + len;
	size_t pairs = 0;
	bool args_reset = false, have_uid = false, have_gid = false;
	while (p < end) {
		const char *key = p;
		p += strlen(p) + 1;
		if (p >= end)
			return fail(err, errlen, "key '%s' has no value", key);
		const char *val = p;
		p += strlen(p) + 1;

		if (pairs++ == 0) {
			if (strcmp(key, "fuse-spec") != 0)
				return fail(err, errlen, "not a fuse spec (it must start with fuse-spec)");
			if (strcmp(val, "1") != 0)
				return fail(err, errlen,
					    "format version %s is not supported by this init (it reads "
					    "version 1): rebuild the image with the same fuse",
					    val);
			continue;
		}

		if (strcmp(key, "arg") == 0) {
			/* An overlay's args replace argv[1..]; argv[0] names the program. */
			if (overlay && !args_reset) {
				vec_truncate(s->argv, &s->argc, 1);
				args_reset = true;
			}
			vec_push(&s->argv, &s->argc, val);
		} else if (strcmp(key, "env") == 0) {
			const char *eq = strchr(val, '=');
			if (!eq || eq == val)
				return fail(err, errlen, "env entry '%s' is not KEY=VALUE", val);
			env_set(s, val);
		} else if (overlay && strcmp(key, "environment") == 0) {
			/* Applied by load_spec before this overlay: see select_environment. */
		} else if (overlay && strcmp(key, "volume") == 0) {
			/* DEV:PATH, mounted by mount_volumes (mounts.c). */
			const char *colon = strchr(val, ':');
			if (strncmp(val, "/dev/", 5) != 0 || !colon || colon[1] != '/')
				return fail(err, errlen, "volume '%s' is not /dev/NAME:/PATH", val);
			vec_push(&s->volumes, &s->volc, val);
		} else if (overlay) {
			if (strcmp(key, "reset-args") != 0 || strcmp(val, "1") != 0)
				return fail(err, errlen, "unknown key '%s' (not made by this fuse?)",
					    key);
			if (!args_reset) {
				vec_truncate(s->argv, &s->argc, 1);
				args_reset = true;
			}
		} else if (strcmp(key, "exe") == 0) {
			if (set_once(&s->exe, key, val, err, errlen) < 0)
				return -1;
		} else if (strcmp(key, "cwd") == 0) {
			if (set_once(&s->cwd, key, val, err, errlen) < 0)
				return -1;
		} else if (strcmp(key, "hostname") == 0) {
			if (set_once(&s->hostname, key, val, err, errlen) < 0)
				return -1;
		} else if (strcmp(key, "uid") == 0 || strcmp(key, "gid") == 0) {
			bool is_uid = key[0] == 'u';
			bool *seen = is_uid ? &have_uid : &have_gid;
			unsigned int id;
			if (*seen)
				return fail(err, errlen, "key '%s' is given twice", key);
			if (!parse_id(val, &id))
				return fail(err, errlen, "%s '%s' is not a decimal id", key, val);
			*seen = true;
			if (is_uid)
				s->uid = id;
			else
				s->gid = id;
		} else if (strcmp(key, "fixed-args") == 0) {
			unsigned int n;
			if (s->fixed_args)
				return fail(err, errlen, "key '%s' is given twice", key);
			if (!parse_id(val, &n) || n == 0)
				return fail(err, errlen, "fixed-args '%s' is not a positive count", val);
			s->fixed_args = n;
		} else if (strcmp(key, "caps") == 0) {
			if (s->have_caps)
				return fail(err, errlen, "key '%s' is given twice", key);
			if (!parse_mask(val, &s->caps))
				return fail(err, errlen, "caps '%s' is not a decimal mask", val);
			s->have_caps = true;
		} else {
			return fail(err, errlen, "unknown key '%s' (not made by this fuse?)", key);
		}
	}
	if (overlay)
		return 0;

	if (s->have_caps && s->uid != 0)
		return fail(err, errlen, "caps is for uid 0 only (uid %u has none)", (unsigned)s->uid);

	/* The baked spec must be complete. */
	if (!s->exe)
		return fail(err, errlen, "no exe");
	if (s->exe[0] != '/')
		return fail(err, errlen, "exe '%s' is not an absolute path", s->exe);
	if (s->argc == 0)
		return fail(err, errlen, "no arg (argv[0] is required)");
	if (s->fixed_args >= s->argc)
		return fail(err, errlen, "fixed-args %zu is not below the %zu args", s->fixed_args,
			    s->argc);
	if (!s->cwd)
		s->cwd = xstrdup("/");
	if (s->cwd[0] != '/')
		return fail(err, errlen, "cwd '%s' is not an absolute path", s->cwd);
	if (!s->hostname)
		s->hostname = xstrdup("fuse");
	/* It goes into /run/hosts: whitespace would corrupt that file. */
	if (s->hostname[0] == '\0' || strlen(s->hostname) > HOSTNAME_MAX ||
	    strpbrk(s->hostname, " \t\n\r\v\f"))
		return fail(err, errlen,
			    "hostname '%s' must be 1 to %d characters without whitespace",
			    s->hostname, HOSTNAME_MAX);
	return 0;
}

/* Environment names become file names under ENV_DIR: the builder's rule (config.rs). */
static bool valid_environment_name(const char *name)
{
	size_t n = strlen(name);
	if (n == 0 || n > ENV_NAME_MAX || !isalnum((unsigned char)name[0]))
		return false;
	for (const char *c = name; *c; c++)
		if (!isalnum((unsigned char)*c) && *c != '-' && *c != '_' && *c != '.')
			return false;
	return true;
}

/* The value of the overlay's `environment` key, or NULL. Malformed overlays are left to
 * spec_parse to report. A second `environment` key is an error. */
static const char *overlay_environment(const char *buf, size_t len)
{
	if (len == 0 || buf[len - 1] != '\0')
		return NULL;
	const char *found = NULL, *p = buf, *end = buf + len;
	while (p < end) {
		const char *key = p;
		p += strlen(p) + 1;
		if (p >= end)
			break;
		const char *val = p;
		p += strlen(p) + 1;
		if (strcmp(key, "environment") == 0) {
			if (found)
				die(EXIT_INIT_FAILURE,
				    "bad run overlay (fw_cfg opt/fuse/run): key 'environment' is given twice");
			found = val;
		}
	}
	return found;
}

/* The names under ENV_DIR, comma-separated, for error messages. */
static void list_environments(char *out, size_t outlen)
{
	out[0] = '\0';
	DIR *dir = opendir(ENV_DIR);
	if (!dir) {
		snprintf(out, outlen, "none");
		return;
	}
	struct dirent *e;
	size_t used = 0;
	while ((e = readdir(dir)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		int n = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "", e->d_name);
		if (n < 0 || (size_t)n >= outlen - used)
			break;
		used += (size_t)n;
	}
	closedir(dir);
	if (used == 0)
		snprintf(out, outlen, "none");
}

/*
 * Select a baked environment: apply ENV_DIR/<name> (an overlay: its variables, maybe its
 * arguments) to the spec, and point CURRENT_LINK at FILES_DIR/<name>. The image's
 * per-environment config files are symlinks into CURRENT_LINK, so the root stays read-only
 * and one image serves every environment. Applied before the run overlay, so values given at
 * run win over the environment's.
 */
static void select_environment(struct app_spec *s, const char *name)
{
	char path[sizeof(ENV_DIR) + ENV_NAME_MAX + 2], err[512];
	if (!valid_environment_name(name))
		die(EXIT_INIT_FAILURE, "invalid environment name '%s'", name);
	snprintf(path, sizeof(path), "%s/%s", ENV_DIR, name);
	char *buf;
	size_t len;
	int r = read_file(path, SPEC_MAX_BYTES, &buf, &len);
	if (r == -ENOENT) {
		char names[512];
		list_environments(names, sizeof(names));
		die(EXIT_INIT_FAILURE, "environment '%s' is not in this image (it has: %s)", name,
		    names);
	}
	if (r < 0)
		die(EXIT_INIT_FAILURE, "cannot read environment %s: %s", path, strerror(-r));
	if (spec_parse(s, buf, len, true, err, sizeof(err)) < 0)
		die(EXIT_INIT_FAILURE, "bad environment %s: %s", path, err);
	free(buf);

	char target[sizeof(FILES_DIR) + ENV_NAME_MAX + 2];
	snprintf(target, sizeof(target), "%s/%s", FILES_DIR, name);
	if (mkdir(CURRENT_DIR, 0755) < 0 && errno != EEXIST)
		die(EXIT_INIT_FAILURE, "cannot create %s: %s", CURRENT_DIR, strerror(errno));
	if (symlink(target, CURRENT_LINK) < 0)
		die(EXIT_INIT_FAILURE, "cannot link %s to %s: %s", CURRENT_LINK, target,
		    strerror(errno));
	debug("environment %s selected", name);
}

/* The image's default environment (DEFAULT_ENV_PATH holds its name), or NULL. */
static char *default_environment(void)
{
	char *buf;
	size_t len;
	int r = read_file(DEFAULT_ENV_PATH, ENV_NAME_MAX + 2, &buf, &len);
	if (r == -ENOENT)
		return NULL;
	if (r < 0)
		die(EXIT_INIT_FAILURE, "cannot read %s: %s", DEFAULT_ENV_PATH, strerror(-r));
	while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\0'))
		buf[--len] = '\0';
	return buf;
}

bool load_spec(struct app_spec *s)
{
	memset(s, 0, sizeof(*s));
	/* Vectors are always NULL-terminated, even when empty, for execve. */
	s->argv = xmalloc(sizeof(char *));
	s->argv[0] = NULL;
	s->envp = xmalloc(sizeof(char *));
	s->envp[0] = NULL;

	char err[512];
	char *buf;
	size_t len;
	int r = read_file(SPEC_PATH, SPEC_MAX_BYTES, &buf, &len);
	if (r < 0)
		die(EXIT_INIT_FAILURE, "cannot read the app spec %s: %s%s", SPEC_PATH, strerror(-r),
		    r == -ENOENT ? " (is this a fuse image?)" : "");
	if (spec_parse(s, buf, len, false, err, sizeof(err)) < 0)
		die(EXIT_INIT_FAILURE, "bad app spec %s: %s", SPEC_PATH, err);
	free(buf);

	/* The overlay exists only when the runner passed -fw_cfg name=opt/fuse/run,... (fuse
	 * always does; a cloud never can). */
	r = read_file(OVERLAY_PATH, SPEC_MAX_BYTES, &buf, &len);
	if (r == -ENOENT)
		return false;
	if (r < 0)
		die(EXIT_INIT_FAILURE, "cannot read the run overlay %s: %s", OVERLAY_PATH,
		    strerror(-r));
	/* The environment first: the overlay's own values override the environment's. */
	const char *selected = overlay_environment(buf, len);
	char *fallback = selected ? NULL : default_environment();
	if (selected || fallback)
		select_environment(s, selected ? selected : fallback);
	free(fallback);
	if (spec_parse(s, buf, len, true, err, sizeof(err)) < 0)
		die(EXIT_INIT_FAILURE, "bad run overlay (fw_cfg opt/fuse/run): %s", err);
	free(buf);
	debug("run overlay applied");
	return true;
}

/* Why `buf` is not fuse's user-data when it does not even start as a JSON object: the formats
 * a cloud user is likely to have passed by mistake. Only fixed words are quoted, since the
 * text may hold secrets. */
static const char *foreign_userdata(const char *buf, size_t len)
{
	static const struct {
		const char *prefix, *what;
	} known[] = {
		{"#cloud-config", "cloud-init's #cloud-config"},
		{"#!", "a script (#!)"},
		{"Content-Type:", "a MIME multipart document"},
		{"\x1f\x8b", "gzip-compressed (pass it uncompressed)"},
	};
	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
		size_t n = strlen(known[i].prefix);
		if (len >= n && memcmp(buf, known[i].prefix, n) == 0)
			return known[i].what;
	}
	return "not a JSON object";
}

/* A variable name as `-e` takes it (boot/src/spec.rs validates the same). */
static bool valid_env_name(const char *k)
{
	return *k != '\0' && !strchr(k, '=');
}

const char *apply_userdata(struct app_spec *s, const char *buf, size_t len, const char *source,
			   bool *by_default)
{
	static char selected[ENV_NAME_MAX + 1];
	char *fallback = NULL;
	const char *env_name = NULL;
	struct json *doc = NULL;
	char err[256];

	if (buf) {
		size_t i = 0;
		while (i < len && (buf[i] == ' ' || buf[i] == '\n' || buf[i] == '\r' ||
				   buf[i] == '\t'))
			i++;
		if (i == len || buf[i] != '{')
			die(EXIT_INIT_FAILURE,
			    "the user-data from %s is not fuse's: it is %s; make it with `fuse "
			    "userdata` (format: docs/config.md)",
			    source, i == len ? "blank" : foreign_userdata(buf + i, len - i));
		doc = json_parse(buf, len, err, sizeof(err));
		if (!doc)
			die(EXIT_INIT_FAILURE, "bad user-data from %s: %s", source, err);
		for (size_t k = 0; k < doc->n; k++) {
			const char *key = doc->keys[k];
			if (strcmp(key, "fuse") && strcmp(key, "environment") && strcmp(key, "env") &&
			    strcmp(key, "args"))
				die(EXIT_INIT_FAILURE,
				    "bad user-data from %s: unknown key \"%.40s\" (it takes fuse, "
				    "environment, env, args)",
				    source, key);
		}
		const struct json *version = json_get(doc, "fuse");
		if (!version || version->type != JSON_NUMBER || strcmp(version->str, "1") != 0)
			die(EXIT_INIT_FAILURE,
			    "bad user-data from %s: it must say \"fuse\": 1 (the format version this "
			    "init reads)",
			    source);
		const struct json *e = json_get(doc, "environment");
		if (e && e->type != JSON_STRING)
			die(EXIT_INIT_FAILURE, "bad user-data from %s: \"environment\" is not a string",
			    source);
		env_name = e ? e->str : NULL;
	}
	*by_default = !env_name;
	if (!env_name)
		env_name = fallback = default_environment();
	if (env_name) {
		select_environment(s, env_name);
		snprintf(selected, sizeof(selected), "%s", env_name);
	}
	free(fallback);
	if (!doc)
		return env_name ? selected : NULL;

	const struct json *env = json_get(doc, "env");
	if (env && env->type != JSON_OBJECT)
		die(EXIT_INIT_FAILURE, "bad user-data from %s: \"env\" is not an object", source);
	for (size_t i = 0; env && i < env->n; i++) {
		if (!valid_env_name(env->keys[i]))
			die(EXIT_INIT_FAILURE,
			    "bad user-data from %s: invalid variable name \"%.40s\" (empty, or holds "
			    "'=')",
			    source, env->keys[i]);
		if (env->items[i]->type != JSON_STRING)
			die(EXIT_INIT_FAILURE, "bad user-data from %s: the value of %.40s is not a string",
			    source, env->keys[i]);
		size_t klen = strlen(env->keys[i]), vlen = strlen(env->items[i]->str);
		char *kv = xmalloc(klen + vlen + 2);
		memcpy(kv, env->keys[i], klen);
		kv[klen] = '=';
		memcpy(kv + klen + 1, env->items[i]->str, vlen + 1);
		env_set(s, kv);
		free(kv);
	}
	const struct json *args = json_get(doc, "args");
	if (args && args->type != JSON_ARRAY)
		die(EXIT_INIT_FAILURE, "bad user-data from %s: \"args\" is not an array", source);
	if (args) {
		/* The app's arguments, as after the image on `fuse run`: the launcher's stay. */
		vec_truncate(s->argv, &s->argc, 1 + s->fixed_args);
		for (size_t i = 0; i < args->n; i++) {
			if (args->items[i]->type != JSON_STRING)
				die(EXIT_INIT_FAILURE,
				    "bad user-data from %s: args[%zu] is not a string", source, i);
			vec_push(&s->argv, &s->argc, args->items[i]->str);
		}
	}
	json_free(doc);
	debug("user-data applied");
	return env_name ? selected : NULL;
}
