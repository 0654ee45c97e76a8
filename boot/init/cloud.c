/*
 * The run-time configuration a cloud hands an instance, read when QEMU's fw_cfg overlay is
 * absent (a machine fuse did not start): first a NoCloud or config-drive disk (libvirt,
 * Proxmox, OpenStack), then EC2's instance metadata service (IMDSv2). What they hold (fuse's
 * user-data, the instance's host name) stays in PID 1's memory: it is never written to a
 * file or the kernel command line, and never printed.
 */
#define _GNU_SOURCE
#include "init.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* EC2's user-data is at most 16 KB; anything much larger is not ours. */
#define USERDATA_MAX (64 * 1024)
#define SEED_MOUNT "/run/fuse-seed"

#define IMDS_ADDR "169.254.169.254"
#define IMDS_PORT 80
/* How long a connection to the metadata service may take. EC2's answers in well under a
 * millisecond; elsewhere the address leads nowhere and its packets are dropped, and this is
 * all the boot waits for it (the bound: 1 s). */
#define IMDS_CONNECT_MS 500
/* How long the token's answer may take once connected: a network may accept the connection
 * and lead it nowhere (a proxy, a user-mode network), and the boot waits for that too. Once
 * the service has answered, the other answers get more patience. */
#define IMDS_TOKEN_ANSWER_MS 1000
#define IMDS_ANSWER_MS 3000
/* The session token's lifetime: the init needs it for three requests at boot. */
#define IMDS_TOKEN_TTL "60"

/* ---- the host name ------------------------------------------------------------------- */

/* Take `name` (a metadata host name, maybe an FQDN such as ip-10-0-0-7.ec2.internal) when it
 * is a valid DNS name: the short name becomes the host name, as cloud-init does. */
static void set_hostname(struct cloud_config *c, const char *name, const char *source)
{
	size_t n = strlen(name);
	while (n > 0 && isspace((unsigned char)name[n - 1]))
		n--;
	if (n == 0)
		return;
	bool ok = n < 254 && name[0] != '.' && name[0] != '-';
	for (size_t i = 0; ok && i < n; i++)
		ok = isalnum((unsigned char)name[i]) || name[i] == '-' || name[i] == '.';
	size_t label = strcspn(name, ".");
	if (label > n)
		label = n;
	if (!ok || label == 0 || label > 63) {
		warn("ignoring the host name from %s: not a valid DNS name", source);
		return;
	}
	free(c->hostname);
	free(c->fqdn);
	c->hostname = strndup(name, label);
	c->fqdn = strndup(name, n);
	if (!c->hostname || !c->fqdn)
		die(EXIT_INIT_FAILURE, "out of memory");
}

/* ---- NoCloud / config-drive ---------------------------------------------------------- */

enum seed_kind { SEED_NONE, SEED_NOCLOUD, SEED_CONFIG_DRIVE };

/* The label in a fixed-width, space-padded field. */
static void trim_label(char *out, const unsigned char *field, size_t width)
{
	size_t n = width;
	while (n > 0 && (field[n - 1] == ' ' || field[n - 1] == '\0'))
		n--;
	memcpy(out, field, n);
	out[n] = '\0';
}

