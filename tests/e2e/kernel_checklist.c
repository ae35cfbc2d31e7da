/* What images expect of Linux: a checklist run inside a real VM, on each guest kernel.
 *
 * Build: musl-gcc -static -O2 -o checklist kernel_checklist.c
 * Usage: checklist [NAME...]    (no names: every check)
 *
 * Prints one line per check, "ok NAME" or "FAIL NAME: reason (errno text)", and exits 1 if
 * any failed. Each check runs in its own child process with a time limit, so a check that
 * crashes or hangs fails alone (named, with the signal) instead of hiding the others. Every
 * check exercises its feature end to end (a syscall that merely exists is not enough), so a
 * kernel built without it, or a guest init that does not set it up, fails here.
 * Needs root in the guest (the VM's default user). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHECK_TIMEOUT_S 30
#define TMPFS_MAGIC 0x01021994
#define SYSFS_MAGIC 0x62656572

/* musl ships no <linux/...> headers: the few kernel ABI constants used here. */
#define FUTEX_WAIT_PRIVATE 128
#define FUTEX_WAKE_PRIVATE 129
#define GRND_NONBLOCK 1
#define SECCOMP_MODE_FILTER 2
#define SECCOMP_RET_ALLOW 0x7fff0000u
#define SECCOMP_RET_ERRNO 0x00050000u
#define SECCOMP_DATA_NR 0 /* offsetof(struct seccomp_data, nr) */
#define SECCOMP_DATA_ARCH 4 /* offsetof(struct seccomp_data, arch) */
#if defined(__x86_64__)
#define AUDIT_ARCH_NATIVE 0xc000003eu
#elif defined(__aarch64__)
#define AUDIT_ARCH_NATIVE 0xc00000b7u
#else
#error "add this architecture's AUDIT_ARCH_* value"
#endif
struct sock_filter { uint16_t code; uint8_t jt, jf; uint32_t k; };
struct sock_fprog { unsigned short len; struct sock_filter *filter; };
#define BPF_STMT(code, k) {(uint16_t)(code), 0, 0, k}
#define BPF_JUMP(code, k, jt, jf) {(uint16_t)(code), jt, jf, k}
#define BPF_LD_W_ABS 0x20 /* BPF_LD | BPF_W | BPF_ABS */
#define BPF_JEQ_K 0x15 /* BPF_JMP | BPF_JEQ | BPF_K */
#define BPF_RET_K 0x06 /* BPF_RET | BPF_K */

/* A check returns NULL when it passed, else why it failed. */
typedef const char *(*check_fn)(void);

static char reason[512];

/* Why a step failed, with errno's text. */
static const char *why(const char *what)
{
	snprintf(reason, sizeof(reason), "%s (%s)", what, strerror(errno));
	return reason;
}

/* Why a step failed when errno says nothing. */
static const char *whyx(const char *what)
{
	snprintf(reason, sizeof(reason), "%s", what);
	return reason;
}

/* Runs fn in a child process (under a time limit) and returns its verdict, passed back
 * through a pipe. Checks that change process state (signal masks, seccomp, namespaces) or
 * must survive a crash run this way. */
static const char *in_child(check_fn fn)
{
	static char verdict[512];
	int p[2];
	if (pipe(p) < 0)
		return why("pipe");
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		return why("fork");
	if (pid == 0) {
		close(p[0]);
		alarm(CHECK_TIMEOUT_S);
		const char *r = fn();
		if (r && write(p[1], r, strlen(r)) < 0)
			_exit(3);
		_exit(r ? 1 : 0);
	}
	close(p[1]);
	size_t n = 0;
	ssize_t got;
	while (n < sizeof(verdict) - 1 &&
	       (got = read(p[0], verdict + n, sizeof(verdict) - 1 - n)) > 0)
		n += (size_t)got;
	verdict[n] = 0;
	close(p[0]);
	int st;
	if (waitpid(pid, &st, 0) < 0)
		return why("waitpid");
	if (WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM)
		snprintf(verdict, sizeof(verdict), "timed out after %d s", CHECK_TIMEOUT_S);
	else if (WIFSIGNALED(st))
		snprintf(verdict, sizeof(verdict), "killed by signal %d (%s)", WTERMSIG(st),
			 strsignal(WTERMSIG(st)));
	else if (WEXITSTATUS(st) == 0 && n == 0)
		return NULL;
	else if (n == 0)
		snprintf(verdict, sizeof(verdict), "exited %d without a reason", WEXITSTATUS(st));
	return verdict;
}

