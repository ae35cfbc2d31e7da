"""The `supermachine` command: argument parsing and printing; the work is the public API's.

Imports of the heavy parts happen inside the command functions, so `supermachine --help`
and every command pay only for what they use (Python start-up counts in every figure).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .errors import Error

PROG = "supermachine"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an environment variable (KEY alone copies it from here)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the VM")
    p.add_argument("-u", "--user", metavar="USER", help="user[:group] or uid[:gid] to run as")
    p.add_argument("--entrypoint", metavar="CMD", help="override the image's entrypoint")
    p.add_argument("-m", "--memory", default="512M", help="guest memory (default 512M)")
    p.add_argument("--cpus", default="1", help="virtual CPUs (default 1)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="keep stdin open even when it is a terminal")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="accelerator (default: hardware KVM when usable, else TCG)")
    p.add_argument("--kernel", metavar="PATH", help="guest kernel to boot instead of the default")
    p.add_argument("--initrd", metavar="PATH", help="initramfs to use with --kernel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run OCI/Docker images as isolated microVMs.")
    parser.add_argument("--debug", action="store_true",
                        help="show boot output, QEMU's command line and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="show boot output")
    parser.add_argument("--home", metavar="DIR",
                        help="state and cache directory (default: $SUPERMACHINE_HOME or "
                             "~/.cache/supermachine)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a command in a new VM from an image",
                         description="Boot IMAGE in a fresh microVM and run its entrypoint "
                                     "and command (CMD replaces the image's Cmd).")
    _add_run_options(run)
    run.add_argument("image", metavar="IMAGE",
                     help="OCI layout dir, oci-archive or docker-archive (oci:, oci-archive:, "
                          "docker-archive: prefixes accepted)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ...")
    run.set_defaults(func=cmd_run)
    return parser


# ---- commands ---------------------------------------------------------------------------

def _home(args: argparse.Namespace):
    from .home import Home

    return Home(os.path.abspath(args.home)) if args.home else Home.default()


def cmd_run(args: argparse.Namespace) -> int:
    from . import vm as vm_mod
    from .workload import parse_cpus, parse_memory

    stdin_piped = not os.isatty(0) if _fd_open(0) else False
    forward_stdin = args.interactive or stdin_piped
    machine = vm_mod.VM(
        args.image,
        memory=parse_memory(args.memory),
        cpus=parse_cpus(args.cpus),
        accel=args.accel,
        kernel=args.kernel,
        initrd=args.initrd,
        home=_home(args),
        verbose=args.verbose or args.debug,
        on_notice=_notice,
    )
    with machine:
        return machine.run_workload(
            cmd=args.cmd or None,
            entrypoint=args.entrypoint,
            env=args.env,
            workdir=args.workdir,
            user=args.user,
            stdin_fd=0 if forward_stdin else None,
            stdout_fd=1,
            stderr_fd=2,
        )


# ---- plumbing ---------------------------------------------------------------------------

def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _notice(message: str) -> None:
    """One-line notices to the user (e.g. which accelerator), on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _raise_exit(signum: int, _frame: object) -> None:
    # Unwind through every `with` so the VM is torn down, then exit 128+N like a shell.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        return args.func(args)
    except Error as e:
        if args.debug:
            raise
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130
    except BrokenPipeError:
        return 141
    except OSError as e:
        if args.debug:
            raise
        print(f"{PROG}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 125
    except Exception as e:  # a bug of ours: still one line, the traceback is behind --debug
        if args.debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (run with --debug for "
              "details)", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main())