/* The kind of seed the filesystem on `dev` is, by its label, and its type for mount(2). */
static enum seed_kind seed_kind(const char *dev, const char **fstype, char *label)
{
	int fd = open(dev, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return SEED_NONE;
	unsigned char sector[512], pvd[2048];
	enum seed_kind kind = SEED_NONE;
	label[0] = '\0';
	/* FAT: the boot sector's signature and label (FAT12/16 at 0x2B, FAT32 at 0x47, each
	 * after an extended boot signature 0x29). */
	if (pread(fd, sector, sizeof(sector), 0) == (ssize_t)sizeof(sector) && sector[510] == 0x55 &&
	    sector[511] == 0xAA) {
		bool fat32 = sector[0x16] == 0 && sector[0x17] == 0;
		size_t sig = fat32 ? 0x42 : 0x26, at = fat32 ? 0x47 : 0x2B;
		if (sector[sig] == 0x29) {
			trim_label(label, sector + at, 11);
			*fstype = "vfat";
		}
	}
	/* ISO 9660: the primary volume descriptor in sector 16, its volume id at offset 40. */
	if (!label[0] && pread(fd, pvd, sizeof(pvd), 16 * 2048) == (ssize_t)sizeof(pvd) &&
	    pvd[0] == 1 && memcmp(pvd + 1, "CD001", 5) == 0) {
		trim_label(label, pvd + 40, 32);
		*fstype = "iso9660";
	}
	close(fd);
	if (strcasecmp(label, "cidata") == 0)
		kind = SEED_NOCLOUD;
	else if (strcasecmp(label, "config-2") == 0)
		kind = SEED_CONFIG_DRIVE;
	return kind;
}

/* Read SEED_MOUNT/`rel` into `out` (NULL when absent). Dies when it is there but unusable. */
static void read_seed_file(const char *rel, const char *source, char **out, size_t *len)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/%s", SEED_MOUNT, rel);
	int r = read_file(path, USERDATA_MAX, out, len);
	if (r == -ENOENT) {
		*out = NULL;
		*len = 0;
		return;
	}
	if (r == -EFBIG)
		die(EXIT_INIT_FAILURE, "%s on %s is larger than %d KiB", rel, source,
		    USERDATA_MAX / 1024);
	if (r < 0)
		die(EXIT_INIT_FAILURE, "cannot read %s on %s: %s", rel, source, strerror(-r));
}

/* NoCloud's meta-data is YAML; its `local-hostname: NAME` line is all the init takes. */
static void nocloud_hostname(struct cloud_config *c, const char *meta, const char *source)
{
	for (const char *line = meta; line && *line;) {
		const char *next = strchr(line, '\n');
		size_t n = next ? (size_t)(next - line) : strlen(line);
		const char *key = "local-hostname:";
		if (n > strlen(key) && strncmp(line, key, strlen(key)) == 0) {
			char name[256];
			const char *v = line + strlen(key);
			while (*v == ' ' || *v == '\t')
				v++;
			size_t vn = n - (size_t)(v - line);
			if (vn >= sizeof(name))
				vn = sizeof(name) - 1;
			memcpy(name, v, vn);
			name[vn] = '\0';
			/* A quoted YAML scalar. */
			if (vn >= 2 && (name[0] == '"' || name[0] == '\'') && name[vn - 1] == name[0]) {
				name[vn - 1] = '\0';
				memmove(name, name + 1, vn - 1);
			}
			set_hostname(c, name, source);
			return;
		}
		line = next ? next + 1 : NULL;
	}
}

/* OpenStack's meta_data.json: its "hostname". */
static void config_drive_hostname(struct cloud_config *c, const char *meta, size_t len,
				  const char *source)
{
	char err[128];
	struct json *doc = json_parse(meta, len, err, sizeof(err));
	if (!doc) {
		warn("ignoring openstack/latest/meta_data.json on %s: %s", source, err);
		return;
	}
	const struct json *h = json_get(doc, "hostname");
	if (h && h->type == JSON_STRING)
		set_hostname(c, h->str, source);
	json_free(doc);
}

/* Block devices in name order, so the choice among several seeds is stable. */
static int by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

