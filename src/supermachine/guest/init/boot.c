/* VM mode boot: from the initramfs to the image's root filesystem.
 *
 * Kernel command line options read from /proc/cmdline:
 *   sm.debug=1            log boot steps and agent events to /dev/console
 *   sm.root=PATH          root block device (default /dev/vda)
 *   sm.rootfstype=TYPE    its filesystem (default squashfs; erofs works the same way)
 *   sm.port=NAME          virtio-serial port name of the agent channel (default sm.agent)
 *   sm.net=ADDR/PREFIX,GW,DNS[,MTU]  configure eth0 statically (no DHCP client needed)
 *                         and write /etc/resolv.conf; absent: eth0 is left alone (none mode
 *                         has no NIC at all)
 *
 * Layout: the image is mounted read-only on /mnt/lower, a tmpfs on /mnt/rw holds the overlay's
 * upper and work dirs, the overlay is assembled on /mnt/root and moved over / (pivot_root
 * does not work from an initramfs, which cannot be unmounted). Any failure prints one line
 * "sm-init: fatal: ..." on the console and powers off: a VM that cannot boot must end, not
 * hang or panic-loop. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "sm.h"

#define DEVICE_WAIT_MS 5000
#define MODULE_INIT_COMPRESSED_FILE 4 /* finit_module flag (Linux 5.17+) */
#define NEWROOT "/mnt/root"

struct cmdline {
	bool debug;
	char root[128];
	char fstype[32];
	char port[64];
	char net[96];
};

void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	reboot(RB_HALT_SYSTEM);
	_exit(1); /* only reached when not PID 1 */
}

static void __attribute__((noreturn, format(printf, 1, 2))) fatal(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	dprintf(2, "sm-init: fatal: %s\n", line);
	power_off();
}

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void opt(const char *tok, const char *key, char *dst, size_t size)
{
	size_t k = strlen(key);
	if (strncmp(tok, key, k) == 0 && strlen(tok + k) < size && tok[k])
		strcpy(dst, tok + k);
}

static void parse_cmdline(struct cmdline *c)
{
	strcpy(c->root, "/dev/vda");
	strcpy(c->fstype, "squashfs");
	strcpy(c->port, "sm.agent");
	char buf[4096];
	if (read_small("/proc/cmdline", buf, sizeof(buf)) < 0)
		return;
	for (char *tok = strtok(buf, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
		if (strcmp(tok, "sm.debug=1") == 0)
			c->debug = true;
		opt(tok, "sm.root=", c->root, sizeof(c->root));
		opt(tok, "sm.rootfstype=", c->fstype, sizeof(c->fstype));
		opt(tok, "sm.port=", c->port, sizeof(c->port));
		opt(tok, "sm.net=", c->net, sizeof(c->net));
	}
}

/* Kernel modules listed in /sm/modules, one path per line, already in dependency order. */
static void load_modules(bool debug)
{
	static char list[64 * 1024];
	if (read_small("/sm/modules", list, sizeof(list)) < 0)
		return; /* a kernel with everything built in needs none */
	for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
		while (*line == ' ' || *line == '\t')
			line++;
		size_t n = strlen(line);
		while (n && (line[n - 1] == ' ' || line[n - 1] == '\r' || line[n - 1] == '\t'))
			line[--n] = 0;
		if (!n || line[0] == '#')
			continue;
		char path[512];
		snprintf(path, sizeof(path), "%s%s", line[0] == '/' ? "" : "/", line);
		int flags = 0;
		const char *dot = strrchr(path, '.');
		if (dot && (!strcmp(dot, ".xz") || !strcmp(dot, ".zst") || !strcmp(dot, ".gz")))
			flags = MODULE_INIT_COMPRESSED_FILE;
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", flags) < 0 && errno != EEXIST))
			dprintf(2, "sm-init: module %s: %s\n", path, strerror(errno));
		else
			sm_log(debug, "loaded %s", path);
		if (fd >= 0)
			close(fd);
	}
}

/* Finds the /dev node name (vportNpM) of the virtio-serial port called name. */
static bool find_port(const char *name, char *dev, size_t size)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return false;
	bool found = false;
	struct dirent *e;
	while (!found && (e = readdir(d))) {
		if (e->d_name[0] == '.' || strlen(e->d_name) > 64)
			continue;
		char path[128], got[128];
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%.64s/name", e->d_name);
		ssize_t n = read_small(path, got, sizeof(got));
		if (n <= 0)
			continue;
		if (got[n - 1] == '\n')
			got[n - 1] = 0;
		if (strcmp(got, name) != 0)
			continue;
		snprintf(dev, size, "/dev/%.64s", e->d_name);
		found = access(dev, F_OK) == 0; /* devtmpfs creates the node a moment later */
	}
	closedir(d);
	return found;
}

