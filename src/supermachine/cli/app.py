"""The `supermachine` command line: the parser and `main`, which turns every error into
one line and an exit status. Each command group lives in its own module and imports what
it uses when it runs, so `--version`, `--help` and `ps` pay only for what they use."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import Error
from . import images, run, snapshots, vms
from .common import PROG
from .interrupts import INTERRUPTS


class _Parser(argparse.ArgumentParser):
    """No prefix matching of long options, here and in every subcommand (the subparsers
    are made of this class too): `run --init` must not silently mean `--initrd`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="Run OCI/Docker images as isolated microVMs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show boot output, QEMU's command line and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="show boot output")
    parser.add_argument("--home", metavar="DIR",
                        help="state and cache directory (default: $SUPERMACHINE_HOME or "
                             "~/.cache/supermachine)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (run, images, vms, snapshots):
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if not getattr(args, "reads_state_only", False) or args.debug or args.verbose:
        import logging  # ~10 ms: not for commands that only read state (ps, inspect, ...)

        level = logging.DEBUG if args.debug else logging.INFO if args.verbose else \
            logging.WARNING
        logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    INTERRUPTS.install()  # again, for callers of this main() (tests): installing is idempotent
    try:
        status = args.func(args)
        # A signal killed the VM: whatever the workload's status, the run was interrupted.
        return INTERRUPTS.exit_code if INTERRUPTS.exit_code is not None else status
    except Error as e:
        if INTERRUPTS.exit_code is not None:
            return INTERRUPTS.exit_code  # the error is the VM dying of the signal
        if args.debug:
            raise
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # SIGINT raised by code run before main() installed ours
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