/* The filesystem type of the topmost mount on mount point mnt, from /proc/self/mountinfo
 * ("ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"), or
 * NULL (with errno) when nothing is mounted there. */
static const char *mount_type(const char *mnt)
{
	static char type[64];
	char line[1024], point[512], fs[64];
	FILE *f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return NULL;
	type[0] = 0;
	while (fgets(line, sizeof(line), f)) {
		const char *dash = strstr(line, " - ");
		if (sscanf(line, "%*s %*s %*s %*s %511s", point) == 1 && dash &&
		    sscanf(dash + 3, "%63s", fs) == 1 && strcmp(point, mnt) == 0)
			snprintf(type, sizeof(type), "%s", fs); /* later lines are mounted on top */
	}
	fclose(f);
	errno = ENOENT;
	return type[0] ? type : NULL;
}

/* ---- filesystems the workload sees ------------------------------------------------------ */

/* ps, top, every runtime's process inspection read /proc; findmnt and systemd need mountinfo. */
static const char *check_procfs(void)
{
	char buf[512], want[32];
	int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return why("open /proc/self/stat");
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return why("read /proc/self/stat");
	buf[n] = 0;
	snprintf(want, sizeof(want), "%d (", (int)getpid());
	if (strncmp(buf, want, strlen(want)) != 0)
		return whyx("/proc/self/stat does not start with our pid");
	if (!mount_type("/"))
		return why("/proc/self/mountinfo has no mount on /");
	return NULL;
}

/* udev-less tools (lsblk, ip, systemd) read devices and kernel state from /sys. */
static const char *check_sysfs(void)
{
	struct stat st;
	struct statfs sf;
	if (stat("/sys/kernel", &st) < 0 || !S_ISDIR(st.st_mode))
		return why("stat /sys/kernel");
	if (statfs("/sys", &sf) < 0)
		return why("statfs /sys");
	if (sf.f_type != SYSFS_MAGIC)
		return whyx("/sys is not sysfs");
	return NULL;
}

/* Terminals: ssh, script, expect, `docker run -t` all allocate ptys. */
static const char *check_devpts(void)
{
	char buf[16];
	int m = posix_openpt(O_RDWR | O_NOCTTY);
	if (m < 0)
		return why("posix_openpt");
	if (grantpt(m) < 0 || unlockpt(m) < 0)
		return why("grantpt/unlockpt");
	const char *name = ptsname(m);
	if (!name)
		return why("ptsname");
	int s = open(name, O_RDWR | O_NOCTTY);
	if (s < 0)
		return why("open the pty's slave");
	/* A line typed on the master reaches the slave through the line discipline. */
	if (write(m, "ping\n", 5) != 5)
		return why("write to the pty master");
	if (read(s, buf, sizeof(buf)) != 5 || memcmp(buf, "ping\n", 5) != 0)
		return why("read the line from the pty slave");
	close(s);
	close(m);
	return NULL;
}

/* POSIX shared memory (shm_open: Python multiprocessing, PostgreSQL, Chromium) lives on the
 * /dev/shm tmpfs; this is also the check for mmap on tmpfs. */
