"""The `supermachine` command: parsing and printing only; the work is the library's.

    dispatch.py   argv -> a command's code: regular argv parsed without argparse, errors
                  become one line and an exit status
    options.py    commands of plain options, declared once for argparse and dispatch
    app.py        the argparse parser: help, usage errors, every other argv
    run.py        run (attached, -t, -d): options -> VMSpec + WorkloadSpec
    vms.py        exec, cp, ps, logs, stop, rm, inspect: detached VMs
    images.py     pull, images, rmi, prune, login, logout
    snapshots.py  snapshot, snapshots
    common.py     the state home, notices, tables, registry options
    interrupts.py signals as events (the terminal pump is ../terminal.py, shared with oci/)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .interrupts import INTERRUPTS

    # First, before any other import, for every command (`--version` too, so that its time
    # is the time until a signal is ours): Ctrl-C after this never prints a traceback.
    INTERRUPTS.install()
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--version"]:  # asked by scripts and health checks: no parser, no imports
        from .. import __version__

        print(f"supermachine {__version__}")
        return 0
    if args[:1] == ["run"]:  # through the service when one runs: no parser here at all
        from ..service.runclient import try_forward

        code = try_forward(args[1:])
        if code is not None:
            return code
    from . import dispatch

    parsed = dispatch.parse(args)  # the regular argv of some commands: no argparse
    if parsed is not None:
        return dispatch.execute(parsed)
    from .app import main as run_command

    return run_command(args)


def entry() -> None:
    """The `supermachine` program (console script, `python -m supermachine`): `main`, then
    the process ends without Python's finalization. Everything a command starts has ended
    when `main` returns (threads joined, files closed, VMs and their helpers gone), so
    tearing the interpreter down (module teardown, a full garbage collection, OpenSSL's
    cleanup) is work nobody needs: 8-10 ms of every command, a sixth of `ps`. An error
    that leaves `main` (argparse's exit, a bug) takes the ordinary way out."""
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`| head`): as a command's write would
        status = status or 141
    os._exit(status)


__all__ = ["entry", "main"]