/* Waits (bounded) for the root disk and the agent port to show up. */
static void wait_devices(const struct cmdline *c, char *port, size_t size)
{
	int64_t deadline = mono_ms() + DEVICE_WAIT_MS;
	bool root = false, have_port = false;
	for (;;) {
		root = root || access(c->root, F_OK) == 0;
		have_port = have_port || find_port(c->port, port, size);
		if (root && have_port)
			return;
		if (mono_ms() > deadline)
			break;
		struct timespec ts = {0, 2 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	if (!root)
		fatal("root device %s did not appear within %d s (disk attached? virtio_blk loaded?)",
		      c->root, DEVICE_WAIT_MS / 1000);
	fatal("virtio-serial port %s did not appear within %d s (virtserialport attached?)",
	      c->port, DEVICE_WAIT_MS / 1000);
}

static void mkdir_or_fatal(const char *path, mode_t mode)
{
	if (mkdir(path, mode) < 0 && errno != EEXIST)
		fatal("mkdir %s: %s", path, strerror(errno));
}

static void mount_or_fatal(const char *src, const char *dst, const char *type,
			   unsigned long flags, const char *data)
{
	if (mount(src, dst, type, flags, data) < 0)
		fatal("mount %s on %s (%s): %s", src, dst, type ? type : "move", strerror(errno));
}

/* Mounts inside the new root, created if the image lacks them (the overlay is writable). */
static void populate_newroot(void)
{
	static const char *const moved[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < 3; i++) {
		char dst[64];
		snprintf(dst, sizeof(dst), NEWROOT "%s", moved[i]);
		mkdir_or_fatal(dst, 0755);
		mount_or_fatal(moved[i], dst, NULL, MS_MOVE, NULL);
	}
	mkdir_or_fatal(NEWROOT "/dev/pts", 0755);
	mount_or_fatal("devpts", NEWROOT "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		       "newinstance,ptmxmode=0666,mode=0620,gid=5");
	/* /dev/ptmx must reach this devpts instance, as in docker. */
	unlink(NEWROOT "/dev/ptmx");
	if (symlink("pts/ptmx", NEWROOT "/dev/ptmx") < 0)
		fatal("symlink /dev/ptmx: %s", strerror(errno));
	mkdir_or_fatal(NEWROOT "/dev/shm", 01777);
	mount_or_fatal("shm", NEWROOT "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	/* What docker mounts too: POSIX message queues, and cgroup v2 (read-write: the VM is the
	 * container's whole machine, and systemd-based images manage their own cgroups). A kernel
	 * without them still boots; the workload then sees what it would see on such a host. */
	static const char *const optional[][3] = {{"mqueue", "/dev/mqueue", "mqueue"},
						  {"cgroup2", "/sys/fs/cgroup", "cgroup2"}};
	for (size_t i = 0; i < 2; i++) {
		char dst[64];
		snprintf(dst, sizeof(dst), NEWROOT "%s", optional[i][1]);
		if ((mkdir(dst, 0755) < 0 && errno != EEXIST) ||
		    mount(optional[i][0], dst, optional[i][2], MS_NOSUID | MS_NODEV | MS_NOEXEC,
			  NULL) < 0)
			dprintf(2, "sm-init: mount %s: %s\n", optional[i][1], strerror(errno));
	}
	/* Conveniences every container runtime provides; failures are harmless. */
	static const char *const links[][2] = {{"/proc/self/fd", "fd"},
					       {"/proc/self/fd/0", "stdin"},
					       {"/proc/self/fd/1", "stdout"},
					       {"/proc/self/fd/2", "stderr"}};
	for (size_t i = 0; i < 4; i++) {
		char dst[64];
		snprintf(dst, sizeof(dst), NEWROOT "/dev/%s", links[i][1]);
		if (symlink(links[i][0], dst) < 0 && errno != EEXIST)
			dprintf(2, "sm-init: symlink %s: %s\n", dst, strerror(errno));
	}
}

static void loopback_up(bool debug)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	/* The kernel assigns 127.0.0.1/8 and ::1 to lo by itself once it is up. */
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
		sm_log(debug, "lo up: %s", strerror(errno));
	if (s >= 0)
		close(s);
}

static int set_addr(int s, unsigned long req, const char *ifname, struct in_addr a)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr = a};
	memcpy(&ifr.ifr_addr, &sin, sizeof(sin));
	return ioctl(s, req, &ifr);
}

/* Parses "ADDR/PREFIX,GW,DNS[,MTU]" (all IPv4; MTU 0 when absent). */
static bool parse_net(const char *spec, struct in_addr *addr, int *prefix, struct in_addr *gw,
		      struct in_addr *dns, int *mtu)
{
	char buf[96];
	snprintf(buf, sizeof(buf), "%s", spec);
	char *slash = strchr(buf, '/'), *c1 = strchr(buf, ','), *c2 = c1 ? strchr(c1 + 1, ',') : 0;
	if (!slash || !c1 || !c2 || slash > c1)
		return false;
	char *c3 = strchr(c2 + 1, ',');
	*slash = *c1 = *c2 = 0;
	char *end;
	*mtu = 0;
	if (c3) {
		*c3 = 0;
		long m = strtol(c3 + 1, &end, 10);
		if (*end || m < 68 || m > 65535)
			return false;
		*mtu = (int)m;
	}
	long p = strtol(slash + 1, &end, 10);
	if (*end || p < 1 || p > 32)
		return false;
	*prefix = (int)p;
	return inet_pton(AF_INET, buf, addr) == 1 && inet_pton(AF_INET, c1 + 1, gw) == 1 &&
	       inet_pton(AF_INET, c2 + 1, dns) == 1;
}

/* resolv.conf like docker's: always ours, replacing the image's file (or dangling link). */
static void write_resolv(struct in_addr dns, bool debug)
{
	char ip[INET_ADDRSTRLEN], text[64];
	inet_ntop(AF_INET, &dns, ip, sizeof(ip));
	int n = snprintf(text, sizeof(text), "nameserver %s\n", ip);
	mkdir("/etc", 0755);
	unlink("/etc/resolv.conf");
	int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
		      0644);
	if (fd < 0 || write(fd, text, (size_t)n) != n)
		dprintf(2, "sm-init: write /etc/resolv.conf: %s\n", strerror(errno));
	if (fd >= 0)
		close(fd);
	sm_log(debug, "resolv.conf: nameserver %s", ip);
}

