/* netguard: an LD_PRELOAD library for passt that enforces a VM's egress policy on the host.
 *
 * Every packet a guest sends out becomes a connect()/sendto()/sendmsg()/sendmmsg() of
 * passt's, so checking the destination of those calls is a filter the guest cannot get
 * around: it runs outside the VM, in the host process that owns the sockets. passt's own
 * --no-map-gw only stops the gateway alias; a guest that hand-crafts a packet to 127.0.0.1
 * still reaches host loopback without this library (measured: tests/e2e/test_network.py).
 *
 * Policy, from the environment variable SM_NETGUARD (read once at load; missing or malformed
 * means deny every IP destination: fail closed):
 *     loopback=0|1;dns=IP,IP;deny=CIDR,CIDR;allow=*|CIDR,CIDR
 *   loopback  whether 127.0.0.0/8, ::1, 0.0.0.0 and :: may be reached
 *   dns       resolver addresses always reachable on port 53 (passt's DNS forwarding)
 *   deny      never reachable (the guest's gateway address, which stands for the host)
 *   allow     "*" for any other destination, or the only IPv4 networks allowed
 * Denied calls fail with EACCES (passt then resets the guest's connection). Non-IP sockets
 * (passt's unix socket, netlink) are never touched.
 *
 * Replies: a datagram passt received (on a published UDP port, say, from a client on host
 * loopback) makes its sender reachable on that address and port, as a stateful firewall
 * would; the table of such peers is small and bounded (oldest entries are reused). TCP needs
 * no such rule: accepted connections are never connect()ed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_NETS 256
#define MAX_DNS 8
#define MAX_PEERS 1024

struct net4 {
	uint32_t addr, mask; /* host byte order */
};

static struct {
	bool ok, loopback, any;
	struct net4 nets[MAX_NETS], deny[MAX_NETS];
	int nnets, ndeny;
	uint32_t dns[MAX_DNS];
	int ndns;
} policy;

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *,
			      socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
