/* Byte buffers and EXEC payload parsing: everything that turns host bytes into structures.
 * The host is validated as strictly as the host validates us: any deviation from
 * docs/protocol.md is a protocol error, which resets the agent. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sm.h"

uint8_t *buf_reserve(struct buf *b, size_t n)
{
	/* Compact first: the consumed prefix is dead space. */
	if (b->off && b->off == b->len) {
		b->off = b->len = 0;
	} else if (b->off > b->cap / 2) {
		memmove(b->p, b->p + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
	}
	if (b->cap - b->len < n) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap - b->len < n)
			cap *= 2;
		uint8_t *p = realloc(b->p, cap);
		if (!p)
			return NULL;
		b->p = p;
		b->cap = cap;
	}
	return b->p + b->len;
}

int buf_append(struct buf *b, const void *d, size_t n)
{
	uint8_t *w = buf_reserve(b, n);
	if (!w)
		return -1;
	memcpy(w, d, n);
	b->len += n;
	return 0;
}

void buf_free(struct buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

ssize_t read_small(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t n = 0;
	while (n + 1 < size) {
		ssize_t r = read(fd, buf + n, size - 1 - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	buf[n] = 0;
	return (ssize_t)n;
}

void sm_log(bool debug, const char *fmt, ...)
{
	if (!debug)
		return;
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	/* Seconds since boot, as the kernel prints them: shows where a slow boot goes. */
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	dprintf(2, "sm-init: [%ld.%03ld] %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000000, line);
}

enum tag { TAG_ARGV = 1, TAG_ENV, TAG_CWD, TAG_USER, TAG_FLAGS, TAG_WINSIZE, TAG_OP, TAG_MODE,
	   TAG_RLIMITS };
#define RLIMIT_ENTRY 20 /* u32 resource | u64 soft | u64 hard */
#define RLIMIT_RESOURCES 16 /* RLIMIT_CPU .. RLIMIT_RTTIME */

/* Copies a TLV string value; strings must not contain NUL (they become C strings). */
static char *dup_string(const uint8_t *v, uint32_t n)
{
	if (memchr(v, 0, n))
		return NULL;
	char *s = malloc((size_t)n + 1);
	if (s) {
		memcpy(s, v, n);
		s[n] = 0;
	}
	return s;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto fail; } while (0)

int exec_req_parse(struct exec_req *r, const uint8_t *p, size_t n, char *err, size_t errlen)
{
	memset(r, 0, sizeof(*r));
	r->mode = 0644;
	/* First pass counts repeated fields so the arrays are sized exactly (bounded by n). */
	size_t argc = 0, envc = 0;
	unsigned seen = 0;
	for (size_t i = 0; i < n;) {
		if (n - i < 6)
			FAIL("EXEC: truncated TLV header");
		uint16_t tag = get16(p + i);
		uint32_t len = get32(p + i + 2);
		i += 6;
		if (len > n - i)
			FAIL("EXEC: TLV length %u overruns payload", len);
		if (tag < TAG_ARGV || tag > TAG_RLIMITS)
			FAIL("EXEC: unknown tag %u", tag);
		if (tag == TAG_ARGV) {
			argc++;
		} else if (tag == TAG_ENV) {
			envc++;
		} else {
			if (seen & (1u << tag))
				FAIL("EXEC: tag %u repeated", tag);
			seen |= 1u << tag;
		}
		i += len;
	}
	if (argc == 0 || argc > SM_MAX_ARGS)
		FAIL("EXEC: need 1..%u ARGV entries, got %zu", SM_MAX_ARGS, argc);
	if (envc > SM_MAX_ARGS)
		FAIL("EXEC: too many ENV entries (%zu)", envc);
	r->argv = calloc(argc + 1, sizeof(char *));
	r->envp = calloc(envc + 2, sizeof(char *)); /* +1 for a HOME the child may add */
	if (!r->argv || !r->envp)
		FAIL("EXEC: out of memory");

	for (size_t i = 0; i < n;) {
		uint16_t tag = get16(p + i);
		uint32_t len = get32(p + i + 2);
		const uint8_t *v = p + i + 6;
		i += 6 + (size_t)len;
		char *s = NULL;
		switch (tag) {
		case TAG_ARGV:
		case TAG_ENV:
		case TAG_CWD:
		case TAG_USER:
			if (!(s = dup_string(v, len)))
				FAIL("EXEC: string field %u contains NUL", tag);
			if (tag == TAG_ARGV) {
				r->argv[r->argc++] = s;
			} else if (tag == TAG_ENV) {
				r->envp[r->envc++] = s;
				char *eq = strchr(s, '=');
				if (!eq || eq == s)
					FAIL("EXEC: ENV entry must be KEY=VALUE with a non-empty KEY");
			} else if (tag == TAG_CWD) {
				r->cwd = s;
				if (s[0] != '/')
					FAIL("EXEC: CWD must be absolute");
			} else {
				r->user = s;
				if (!s[0])
					FAIL("EXEC: USER must not be empty");
			}
			break;
		case TAG_FLAGS:
		case TAG_OP:
		case TAG_MODE:
			if (len != 4)
				FAIL("EXEC: field %u must be 4 bytes", tag);
			if (tag == TAG_FLAGS) {
				r->flags = get32(v);
				if (r->flags & ~FLAGS_KNOWN)
					FAIL("EXEC: unknown FLAGS bits 0x%x", r->flags);
			} else if (tag == TAG_OP) {
				r->op = get32(v);
				if (r->op > OP_MOUNT)
					FAIL("EXEC: unknown OP %u", r->op);
			} else {
				r->mode = get32(v);
				if (r->mode & ~07777u)
					FAIL("EXEC: MODE 0%o has bits outside 07777", r->mode);
			}
			break;
		case TAG_WINSIZE:
			if (len != 4)
				FAIL("EXEC: WINSIZE must be 4 bytes");
			r->rows = get16(v);
			r->cols = get16(v + 2);
			break;
		case TAG_RLIMITS:
			if (len % RLIMIT_ENTRY || len / RLIMIT_ENTRY > SM_MAX_RLIMITS)
				FAIL("EXEC: RLIMITS must be up to %d entries of %d bytes", SM_MAX_RLIMITS,
				     RLIMIT_ENTRY);
			for (uint32_t k = 0; k < len / RLIMIT_ENTRY; k++) {
				struct exec_rlimit *l = &r->rlimits[r->nrlimits++];
				const uint8_t *e = v + (size_t)k * RLIMIT_ENTRY;
				l->resource = get32(e);
				l->soft = get64(e + 4);
				l->hard = get64(e + 12);
				if (l->resource >= RLIMIT_RESOURCES || l->soft > l->hard)
					FAIL("EXEC: RLIMITS entry %u is malformed", k);
			}
			break;
		}
	}
	return 0;
fail:
	exec_req_free(r);
	return -1;
}

void exec_req_free(struct exec_req *r)
{
	if (r->argv)
		for (size_t i = 0; i < r->argc; i++)
			free(r->argv[i]);
	if (r->envp)
		for (size_t i = 0; i < r->envc; i++)
			free(r->envp[i]);
	free(r->argv);
	free(r->envp);
	free(r->cwd);
	free(r->user);
	memset(r, 0, sizeof(*r));
}