bool cloud_disk(struct cloud_config *c)
{
	struct dirent **names;
	int n = scandir("/sys/class/block", &names, NULL, by_name);
	if (n < 0)
		return false;
	bool found = false;
	for (int i = 0; i < n; i++) {
		const char *name = names[i]->d_name;
		/* The verity device, loop and RAM disks never carry a seed. */
		bool skip = name[0] == '.' || strncmp(name, "dm-", 3) == 0 ||
			    strncmp(name, "loop", 4) == 0 || strncmp(name, "ram", 3) == 0;
		char dev[300], label[40];
		const char *fstype = NULL;
		snprintf(dev, sizeof(dev), "/dev/%s", name);
		enum seed_kind kind = skip || found ? SEED_NONE : seed_kind(dev, &fstype, label);
		if (kind == SEED_NONE) {
			free(names[i]);
			continue;
		}
		found = c->found = true;
		snprintf(c->source, sizeof(c->source), "the %s disk %.32s (%.32s)",
			 kind == SEED_NOCLOUD ? "NoCloud" : "config-drive", name, label);
		if (mkdir(SEED_MOUNT, 0700) < 0 && errno != EEXIST)
			die(EXIT_INIT_FAILURE, "cannot create %s: %s", SEED_MOUNT, strerror(errno));
		if (mount(dev, SEED_MOUNT, fstype, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
			  NULL) < 0)
			die(EXIT_INIT_FAILURE, "cannot mount %s (%s): %s", c->source, fstype,
			    strerror(errno));
		char *meta;
		size_t meta_len;
		if (kind == SEED_NOCLOUD) {
			read_seed_file("user-data", c->source, &c->userdata, &c->len);
			read_seed_file("meta-data", c->source, &meta, &meta_len);
			if (meta)
				nocloud_hostname(c, meta, c->source);
		} else {
			read_seed_file("openstack/latest/user_data", c->source, &c->userdata, &c->len);
			read_seed_file("openstack/latest/meta_data.json", c->source, &meta, &meta_len);
			if (meta)
				config_drive_hostname(c, meta, meta_len, c->source);
		}
		free(meta);
		if (umount(SEED_MOUNT) < 0)
			warn("cannot unmount %s: %s", c->source, strerror(errno));
		rmdir(SEED_MOUNT);
		if (c->userdata && c->len == 0) {
			free(c->userdata);
			c->userdata = NULL;
		}
		free(names[i]);
	}
	free(names);
	return found;
}

/* ---- EC2 IMDSv2 ---------------------------------------------------------------------- */