static ssize_t (*real_recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
static ssize_t (*real_recvmsg)(int, struct msghdr *, int);
static int (*real_recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);

/* Senders of datagrams received: (address, port), host byte order. passt is single-threaded,
 * so no locking. */
static struct {
	uint32_t ip;
	uint16_t port;
} peers[MAX_PEERS];
static unsigned int npeers, next_peer;

static bool is_peer(uint32_t ip, uint16_t port)
{
	for (unsigned int i = 0; i < npeers; i++)
		if (peers[i].ip == ip && peers[i].port == port)
			return true;
	return false;
}

static void note_peer(const struct sockaddr *sa, socklen_t len)
{
	if (!sa || len < sizeof(struct sockaddr_in) || sa->sa_family != AF_INET)
		return;
	const struct sockaddr_in *s = (const void *)sa;
	uint32_t ip = ntohl(s->sin_addr.s_addr);
	uint16_t port = ntohs(s->sin_port);
	if (is_peer(ip, port))
		return;
	peers[next_peer].ip = ip;
	peers[next_peer].port = port;
	next_peer = (next_peer + 1) % MAX_PEERS;
	if (npeers < MAX_PEERS)
		npeers++;
}

static bool parse_net(char *text, struct net4 *n)
{
	char *slash = strchr(text, '/');
	long bits = 32;
	if (slash) {
		char *end;
		*slash = 0;
		bits = strtol(slash + 1, &end, 10);
		if (*end || bits < 0 || bits > 32)
			return false;
	}
	struct in_addr a;
	if (inet_pton(AF_INET, text, &a) != 1)
		return false;
	n->mask = bits == 0 ? 0 : 0xffffffffu << (32 - bits);
	n->addr = ntohl(a.s_addr) & n->mask;
	return true;
}

/* Parses one "key=value" field; returns false on anything unexpected. */
static bool parse_field(char *field)
{
	char *eq = strchr(field, '=');
	if (!eq)
		return false;
	*eq = 0;
	char *val = eq + 1;
	if (!strcmp(field, "loopback")) {
		if (strcmp(val, "0") && strcmp(val, "1"))
			return false;
		policy.loopback = val[0] == '1';
		return true;
	}
	bool dns = !strcmp(field, "dns"), deny = !strcmp(field, "deny");
	if (!dns && !deny && strcmp(field, "allow"))
		return false;
	if (!dns && !deny && !strcmp(val, "*")) {
		policy.any = true;
		return true;
	}
	char *save = NULL;
	for (char *item = strtok_r(val, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
		if (dns) {
			struct in_addr a;
			if (policy.ndns == MAX_DNS || inet_pton(AF_INET, item, &a) != 1)
				return false;
			policy.dns[policy.ndns++] = ntohl(a.s_addr);
		} else if (deny) {
			if (policy.ndeny == MAX_NETS || !parse_net(item, &policy.deny[policy.ndeny++]))
				return false;
		} else if (policy.nnets == MAX_NETS || !parse_net(item, &policy.nets[policy.nnets++])) {
			return false;
		}
	}
	return true;
}

__attribute__((constructor)) static void netguard_init(void)
{
	real_connect = dlsym(RTLD_NEXT, "connect");
	real_sendto = dlsym(RTLD_NEXT, "sendto");
	real_sendmsg = dlsym(RTLD_NEXT, "sendmsg");
	real_sendmmsg = dlsym(RTLD_NEXT, "sendmmsg");
	real_recvfrom = dlsym(RTLD_NEXT, "recvfrom");
	real_recvmsg = dlsym(RTLD_NEXT, "recvmsg");
	real_recvmmsg = dlsym(RTLD_NEXT, "recvmmsg");
	const char *env = getenv("SM_NETGUARD");
	static char buf[8192];
	if (!env || strlen(env) >= sizeof(buf))
		return;
	strcpy(buf, env);
	char *save = NULL;
	bool ok = true;
	for (char *f = strtok_r(buf, ";", &save); f && ok; f = strtok_r(NULL, ";", &save))
		ok = parse_field(f);
	policy.ok = ok;
	if (!ok) {
		policy.any = false;
		policy.loopback = false;
		policy.nnets = policy.ndns = policy.ndeny = 0;
	}
}

static bool allowed4(uint32_t ip, uint16_t port)
{
	if (!policy.ok)
		return false;
	if (is_peer(ip, port))
		return true;
	for (int i = 0; i < policy.ndns; i++)
		if (ip == policy.dns[i] && port == 53)
			return true;
	if ((ip >> 24) == 127 || ip == 0)
		return policy.loopback;
	for (int i = 0; i < policy.ndeny; i++)
		if ((ip & policy.deny[i].mask) == policy.deny[i].addr)
			return false;
	if (policy.any)
		return true;
	for (int i = 0; i < policy.nnets; i++)
		if ((ip & policy.nets[i].mask) == policy.nets[i].addr)
			return true;
	return false;
}

/* true: the call may go ahead. NULL or non-IP addresses are not ours to judge (a connected
 * socket's destination was checked when it was connected). */
static bool allowed(const struct sockaddr *sa, socklen_t len)
{
	if (!sa)
		return true;
	if (sa->sa_family == AF_INET) {
		if (len < sizeof(struct sockaddr_in))
			return false;
		const struct sockaddr_in *s = (const void *)sa;
		return allowed4(ntohl(s->sin_addr.s_addr), ntohs(s->sin_port));
	}
	if (sa->sa_family == AF_INET6) {
		if (len < sizeof(struct sockaddr_in6))
			return false;
		const struct sockaddr_in6 *s = (const void *)sa;
		const uint8_t *b = s->sin6_addr.s6_addr;
		static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
		if (!memcmp(b, mapped, 12)) {
			uint32_t ip = (uint32_t)b[12] << 24 | b[13] << 16 | b[14] << 8 | b[15];
			return allowed4(ip, ntohs(s->sin6_port));
		}
		/* The guest has no IPv6 (passt runs --ipv4-only); refuse rather than judge. */
		return false;
	}
	return true;
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *sa, socklen_t *len)
{
	ssize_t r = real_recvfrom(fd, buf, n, flags, sa, len);
	if (r >= 0 && sa && len)
		note_peer(sa, *len);
	return r;
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
	ssize_t r = real_recvmsg(fd, msg, flags);
	if (r >= 0 && msg)
		note_peer(msg->msg_name, msg->msg_namelen);
	return r;
}

int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *timeout)
{
	int r = real_recvmmsg(fd, v, n, flags, timeout);
	for (int i = 0; i < r; i++)
		note_peer(v[i].msg_hdr.msg_name, v[i].msg_hdr.msg_namelen);
	return r;
}

int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	if (!allowed(sa, len)) {
		errno = EACCES;
		return -1;
	}
	return real_connect(fd, sa, len);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa,
	       socklen_t len)
{
	if (!allowed(sa, len)) {
		errno = EACCES;
		return -1;
	}
	return real_sendto(fd, buf, n, flags, sa, len);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	if (msg && !allowed(msg->msg_name, msg->msg_namelen)) {
		errno = EACCES;
		return -1;
	}
	return real_sendmsg(fd, msg, flags);
}

/* A batch with a denied datagram in it goes out one by one, the denied ones dropped (and
 * reported sent, as a firewall would drop them silently). */
int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
	bool all = true;
	for (unsigned int i = 0; i < n && all; i++)
		all = allowed(v[i].msg_hdr.msg_name, v[i].msg_hdr.msg_namelen);
	if (all)
		return real_sendmmsg(fd, v, n, flags);
	unsigned int done = 0;
	for (; done < n; done++) {
		struct msghdr *m = &v[done].msg_hdr;
		if (!allowed(m->msg_name, m->msg_namelen)) {
			size_t total = 0;
			for (size_t j = 0; j < m->msg_iovlen; j++)
				total += m->msg_iov[j].iov_len;
			v[done].msg_len = (unsigned int)total;
			continue;
		}
		ssize_t r = real_sendmsg(fd, m, flags);
		if (r < 0)
			return done ? (int)done : -1;
		v[done].msg_len = (unsigned int)r;
	}
	return (int)done;
}
