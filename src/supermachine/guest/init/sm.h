/* sm-init: PID 1 of every supermachine VM and the guest side of docs/protocol.md.
 * Shared declarations of the few compilation units. */
#ifndef SM_H
#define SM_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Protocol constants (docs/protocol.md). */
#define SM_MAGIC 0x4d53u
#define SM_HDR 12u
#define SM_MAX_PAYLOAD 65536u
#define SM_INITIAL_WINDOW 262144u
#define SM_MAX_SESSIONS 1024u
#define SM_MAX_ARGS 4096u
#define SM_MAX_MSG 1024u
#define SM_VERSION 1u
#define SM_NONCE 16u

enum frame_type {
	T_HELLO = 1, T_EXEC, T_STARTED, T_DATA, T_EOF, T_CREDIT, T_SIGNAL, T_RESIZE,
	T_EXIT, T_CLOSE, T_PING, T_PONG, T_ERROR, T_SHUTDOWN,
};
enum exit_kind { K_EXITED = 0, K_SIGNALED = 1, K_NOSTART = 2, K_FAILED = 3 };
enum op { OP_RUN = 0, OP_READ = 1, OP_WRITE = 2, OP_MOUNT = 3 };
/* MODE bits of a MOUNT session (docs/protocol.md). */
#define MOUNT_RDONLY 1u
#define MOUNT_MKDIR 2u   /* create the target directory (and its parents) */
#define MOUNT_MKFILE 4u  /* create the target as an empty file (a single-file bind mount) */
#define MOUNT_BIND 8u
#define MOUNT_REMOUNT 16u
#define MOUNT_NOSUID 32u /* nosuid, nodev */
#define MOUNT_COPYUP 64u /* first copy what the image has at the target into the new mount */
#define MOUNT_BLOCK 128u /* source = a virtio-blk serial: re-probe that disk, mount it */
#define MOUNT_PIVOT 256u /* target = a mounted directory: it becomes the root (OCI bundles) */
#define MOUNT_KNOWN 511u
#define FLAG_STDIN 1u
#define FLAG_TTY 2u
#define FLAG_KEEP 4u
#define FLAGS_KNOWN (FLAG_STDIN | FLAG_TTY | FLAG_KEEP)

/* Outbound buffer: stop reading process output above SOFT, stop parsing host frames above
 * HARD. Everything appended is bounded per event, so the buffer stays a few MiB at most. */
#define OUT_SOFT (256u * 1024u)
#define OUT_HARD (1024u * 1024u)
/* Slots: SM_MAX_SESSIONS attached plus as many detached (KEEP, or killed but not reaped). */
#define SLOTS (2u * SM_MAX_SESSIONS)

/* Little-endian helpers. */
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Growable byte buffer; data lives in p[off, len). */
struct buf {
	uint8_t *p;
	size_t off, len, cap;
};
/* Make room for n more bytes at the end; returns a pointer to them or NULL (ENOMEM). */
uint8_t *buf_reserve(struct buf *b, size_t n);
int buf_append(struct buf *b, const void *d, size_t n);
void buf_free(struct buf *b);
/* Reads a small file (procfs, sysfs) into buf, NUL-terminated; returns the length or -1. */
ssize_t read_small(const char *path, char *buf, size_t size);
static inline size_t buf_used(const struct buf *b) { return b->len - b->off; }

/* A parsed EXEC request: strings are NUL-terminated heap copies (bounded by the payload). */
#define SM_MAX_RLIMITS 16
struct exec_rlimit {
	uint32_t resource;
	uint64_t soft, hard; /* UINT64_MAX: unlimited */
};
struct exec_req {
	char **argv, **envp;
	size_t argc, envc;
	char *cwd, *user;
	uint32_t flags, op, mode;
	uint16_t rows, cols;
	struct exec_rlimit rlimits[SM_MAX_RLIMITS];
	size_t nrlimits;
};
/* Parses and validates an EXEC payload; on failure returns -1 with a message in err. */
int exec_req_parse(struct exec_req *r, const uint8_t *p, size_t n, char *err, size_t errlen);
void exec_req_free(struct exec_req *r);

/* Who a session runs as. */
#define MAX_GROUPS 64
struct ident {
	uid_t uid;
	gid_t gid;
	gid_t groups[MAX_GROUPS];
	int ngroups;
	char home[256];
	bool have_home;
};
/* Resolves a USER spec against /etc/passwd and /etc/group of the current root.
 * Returns 0, or an errno with a one-line reason in err. */
int resolve_user(const char *spec, struct ident *id, char *err, size_t errlen);
/* Fills id->home for uid (HOME default); leaves have_home false if unknown. */
void lookup_home(uid_t uid, struct ident *id);

/* Child side of a process session: never returns. Reports setup/exec failures on report_fd as
 * u8 kind | i32 errno | message, then exits 127. stdio: fds for 0,1,2 (already opened). */
void child_exec(const struct exec_req *r, const int stdio[3], bool tty, int report_fd,
		bool change_ids) __attribute__((noreturn));
/* mkdir -p with mode 0755; returns 0 or -1 with errno. */
int mkdir_p(const char *path);

/* Event loop. fd: the agent port/socket. vm: running as PID 1 in a VM. */
struct agent_opts {
	int fd;
	bool vm;
	bool debug;
	const char *port_path; /* vm: reopen path if needed (may be NULL) */
};
void agent_run(const struct agent_opts *o) __attribute__((noreturn));

/* VM mode boot: mounts, modules, switch root; returns the opened agent port fd. */
int boot_vm(bool *debug);
/* HELLO's NETWORK setup of eth0 (boot.c); -1 with errno and *step on failure. */
int network_reconfigure(const char *spec, const char **step);
/* Power off (VM) after syncing; never returns. */
void power_off(void) __attribute__((noreturn));

/* Logging: sm_log only when debug is on. */
void sm_log(bool debug, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
