/* The agent: one poll(2) loop multiplexing the host channel, SIGCHLD (signalfd) and every
 * session's pipes. All fds are non-blocking and close-on-exec; memory is bounded by the
 * protocol's limits (input buffer: two frames; output: OUT_HARD plus one event's worth;
 * stdin queues: one window per session). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "sm.h"

/* RNDADDENTROPY = _IOW('R', 0x03, int[2]); spelled out because musl ships no linux/ headers. */
#define SM_RNDADDENTROPY 0x40085203
/* RNDRESEEDCRNG = _IO('R', 0x07): credited entropy alone only reaches the CRNG at its next
 * scheduled reseed (up to a minute later); clones of one snapshot must diverge at once. */
#define SM_RNDRESEEDCRNG 0x5207
#define IN_CAP (2 * (SM_HDR + SM_MAX_PAYLOAD))
#define HUP_BACKOFF_MIN_MS 5
#define HUP_BACKOFF_MAX_MS 50 /* bounds reconnect latency; 20 wakeups/s is cheap */

struct session {
	bool used;
	bool attached; /* a host channel names it; false once detached by a reset */
	uint32_t id;
	uint32_t flags, op;
	pid_t pid; /* the process (and its group); 0 for file sessions */
	bool reaped;
	int wstatus;
	int status_fd; /* exec report pipe: data = failure, EOF alone = exec succeeded */
	bool started;  /* output may flow (STARTED sent, or detached) */
	int in_fd;     /* process stdin (pipe or pty) or the file being written */
	bool in_eof;   /* host ended stdin: close in_fd once inq drains */
	struct buf inq;
	uint32_t in_window; /* stdin bytes the host may still send */
	int out_fd[3];      /* by stream: [1] stdout (or pty, or file read), [2] stderr */
	uint64_t credit[3];
	int ctl_fd; /* pty master for RESIZE; -1 without TTY */
	bool have_report;
	uint8_t rkind;
	int32_t rcode;
	char rmsg[256];
};

enum role { R_AGENT, R_SIG, R_STATUS, R_IN, R_OUT1, R_OUT2 };
struct pref {
	struct session *s;
	int role;
};

struct agent {
	struct agent_opts o;
	bool hello; /* handshake done: frames are live */
	bool gone;  /* host mode: the peer closed; exit once every child is gone */
	bool hup;   /* vm mode: the port hung up; probe it with backoff */
	int backoff_ms;
	int64_t probe_at_ms;
	int sigfd;
	struct buf in;
	struct buf out;     /* out.off is always at a frame boundary ... */
	size_t out_partial; /* ... and this much of that frame is already written */
	struct session *s;
	struct pollfd *pfd;
	struct pref *pref;
	uint8_t *scratch; /* sink for detached sessions' output */
};

static void __attribute__((noreturn)) oom(void)
{
	dprintf(2, "sm-init: fatal: out of memory\n");
	_exit(1);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* ---- output ------------------------------------------------------------------------ */

/* Queues a frame; b/nb is an optional second payload part. Frames for the host are only
 * produced while a handshake is live (HELLO and ERROR excepted). */
static void emit2(struct agent *a, uint8_t type, uint8_t stream, uint32_t ch, const void *p,
		  size_t n, const void *b, size_t nb)
{
	if (!a->hello && type != T_HELLO && type != T_ERROR)
		return;
	if (a->gone)
		return;
	uint8_t *w = buf_reserve(&a->out, SM_HDR + n + nb);
	if (!w)
		oom();
	put16(w, SM_MAGIC);
	w[2] = type;
	w[3] = stream;
	put32(w + 4, ch);
	put32(w + 8, (uint32_t)(n + nb));
	if (n)
		memcpy(w + SM_HDR, p, n);
	if (nb)
		memcpy(w + SM_HDR + n, b, nb);
	a->out.len += SM_HDR + n + nb;
}

static void emit(struct agent *a, uint8_t type, uint8_t stream, uint32_t ch, const void *p,
		 size_t n)
{
	emit2(a, type, stream, ch, p, n, NULL, 0);
}

static void emit_u32(struct agent *a, uint8_t type, uint8_t stream, uint32_t ch, uint32_t v)
{
	uint8_t b[4];
	put32(b, v);
	emit(a, type, stream, ch, b, 4);
}

static void emit_exit(struct agent *a, uint32_t ch, int kind, int32_t code, const char *msg)
{
	uint8_t h[8] = {(uint8_t)kind, 0, 0, 0};
	put32(h + 4, (uint32_t)code);
	size_t n = strnlen(msg, SM_MAX_MSG);
	emit2(a, T_EXIT, 0, ch, h, 8, msg, n);
}

static size_t out_frame_len(const struct agent *a)
{
	return SM_HDR + get32(a->out.p + a->out.off + 8);
}

/* Writes what the port takes; keeps out.off on a frame boundary. */
static void flush(struct agent *a)
{
	while (buf_used(&a->out) > a->out_partial && !a->gone && !a->hup) {
		size_t start = a->out.off + a->out_partial;
		ssize_t w = write(a->o.fd, a->out.p + start, a->out.len - start);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			/* EAGAIN: wait for POLLOUT. Other errors (EPIPE) surface as hang-up on read. */
			return;
		}
		a->out_partial += (size_t)w;
		while (buf_used(&a->out) && a->out_partial >= out_frame_len(a)) {
			size_t fl = out_frame_len(a);
			a->out_partial -= fl;
			a->out.off += fl;
		}
	}
}

/* Drops queued frames, but completes one already partly written so the stream stays framed. */
static void out_truncate(struct agent *a)
{
	if (a->out_partial)
		a->out.len = a->out.off + out_frame_len(a);
	else
		a->out.len = a->out.off;
}

/* ---- sessions ----------------------------------------------------------------------- */

static struct session *find(struct agent *a, uint32_t id)
{
	for (unsigned i = 0; i < SLOTS; i++)
		if (a->s[i].used && a->s[i].attached && a->s[i].id == id)
			return &a->s[i];
	return NULL;
}

