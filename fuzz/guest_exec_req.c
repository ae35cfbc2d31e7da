/* libFuzzer target: the guest agent's parser of EXEC payloads (proto.c exec_req_parse), the
 * one piece of sm-init that decodes variable-length host input into heap structures. Built
 * with ASan and UBSan (`make -C src/supermachine/guest/init fuzz`); run by fuzz/guest.sh.
 *
 * Beyond the sanitizers, it checks what the parser promises: on success every string is
 * NUL-terminated within the payload's size, ARGV is non-empty and NULL-terminated, every
 * ENV entry is KEY=VALUE, CWD is absolute; on failure nothing is left allocated (LeakSanitizer)
 * and the message is a terminated string. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sm.h"

static void check(int ok)
{
	if (!ok)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct exec_req r;
	char err[128];
	memset(err, 'x', sizeof(err));
	if (exec_req_parse(&r, data, size, err, sizeof(err)) < 0) {
		check(memchr(err, 0, sizeof(err)) != NULL);
		return 0;
	}
	check(r.argc >= 1 && r.argv[r.argc] == NULL);
	for (size_t i = 0; i < r.argc; i++)
		check(strlen(r.argv[i]) <= size);
	for (size_t i = 0; i < r.envc; i++) {
		const char *eq = strchr(r.envp[i], '=');
		check(eq != NULL && eq != r.envp[i]);
	}
	check(r.cwd == NULL || r.cwd[0] == '/');
	check(r.user == NULL || r.user[0] != 0);
	check((r.mode & ~07777u) == 0);
	exec_req_free(&r);
	return 0;
}
