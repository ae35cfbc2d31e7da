/* fsguard: what a guest may make QEMU do to the host through a shared directory.
 *
 * Host directories are shared with QEMU's 9p "local" backend in security_model=none: QEMU
 * creates files as the user who runs supermachine, with the modes the guest asks for, and
 * resolves every path component itself with O_NOFOLLOW below the export (so `..` and
 * symlinks do not lead out of it). What that model still lets a root guest do is harmful on
 * the host: a setuid or setgid file (run by a host user, it would run as the owner: root, if
 * root runs supermachine), device nodes (a raw disk in a user's directory), FIFOs and sockets
 * (a host program opening them blocks or talks to the guest), file capabilities and other
 * security xattrs, and files handed to other owners.
 *
 * Loaded into QEMU with LD_PRELOAD, this library wraps the libc calls QEMU's 9p backend makes
 * and refuses exactly those: modes lose S_ISUID and S_ISGID, mknod makes regular files only,
 * chown does nothing and says it worked (what security_model=none means: files stay the host
 * user's; `tar x` or `cp -a` as root in the guest must not fail on it), and only user.*
 * extended attributes may be set or removed. Everything else passes through unchanged.
 * When root runs supermachine, QEMU also lacks CAP_FSETID and CAP_MKNOD (qemu.py drops them
 * from its bounding set), so a write to an existing setuid file clears the bit, as it does
 * for everyone else.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define STRIP (S_ISUID | S_ISGID)

static void *next(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

static mode_t open_mode(int flags, va_list ap)
{
	return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN_WRAPPER(name, ...)                                                               \
	int name(__VA_ARGS__, int flags, ...)                                                 \
	{                                                                                     \
		va_list ap;                                                                   \
		va_start(ap, flags);                                                          \
		mode_t mode = open_mode(flags, ap) & ~STRIP;                                  \
		va_end(ap);                                                                   \
		static int (*real)();                                                         \
		if (!real)                                                                    \
			real = next(#name);

OPEN_WRAPPER(open, const char *path)
	return real(path, flags, mode);
}
OPEN_WRAPPER(open64, const char *path)
	return real(path, flags, mode);
}
OPEN_WRAPPER(openat, int dirfd, const char *path)
	return real(dirfd, path, flags, mode);
}
OPEN_WRAPPER(openat64, int dirfd, const char *path)
	return real(dirfd, path, flags, mode);
}

int creat(const char *path, mode_t mode)
{
	return open(path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

int mkdir(const char *path, mode_t mode)
{
	static int (*real)(const char *, mode_t);
	if (!real)
		real = next("mkdir");
	return real(path, mode & ~STRIP);
}

int mkdirat(int dirfd, const char *path, mode_t mode)
{
	static int (*real)(int, const char *, mode_t);
	if (!real)
		real = next("mkdirat");
	return real(dirfd, path, mode & ~STRIP);
}

int mknodat(int dirfd, const char *path, mode_t mode, dev_t dev)
{
	static int (*real)(int, const char *, mode_t, dev_t);
	if (!real)
		real = next("mknodat");
	if ((mode & S_IFMT) != S_IFREG && (mode & S_IFMT) != 0) {
		errno = EPERM; /* no devices, FIFOs or sockets on the host */
		return -1;
	}
	return real(dirfd, path, mode & ~STRIP, 0);
}

int mknod(const char *path, mode_t mode, dev_t dev)
{
	return mknodat(AT_FDCWD, path, mode, dev);
}

/* What a QEMU built against glibc before 2.33 calls instead of mknod/mknodat. */
int __xmknodat(int ver, int dirfd, const char *path, mode_t mode, dev_t *dev)
{
	return mknodat(dirfd, path, mode, dev ? *dev : 0);
}

int __xmknod(int ver, const char *path, mode_t mode, dev_t *dev)
{
	return mknodat(AT_FDCWD, path, mode, dev ? *dev : 0);
}

int mkfifo(const char *path, mode_t mode)
{
	errno = EPERM;
	return -1;
}

int mkfifoat(int dirfd, const char *path, mode_t mode)
{
	errno = EPERM;
	return -1;
}

int chmod(const char *path, mode_t mode)
{
	static int (*real)(const char *, mode_t);
	if (!real)
		real = next("chmod");
	return real(path, mode & ~STRIP);
}

int fchmod(int fd, mode_t mode)
{
	static int (*real)(int, mode_t);
	if (!real)
		real = next("fchmod");
	return real(fd, mode & ~STRIP);
}

int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
	static int (*real)(int, const char *, mode_t, int);
	if (!real)
		real = next("fchmodat");
	return real(dirfd, path, mode & ~STRIP, flags);
}

int chown(const char *p, uid_t u, gid_t g) { return 0; }
int lchown(const char *p, uid_t u, gid_t g) { return 0; }
int fchown(int fd, uid_t u, gid_t g) { return 0; }
int fchownat(int d, const char *p, uid_t u, gid_t g, int f) { return 0; }

static int xattr_allowed(const char *name)
{
	if (name && strncmp(name, "user.", 5) == 0)
		return 1;
	errno = EPERM; /* security.capability, trusted.*, ACLs: not from a guest */
	return 0;
}

int setxattr(const char *p, const char *n, const void *v, size_t s, int f)
{
	static int (*real)(const char *, const char *, const void *, size_t, int);
	if (!real)
		real = next("setxattr");
	return xattr_allowed(n) ? real(p, n, v, s, f) : -1;
}

int lsetxattr(const char *p, const char *n, const void *v, size_t s, int f)
{
	static int (*real)(const char *, const char *, const void *, size_t, int);
	if (!real)
		real = next("lsetxattr");
	return xattr_allowed(n) ? real(p, n, v, s, f) : -1;
}

int fsetxattr(int fd, const char *n, const void *v, size_t s, int f)
{
	static int (*real)(int, const char *, const void *, size_t, int);
	if (!real)
		real = next("fsetxattr");
	return xattr_allowed(n) ? real(fd, n, v, s, f) : -1;
}

/* Removing is guarded like setting: a guest must not strip a host file's ACLs or labels. */
int removexattr(const char *p, const char *n)
{
	static int (*real)(const char *, const char *);
	if (!real)
		real = next("removexattr");
	return xattr_allowed(n) ? real(p, n) : -1;
}

int lremovexattr(const char *p, const char *n)
{
	static int (*real)(const char *, const char *);
	if (!real)
		real = next("lremovexattr");
	return xattr_allowed(n) ? real(p, n) : -1;
}

int fremovexattr(int fd, const char *n)
{
	static int (*real)(int, const char *);
	if (!real)
		real = next("fremovexattr");
	return xattr_allowed(n) ? real(fd, n) : -1;
}
