/*
 * Networking: loopback, and eth0 configured by a minimal DHCP client.
 *
 * The client speaks just enough DHCP (RFC 2131) for QEMU user networking and cloud DHCP
 * servers: DISCOVER, OFFER, REQUEST, ACK over an AF_PACKET socket (the interface has no
 * address yet, so a UDP socket could not receive the unicast or broadcast replies reliably).
 * The lease is never renewed: the address stays configured for the life of the VM, which is
 * what QEMU's slirp and short-lived VMs need.
 */
#define _GNU_SOURCE
#include "init.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define DHCP_TOTAL_MS 3000 /* give up after this: the app still runs, without network */
#define DHCP_RETRY_MS 800  /* resend a request not answered within this */
/* How long a NIC may take to report its link up after IFF_UP: virtio-net is up at once, an
 * emulated e1000 (the cloud machine's) or a cloud's ENA only after its link watchdog ran, and
 * what is sent before that is lost. */
#define CARRIER_WAIT_MS 3000

#define DHCP_SERVER_PORT 67
#define DHCP_CLIENT_PORT 68
#define DHCP_MAGIC 0x63825363u

enum { DHCPDISCOVER = 1, DHCPOFFER = 2, DHCPREQUEST = 3, DHCPACK = 5, DHCPNAK = 6 };
enum {
	OPT_PAD = 0,
	OPT_SUBNET = 1,
	OPT_ROUTER = 3,
	OPT_DNS = 6,
	OPT_MTU = 26,
	OPT_REQUESTED_IP = 50,
	OPT_MSG_TYPE = 53,
	OPT_SERVER_ID = 54,
	OPT_PARAM_LIST = 55,
	OPT_END = 255,
};

/* A BOOTP/DHCP message (RFC 2131 figure 1), options sized for the 576-byte minimum. */
struct dhcp_msg {
	uint8_t op, htype, hlen, hops;
	uint32_t xid;
	uint16_t secs, flags;
	uint32_t ciaddr, yiaddr, siaddr, giaddr;
	uint8_t chaddr[16];
	uint8_t sname[64];
	uint8_t file[128];
	uint32_t magic;
	uint8_t options[312];
} __attribute__((packed));

struct dhcp_packet {
	struct iphdr ip;
	struct udphdr udp;
	struct dhcp_msg dhcp;
} __attribute__((packed));

/* What an OFFER or ACK told us. All addresses in network byte order. */
struct lease {
	uint32_t addr, mask, router, server;
	uint32_t dns[3];
	int ndns;
	int mtu;
};

/* Set or clear IFF_UP on an interface. Returns 0 or -errno. */
static int if_up(int sock, const char *name)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
		return -errno;
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0)
		return -errno;
	return 0;
}

/* Waits until `name` has its link (IFF_RUNNING), CARRIER_WAIT_MS at most. Returns whether
 * it has. */
static bool wait_carrier(int sock, const char *name)
{
	long long deadline = now_ms() + CARRIER_WAIT_MS;
	for (;;) {
		struct ifreq ifr;
		memset(&ifr, 0, sizeof(ifr));
		snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
		if (ioctl(sock, SIOCGIFFLAGS, &ifr) == 0 && (ifr.ifr_flags & IFF_RUNNING))
			return true;
		if (now_ms() >= deadline)
			return false;
		sleep_ms(5);
	}
}