/* eth0 with this address, MTU (0: as it is) and default route, and with `mac` (NULL: as it
 * is) taken while it is down; returns the step that failed, or NULL. */
static const char *eth0_setup(struct in_addr addr, int prefix, struct in_addr gw, int mtu,
			      const unsigned char *mac)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct in_addr mask = {htonl(prefix == 32 ? 0xffffffffu : ~(0xffffffffu >> prefix))};
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "eth0");
	const char *step = "socket";
	if (s < 0)
		goto fail;
	if (mac) {
		/* Down first: that also drops the routes through the old address. */
		step = "down";
		if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
		    (ifr.ifr_flags &= ~IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
			goto fail;
		step = "mac";
		ifr.ifr_hwaddr.sa_family = 1; /* ARPHRD_ETHER */
		memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
		if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0)
			goto fail;
	}
	step = "address";
	if (set_addr(s, SIOCSIFADDR, "eth0", addr) < 0)
		goto fail;
	step = "netmask";
	if (set_addr(s, SIOCSIFNETMASK, "eth0", mask) < 0)
		goto fail;
	step = "mtu";
	ifr.ifr_mtu = mtu;
	if (mtu && ioctl(s, SIOCSIFMTU, &ifr) < 0)
		goto fail;
	step = "up";
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0 || (ifr.ifr_flags |= IFF_UP | IFF_RUNNING,
						  ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
		goto fail;
	struct rtentry rt;
	memset(&rt, 0, sizeof(rt));
	struct sockaddr_in any = {.sin_family = AF_INET}, via = {.sin_family = AF_INET, .sin_addr = gw};
	memcpy(&rt.rt_dst, &any, sizeof(any));
	memcpy(&rt.rt_genmask, &any, sizeof(any));
	memcpy(&rt.rt_gateway, &via, sizeof(via));
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = "eth0";
	step = "default route";
	if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
		goto fail;
	close(s);
	return NULL;
fail:;
	int err = errno;
	if (s >= 0)
		close(s);
	errno = err;
	return step;
}

