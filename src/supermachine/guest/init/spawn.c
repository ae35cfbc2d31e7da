/* Child side of a process session (runs between fork and exec) and the /etc/passwd and
 * /etc/group lookups it needs. Nothing here may block on the host: failures are shipped to
 * the parent over a close-on-exec pipe, whose silent EOF means "exec succeeded". */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sm.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define LINE_MAX_ 4096 /* longer passwd/group lines are skipped, not truncated */

/* Reads the next whole line (without newline) into line; skips overlong lines. */
static bool next_line(FILE *f, char *line, size_t size)
{
	while (fgets(line, (int)size, f)) {
		size_t n = strlen(line);
		if (n && line[n - 1] == '\n') {
			line[n - 1] = 0;
			return true;
		}
		if (feof(f))
			return true; /* last line without newline */
		int c; /* overlong: drop the rest of it */
		while ((c = fgetc(f)) != EOF && c != '\n')
			;
	}
	return false;
}

/* Splits a colon-separated line into at most max fields; returns the count. */
static int split(char *line, char **field, int max)
{
	int n = 0;
	field[n++] = line;
	for (char *p = line; *p && n < max; p++)
		if (*p == ':') {
			*p = 0;
			field[n++] = p + 1;
		}
	return n;
}

/* Parses a decimal id (no sign, no junk, fits below (id_t)-1). */
static bool parse_id(const char *s, unsigned *out)
{
	if (!*s || strlen(s) > 10)
		return false;
	unsigned long long v = 0;
	for (const char *p = s; *p; p++) {
		if (*p < '0' || *p > '9')
			return false;
		v = v * 10 + (unsigned)(*p - '0');
	}
	if (v >= 0xffffffffull)
		return false;
	*out = (unsigned)v;
	return true;
}

struct pwent {
	char name[256];
	unsigned uid, gid;
	char home[256];
};

/* Finds a passwd entry by name (name != NULL) or by uid. */
static bool find_passwd(const char *name, unsigned uid, struct pwent *out)
{
	FILE *f = fopen("/etc/passwd", "re");
	if (!f)
		return false;
	char line[LINE_MAX_], *fl[7];
	bool found = false;
	while (!found && next_line(f, line, sizeof(line))) {
		if (split(line, fl, 7) < 7)
			continue;
		unsigned u, g;
		if (!parse_id(fl[2], &u) || !parse_id(fl[3], &g))
			continue;
		if (name ? strcmp(fl[0], name) != 0 : u != uid)
			continue;
		snprintf(out->name, sizeof(out->name), "%s", fl[0]);
		snprintf(out->home, sizeof(out->home), "%s", fl[5]);
		out->uid = u;
		out->gid = g;
		found = true;
	}
	fclose(f);
	return found;
}

/* Looks a group up by name; returns its gid. */
static bool find_group(const char *name, unsigned *gid)
{
	FILE *f = fopen("/etc/group", "re");
	if (!f)
		return false;
	char line[LINE_MAX_], *fl[4];
	bool found = false;
	while (!found && next_line(f, line, sizeof(line))) {
		if (split(line, fl, 4) >= 3 && strcmp(fl[0], name) == 0 && parse_id(fl[2], gid))
			found = true;
	}
	fclose(f);
	return found;
}

/* Adds the groups that list user as a member (after the primary gid already in id). */
static void add_member_groups(const char *user, struct ident *id)
{
	FILE *f = fopen("/etc/group", "re");
	if (!f)
		return;
	char line[LINE_MAX_], *fl[4];
	while (id->ngroups < MAX_GROUPS && next_line(f, line, sizeof(line))) {
		unsigned g;
		if (split(line, fl, 4) < 4 || !parse_id(fl[2], &g))
			continue;
		for (char *m = strtok(fl[3], ","); m; m = strtok(NULL, ",")) {
			if (strcmp(m, user) != 0)
				continue;
			bool dup = false;
			for (int i = 0; i < id->ngroups; i++)
				dup |= id->groups[i] == (gid_t)g;
			if (!dup)
				id->groups[id->ngroups++] = (gid_t)g;
			break;
		}
	}
	fclose(f);
}