static const char *check_shm(void)
{
	struct statfs sf;
	char name[64];
	if (statfs("/dev/shm", &sf) < 0)
		return why("statfs /dev/shm");
	if (sf.f_type != TMPFS_MAGIC)
		return whyx("/dev/shm is not a tmpfs");
	snprintf(name, sizeof(name), "/checklist-%d", (int)getpid());
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0)
		return why("shm_open");
	shm_unlink(name);
	if (ftruncate(fd, 4096) < 0)
		return why("ftruncate");
	char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return why("mmap MAP_SHARED");
	memcpy(p + 100, "shared", 6);
	munmap(p, 4096);
	char buf[6];
	if (pread(fd, buf, 6, 100) != 6 || memcmp(buf, "shared", 6) != 0)
		return whyx("what was written through the mapping did not reach the file");
	close(fd);
	return NULL;
}

/* POSIX message queues (mq_open), and docker's /dev/mqueue mount of them. */
static const char *check_mqueue(void)
{
	char name[64], buf[64];
	struct mq_attr attr = {.mq_maxmsg = 4, .mq_msgsize = sizeof(buf)};
	snprintf(name, sizeof(name), "/checklist-%d", (int)getpid());
	mqd_t q = mq_open(name, O_RDWR | O_CREAT | O_EXCL, 0600, &attr);
	if (q == (mqd_t)-1)
		return why("mq_open");
	int sent = mq_send(q, "hello", 5, 1);
	ssize_t got = sent == 0 ? mq_receive(q, buf, sizeof(buf), NULL) : -1;
	int err = errno;
	mq_close(q);
	if (mq_unlink(name) < 0)
		return why("mq_unlink");
	errno = err;
	if (sent < 0 || got != 5 || memcmp(buf, "hello", 5) != 0)
		return why("mq_send/mq_receive");
	const char *type = mount_type("/dev/mqueue");
	if (!type)
		return why("/dev/mqueue is not mounted");
	if (strcmp(type, "mqueue") != 0)
		return whyx("/dev/mqueue is not an mqueue filesystem");
	return NULL;
}

/* ---- networking (a network="none" VM still has loopback) -------------------------------- */

/* A TCP round trip through a listening socket on the loopback address addr. */
static const char *tcp_roundtrip(struct sockaddr *addr, socklen_t len)
{
	char buf[8];
	int l = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0)
		return why("socket");
	if (bind(l, addr, len) < 0 || listen(l, 1) < 0)
		return why("bind/listen on loopback port 0");
	if (getsockname(l, addr, &len) < 0) /* learns the port the kernel chose */
		return why("getsockname");
	int c = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, addr, len) < 0)
		return why("connect");
	int a = accept(l, NULL, NULL);
	if (a < 0)
		return why("accept");
	if (send(c, "ping", 4, 0) != 4 || recv(a, buf, 4, MSG_WAITALL) != 4 ||
	    memcmp(buf, "ping", 4) != 0)
		return why("send/recv client to server");
	if (send(a, "pong", 4, 0) != 4 || recv(c, buf, 4, MSG_WAITALL) != 4 ||
	    memcmp(buf, "pong", 4) != 0)
		return why("send/recv server to client");
	close(a);
	close(c);
	close(l);
	return NULL;
}

static const char *check_ipv4(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	return tcp_roundtrip((struct sockaddr *)&a, sizeof(a));
}

/* Many servers bind [::] or ::1 by default (and "localhost" resolves to ::1 first). */
static const char *check_ipv6(void)
{
	struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
	return tcp_roundtrip((struct sockaddr *)&a, sizeof(a));
}

/* socketpair (shells, supervisors) and an abstract-namespace socket (D-Bus, X11, Chromium). */
static const char *check_unix(void)
{
	int sv[2];
	char buf[4];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return why("socketpair");
	if (write(sv[0], "abc", 3) != 3 || read(sv[1], buf, 3) != 3 || memcmp(buf, "abc", 3))
		return why("socketpair round trip");
	close(sv[0]);
	close(sv[1]);

	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int n = snprintf(a.sun_path + 1, sizeof(a.sun_path) - 1, "checklist-%d", (int)getpid());
	socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
	int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0 || bind(l, (struct sockaddr *)&a, len) < 0 || listen(l, 1) < 0)
		return why("bind/listen on an abstract unix socket");
	int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&a, len) < 0)
		return why("connect to the abstract unix socket");
	int s = accept(l, NULL, NULL);
	if (s < 0 || write(c, "xyz", 3) != 3 || read(s, buf, 3) != 3 || memcmp(buf, "xyz", 3))
		return why("abstract unix socket round trip");
	close(s);
	close(c);
	close(l);
	return NULL;
}