/* Static eth0 setup from sm.net=; failures are reported, not fatal: the VM still runs. */
static void network_up(const char *spec, bool debug)
{
	struct in_addr addr, gw, dns;
	int prefix, mtu;
	if (!parse_net(spec, &addr, &prefix, &gw, &dns, &mtu)) {
		dprintf(2, "sm-init: bad sm.net=%s (want ADDR/PREFIX,GW,DNS[,MTU])\n", spec);
		return;
	}
	/* virtio_net was loaded with the other modules; its interface shows up shortly after. */
	int64_t deadline = mono_ms() + DEVICE_WAIT_MS;
	while (if_nametoindex("eth0") == 0 && mono_ms() < deadline) {
		struct timespec ts = {0, 2 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	const char *failed = eth0_setup(addr, prefix, gw, mtu, NULL);
	if (failed) {
		dprintf(2, "sm-init: eth0 %s: %s\n", failed, strerror(errno));
		return;
	}
	write_resolv(dns, debug);
	sm_log(debug, "eth0 %s/%d", spec, prefix);
}

/* HELLO's NETWORK field: "ADDR/PREFIX,GW,MTU,MAC". Returns 0, or -1 with errno (EINVAL for
 * a malformed field) and *step naming what failed. */
int network_reconfigure(const char *spec, const char **step)
{
	char buf[128], dns_part[] = "0.0.0.0";
	unsigned m[6];
	snprintf(buf, sizeof(buf), "%s", spec);
	char *last = strrchr(buf, ',');
	*step = "parse";
	if (!last || sscanf(last + 1, "%2x:%2x:%2x:%2x:%2x:%2x", &m[0], &m[1], &m[2], &m[3], &m[4],
			    &m[5]) != 6 || strlen(last + 1) != 17) {
		errno = EINVAL;
		return -1;
	}
	*last = 0;
	/* parse_net wants ADDR/PREFIX,GW,DNS[,MTU]: put a DNS in the middle */
	char *comma = strchr(buf, ','), *mtu = comma ? strchr(comma + 1, ',') : NULL;
	char full[160];
	if (!comma || !mtu) {
		errno = EINVAL;
		return -1;
	}
	*mtu++ = 0;
	snprintf(full, sizeof(full), "%s,%s,%s", buf, dns_part, mtu);
	struct in_addr addr, gw, dns;
	int prefix, mtu_v;
	if (!parse_net(full, &addr, &prefix, &gw, &dns, &mtu_v)) {
		errno = EINVAL;
		return -1;
	}
	unsigned char mac[6];
	for (int i = 0; i < 6; i++)
		mac[i] = (unsigned char)m[i];
	const char *failed = eth0_setup(addr, prefix, gw, mtu_v, mac);
	if (failed) {
		*step = failed;
		return -1;
	}
	return 0;
}

/* Makes sure fds 0-2 exist, so later pipes never land on them. */
static void std_fds(void)
{
	int con = open("/dev/console", O_RDWR | O_NOCTTY);
	if (con < 0)
		con = open("/dev/null", O_RDWR);
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0 && con >= 0)
			dup2(con, fd);
	if (con > 2)
		close(con);
}

int boot_vm(bool *debug)
{
	mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY)
		dprintf(2, "sm-init: mount /dev: %s\n", strerror(errno));
	std_fds();
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mount_or_fatal("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_fatal("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);

	struct cmdline c = {0};
	parse_cmdline(&c);
	*debug = c.debug;
	sm_log(c.debug, "root %s (%s), port %s", c.root, c.fstype, c.port);
	load_modules(c.debug);
	char port[128];
	wait_devices(&c, port, sizeof(port));

	mkdir_or_fatal("/mnt", 0755);
	mkdir_or_fatal("/mnt/lower", 0755);
	mkdir_or_fatal("/mnt/rw", 0755);
	mkdir_or_fatal(NEWROOT, 0755);
	mount_or_fatal(c.root, "/mnt/lower", c.fstype, MS_RDONLY, NULL);
	mount_or_fatal("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755");
	mkdir_or_fatal("/mnt/rw/upper", 0755);
	mkdir_or_fatal("/mnt/rw/work", 0755);
	mount_or_fatal("overlay", NEWROOT, "overlay", 0,
		       "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work");
	populate_newroot();

	if (chdir(NEWROOT) < 0)
		fatal("chdir %s: %s", NEWROOT, strerror(errno));
	mount_or_fatal(".", "/", NULL, MS_MOVE, NULL);
	if (chroot(".") < 0 || chdir("/") < 0)
		fatal("chroot: %s", strerror(errno));
	sm_log(c.debug, "switched to the image root");

	if (sethostname("localhost", 9) < 0)
		sm_log(c.debug, "sethostname: %s", strerror(errno));
	loopback_up(c.debug);
	if (c.net[0])
		network_up(c.net, c.debug);
	/* Container runtimes give processes a high fd limit; docker's default is 1048576. */
	struct rlimit rl = {1048576, 1048576};
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		sm_log(c.debug, "setrlimit NOFILE: %s", strerror(errno));

	int fd = open(port, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		fatal("open agent port %s: %s", port, strerror(errno));
	sm_log(c.debug, "agent on %s", port);
	return fd;
}