/* Connect to the metadata service within IMDS_CONNECT_MS. Returns the socket or -1. */
static int imds_connect(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(IMDS_PORT)};
	inet_pton(AF_INET, IMDS_ADDR, &a.sin_addr);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0 && errno != EINPROGRESS) {
		close(fd);
		return -1;
	}
	struct pollfd p = {.fd = fd, .events = POLLOUT};
	int err = 0;
	socklen_t elen = sizeof(err);
	if (poll(&p, 1, IMDS_CONNECT_MS) != 1 ||
	    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0 || err != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Send all of `buf` before `deadline`. */
static bool send_all(int fd, const char *buf, size_t len, long long deadline)
{
	while (len > 0) {
		struct pollfd p = {.fd = fd, .events = POLLOUT};
		long long left = deadline - now_ms();
		if (left <= 0 || poll(&p, 1, (int)left) != 1)
			return false;
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return false;
		if (n > 0) {
			buf += n;
			len -= (size_t)n;
		}
	}
	return true;
}

/*
 * One HTTP/1.1 request to the metadata service on a fresh connection (`Connection: close`).
 * Returns the status code with the body in *body (malloc'ed, NUL-terminated), 0 when the
 * service did not answer (no connection within IMDS_CONNECT_MS), or -1 when its answer was
 * broken or late (with a reason in `why`).
 */
static int imds_request(const char *method, const char *path, const char *header, int answer_ms,
			char **body, size_t *body_len, char *why, size_t whylen)
{
	*body = NULL;
	*body_len = 0;
	int fd = imds_connect();
	if (fd < 0)
		return 0;
	char req[512];
	int n = snprintf(req, sizeof(req),
			 "%s %s HTTP/1.1\r\nHost: " IMDS_ADDR "\r\n%s\r\nConnection: close\r\n"
			 "Content-Length: 0\r\n\r\n",
			 method, path, header);
	long long deadline = now_ms() + answer_ms;
	if (n < 0 || (size_t)n >= sizeof(req) || !send_all(fd, req, (size_t)n, deadline)) {
		close(fd);
		snprintf(why, whylen, "the request could not be sent");
		return -1;
	}
	/* Read the whole answer: headers and a body of at most USERDATA_MAX. */
	size_t cap = USERDATA_MAX + 8192, len = 0;
	char *buf = xmalloc(cap + 1);
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		long long left = deadline - now_ms();
		if (left <= 0 || poll(&p, 1, (int)left) != 1) {
			free(buf);
			close(fd);
			snprintf(why, whylen, "no complete answer within %d ms", answer_ms);
			return -1;
		}
		ssize_t r = recv(fd, buf + len, cap - len, 0);
		if (r < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (r <= 0)
			break;
		len += (size_t)r;
		if (len == cap) {
			free(buf);
			close(fd);
			snprintf(why, whylen, "the answer is larger than %d KiB", USERDATA_MAX / 1024);
			return -1;
		}
	}
	close(fd);
	buf[len] = '\0';
	int status = 0;
	char *head_end = strstr(buf, "\r\n\r\n");
	if (sscanf(buf, "HTTP/1.%*[01] %3d", &status) != 1 || status < 100 || !head_end) {
		free(buf);
		snprintf(why, whylen, "the answer is not HTTP");
		return -1;
	}
	*head_end = '\0';
	char *data = head_end + 4;
	size_t data_len = len - (size_t)(data - buf);
	/* The service sends Content-Length; chunked coding is not something it does. */
	for (char *h = strstr(buf, "\r\n"); h; h = strstr(h + 2, "\r\n")) {
		if (strncasecmp(h + 2, "Transfer-Encoding:", 18) == 0) {
			free(buf);
			snprintf(why, whylen, "the answer uses a transfer coding");
			return -1;
		}
		if (strncasecmp(h + 2, "Content-Length:", 15) == 0) {
			unsigned long cl = strtoul(h + 17, NULL, 10);
			if (cl > data_len) {
				free(buf);
				snprintf(why, whylen, "the answer is cut short");
				return -1;
			}
			data_len = cl;
		}
	}
	*body = xmalloc(data_len + 1);
	memcpy(*body, data, data_len);
	(*body)[data_len] = '\0';
	*body_len = data_len;
	free(buf);
	return status;
}

bool cloud_imds(struct cloud_config *c)
{
	char *token, *body, why[128], header[256];
	size_t len;
	long long start = now_ms();
	int st = imds_request("PUT", "/latest/api/token",
			      "X-aws-ec2-metadata-token-ttl-seconds: " IMDS_TOKEN_TTL,
			      IMDS_TOKEN_ANSWER_MS, &token, &len, why, sizeof(why));
	if (st <= 0) {
		/* No connection, or one that led nowhere: no metadata service on this network. */
		debug("no IMDS: %s", st < 0 ? why : "no connection");
		snprintf(c->source, sizeof(c->source),
			 "no cidata/config-2 disk, no IMDS answer in %lld ms", now_ms() - start);
		return false;
	}
	c->found = true;
	snprintf(c->source, sizeof(c->source), "EC2 IMDSv2");
	if (st != 200) {
		free(token);
		/* A service that refuses a session (disabled, or not EC2's) cannot hold this
		 * instance's user-data either: the image's defaults. IMDSv1 is never tried. */
		warn("the instance metadata service refused a session token (HTTP %d)", st);
		snprintf(c->source, sizeof(c->source), "EC2 IMDSv2 (no session token)");
		return true;
	}
	/* A token is printable ASCII; anything else would corrupt the header. */
	while (len > 0 && isspace((unsigned char)token[len - 1]))
		token[--len] = '\0';
	for (size_t i = 0; i < len; i++)
		if (!isgraph((unsigned char)token[i]) || len > 200)
			die(EXIT_INIT_FAILURE, "the instance metadata service sent a malformed token");
	snprintf(header, sizeof(header), "X-aws-ec2-metadata-token: %s", token);
	free(token);

	st = imds_request("GET", "/latest/user-data", header, IMDS_ANSWER_MS, &body, &len, why,
			  sizeof(why));
	if (st == 200 && len > 0) {
		c->userdata = body;
		c->len = len;
	} else if (st == 200 || st == 404) {
		free(body); /* none given to this instance */
	} else {
		/* There may be user-data we cannot read: running with the image's defaults
		 * instead (say, dev settings in production) would be worse than stopping. */
		free(body);
		if (st < 0)
			die(EXIT_INIT_FAILURE, "cannot read the user-data from EC2 IMDSv2: %s", why);
		die(EXIT_INIT_FAILURE, "cannot read the user-data from EC2 IMDSv2: HTTP %d", st);
	}
	st = imds_request("GET", "/latest/meta-data/local-hostname", header, IMDS_ANSWER_MS, &body,
			  &len, why, sizeof(why));
	if (st == 200)
		set_hostname(c, body, "EC2 IMDSv2");
	free(body);
	return true;
}