/* ---- event interfaces (every event loop: libuv, tokio, asyncio, Go's netpoller) --------- */

static const char *check_epoll(void)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 42}, out;
	int e = epoll_create1(EPOLL_CLOEXEC), fd = eventfd(0, EFD_CLOEXEC);
	if (e < 0 || fd < 0)
		return why("epoll_create1/eventfd");
	if (epoll_ctl(e, EPOLL_CTL_ADD, fd, &ev) < 0)
		return why("epoll_ctl");
	if (epoll_wait(e, &out, 1, 0) != 0)
		return why("epoll_wait saw an event before there was one");
	uint64_t one = 1;
	if (write(fd, &one, 8) != 8)
		return why("write eventfd");
	if (epoll_wait(e, &out, 1, 1000) != 1 || out.data.u32 != 42 || !(out.events & EPOLLIN))
		return why("epoll_wait did not see the eventfd become readable");
	close(fd);
	close(e);
	return NULL;
}

/* File watchers: webpack, nodemon, systemd path units, IDE servers. */
static const char *check_inotify(void)
{
	char dir[] = "/tmp/checklist-XXXXXX", path[64];
	union { struct inotify_event ev; char raw[sizeof(struct inotify_event) + 256]; } buf;
	if (!mkdtemp(dir))
		return why("mkdtemp in /tmp");
	int in = inotify_init1(IN_CLOEXEC);
	if (in < 0)
		return why("inotify_init1");
	if (inotify_add_watch(in, dir, IN_CREATE) < 0)
		return why("inotify_add_watch");
	snprintf(path, sizeof(path), "%s/new", dir);
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0)
		return why("create a file in the watched directory");
	close(fd);
	ssize_t n = read(in, &buf, sizeof(buf));
	int err = errno;
	unlink(path);
	rmdir(dir);
	errno = err;
	if (n < (ssize_t)sizeof(struct inotify_event))
		return why("read the inotify event");
	if (!(buf.ev.mask & IN_CREATE) || buf.ev.len == 0 || strcmp(buf.ev.name, "new") != 0)
		return whyx("the event is not IN_CREATE of the new file");
	close(in);
	return NULL;
}

static const char *check_eventfd(void)
{
	uint64_t v = 3, w = 4, sum;
	int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (fd < 0)
		return why("eventfd");
	if (read(fd, &sum, 8) != -1 || errno != EAGAIN)
		return whyx("a fresh eventfd did not read EAGAIN");
	if (write(fd, &v, 8) != 8 || write(fd, &w, 8) != 8)
		return why("write eventfd");
	if (read(fd, &sum, 8) != 8 || sum != 7)
		return why("read eventfd: the counter is not the sum of the writes");
	close(fd);
	return NULL;
}

/* Runs in a child (in_child): it blocks SIGUSR1. */
static const char *check_signalfd(void)
{
	sigset_t set;
	struct signalfd_siginfo si;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		return why("sigprocmask");
	int fd = signalfd(-1, &set, SFD_CLOEXEC);
	if (fd < 0)
		return why("signalfd");
	raise(SIGUSR1);
	if (read(fd, &si, sizeof(si)) != sizeof(si))
		return why("read signalfd");
	if (si.ssi_signo != SIGUSR1)
		return whyx("signalfd delivered another signal");
	close(fd);
	return NULL;
}

