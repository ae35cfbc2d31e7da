"""`supermachine serve`: the per-user service (service/), in the foreground. Parsing and
printing only; the CLI's way *into* a running service is in run.py (`run`) and needs none
of this."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .common import PROG, home_of


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the service: warm pools, an HTTP API, fast `run` from any shell",
        description="Keep VMs and warm pools in one long-lived process. It listens on a unix "
                    "socket in $XDG_RUNTIME_DIR/supermachine (0600); while it runs, `run` "
                    "goes through it (a ready VM from a matching pool when there is one). "
                    "SIGTERM stops every VM it owns.")
    p.add_argument("--pool", action="append", default=[], metavar="IMAGE[=N]",
                   help="keep N (default 2) VMs of IMAGE restored and warm, with `run`'s "
                        "defaults, whatever number are in use (up to 2N alive; repeatable)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also serve HTTP on TCP (loopback unless HOST says otherwise); "
                        "clients then need the bearer token from the runtime directory's "
                        "`token` file")
    p.add_argument("--max-sandboxes", type=int, default=64, metavar="N",
                   help="refuse to run more sandboxes than N at once (default 64)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="refuse sandboxes and pools beyond this much guest memory in all "
                        "(default: half of this machine's memory)")
    p.set_defaults(func=cmd_serve)


#: this group's commands, in the order `--help` lists them: name -> adds its parser

def parse_pool(text: str) -> tuple[str, int]:
    image, sep, count = text.rpartition("=")
    if not sep or "/" in count or ":" in count:
        return text, 2
    if not count.isdigit() or not 1 <= int(count) <= 1024:
        raise UsageError(f"--pool {text!r}: N must be a number from 1 to 1024")
    return image, int(count)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from ..service import http
    from ..service.core import Limits
    from ..spec import VMSpec, parse_memory
    from .run import _image_arg, forwarded_run

    pools = []
    for text in args.pool:
        image, size = parse_pool(text)
        pools.append((VMSpec.create(_image_arg(image)), size))
    if not 1 <= args.max_sandboxes <= 4096:
        raise UsageError("--max-sandboxes must be from 1 to 4096")
    budget = {"memory_budget_mib": parse_memory(args.memory_budget)} \
        if args.memory_budget else {}
    limits = Limits(max_sandboxes=args.max_sandboxes, **budget)
    if not (args.debug or args.verbose):
        logging.getLogger("supermachine").setLevel(logging.INFO)

    def ready(directory, tcp) -> None:
        where = f"{directory}/api.sock" + (f" and http://{tcp}" if tcp else "")
        print(f"{PROG}: serving on {where}" +
              (f" (token in {directory}/token)" if tcp else ""), file=sys.stderr, flush=True)

    return http.serve(home_of(args), listen=args.listen, pools=tuple(pools), limits=limits,
                      ready=ready, parse_run=forwarded_run)