int resolve_user(const char *spec, struct ident *id, char *err, size_t errlen)
{
	memset(id, 0, sizeof(*id));
	char user[256], *group = NULL;
	if (strlen(spec) >= sizeof(user)) {
		snprintf(err, errlen, "user: %.64s...: name too long", spec);
		return EINVAL;
	}
	strcpy(user, spec);
	char *colon = strchr(user, ':'), *extra = NULL;
	if (colon) {
		*colon = 0;
		group = colon + 1;
		/* uid:gid:G1,G2: exactly these supplementary groups (an OCI process's
		 * additionalGids, resolved by the engine), none when the list is empty */
		if ((extra = strchr(group, ':')))
			*extra++ = 0;
	}
	if (!user[0] || (group && !group[0])) {
		snprintf(err, errlen, "user: %s: expected name, uid, name:group or uid:gid", spec);
		return EINVAL;
	}
	struct pwent pw;
	unsigned uid, gid = 0;
	bool have_pw;
	if (parse_id(user, &uid)) {
		have_pw = find_passwd(NULL, uid, &pw);
	} else {
		have_pw = find_passwd(user, 0, &pw);
		if (!have_pw) {
			snprintf(err, errlen, "user: %s: no such user in /etc/passwd", user);
			return ENOENT;
		}
		uid = pw.uid;
	}
	if (have_pw)
		gid = pw.gid;
	if (group && !parse_id(group, &gid) && !find_group(group, &gid)) {
		snprintf(err, errlen, "user: %s: no such group in /etc/group", group);
		return ENOENT;
	}
	id->uid = (uid_t)uid;
	id->gid = (gid_t)gid;
	if (extra) {
		for (char *g = strtok(extra, ","); g; g = strtok(NULL, ",")) {
			unsigned v;
			if (!parse_id(g, &v) || id->ngroups >= MAX_GROUPS) {
				snprintf(err, errlen, "user: %.64s: bad supplementary group list", spec);
				return EINVAL;
			}
			id->groups[id->ngroups++] = (gid_t)v;
		}
		if (have_pw) {
			snprintf(id->home, sizeof(id->home), "%s", pw.home);
			id->have_home = pw.home[0] != 0;
		}
		return 0;
	}
	id->groups[id->ngroups++] = (gid_t)gid;
	if (have_pw) {
		add_member_groups(pw.name, id);
		snprintf(id->home, sizeof(id->home), "%s", pw.home);
		id->have_home = pw.home[0] != 0;
	}
	return 0;
}

void lookup_home(uid_t uid, struct ident *id)
{
	struct pwent pw;
	if (find_passwd(NULL, (unsigned)uid, &pw) && pw.home[0]) {
		snprintf(id->home, sizeof(id->home), "%s", pw.home);
		id->have_home = true;
	}
}