static const char *check_timerfd(void)
{
	struct itimerspec its = {.it_value = {.tv_nsec = 10 * 1000 * 1000}};
	struct timespec t0, t1;
	uint64_t expirations;
	int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
	if (fd < 0)
		return why("timerfd_create");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (timerfd_settime(fd, 0, &its, NULL) < 0)
		return why("timerfd_settime");
	if (read(fd, &expirations, 8) != 8 || expirations < 1)
		return why("read timerfd");
	clock_gettime(CLOCK_MONOTONIC, &t1);
	long long ns = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
	if (ns < 10 * 1000 * 1000)
		return whyx("the 10 ms timer fired early");
	close(fd);
	return NULL;
}

/* Every mutex and condition variable (glibc, musl, Go, Rust) is built on futexes. */
static const char *check_futex(void)
{
	int word = 0;
	struct timespec ts = {.tv_nsec = 10 * 1000 * 1000};
	if (syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 1, &ts, NULL, 0) != -1 || errno != EAGAIN)
		return why("FUTEX_WAIT on a changed value did not return EAGAIN");
	if (syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0) != -1 ||
	    errno != ETIMEDOUT)
		return why("FUTEX_WAIT with a 10 ms timeout did not return ETIMEDOUT");
	long woken = syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	if (woken != 0)
		return why("FUTEX_WAKE with no waiters did not return 0");
	return NULL;
}

/* ---- sandboxing that runtimes and browsers do inside the image -------------------------- */

/* Runs in a child (in_child): the filter cannot be removed. Chromium, systemd services,
 * runc inside the VM, and Docker's default profile all install seccomp filters. */
static const char *check_seccomp(void)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
		BPF_JUMP(BPF_JEQ_K, AUDIT_ARCH_NATIVE, 1, 0),
		BPF_STMT(BPF_RET_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD_W_ABS, SECCOMP_DATA_NR),
		BPF_JUMP(BPF_JEQ_K, SYS_getppid, 0, 1),
		BPF_STMT(BPF_RET_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return why("PR_SET_NO_NEW_PRIVS");
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
		return why("PR_SET_SECCOMP");
	errno = 0;
	if (syscall(SYS_getppid) != -1 || errno != EPERM)
		return whyx("the filter did not make getppid fail with EPERM");
	if (syscall(SYS_getpid) <= 0)
		return why("the filter blocked getpid too");
	return NULL;
}

static const char *write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return why(path);
	ssize_t n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? NULL : why(path);
}

/* The grandchild of check_namespaces: pid 1 of the new pid namespace, root of the new user
 * namespace, in its own mount namespace. */
static const char *ns_grandchild(void)
{
	char dir[] = "/tmp/checklist-ns-XXXXXX", path[64];
	struct statfs sf;
	if (getpid() != 1)
		return whyx("the first process in the new pid namespace is not pid 1");
	if (!mkdtemp(dir))
		return why("mkdtemp in /tmp");
	if (mount("none", dir, "tmpfs", 0, "size=1m") < 0) {
		const char *r = why("mount a tmpfs in the new namespaces");
		rmdir(dir);
		return r;
	}
	snprintf(path, sizeof(path), "%s/f", dir);
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	int ok = fd >= 0 && statfs(dir, &sf) == 0 && sf.f_type == TMPFS_MAGIC;
	if (fd >= 0)
		close(fd);
	umount(dir);
	rmdir(dir);
	return ok ? NULL : why("use the new tmpfs");
}

/* Runs in a child (in_child): it leaves this process in new namespaces. Rootless podman,
 * buildah, bubblewrap, Chromium's sandbox, `unshare -r` all start like this. */
static const char *check_namespaces(void)
{
	char map[64];
	uid_t uid = getuid();
	gid_t gid = getgid();
	if (unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID) < 0)
		return why("unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)");
	const char *r = write_file("/proc/self/setgroups", "deny");
	snprintf(map, sizeof(map), "0 %u 1", (unsigned)uid);
	if (!r)
		r = write_file("/proc/self/uid_map", map);
	snprintf(map, sizeof(map), "0 %u 1", (unsigned)gid);
	if (!r)
		r = write_file("/proc/self/gid_map", map);
	return r ? r : in_child(ns_grandchild);
}

