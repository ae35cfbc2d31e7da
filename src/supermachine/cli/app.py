"""The `supermachine` command line's argparse parser: help, usage errors, and every argv
that dispatch.py does not parse itself. Each command group lives in its own module and
imports what it uses when it runs, so `--version`, `--help` and `ps` pay only for what
they use."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from ..errors import UsageError
from .common import PROG
from .dispatch import COMMANDS, GLOBAL_OPTIONS, execute, group


def _help_width() -> int:
    """The width argparse's formatter takes by default, shutil.get_terminal_size().columns
    - 2 ($COLUMNS, else the terminal's, else 80), without importing shutil: argparse makes
    a formatter for every option it adds, and importing shutil (bz2, lzma) for that was
    ~3 ms of every command's start-up."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_help_width())


class _Parser(argparse.ArgumentParser):
    """No prefix matching of long options, here and in every subcommand (the subparsers
    are made of this class too): `run --init` must not silently mean `--initrd`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _RaisingParser(_Parser):
    """For arguments parsed away from a terminal (the service parsing a forwarded `run`):
    errors raise instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise UsageError(message or "run's --help is answered by the CLI, not the service")


def parse_run_argv(argv: Sequence[str]) -> argparse.Namespace:
    """``supermachine run ARGV...`` parsed exactly as `main` would; raises UsageError. The
    parser is built once (~2 ms, on every forwarded run's path) and kept."""
    parser, lock = _run_parser()
    with lock:  # parsing does not change the parser, but argparse promises nothing
        return parser.parse_args(["run", *argv])


@functools.cache
def _run_parser() -> tuple:  # (the parser, a lock); no typing import on the CLI's path
    import threading

    return build_parser("run", parser_class=_RaisingParser), threading.Lock()


#: the global flags that may come before the command (see command_named)
_GLOBAL_FLAGS = tuple(f for o in GLOBAL_OPTIONS if not o.value for f in o.flags)


def command_named(argv: Sequence[str]) -> str | None:
    """The command argv plainly names: its first word that is not a global option (nor
    --home's value). None when in doubt (help asked for, an option we do not know, no
    command, or one that does not exist): then the whole parser is built."""
    args = iter(argv)
    for arg in args:
        if arg == "--home":
            next(args, None)
        elif arg in _GLOBAL_FLAGS or arg.startswith("--home="):
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None,
                 parser_class: type[argparse.ArgumentParser] = _Parser
                 ) -> argparse.ArgumentParser:
    """The whole parser, or with ``command`` one that knows only that command: argparse
    builds every subcommand's parser eagerly (~10 ms for all of them, a formatter per
    option), and parsing `ps` needs only its own. Help and errors use the whole one."""
    from .. import __version__

    parser = parser_class(prog=PROG, description="Run OCI/Docker images as isolated microVMs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    for option in GLOBAL_OPTIONS:
        option.add_to(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if command is None or name == command:
            getattr(group(module), f"add_{name}")(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_named(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