int mkdir_p(const char *path)
{
	char p[4096];
	if (strlen(path) >= sizeof(p)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(p, path);
	for (char *s = p + 1;; s++) {
		if (*s != '/' && *s)
			continue;
		char c = *s;
		*s = 0;
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			return -1;
		*s = c;
		if (!c)
			break;
	}
	struct stat st;
	if (stat(path, &st) < 0)
		return -1;
	if (!S_ISDIR(st.st_mode)) {
		errno = ENOTDIR;
		return -1;
	}
	return 0;
}

/* Sends the failure to the parent and exits; the parent turns it into EXIT kind/code/msg. */
static void __attribute__((noreturn)) report(int fd, int kind, int code, const char *fmt, ...)
{
	uint8_t msg[5 + 256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf((char *)msg + 5, 256, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > 255)
		n = 255;
	msg[0] = (uint8_t)kind;
	put32(msg + 1, (uint32_t)code);
	/* One write below PIPE_BUF is atomic: the parent sees all of it or nothing. */
	ssize_t w = write(fd, msg, 5 + (size_t)n);
	(void)w;
	_exit(127);
}

/* execve through PATH like execvp, but with the session's own PATH and environment and
 * without the shell fallback (ENOEXEC is reported, as docker does). Returns the errno. */
static int exec_search(const char *file, char *const argv[], char *const envp[])
{
	if (!*file)
		return ENOENT;
	if (strchr(file, '/')) {
		execve(file, argv, envp);
		return errno;
	}
	const char *path = DEFAULT_PATH;
	for (size_t i = 0; envp[i]; i++)
		if (strncmp(envp[i], "PATH=", 5) == 0)
			path = envp[i] + 5;
	size_t flen = strlen(file);
	int result = ENOENT;
	for (const char *d = path;; d++) {
		const char *end = strchrnul(d, ':');
		size_t dlen = (size_t)(end - d);
		char full[4096];
		if (dlen + flen + 2 <= sizeof(full)) {
			/* An empty PATH element means the current directory, as in POSIX. */
			if (dlen) {
				memcpy(full, d, dlen);
				full[dlen] = '/';
				memcpy(full + dlen + 1, file, flen + 1);
			} else {
				memcpy(full, file, flen + 1);
			}
			/* A failed execve costs a whole new mm (set up before the file is even
			 * looked up): ~0.5 ms each under TCG. A missing file is told far cheaper. */
			if (access(full, F_OK) < 0 && (errno == ENOENT || errno == ENOTDIR))
				errno = ENOENT;
			else
				execve(full, argv, envp);
			if (errno == EACCES)
				result = EACCES; /* keep looking, but remember it */
			else if (errno != ENOENT && errno != ENOTDIR)
				return errno; /* found something that could not run */
		}
		if (!*end)
			break;
		d = end;
	}
	return result;
}

void child_exec(const struct exec_req *r, const int stdio[3], bool tty, int report_fd,
		bool change_ids)
{
	/* The init blocks SIGCHLD for its signalfd and ignores SIGPIPE: both are inherited
	 * across exec and would break ordinary programs. */
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < 65; sig++)
		signal(sig, SIG_DFL);

	setsid(); /* its own session and process group: SIGNAL/CLOSE hit the whole group */
	if (tty && ioctl(stdio[0], TIOCSCTTY, 0) < 0)
		report(report_fd, K_FAILED, errno, "tty: cannot make it the controlling terminal");
	for (int i = 0; i < 3; i++) {
		/* dup2 onto itself keeps close-on-exec set, so clear it explicitly then. */
		int rc = stdio[i] == i ? fcntl(i, F_SETFD, 0) : dup2(stdio[i], i);
		if (rc < 0)
			report(report_fd, K_FAILED, errno, "stdio: dup2 failed");
	}

	struct ident id;
	memset(&id, 0, sizeof(id));
	char err[256];
	if (r->user) {
		int e = resolve_user(r->user, &id, err, sizeof(err));
		if (e)
			report(report_fd, K_FAILED, e, "%s", err);
	} else {
		lookup_home(getuid(), &id);
	}
	const char *cwd = r->cwd ? r->cwd : "/";
	/* Created as root before dropping privileges, as docker does for WORKDIR. */
	if (mkdir_p(cwd) < 0)
		report(report_fd, K_FAILED, errno, "cwd: %s: %s", cwd, strerror(errno));
	/* Before the ids change: raising a hard limit takes CAP_SYS_RESOURCE. */
	for (size_t i = 0; i < r->nrlimits; i++) {
		const struct exec_rlimit *l = &r->rlimits[i];
		struct rlimit rl = {l->soft == UINT64_MAX ? RLIM_INFINITY : (rlim_t)l->soft,
				    l->hard == UINT64_MAX ? RLIM_INFINITY : (rlim_t)l->hard};
		if (setrlimit((int)l->resource, &rl) < 0)
			report(report_fd, K_FAILED, errno, "rlimit %u: %s", (unsigned)l->resource,
			       strerror(errno));
	}
	if (r->user && change_ids) {
		if (setgroups((size_t)id.ngroups, id.groups) < 0)
			report(report_fd, K_FAILED, errno, "user: setgroups: %s", strerror(errno));
		if (setgid(id.gid) < 0)
			report(report_fd, K_FAILED, errno, "user: setgid %u: %s", (unsigned)id.gid,
			       strerror(errno));
		if (setuid(id.uid) < 0)
			report(report_fd, K_FAILED, errno, "user: setuid %u: %s", (unsigned)id.uid,
			       strerror(errno));
	}
	if (chdir(cwd) < 0)
		report(report_fd, K_FAILED, errno, "cwd: %s: %s", cwd, strerror(errno));

	/* envp has a spare slot (see exec_req_parse) for HOME. */
	char **envp = r->envp;
	bool has_home = false;
	for (size_t i = 0; i < r->envc; i++)
		has_home |= strncmp(envp[i], "HOME=", 5) == 0;
	char home[300];
	if (!has_home) {
		snprintf(home, sizeof(home), "HOME=%s", id.have_home ? id.home : "/");
		envp[r->envc] = home;
		envp[r->envc + 1] = NULL;
	}
	int e = exec_search(r->argv[0], r->argv, envp);
	const char *what = e == ENOENT ? "not found" : strerror(e);
	report(report_fd, K_NOSTART, e, "exec: %.200s: %s", r->argv[0], what);
}