/* cgroup v2 as docker mounts it: systemd in the image, and resource-limiting tools, create
 * child cgroups under /sys/fs/cgroup. */
static const char *check_cgroup2(void)
{
	char buf[512], dir[64], procs[80];
	struct stat st;
	const char *type = mount_type("/sys/fs/cgroup");
	if (!type)
		return why("/sys/fs/cgroup is not mounted");
	if (strcmp(type, "cgroup2") != 0)
		return whyx("/sys/fs/cgroup is not a cgroup2 filesystem");
	int fd = open("/sys/fs/cgroup/cgroup.controllers", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, buf, sizeof(buf)) < 0)
		return why("read /sys/fs/cgroup/cgroup.controllers");
	close(fd);
	snprintf(dir, sizeof(dir), "/sys/fs/cgroup/checklist-%d", (int)getpid());
	if (mkdir(dir, 0755) < 0)
		return why("mkdir a child cgroup");
	snprintf(procs, sizeof(procs), "%s/cgroup.procs", dir);
	int populated = stat(procs, &st) == 0; /* the kernel fills a new cgroup's directory */
	if (rmdir(dir) < 0)
		return why("rmdir the child cgroup");
	return populated ? NULL : whyx("the new cgroup has no cgroup.procs");
}

/* ---- files on the VM's filesystems ------------------------------------------------------ */

/* Databases and disk images write past 4 GiB (sparse), on the root overlay. */
static const char *check_largefile(void)
{
	const off_t off = 5LL << 30;
	char path[64], block[4096], back[4096];
	struct stat st;
	snprintf(path, sizeof(path), "/checklist-large-%d", (int)getpid());
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return why("create a file on the root filesystem");
	unlink(path);
	memset(block, 0x5a, sizeof(block));
	if (pwrite(fd, block, sizeof(block), off) != (ssize_t)sizeof(block))
		return why("pwrite 4 KiB at 5 GiB");
	if (fstat(fd, &st) < 0 || st.st_size <= off)
		return why("fstat: the file is not past 5 GiB");
	if (pread(fd, back, sizeof(back), off) != (ssize_t)sizeof(back) ||
	    memcmp(block, back, sizeof(back)) != 0)
		return why("pread at 5 GiB did not return what was written");
	close(fd);
	return NULL;
}

/* Every dynamically linked program maps its binary and libraries from the image's read-only
 * lower layer (through the overlay), and writes to MAP_PRIVATE copies (relocations). */