/* Closes a session's fds and drops its queued stdin; the slot stays in use. */
static void release_io(struct session *s)
{
	close_fd(&s->status_fd);
	close_fd(&s->in_fd);
	close_fd(&s->out_fd[1]);
	close_fd(&s->out_fd[2]);
	close_fd(&s->ctl_fd);
	buf_free(&s->inq);
}

static void free_session(struct session *s)
{
	release_io(s);
	/* A free slot must hold no fd number, not 0: stale poll entries look at them. */
	*s = (struct session){.status_fd = -1, .in_fd = -1, .out_fd = {-1, -1, -1}, .ctl_fd = -1};
}

static void set_report(struct session *s, int kind, int code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void set_report(struct session *s, int kind, int code, const char *fmt, ...)
{
	if (s->have_report)
		return; /* the first failure is the one that matters */
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(s->rmsg, sizeof(s->rmsg), fmt, ap);
	va_end(ap);
	s->have_report = true;
	s->rkind = (uint8_t)kind;
	s->rcode = code;
}

/* Sends EXIT and frees the slot once nothing of the session is left to wait for. */
static void maybe_finish(struct agent *a, struct session *s)
{
	if (!s->used || (s->pid && !s->reaped) || s->status_fd >= 0 || s->out_fd[1] >= 0 ||
	    s->out_fd[2] >= 0 || (s->op == OP_WRITE && s->in_fd >= 0))
		return;
	if (s->attached) {
		if (s->have_report)
			emit_exit(a, s->id, s->rkind, s->rcode, s->rmsg);
		else if (s->pid && WIFSIGNALED(s->wstatus))
			emit_exit(a, s->id, K_SIGNALED, WTERMSIG(s->wstatus), "");
		else
			emit_exit(a, s->id, K_EXITED, s->pid ? WEXITSTATUS(s->wstatus) : 0, "");
	}
	free_session(s);
}

/* SIGKILLs the process group and drops every pending byte; the slot lives on until the
 * process is reaped (so its pid is not mistaken for an orphan). */
static void kill_session(struct session *s)
{
	if (s->pid && !s->reaped) {
		kill(-s->pid, SIGKILL);
		kill(s->pid, SIGKILL); /* in case it has not reached setsid() yet */
	}
	release_io(s);
}

/* Reset: sessions are killed (KEEP ones detached when !all), no frame for any of them is
 * sent afterwards, and the host must HELLO again. */
static void reset(struct agent *a, bool all)
{
	for (unsigned i = 0; i < SLOTS; i++) {
		struct session *s = &a->s[i];
		if (!s->used)
			continue;
		bool keep = !all && (s->flags & FLAG_KEEP) && s->op == OP_RUN;
		if (keep) {
			/* Detached: stdin ends, output is read and discarded so it never blocks. */
			close_fd(&s->in_fd);
			buf_free(&s->inq);
		} else {
			kill_session(s);
		}
		s->attached = false;
		s->id = 0;
		maybe_finish(a, s);
	}
	out_truncate(a);
	a->hello = false;
}

static void proto_error(struct agent *a, const char *msg)
{
	sm_log(a->o.debug, "protocol error: %s", msg);
	reset(a, false);
	emit(a, T_ERROR, 0, 0, msg, strnlen(msg, SM_MAX_MSG));
}

/* Writes queued stdin; credits the host for what the process (or file) took. */
static void write_stdin(struct agent *a, struct session *s)
{
	while (buf_used(&s->inq) && s->in_fd >= 0) {
		ssize_t w = write(s->in_fd, s->inq.p + s->inq.off, buf_used(&s->inq));
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return;
		if (w <= 0) {
			/* The reader is gone (EPIPE) or the file failed: drop the rest, still credit
			 * it so the host never stalls on a window nobody will open. */
			if (s->op == OP_WRITE)
				set_report(s, K_FAILED, errno, "write: %s", strerror(errno));
			w = (ssize_t)buf_used(&s->inq);
			close_fd(&s->in_fd);
		}
		s->inq.off += (size_t)w;
		s->in_window += (uint32_t)w;
		emit_u32(a, T_CREDIT, 0, s->id, (uint32_t)w);
	}
	if (!buf_used(&s->inq))
		s->inq.off = s->inq.len = 0;
	if (s->in_eof && !buf_used(&s->inq) && s->in_fd >= 0 && s->ctl_fd < 0) {
		/* A pty has no half-close: stdin EOF is ignored with TTY (ctl_fd set). */
		if (s->op == OP_WRITE && fsync(s->in_fd) < 0)
			set_report(s, K_FAILED, errno, "write: fsync: %s", strerror(errno));
		close_fd(&s->in_fd);
	}
}

/* Reads one chunk of a session's output into a DATA frame (or discards it when detached). */
static void read_output(struct agent *a, struct session *s, int stream)
{
	int *fd = &s->out_fd[stream];
	ssize_t n;
	if (!s->attached) {
		n = read(*fd, a->scratch, SM_MAX_PAYLOAD);
	} else if (buf_used(&a->out) >= OUT_SOFT) {
		return; /* checked per read: one poll round may wake many sessions */
	} else {
		size_t want = s->credit[stream] < SM_MAX_PAYLOAD ? (size_t)s->credit[stream]
								 : SM_MAX_PAYLOAD;
		uint8_t *w = buf_reserve(&a->out, SM_HDR + want);
		if (!w)
			oom();
		n = read(*fd, w + SM_HDR, want);
		if (n > 0) {
			put16(w, SM_MAGIC);
			w[2] = T_DATA;
			w[3] = (uint8_t)stream;
			put32(w + 4, s->id);
			put32(w + 8, (uint32_t)n);
			a->out.len += SM_HDR + (size_t)n;
			s->credit[stream] -= (uint64_t)n;
		}
	}
	if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR)))
		return;
	if (n < 0 && errno != EIO && s->op == OP_READ) {
		set_report(s, K_FAILED, errno, "read: %s", strerror(errno));
	} else if (s->attached) {
		/* EOF; a pty master reports EIO once the last slave fd closes. */
		emit(a, T_EOF, (uint8_t)stream, s->id, NULL, 0);
	}
	close_fd(fd);
}

