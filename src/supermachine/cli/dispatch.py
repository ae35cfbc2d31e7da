"""From argv to a command's code: which module defines each command, the global options,
the regular argv parsed without argparse (options.py), and running a parsed command, where
every error becomes one line and an exit status. No argparse here: app.py builds the
parser for help, mistakes and whatever this does not parse."""

from __future__ import annotations

import sys

from ..errors import Error
from .common import PROG
from .interrupts import INTERRUPTS
from .options import Opt, parse_regular

#: every command and the module (command group) whose ``add_<command>`` adds its parser,
#: in the order `--help` lists them: a command imports its own group only. A group may
#: also declare commands of plain options in ``REGULAR`` (name -> options.Command).
COMMANDS = {
    "run": "run",
    "pull": "images", "images": "images", "rmi": "images", "prune": "images",
    "login": "images", "logout": "images",
    "exec": "vms", "cp": "vms", "ps": "vms", "logs": "vms", "stop": "vms", "rm": "vms",
    "inspect": "vms",
    "snapshot": "snapshots", "snapshots": "snapshots",
    "volume": "volumes",
    "serve": "service",
    "kernel": "kernel",
}

#: the options before the command (--version is app.py's: argparse prints it)
GLOBAL_OPTIONS = (
    Opt("--debug", dest="debug", help="show boot output, QEMU's command line and tracebacks"),
    Opt("-v", "--verbose", dest="verbose", help="show boot output"),
    Opt("--home", dest="home", value=True, metavar="DIR",
        help="state and cache directory (default: $SUPERMACHINE_HOME or "
             "~/.cache/supermachine)"),
)


def group(name: str):
    """The command group module ``name`` (images, vms, ...), imported now."""
    __import__(f"{__package__}.{name}")
    return sys.modules[f"{__package__}.{name}"]


def regular_command(name: str):
    """The options.Command declared for ``name``, or None (argparse parses it)."""
    module = COMMANDS.get(name)
    return getattr(group(module), "REGULAR", {}).get(name) if module else None


def parse(argv: list[str]):
    """``argv`` parsed without argparse, or None where argparse must parse it."""
    return parse_regular(argv, GLOBAL_OPTIONS, regular_command)


def execute(args) -> int:
    """Run a parsed command (``args.func``); every error becomes one line on stderr and an
    exit status, the traceback only with --debug."""
    # logging costs ~10 ms to import: commands whose code never logs (ps, pull, images, ...;
    # set_defaults(logs_nothing=True)) set it up only for --debug and --verbose.
    if not getattr(args, "logs_nothing", False) or args.debug or args.verbose:
        import logging

        level = logging.DEBUG if args.debug else logging.INFO if args.verbose else \
            logging.WARNING
        logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    INTERRUPTS.install()  # again, for callers of main() (tests): installing is idempotent
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