static const char *check_mmap_lower(void)
{
	char head[4096];
	int fd = open("/bin/sh", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return why("open /bin/sh");
	if (pread(fd, head, sizeof(head), 0) != (ssize_t)sizeof(head))
		return why("read /bin/sh");
	char *p = mmap(NULL, sizeof(head), PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return why("mmap /bin/sh read-only");
	if (memcmp(p, head, sizeof(head)) != 0 || memcmp(p, "\177ELF", 4) != 0)
		return whyx("the mapping of /bin/sh differs from what read() returns");
	munmap(p, sizeof(head));
	p = mmap(NULL, sizeof(head), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
		return why("mmap /bin/sh MAP_PRIVATE writable");
	p[0] = 0;
	munmap(p, sizeof(head));
	if (pread(fd, head, 4, 0) != 4 || memcmp(head, "\177ELF", 4) != 0)
		return whyx("a MAP_PRIVATE write reached /bin/sh");
	close(fd);
	return NULL;
}

/* A new file in dir, shared-mapped: SQLite's WAL index, LMDB, Java's and .NET's
 * memory-mapped files. Both directions must stay coherent. */
static const char *mmap_shared_in(const char *dir)
{
	char path[128], buf[8];
	snprintf(path, sizeof(path), "%s/checklist-mmap-%d", dir, (int)getpid());
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return why("create a file there");
	if (ftruncate(fd, 8192) < 0)
		return why("ftruncate");
	char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return why("mmap MAP_SHARED");
	memcpy(p + 5000, "mapped", 6);
	if (msync(p, 8192, MS_SYNC) < 0)
		return why("msync");
	if (pread(fd, buf, 6, 5000) != 6 || memcmp(buf, "mapped", 6) != 0)
		return whyx("a write through the mapping is not seen by read()");
	if (pwrite(fd, "direct", 6, 100) != 6)
		return why("pwrite");
	if (memcmp(p + 100, "direct", 6) != 0)
		return whyx("a write() is not seen through the mapping");
	munmap(p, 8192);
	close(fd);
	/* unlinked only now: QEMU 7.2's 9p server fails fd operations on an unlinked file */
	if (unlink(path) < 0)
		return why("unlink");
	return NULL;
}

/* ... on the root overlay (its upper layer) */
static const char *check_mmap_overlay(void)
{
	return mmap_shared_in("");
}

/* ... on a host directory (9p), mounted at /mnt/bind by the test: only run when named */
static const char *check_mmap_bind(void)
{
	return mmap_shared_in("/mnt/bind");
}

/* ... on a named volume (9p, mapped-xattr), mounted at /mnt/volume: only when named */
static const char *check_mmap_volume(void)
{
	return mmap_shared_in("/mnt/volume");
}

/* Python, OpenSSL, Go and Rust ask for randomness at start-up; a pool that is not
 * initialised right after boot makes them block or fail. */
static const char *check_getrandom(void)
{
	unsigned char buf[32] = {0}, zero[32] = {0};
	if (syscall(SYS_getrandom, buf, sizeof(buf), GRND_NONBLOCK) != (long)sizeof(buf))
		return why("getrandom(GRND_NONBLOCK)");
	if (memcmp(buf, zero, sizeof(buf)) == 0)
		return whyx("getrandom returned zeros");
	return NULL;
}

static const struct {
	const char *name;
	check_fn fn;
	int on_request; /* run only when named (needs something the VM may not have) */
} checks[] = {
	{"procfs", check_procfs},
	{"sysfs", check_sysfs},
	{"devpts", check_devpts},
	{"shm", check_shm},
	{"mqueue", check_mqueue},
	{"ipv4", check_ipv4},
	{"ipv6", check_ipv6},
	{"unix", check_unix},
	{"epoll", check_epoll},
	{"inotify", check_inotify},
	{"eventfd", check_eventfd},
	{"signalfd", check_signalfd},
	{"timerfd", check_timerfd},
	{"futex", check_futex},
	{"seccomp", check_seccomp},
	{"namespaces", check_namespaces},
	{"cgroup2", check_cgroup2},
	{"largefile", check_largefile},
	{"mmap-lower", check_mmap_lower},
	{"mmap-overlay", check_mmap_overlay},
	{"getrandom", check_getrandom},
	/* the ones below run only when named: they need the VM's volumes */
	{"mmap-bind", check_mmap_bind, 1},
	{"mmap-volume", check_mmap_volume, 1},
};
#define NCHECKS (sizeof(checks) / sizeof(checks[0]))

int main(int argc, char **argv)
{
	int failed = 0;
	for (int a = 1; a < argc; a++) { /* named checks must exist: a typo is not a pass */
		size_t i = 0;
		while (i < NCHECKS && strcmp(argv[a], checks[i].name) != 0)
			i++;
		if (i == NCHECKS) {
			fprintf(stderr, "checklist: no check named %s\n", argv[a]);
			return 2;
		}
	}
	for (size_t i = 0; i < NCHECKS; i++) {
		int wanted = argc == 1 && !checks[i].on_request;
		for (int a = 1; a < argc; a++)
			wanted |= strcmp(argv[a], checks[i].name) == 0;
		if (!wanted)
			continue;
		const char *r = in_child(checks[i].fn);
		if (r)
			printf("FAIL %s: %s\n", checks[i].name, r);
		else
			printf("ok %s\n", checks[i].name);
		failed |= r != NULL;
	}
	return failed;
}
