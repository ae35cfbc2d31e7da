/* sm-init entry point.
 *
 *   as PID 1            VM mode: boot (boot.c), then serve the agent on the virtio port
 *   sm-init --agent-fd N [--debug]
 *                       host mode for tests: serve the agent on fd N (a socketpair end),
 *                       mount nothing, exit when N reaches EOF and every child is gone,
 *                       or at once on SHUTDOWN. */
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sm.h"

static int usage(void)
{
	fprintf(stderr, "usage: sm-init --agent-fd N [--debug]  (or run as PID 1 in a VM)\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct agent_opts o = {.fd = -1};
	bool host_mode = false;
	for (int i = 1; i < argc; i++)
		host_mode |= strcmp(argv[i], "--agent-fd") == 0;
	/* As PID 1 the kernel may pass stray command line words as arguments: ignore them. */
	if (getpid() == 1 && !host_mode) {
		o.vm = true;
		o.fd = boot_vm(&o.debug);
		agent_run(&o);
	}
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--agent-fd") == 0 && i + 1 < argc) {
			char *end;
			long fd = strtol(argv[++i], &end, 10);
			if (*end || fd < 0 || fd > 65535)
				return usage();
			o.fd = (int)fd;
		} else if (strcmp(argv[i], "--debug") == 0) {
			o.debug = true;
		} else {
			return usage();
		}
	}
	if (o.fd < 0 || fcntl(o.fd, F_GETFD) < 0)
		return usage();
	/* Pipes created later must never land on 0-2: the child's dup2 relies on it. */
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
			return 1;
	agent_run(&o);
}