/* The exec report pipe became readable: a report means failure, bare EOF means exec'd. */
static void read_status(struct agent *a, struct session *s)
{
	uint8_t b[5 + 256];
	ssize_t n = read(s->status_fd, b, sizeof(b));
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n >= 5) {
		size_t ml = (size_t)n - 5;
		char msg[257];
		memcpy(msg, b + 5, ml);
		msg[ml] = 0;
		set_report(s, b[0] == K_NOSTART ? K_NOSTART : K_FAILED, (int32_t)get32(b + 1),
			   "%s", msg);
		return; /* EOF follows */
	}
	close_fd(&s->status_fd);
	if (s->have_report) {
		/* Never started: its pipes carry nothing, the EXIT says why. */
		close_fd(&s->out_fd[1]);
		close_fd(&s->out_fd[2]);
		close_fd(&s->in_fd);
		return;
	}
	s->started = true;
	if (s->attached)
		emit_u32(a, T_STARTED, 0, s->id, (uint32_t)s->pid);
}

static void reap(struct agent *a)
{
	struct signalfd_siginfo si;
	while (read(a->sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
		;
	for (;;) {
		int st;
		pid_t p = waitpid(-1, &st, WNOHANG);
		if (p <= 0)
			return;
		for (unsigned i = 0; i < SLOTS; i++) {
			struct session *s = &a->s[i];
			if (s->used && s->pid == p && !s->reaped) {
				s->reaped = true;
				s->wstatus = st;
				break;
			}
		}
		/* Anything else was an orphan reparented to us: reaping it is all we owe it. */
	}
}

/* ---- EXEC --------------------------------------------------------------------------- */

static void start_file(struct agent *a, struct session *s, const struct exec_req *r)
{
	const char *path = r->argv[0];
	if (path[0] != '/') {
		set_report(s, K_FAILED, EINVAL, "file: %.200s: path must be absolute", path);
		return;
	}
	if (r->op == OP_READ) {
		int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
		struct stat st;
		if (fd >= 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
			close(fd);
			fd = -1;
			errno = EISDIR;
		}
		if (fd < 0) {
			set_report(s, K_FAILED, errno, "read: %.200s: %s", path, strerror(errno));
			return;
		}
		s->out_fd[1] = fd;
	} else {
		struct ident id;
		char err[256];
		int e = r->user ? resolve_user(r->user, &id, err, sizeof(err)) : 0;
		if (e) {
			set_report(s, K_FAILED, e, "%s", err);
			return;
		}
		int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, r->mode);
		/* open() applies the umask and leaves an existing file's mode: set it exactly. */
		if (fd < 0 || fchmod(fd, r->mode) < 0 ||
		    (r->user && fchown(fd, id.uid, id.gid) < 0)) {
			set_report(s, K_FAILED, errno, "write: %.200s: %s", path, strerror(errno));
			if (fd >= 0)
				close(fd);
			return;
		}
		s->in_fd = fd;
	}
	s->started = true;
	emit_u32(a, T_STARTED, 0, s->id, 0);
}

/* Copies the tree at src into the (empty) directory dst, keeping owners, modes, times,
 * symlinks and special files: docker's copy-up of an image's files into a new named volume.
 * Depth is bounded; the tree is the image's own (trusted as much as the image). */
static int copy_tree(int sfd, int dfd, int depth)
{
	if (depth > 64) {
		errno = ELOOP;
		return -1;
	}
	int dfd2 = dup(sfd);
	DIR *d = dfd2 < 0 ? NULL : fdopendir(dfd2);
	if (!d) {
		if (dfd2 >= 0)
			close(dfd2);
		return -1;
	}
	int rc = 0;
	struct dirent *e;
	while (rc == 0 && (e = readdir(d))) {
		const char *n = e->d_name;
		if (!strcmp(n, ".") || !strcmp(n, ".."))
			continue;
		struct stat st;
		if (fstatat(sfd, n, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			rc = -1;
			break;
		}
		mode_t perm = st.st_mode & 07777;
		if (S_ISDIR(st.st_mode)) {
			int s2 = -1, d2 = -1;
			if (mkdirat(dfd, n, 0700) < 0 ||
			    (s2 = openat(sfd, n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0 ||
			    (d2 = openat(dfd, n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0 ||
			    copy_tree(s2, d2, depth + 1) < 0)
				rc = -1;
			if (s2 >= 0)
				close(s2);
			if (d2 >= 0)
				close(d2);
		} else if (S_ISREG(st.st_mode)) {
			int in = openat(sfd, n, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
			int out = in < 0 ? -1 : openat(dfd, n, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
			static char buf[65536]; /* not on the stack: this recurses (the agent is
						   single-threaded) */
			ssize_t r = 0;
			while (out >= 0 && (r = read(in, buf, sizeof(buf))) > 0)
				if (write(out, buf, (size_t)r) != r) {
					r = -1;
					break;
				}
			if (in < 0 || out < 0 || r < 0)
				rc = -1;
			if (in >= 0)
				close(in);
			if (out >= 0)
				close(out);
		} else if (S_ISLNK(st.st_mode)) {
			char target[4096];
			ssize_t len = readlinkat(sfd, n, target, sizeof(target) - 1);
			if (len < 0 || (target[len] = 0, symlinkat(target, dfd, n) < 0))
				rc = -1;
		} else if (mknodat(dfd, n, st.st_mode, st.st_rdev) < 0) {
			rc = -1;
		}
		if (rc == 0 && fchownat(dfd, n, st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW) < 0)
			rc = -1;
		if (rc == 0 && !S_ISLNK(st.st_mode) && fchmodat(dfd, n, perm, 0) < 0)
			rc = -1;
		struct timespec ts[2] = {st.st_atim, st.st_mtim};
		if (rc == 0)
			utimensat(dfd, n, ts, AT_SYMLINK_NOFOLLOW);
	}
	int e2 = errno;
	closedir(d);
	errno = e2;
	return rc;
}

static bool dir_is_empty(int fd)
{
	int d2 = dup(fd);
	DIR *d = d2 < 0 ? NULL : fdopendir(d2);
	if (!d) {
		if (d2 >= 0)
			close(d2);
		return false;
	}
	bool empty = true;
	struct dirent *e;
	while (empty && (e = readdir(d)))
		empty = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
	closedir(d);
	return empty;
}

/* Copy-up for a named volume mounted for the first time: the image's files at dst go into
 * the volume (mounted at a hidden place first), as docker fills an empty volume. */
static int copy_up(const char *src, const char *dst, const char *type, const char *data)
{
	static const char hidden[] = "/run/supermachine/copyup";
	int sfd = open(dst, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sfd < 0)
		return errno == ENOENT || errno == ENOTDIR ? 0 : -1; /* nothing to copy */
	int rc = -1, dfd = -1;
	if (mkdir_p(hidden) == 0 && mount(src, hidden, type, 0, data) == 0) {
		dfd = open(hidden, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		/* docker's rule: only an empty volume is filled (a copy cut short before is not
		 * redone over itself) */
		rc = dfd < 0 ? -1 : dir_is_empty(dfd) ? copy_tree(sfd, dfd, 0) : 0;
		int e = errno;
		if (dfd >= 0)
			close(dfd);
		umount2(hidden, MNT_DETACH);
		errno = e;
	}
	int e = errno;
	close(sfd);
	errno = e;
	return rc;
}

static int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = write(fd, text, strlen(text));
	int e = errno;
	close(fd);
	errno = e;
	return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* A sysfs attribute without its trailing newline. */
static int read_text(const char *path, char *buf, size_t size)
{
	ssize_t n = read_small(path, buf, size);
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return n < 0 ? -1 : 0;
}

/* The virtio device ("virtioN") of the disk whose virtio-blk serial is `serial`. */
static int disk_by_serial(const char *serial, char *virtio, size_t size)
{
	DIR *d = opendir("/sys/block");
	if (!d)
		return -1;
	int rc = -1;
	struct dirent *e;
	while (rc < 0 && (e = readdir(d))) {
		if (strncmp(e->d_name, "vd", 2))
			continue;
		char path[300], value[64], link[256];
		snprintf(path, sizeof(path), "/sys/block/%.64s/serial", e->d_name);
		if (read_text(path, value, sizeof(value)) < 0 || strcmp(value, serial))
			continue;
		snprintf(path, sizeof(path), "/sys/block/%.64s/device", e->d_name);
		ssize_t n = readlink(path, link, sizeof(link) - 1);
		if (n <= 0)
			continue;
		link[n] = 0;
		const char *base = strrchr(link, '/');
		snprintf(virtio, size, "%.63s", base ? base + 1 : link);
		rc = 0;
	}
	closedir(d);
	if (rc < 0)
		errno = ENODEV;
	return rc;
}

/* MOUNT_BLOCK: a volume's disk slot. The guest probed the slot when the snapshot was baked
 * (an empty placeholder then); unbinding and binding the driver probes it again, so the
 * kernel sees this VM's image: its size and whether it is read-only. Makes a device node
 * for it at `node` (the workload's /dev is its own business). */
static int attach_disk(const char *serial, const char *node)
{
	static const char drv[] = "/sys/bus/virtio/drivers/virtio_blk";
	char virtio[64], path[300], dev[32];
	if (disk_by_serial(serial, virtio, sizeof(virtio)) < 0)
		return -1;
	snprintf(path, sizeof(path), "%s/unbind", drv);
	if (write_text(path, virtio) < 0)
		return -1;
	snprintf(path, sizeof(path), "%s/bind", drv);
	if (write_text(path, virtio) < 0)
		return -1;
	DIR *d = NULL;
	snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%.64s/block", virtio);
	if (!(d = opendir(path)))
		return -1;
	struct dirent *e;
	int rc = -1;
	while (rc < 0 && (e = readdir(d))) {
		unsigned maj, min;
		char devpath[400];
		if (e->d_name[0] == '.')
			continue;
		snprintf(devpath, sizeof(devpath), "%s/%.64s/dev", path, e->d_name);
		if (read_text(devpath, dev, sizeof(dev)) < 0 || sscanf(dev, "%u:%u", &maj, &min) != 2)
			continue;
		unlink(node);
		rc = mknod(node, S_IFBLK | 0600, makedev(maj, min));
	}
	int err = errno;
	closedir(d);
	errno = rc < 0 && err == 0 ? ENODEV : err;
	return rc;
}

/* MOUNT_PIVOT: make `dir` (a directory the host mounted, e.g. an OCI bundle's root shared
 * over 9p, with the container's mounts already under it) the root of PID 1 and so of every
 * later session: the guest's own /dev, /proc and /sys (and what is mounted below them) move
 * into it, then it is moved over / and chrooted into, as the boot does for an image. */
static int pivot_to(const char *dir)
{
	static const char *const moved[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < 3; i++) {
		char dst[4200];
		snprintf(dst, sizeof(dst), "%s%s", dir, moved[i]);
		if ((mkdir(dst, 0755) < 0 && errno != EEXIST) ||
		    mount(moved[i], dst, NULL, MS_MOVE, NULL) < 0)
			return -1;
	}
	if (chdir(dir) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0)
		return -1;
	return chdir("/");
}

/* A MOUNT session (docs/protocol.md): argv = source, target, fstype, data; MODE = MOUNT_*
 * flags. Done at once; the session ends with EXIT 0 or the error. The host sends these right
 * after HELLO, for volumes: a VM restored from a snapshot baked without any gets them now. */
static void start_mount(struct agent *a, struct session *s, const struct exec_req *r)
{
	if (r->argc != 4) {
		set_report(s, K_FAILED, EINVAL, "mount: want source, target, type and data");
		return;
	}
	const char *src = r->argv[0], *dst = r->argv[1], *type = r->argv[2], *data = r->argv[3];
	uint32_t f = r->mode;
	char node[64];
	if (f & ~MOUNT_KNOWN) {
		set_report(s, K_FAILED, EINVAL, "mount: unknown flags 0x%x", f);
		return;
	}
	if (dst[0] != '/') {
		set_report(s, K_FAILED, EINVAL, "mount: %.200s: target must be absolute", dst);
		return;
	}
	if (f & MOUNT_PIVOT) {
		if (f != MOUNT_PIVOT || pivot_to(dst) < 0) {
			set_report(s, K_FAILED, f != MOUNT_PIVOT ? EINVAL : errno,
				   "mount: make %.200s the root: %s", dst,
				   f != MOUNT_PIVOT ? "no other flag goes with it" : strerror(errno));
			return;
		}
		s->started = true;
		emit_u32(a, T_STARTED, 0, s->id, 0);
		return;
	}
	if (f & MOUNT_MKDIR) {
		if (mkdir_p(dst) < 0) {
			set_report(s, K_FAILED, errno, "mount: create %.200s: %s", dst, strerror(errno));
			return;
		}
	} else if (f & MOUNT_MKFILE) {
		struct stat st;
		char parent[4096];
		snprintf(parent, sizeof(parent), "%s", dst);
		char *slash = strrchr(parent, '/');
		if (slash && slash != parent)
			*slash = 0;
		int fd = -1;
		if (stat(dst, &st) == 0 ? S_ISDIR(st.st_mode) && (errno = EISDIR)
					: (mkdir_p(parent) < 0 ||
					   (fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW,
						      0644)) < 0)) {
			set_report(s, K_FAILED, errno, "mount: create %.200s: %s", dst, strerror(errno));
			return;
		}
		if (fd >= 0)
			close(fd);
	}
	if (f & MOUNT_BLOCK) {
		if (mkdir_p("/run/supermachine") < 0) {
			set_report(s, K_FAILED, errno, "mount: /run/supermachine: %s", strerror(errno));
			return;
		}
		snprintf(node, sizeof(node), "/run/supermachine/disk-%.32s", src);
		if (attach_disk(src, node) < 0) {
			set_report(s, K_FAILED, errno, "mount: disk %.64s: %s", src, strerror(errno));
			return;
		}
		src = node;
	}
	if ((f & MOUNT_COPYUP) && copy_up(src, dst, type, data) < 0) {
		set_report(s, K_FAILED, errno, "copying the image's %.200s into the volume: %s", dst,
			   strerror(errno));
		return;
	}
	unsigned long flags = 0;
	if (f & MOUNT_RDONLY)
		flags |= MS_RDONLY;
	if (f & MOUNT_BIND)
		flags |= MS_BIND;
	if (f & MOUNT_REMOUNT)
		flags |= MS_REMOUNT;
	if (f & MOUNT_NOSUID)
		flags |= MS_NOSUID | MS_NODEV;
	int mounted = mount(src[0] ? src : NULL, dst, type[0] ? type : NULL, flags,
			    data[0] ? data : NULL);
	int err = errno;
	if (f & MOUNT_BLOCK)
		unlink(node); /* the mount holds the disk; no node is left for anyone to find */
	if (mounted < 0) {
		set_report(s, K_FAILED, err, "mount %.100s on %.200s: %s", src, dst, strerror(err));
		return;
	}
	/* A bind mount takes read-only only from a remount of the new mount. */
	if ((f & MOUNT_BIND) && (f & MOUNT_RDONLY) &&
	    mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0) {
		set_report(s, K_FAILED, errno, "remount %.200s read-only: %s", dst, strerror(errno));
		return;
	}
	s->started = true;
	emit_u32(a, T_STARTED, 0, s->id, 0);
}

/* Opens a pty pair with the given size; returns the master, *slave gets the other end. */
static int open_pty(uint16_t rows, uint16_t cols, int *slave)
{
	int m = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (m < 0)
		return -1;
	char name[64];
	struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
	if (grantpt(m) < 0 || unlockpt(m) < 0 || ptsname_r(m, name, sizeof(name)) != 0 ||
	    ioctl(m, TIOCSWINSZ, &ws) < 0 ||
	    (*slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
		int e = errno;
		close(m);
		errno = e;
		return -1;
	}
	return m;
}

static void start_process(struct agent *a, struct session *s, const struct exec_req *r)
{
	bool tty = r->flags & FLAG_TTY;
	int st[2] = {-1, -1}, child[3] = {-1, -1, -1}, p[2];
	int master = -1, e = 0;
	const char *what = "pipe";
	if (pipe2(st, O_CLOEXEC) < 0)
		goto fail;
	if (tty) {
		what = "pty";
		if ((master = open_pty(r->rows, r->cols, &child[0])) < 0)
			goto fail;
		child[1] = child[2] = child[0];
		s->out_fd[1] = master;
		s->ctl_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
		if (s->ctl_fd < 0)
			goto fail;
		if ((r->flags & FLAG_STDIN) && (s->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0)
			goto fail;
	} else {
		if (r->flags & FLAG_STDIN) {
			if (pipe2(p, O_CLOEXEC) < 0)
				goto fail;
			child[0] = p[0];
			s->in_fd = p[1];
		} else if ((child[0] = open("/dev/null", O_RDWR | O_CLOEXEC)) < 0) {
			goto fail;
		}
		for (int i = 1; i <= 2; i++) {
			if (pipe2(p, O_CLOEXEC) < 0)
				goto fail;
			s->out_fd[i] = p[0];
			child[i] = p[1];
		}
	}
	what = "fork";
	pid_t pid = fork();
	if (pid < 0)
		goto fail;
	if (pid == 0)
		child_exec(r, child, tty, st[1], true);
	s->pid = pid;
	s->status_fd = st[0];
	close(st[1]);
	for (int i = 0; i < 3; i++)
		if (child[i] >= 0 && (i == 0 || child[i] != child[0]))
			close(child[i]);
	for (int i = 1; i <= 2; i++)
		if (s->out_fd[i] >= 0)
			set_nonblock(s->out_fd[i]);
	if (s->in_fd >= 0)
		set_nonblock(s->in_fd);
	set_nonblock(s->status_fd);
	return;
fail:
	e = errno;
	close_fd(&st[0]);
	close_fd(&st[1]);
	for (int i = 0; i < 3; i++)
		if (child[i] >= 0 && (i == 0 || child[i] != child[0]))
			close(child[i]);
	kill_session(s);
	set_report(s, K_NOSTART, e, "%s: %s", what, strerror(e));
}

static void on_exec(struct agent *a, uint32_t ch, const uint8_t *p, size_t n)
{
	if (find(a, ch)) {
		char m[64];
		snprintf(m, sizeof(m), "EXEC: channel %u is already open", ch);
		proto_error(a, m);
		return;
	}
	struct exec_req r;
	char err[256];
	if (exec_req_parse(&r, p, n, err, sizeof(err)) < 0) {
		proto_error(a, err);
		return;
	}
	unsigned attached = 0;
	struct session *s = NULL;
	for (unsigned i = 0; i < SLOTS; i++) {
		attached += a->s[i].used && a->s[i].attached;
		if (!a->s[i].used && !s)
			s = &a->s[i];
	}
	if (!s || attached >= SM_MAX_SESSIONS) {
		/* Not a protocol error: detached KEEP sessions use slots the host cannot see. */
		emit_exit(a, ch, K_FAILED, EAGAIN, "exec: too many open sessions; close some");
		exec_req_free(&r);
		return;
	}
	*s = (struct session){
		.used = true, .attached = true, .id = ch, .flags = r.flags, .op = r.op,
		.status_fd = -1, .in_fd = -1, .out_fd = {-1, -1, -1}, .ctl_fd = -1,
		.in_window = SM_INITIAL_WINDOW,
		.credit = {0, SM_INITIAL_WINDOW, SM_INITIAL_WINDOW},
	};
	if (r.op == OP_RUN)
		start_process(a, s, &r);
	else if (r.op == OP_MOUNT)
		start_mount(a, s, &r);
	else
		start_file(a, s, &r);
	exec_req_free(&r);
	maybe_finish(a, s);
}

/* ---- control frames ----------------------------------------------------------------- */

/* machine-id(5): 32 lowercase hex digits. */
static bool is_machine_id(const uint8_t *p, uint32_t len)
{
	if (len != 32)
		return false;
	for (uint32_t i = 0; i < len; i++)
		if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
			return false;
	return true;
}

/* Replaces the image's /etc/machine-id (a file, or a link systemd images point elsewhere)
 * with a new read-only file; the root is the VM's private overlay, so nothing else sees it. */
static void write_machine_id(const uint8_t *id, bool debug)
{
	char text[33];
	memcpy(text, id, 32);
	text[32] = '\n';
	mkdir("/etc", 0755);
	unlink("/etc/machine-id");
	int fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0444);
	if (fd < 0 || write(fd, text, sizeof(text)) != (ssize_t)sizeof(text))
		sm_log(debug, "/etc/machine-id: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
}

static void on_hello(struct agent *a, const uint8_t *p, size_t n)
{
	if (n < 4 + SM_NONCE) {
		proto_error(a, "HELLO: payload shorter than version and nonce");
		return;
	}
	if (get32(p) != SM_VERSION) {
		char m[96];
		snprintf(m, sizeof(m), "HELLO: protocol version %u is not supported (guest speaks 1)",
			 get32(p));
		proto_error(a, m);
		return;
	}
	const uint8_t *f[6] = {0};
	uint32_t flen[6] = {0};
	for (size_t i = 4 + SM_NONCE; i < n;) {
		if (n - i < 6) {
			proto_error(a, "HELLO: truncated setup field");
			return;
		}
		uint16_t tag = get16(p + i);
		uint32_t len = get32(p + i + 2);
		i += 6;
		if (len > n - i || tag < 1 || tag > 5 || f[tag] ||
		    (tag == 1 && len != 8) || (tag == 2 && (len < 16 || len > 512)) ||
		    (tag == 3 && (len < 1 || len > 64)) || (tag == 5 && (len < 1 || len > 96)) ||
		    (tag == 4 && !is_machine_id(p + i, len))) {
			proto_error(a, "HELLO: bad setup field (unknown, repeated or bad length)");
			return;
		}
		f[tag] = p + i;
		flen[tag] = len;
		i += len;
	}
	reset(a, false);
	/* In host mode the init is an ordinary test process: it must not touch the host's
	 * clock, entropy pool or hostname, so setup is validated but only applied in a VM. */
	if (a->o.vm) {
		if (f[1]) {
			uint64_t ns = get64(f[1]);
			struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u),
					      .tv_nsec = (long)(ns % 1000000000u)};
			if (clock_settime(CLOCK_REALTIME, &ts) < 0)
				sm_log(a->o.debug, "clock_settime: %s", strerror(errno));
		}
		if (f[2]) {
			struct {
				int count, size;
				uint8_t buf[512];
			} ent;
			ent.count = (int)flen[2] * 8;
			ent.size = (int)flen[2];
			memcpy(ent.buf, f[2], flen[2]);
			int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
			if (fd < 0 || ioctl(fd, SM_RNDADDENTROPY, &ent) < 0)
				sm_log(a->o.debug, "RNDADDENTROPY: %s", strerror(errno));
			else if (ioctl(fd, SM_RNDRESEEDCRNG) < 0)
				sm_log(a->o.debug, "RNDRESEEDCRNG: %s", strerror(errno));
			if (fd >= 0)
				close(fd);
		}
		if (f[3] && sethostname((const char *)f[3], flen[3]) < 0)
			sm_log(a->o.debug, "sethostname: %s", strerror(errno));
		if (f[4])
			write_machine_id(f[4], a->o.debug);
		if (f[5]) {
			char spec[97];
			const char *step = "";
			memcpy(spec, f[5], flen[5]);
			spec[flen[5]] = 0;
			if (network_reconfigure(spec, &step) < 0)
				dprintf(2, "sm-init: eth0 %s: %s\n", step, strerror(errno));
			else
				sm_log(a->o.debug, "eth0 now %s", spec);
		}
	}
	a->hello = true;
	emit(a, T_HELLO, 0, 0, p, 4 + SM_NONCE); /* version 1 + the nonce echoed */
}

static void __attribute__((noreturn)) shutdown_now(struct agent *a)
{
	reset(a, true);
	if (a->o.vm)
		power_off();
	_exit(0);
}

/* Checks a frame's type/stream/channel/length shape; returns an error message or NULL. */
static const char *frame_shape(uint8_t type, uint8_t stream, uint32_t ch, uint32_t len)
{
	bool control = type == T_HELLO || type == T_PING || type == T_PONG || type == T_SHUTDOWN;
	if (control ? ch != 0 : (ch == 0 || ch > 0x7fffffffu))
		return "channel not allowed for this frame type";
	if (type == T_CREDIT ? (stream != 1 && stream != 2) : stream != 0)
		return "stream not allowed for this frame type";
	switch (type) {
	case T_DATA:
		return len ? NULL : "DATA: empty payload";
	case T_EOF:
	case T_CLOSE:
	case T_SHUTDOWN:
		return len ? "payload must be empty" : NULL;
	case T_CREDIT:
	case T_SIGNAL:
	case T_RESIZE:
		return len == 4 ? NULL : "payload must be 4 bytes";
	case T_PING:
	case T_PONG:
		return len == 8 ? NULL : "payload must be 8 bytes";
	default:
		return NULL;
	}
}

static void dispatch(struct agent *a, uint8_t type, uint8_t stream, uint32_t ch,
		     const uint8_t *p, uint32_t len)
{
	const char *bad = frame_shape(type, stream, ch, len);
	if (type == T_STARTED || type == T_EXIT || type == T_ERROR)
		bad = "frame type not allowed from the host";
	if (bad) {
		char m[128];
		snprintf(m, sizeof(m), "frame type %u: %s", type, bad);
		proto_error(a, m);
		return;
	}
	if (type == T_HELLO) {
		on_hello(a, p, len);
		return;
	}
	if (type == T_EXEC) {
		on_exec(a, ch, p, len);
		return;
	}
	if (type == T_PING) {
		emit(a, T_PONG, 0, 0, p, 8);
		return;
	}
	if (type == T_PONG)
		return;
	if (type == T_SHUTDOWN)
		shutdown_now(a);
	struct session *s = find(a, ch);
	if (type == T_CREDIT) {
		uint32_t n = get32(p);
		if (!n) {
			proto_error(a, "CREDIT: zero bytes");
			return;
		}
		if (s && s->credit[stream] < (1ull << 40))
			s->credit[stream] += n;
		return;
	}
	if (type == T_SIGNAL) {
		uint32_t sig = get32(p);
		if (sig < 1 || sig > 64) {
			proto_error(a, "SIGNAL: number must be 1..64");
			return;
		}
		if (s && s->pid && !s->reaped)
			kill(s->ctl_fd >= 0 ? -s->pid : s->pid, (int)sig);
		return;
	}
	/* Frames crossing an EXIT in flight name a channel that is already free: ignore. */
	if (!s)
		return;
	if (type == T_RESIZE) {
		struct winsize ws = {.ws_row = get16(p), .ws_col = get16(p + 2)};
		if (s->ctl_fd >= 0)
			ioctl(s->ctl_fd, TIOCSWINSZ, &ws);
	} else if (type == T_CLOSE) {
		if (!s->pid)
			set_report(s, K_FAILED, ECANCELED, "closed by the host");
		kill_session(s);
		maybe_finish(a, s);
	} else { /* DATA or EOF on stdin */
		if (!(s->flags & FLAG_STDIN) && s->op != OP_WRITE) {
			proto_error(a, "stdin frame for a session without the STDIN flag");
			return;
		}
		if (s->in_eof) {
			proto_error(a, "stdin frame after stdin EOF");
			return;
		}
		if (type == T_EOF) {
			s->in_eof = true;
		} else if (len > s->in_window) {
			proto_error(a, "DATA: stdin window exceeded");
			return;
		} else {
			s->in_window -= len;
			if (s->in_fd < 0) {
				/* Nobody reads stdin any more: discard, but give the window back. */
				s->in_window += len;
				emit_u32(a, T_CREDIT, 0, s->id, len);
			} else if (buf_append(&s->inq, p, len) < 0) {
				oom();
			}
		}
		write_stdin(a, s);
		maybe_finish(a, s);
	}
}

/* Before a handshake the input is scanned byte by byte for a HELLO header, so the tail of an
 * earlier connection or of a rejected frame is skipped. Returns true when one starts at 0. */
static bool at_hello(struct agent *a)
{
	static const uint8_t pat[8] = {0x53, 0x4d, T_HELLO, 0, 0, 0, 0, 0};
	for (;;) {
		const uint8_t *p = a->in.p + a->in.off;
		size_t n = buf_used(&a->in);
		if (!n)
			return false;
		const uint8_t *m = memchr(p, pat[0], n);
		if (!m) {
			a->in.off = a->in.len = 0;
			return false;
		}
		a->in.off += (size_t)(m - p);
		p = m;
		n = buf_used(&a->in);
		size_t k = n < 8 ? n : 8;
		bool ok = memcmp(p, pat, k) == 0;
		if (ok && n >= SM_HDR) {
			uint32_t len = get32(p + 8);
			ok = len >= 4 + SM_NONCE && len <= SM_MAX_PAYLOAD;
		}
		if (ok)
			return n >= SM_HDR;
		a->in.off++;
	}
}

static void process_input(struct agent *a)
{
	while (buf_used(&a->out) < OUT_HARD) {
		if (!a->hello && !at_hello(a))
			break;
		const uint8_t *p = a->in.p + a->in.off;
		size_t n = buf_used(&a->in);
		if (n < SM_HDR)
			break;
		uint8_t type = p[2], stream = p[3];
		uint32_t ch = get32(p + 4), len = get32(p + 8);
		const char *bad = NULL;
		if (get16(p) != SM_MAGIC)
			bad = "bad frame magic";
		else if (len > SM_MAX_PAYLOAD)
			bad = "frame payload longer than 65536";
		else if (type < T_HELLO || type > T_SHUTDOWN)
			bad = "unknown frame type";
		if (bad) {
			a->in.off++; /* resynchronise from the next byte */
			proto_error(a, bad);
			continue;
		}
		if (n < SM_HDR + len)
			break;
		a->in.off += SM_HDR + len;
		dispatch(a, type, stream, ch, p + SM_HDR, len);
	}
	if (!buf_used(&a->in))
		a->in.off = a->in.len = 0;
}

/* The host went away: in a VM keep the port and wait for a reconnect, in host mode wind down. */
static void hang_up(struct agent *a)
{
	sm_log(a->o.debug, "agent port hung up");
	reset(a, false);
	a->in.off = a->in.len = 0;
	a->out.off = a->out.len = 0;
	a->out_partial = 0;
	if (a->o.vm) {
		a->hup = true;
		a->backoff_ms = a->backoff_ms ? a->backoff_ms * 2 : HUP_BACKOFF_MIN_MS;
		if (a->backoff_ms > HUP_BACKOFF_MAX_MS)
			a->backoff_ms = HUP_BACKOFF_MAX_MS;
		a->probe_at_ms = now_ms() + a->backoff_ms;
	} else {
		a->gone = true;
	}
}

static void read_agent(struct agent *a)
{
	if (a->in.off) {
		memmove(a->in.p, a->in.p + a->in.off, buf_used(&a->in));
		a->in.len -= a->in.off;
		a->in.off = 0;
	}
	ssize_t n = read(a->o.fd, a->in.p + a->in.len, IN_CAP - a->in.len);
	if (n > 0) {
		a->in.len += (size_t)n;
		a->hup = false;
		a->backoff_ms = 0;
	} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
		hang_up(a);
	}
}

/* ---- the loop ----------------------------------------------------------------------- */

static void add_fd(struct agent *a, nfds_t *n, int fd, short ev, struct session *s, int role)
{
	a->pfd[*n] = (struct pollfd){.fd = fd, .events = ev};
	a->pref[*n] = (struct pref){s, role};
	(*n)++;
}

/* Host mode ends when the peer is gone and so is every child (subreaper: grandchildren too). */
static void maybe_exit(struct agent *a)
{
	if (a->o.vm || !a->gone)
		return;
	for (unsigned i = 0; i < SLOTS; i++)
		if (a->s[i].used)
			return;
	if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
		_exit(0);
}

static void setup(struct agent *a, const struct agent_opts *o)
{
	memset(a, 0, sizeof(*a));
	a->o = *o;
	a->s = calloc(SLOTS, sizeof(*a->s));
	a->pfd = calloc(2 + 4 * SLOTS, sizeof(*a->pfd));
	a->pref = calloc(2 + 4 * SLOTS, sizeof(*a->pref));
	a->scratch = malloc(SM_MAX_PAYLOAD);
	a->in.p = malloc(IN_CAP);
	if (!a->s || !a->pfd || !a->pref || !a->scratch || !a->in.p)
		oom();
	for (unsigned i = 0; i < SLOTS; i++)
		a->s[i] = (struct session){.status_fd = -1, .in_fd = -1, .out_fd = {-1, -1, -1},
					   .ctl_fd = -1};
	a->in.cap = IN_CAP;
	signal(SIGPIPE, SIG_IGN); /* a dead reader shows up as EPIPE, handled per fd */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_BLOCK, &set, NULL);
	a->sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (a->sigfd < 0) {
		dprintf(2, "sm-init: fatal: signalfd: %s\n", strerror(errno));
		_exit(1);
	}
	if (!o->vm)
		prctl(PR_SET_CHILD_SUBREAPER, 1);
	/* Four fds per session: lift the soft limit to the hard one. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	fcntl(o->fd, F_SETFD, FD_CLOEXEC);
	set_nonblock(o->fd);
}

void agent_run(const struct agent_opts *o)
{
	struct agent ag, *a = &ag;
	setup(a, o);
	for (;;) {
		process_input(a);
		flush(a);
		maybe_exit(a);

		nfds_t n = 0;
		int timeout = -1;
		bool port = !a->gone;
		if (a->hup) {
			int64_t left = a->probe_at_ms - now_ms();
			port = left <= 0;
			timeout = left > 0 ? (int)left : 0;
		}
		if (port) {
			short ev = 0;
			if (a->in.len - a->in.off < IN_CAP)
				ev |= POLLIN;
			if (buf_used(&a->out) > a->out_partial)
				ev |= POLLOUT;
			add_fd(a, &n, o->fd, ev, NULL, R_AGENT);
		}
		add_fd(a, &n, a->sigfd, POLLIN, NULL, R_SIG);
		bool room = buf_used(&a->out) < OUT_SOFT;
		for (unsigned i = 0; i < SLOTS; i++) {
			struct session *s = &a->s[i];
			if (!s->used)
				continue;
			if (s->status_fd >= 0)
				add_fd(a, &n, s->status_fd, POLLIN, s, R_STATUS);
			if (s->in_fd >= 0 && buf_used(&s->inq))
				add_fd(a, &n, s->in_fd, POLLOUT, s, R_IN);
			/* Only fds we want to hear from are polled at all: a hung-up pipe reports
			 * POLLHUP even with no events requested, which would spin the loop. */
			for (int st = 1; st <= 2; st++) {
				bool want = s->out_fd[st] >= 0 && s->started &&
					    (!s->attached || (room && s->credit[st] > 0));
				if (want)
					add_fd(a, &n, s->out_fd[st], POLLIN, s, st == 1 ? R_OUT1 : R_OUT2);
			}
		}
		if (poll(a->pfd, n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			dprintf(2, "sm-init: fatal: poll: %s\n", strerror(errno));
			_exit(1);
		}
		if (a->hup && port && !(a->pfd[0].revents & POLLIN)) {
			/* Still no host: probe again later, backing off. */
			hang_up(a);
			continue;
		}
		for (nfds_t i = 0; i < n; i++) {
			short re = a->pfd[i].revents;
			struct session *s = a->pref[i].s;
			if (!re)
				continue;
			switch (a->pref[i].role) {
			case R_AGENT:
				if (re & POLLOUT)
					flush(a);
				if (re & (POLLIN | POLLHUP | POLLERR))
					read_agent(a);
				break;
			case R_SIG:
				reap(a);
				break;
			case R_STATUS:
				if (s->status_fd >= 0)
					read_status(a, s);
				break;
			case R_IN:
				if (s->in_fd >= 0)
					write_stdin(a, s);
				break;
			default: {
				int st = a->pref[i].role == R_OUT1 ? 1 : 2;
				if (s->out_fd[st] >= 0)
					read_output(a, s, st);
			}
			}
		}
		for (unsigned i = 0; i < SLOTS; i++)
			if (a->s[i].used)
				maybe_finish(a, &a->s[i]);
	}
}