static uint16_t ip_checksum(const void *data, size_t len)
{
	const uint8_t *p = data;
	uint32_t sum = 0;
	for (size_t i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		sum += (uint32_t)(p[len - 1] << 8);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

/* Build and broadcast a DISCOVER (lease == NULL) or a REQUEST for `lease`. */
static int dhcp_send(int sock, int ifindex, const uint8_t mac[6], uint32_t xid, uint16_t secs,
		     const struct lease *lease)
{
	struct dhcp_packet pkt;
	memset(&pkt, 0, sizeof(pkt));
	struct dhcp_msg *m = &pkt.dhcp;
	m->op = 1; /* BOOTREQUEST */
	m->htype = 1; /* Ethernet */
	m->hlen = 6;
	m->xid = xid;
	m->secs = htons(secs);
	/* Broadcast flag: we cannot receive unicast IP before the address is configured. */
	m->flags = htons(0x8000);
	memcpy(m->chaddr, mac, 6);
	m->magic = htonl(DHCP_MAGIC);

	uint8_t *o = m->options;
	*o++ = OPT_MSG_TYPE;
	*o++ = 1;
	*o++ = lease ? DHCPREQUEST : DHCPDISCOVER;
	if (lease) {
		*o++ = OPT_REQUESTED_IP;
		*o++ = 4;
		memcpy(o, &lease->addr, 4);
		o += 4;
		*o++ = OPT_SERVER_ID;
		*o++ = 4;
		memcpy(o, &lease->server, 4);
		o += 4;
	}
	*o++ = OPT_PARAM_LIST;
	*o++ = 4;
	*o++ = OPT_SUBNET;
	*o++ = OPT_ROUTER;
	*o++ = OPT_DNS;
	*o++ = OPT_MTU;
	*o++ = OPT_END;

	/* Send the whole options area: some servers drop messages under the BOOTP size. */
	size_t udp_len = sizeof(struct udphdr) + sizeof(struct dhcp_msg);
	pkt.udp.source = htons(DHCP_CLIENT_PORT);
	pkt.udp.dest = htons(DHCP_SERVER_PORT);
	pkt.udp.len = htons((uint16_t)udp_len);
	pkt.udp.check = 0; /* optional over IPv4 */
	pkt.ip.version = 4;
	pkt.ip.ihl = sizeof(struct iphdr) / 4;
	pkt.ip.tot_len = htons((uint16_t)sizeof(pkt));
	pkt.ip.ttl = 64;
	pkt.ip.protocol = IPPROTO_UDP;
	pkt.ip.saddr = htonl(INADDR_ANY);
	pkt.ip.daddr = htonl(INADDR_BROADCAST);
	pkt.ip.check = ip_checksum(&pkt.ip, sizeof(pkt.ip));

	struct sockaddr_ll to;
	memset(&to, 0, sizeof(to));
	to.sll_family = AF_PACKET;
	to.sll_protocol = htons(ETH_P_IP);
	to.sll_ifindex = ifindex;
	to.sll_halen = 6;
	memset(to.sll_addr, 0xff, 6);
	if (sendto(sock, &pkt, sizeof(pkt), 0, (struct sockaddr *)&to, sizeof(to)) < 0)
		return -errno;
	return 0;
}

/* Parse a received IP packet. Returns the DHCP message type of a reply to us, or 0. */
static int dhcp_parse(const uint8_t *buf, size_t len, uint32_t xid, struct lease *l)
{
	if (len < sizeof(struct iphdr))
		return 0;
	const struct iphdr *ip = (const void *)buf;
	size_t ihl = (size_t)ip->ihl * 4;
	if (ip->version != 4 || ip->protocol != IPPROTO_UDP || ihl < sizeof(struct iphdr) ||
	    len < ihl + sizeof(struct udphdr))
		return 0;
	const struct udphdr *udp = (const void *)(buf + ihl);
	if (ntohs(udp->dest) != DHCP_CLIENT_PORT)
		return 0;
	const uint8_t *d = buf + ihl + sizeof(struct udphdr);
	size_t dlen = len - ihl - sizeof(struct udphdr);
	size_t fixed = offsetof(struct dhcp_msg, options);
	if (dlen < fixed)
		return 0;
	struct dhcp_msg m;
	memset(&m, 0, sizeof(m));
	memcpy(&m, d, dlen < sizeof(m) ? dlen : sizeof(m));
	if (m.op != 2 || m.xid != xid || ntohl(m.magic) != DHCP_MAGIC)
		return 0;

	memset(l, 0, sizeof(*l));
	l->addr = m.yiaddr;
	int type = 0;
	const uint8_t *o = d + fixed, *end = d + dlen;
	while (o < end && *o != OPT_END) {
		if (*o == OPT_PAD) {
			o++;
			continue;
		}
		if (o + 2 > end || o + 2 + o[1] > end)
			break; /* truncated option: use what we have */
		uint8_t code = o[0], olen = o[1];
		const uint8_t *v = o + 2;
		switch (code) {
		case OPT_MSG_TYPE:
			if (olen >= 1)
				type = v[0];
			break;
		case OPT_SUBNET:
			if (olen >= 4)
				memcpy(&l->mask, v, 4);
			break;
		case OPT_ROUTER:
			if (olen >= 4)
				memcpy(&l->router, v, 4);
			break;
		case OPT_SERVER_ID:
			if (olen >= 4)
				memcpy(&l->server, v, 4);
			break;
		case OPT_DNS:
			for (int i = 0; i + 4 <= olen && l->ndns < 3; i += 4)
				memcpy(&l->dns[l->ndns++], v + i, 4);
			break;
		case OPT_MTU:
			if (olen >= 2)
				l->mtu = v[0] << 8 | v[1];
			break;
		default:
			break;
		}
		o += 2 + olen;
	}
	return type;
}

/* Wait until `deadline` for a reply of type `want` (or a NAK). Returns the type or 0. */
static int dhcp_wait(int sock, uint32_t xid, long long deadline, int want, struct lease *l)
{
	uint8_t buf[2048];
	for (;;) {
		long long left = deadline - now_ms();
		if (left <= 0)
			return 0;
		struct pollfd pfd = {.fd = sock, .events = POLLIN};
		int r = poll(&pfd, 1, (int)left);
		if (r < 0 && errno != EINTR)
			return 0;
		if (r <= 0)
			continue;
		ssize_t n = recv(sock, buf, sizeof(buf), MSG_DONTWAIT);
		if (n <= 0)
			continue;
		struct lease got = {0};
		int type = dhcp_parse(buf, (size_t)n, xid, &got);
		if (type == DHCPNAK)
			return DHCPNAK;
		if (type == want && got.addr != 0) {
			*l = got;
			return type;
		}
	}
}

/* Run DISCOVER/OFFER/REQUEST/ACK on the interface. Returns 1 with the lease in `l`, 0 when
 * no server answered in time, -1 on a local error (already reported). */
static int dhcp(const char *ifname, int ifindex, const uint8_t mac[6], struct lease *l)
{
	int sock = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, htons(ETH_P_IP));
	if (sock < 0) {
		warn("no network: cannot open a packet socket for DHCP on %s: %s", ifname,
		     strerror(errno));
		return -1;
	}
	struct sockaddr_ll addr;
	memset(&addr, 0, sizeof(addr));
	addr.sll_family = AF_PACKET;
	addr.sll_protocol = htons(ETH_P_IP);
	addr.sll_ifindex = ifindex;
	if (bind(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		warn("no network: cannot bind the DHCP socket to %s: %s", ifname, strerror(errno));
		close(sock);
		return -1;
	}

	/* The transaction id only has to be unlikely to collide with other clients. */
	uint32_t xid;
	if (getrandom(&xid, sizeof(xid), GRND_NONBLOCK) != sizeof(xid))
		xid = (uint32_t)now_ms() ^ (uint32_t)(mac[2] << 24 | mac[3] << 16 | mac[4] << 8 | mac[5]);

	long long start = now_ms(), deadline = start + DHCP_TOTAL_MS;
	bool ok = false;
	struct lease offer;
	while (!ok && now_ms() < deadline) {
		uint16_t secs = (uint16_t)((now_ms() - start) / 1000);
		long long retry = now_ms() + DHCP_RETRY_MS;
		if (retry > deadline)
			retry = deadline;
		if (dhcp_send(sock, ifindex, mac, xid, secs, NULL) < 0 ||
		    dhcp_wait(sock, xid, retry, DHCPOFFER, &offer) != DHCPOFFER)
			continue;
		debug("DHCP offer of %s", inet_ntoa((struct in_addr){offer.addr}));
		/* REQUEST the offer, resending until acknowledged or out of time. */
		while (now_ms() < deadline) {
			retry = now_ms() + DHCP_RETRY_MS;
			if (retry > deadline)
				retry = deadline;
			secs = (uint16_t)((now_ms() - start) / 1000);
			if (dhcp_send(sock, ifindex, mac, xid, secs, &offer) < 0)
				continue;
			int type = dhcp_wait(sock, xid, retry, DHCPACK, l);
			if (type == DHCPACK) {
				/* Some servers leave options out of the ACK they put in the OFFER. */
				if (!l->mask)
					l->mask = offer.mask;
				if (!l->router)
					l->router = offer.router;
				if (!l->ndns) {
					l->ndns = offer.ndns;
					memcpy(l->dns, offer.dns, sizeof(l->dns));
				}
				ok = true;
				break;
			}
			if (type == DHCPNAK)
				break; /* start over with a DISCOVER */
		}
	}
	close(sock);
	return ok ? 1 : 0;
}

static void set_addr_ioctl(int sock, const char *ifname, unsigned long req, uint32_t a,
			   const char *what)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = a;
	if (ioctl(sock, req, &ifr) < 0)
		warn("cannot set the %s of %s: %s", what, ifname, strerror(errno));
}

/* Configure the leased address, mask and default route on the interface. */
static void apply_lease(int sock, const char *ifname, struct lease *l)
{
	if (!l->mask) /* no subnet option: assume the common /24 */
		l->mask = htonl(0xffffff00u);
	set_addr_ioctl(sock, ifname, SIOCSIFADDR, l->addr, "address");
	set_addr_ioctl(sock, ifname, SIOCSIFNETMASK, l->mask, "netmask");
	set_addr_ioctl(sock, ifname, SIOCSIFBRDADDR, l->addr | ~l->mask, "broadcast address");
	if (l->mtu >= 576) {
		struct ifreq ifr;
		memset(&ifr, 0, sizeof(ifr));
		snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
		ifr.ifr_mtu = l->mtu;
		/* EINVAL: more than the NIC takes (passt offers 65520, an e1000 takes 16110): it
		 * keeps its own, smaller MTU, which is always safe. */
		if (ioctl(sock, SIOCSIFMTU, &ifr) < 0) {
			if (errno == EINVAL)
				debug("%s keeps its MTU: it does not take %d", ifname, l->mtu);
			else
				warn("cannot set the MTU of %s to %d: %s", ifname, l->mtu,
				     strerror(errno));
		}
	}
	if (l->router) {
		struct rtentry rt;
		memset(&rt, 0, sizeof(rt));
		struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst;
		struct sockaddr_in *gw = (struct sockaddr_in *)&rt.rt_gateway;
		struct sockaddr_in *mask = (struct sockaddr_in *)&rt.rt_genmask;
		dst->sin_family = gw->sin_family = mask->sin_family = AF_INET;
		gw->sin_addr.s_addr = l->router;
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = (char *)ifname;
		if (ioctl(sock, SIOCADDRT, &rt) < 0)
			warn("cannot add the default route via %s: %s",
			     inet_ntoa((struct in_addr){l->router}), strerror(errno));
	}
}

/* The lease eth0 got in net_up, for net_write_hosts. */
static struct lease current;
static bool have_lease;

/* /run/hosts (/etc/hosts links there): localhost, and our name on our address. */
void net_write_hosts(const char *hostname, const char *fqdn)
{
	char buf[512];
	/* Without a lease, give the name a loopback address so lookups of it still work. */
	const char *addr = have_lease ? inet_ntoa((struct in_addr){current.addr}) : "127.0.1.1";
	int n = fqdn && strcmp(fqdn, hostname) != 0
			? snprintf(buf, sizeof(buf), "127.0.0.1 localhost\n::1 localhost\n%s %s %s\n",
				   addr, fqdn, hostname)
			: snprintf(buf, sizeof(buf), "127.0.0.1 localhost\n::1 localhost\n%s %s\n",
				   addr, hostname);
	if (n < 0 || (size_t)n >= sizeof(buf))
		return;
	int r = write_file("/run/hosts", buf, (size_t)n, 0644);
	if (r < 0)
		warn("cannot write /run/hosts: %s", strerror(-r));
}

static void write_resolv(const struct lease *l)
{
	if (l->ndns == 0)
		return;
	char buf[256];
	size_t n = 0;
	for (int i = 0; i < l->ndns; i++)
		n += (size_t)snprintf(buf + n, sizeof(buf) - n, "nameserver %s\n",
				      inet_ntoa((struct in_addr){l->dns[i]}));
	int r = write_file("/run/resolv.conf", buf, n, 0644);
	if (r < 0)
		warn("cannot write /run/resolv.conf: %s", strerror(-r));
}

bool net_up(void)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		warn("no network: cannot open a socket: %s", strerror(errno));
		return false;
	}
	int r = if_up(sock, "lo");
	if (r < 0)
		warn("cannot bring up lo: %s", strerror(-r));

	const char *ifname = "eth0";
	int ifindex = (int)if_nametoindex(ifname);
	if (ifindex == 0) {
		/* No network device given to the VM: nothing to configure, nothing to say. */
		close(sock);
		return false;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	uint8_t mac[6] = {0};
	if (ioctl(sock, SIOCGIFHWADDR, &ifr) == 0)
		memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);

	r = if_up(sock, ifname);
	if (r < 0) {
		warn("no network: cannot bring up %s: %s", ifname, strerror(-r));
	} else {
		if (!wait_carrier(sock, ifname))
			debug("%s has no link after %d ms; trying DHCP anyway", ifname,
			      CARRIER_WAIT_MS);
		r = dhcp(ifname, ifindex, mac, &current);
		have_lease = r == 1;
		if (r == 0)
			warn("no network: no DHCP answer on %s within %d s; continuing without an "
			     "address",
			     ifname, DHCP_TOTAL_MS / 1000);
	}
	if (have_lease) {
		apply_lease(sock, ifname, &current);
		write_resolv(&current);
		debug("%s is %s", ifname, inet_ntoa((struct in_addr){current.addr}));
	}
	close(sock);
	return have_lease;
}
