"""Commands whose arguments are a few plain options and fixed positionals, declared as data
once: argparse builds their parsers from it (help, errors, every irregular spelling), and
`parse_regular` parses the regular argv without argparse.

Why: argparse's import and parser construction cost ~9 ms of every command (gettext looks
up a translation, importing locale, for each text it shows), a seventh of a small `pull`.
`parse_regular` answers only where argparse would answer the same (tests/unit/cli/
test_options.py checks that with hypothesis); for anything else, `--help`, a mistake, an
abbreviation, `--`, it says None and argparse decides. No argparse import here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

#: what a command's code receives: argparse's Namespace or parse_regular's, attributes
#: alike (an annotation only: argparse is not imported for it)
Args = SimpleNamespace


class Opt:
    """An option: a flag (store_true), or one taking a value (the last one wins), or
    ``repeat`` (each one appends its value)."""

    __slots__ = ("flags", "dest", "value", "repeat", "metavar", "help")

    def __init__(self, *flags: str, dest: str, value: bool = False, repeat: bool = False,
                 metavar: str | None = None, help: str | None = None) -> None:
        self.flags = flags
        self.dest = dest
        self.value = value or repeat
        self.repeat = repeat
        self.metavar = metavar
        self.help = help

    @property
    def default(self):
        return [] if self.repeat else None if self.value else False

    def add_to(self, parser) -> None:
        """Add this option to an argparse parser."""
        kwargs = {"dest": self.dest, "help": self.help}
        if self.repeat:
            kwargs.update(action="append", default=[], metavar=self.metavar)
        elif self.value:
            kwargs["metavar"] = self.metavar
        else:
            kwargs["action"] = "store_true"
        parser.add_argument(*self.flags, **kwargs)


class Arg:
    """A positional argument: one word."""

    __slots__ = ("dest", "metavar", "help")

    def __init__(self, dest: str, *, metavar: str | None = None, help: str | None = None
                 ) -> None:
        self.dest = dest
        self.metavar = metavar
        self.help = help


class Command:
    """A command of options and positionals only; ``defaults`` are set on the parsed
    arguments as argparse's ``set_defaults`` sets them (``func``, the code that runs it)."""

    __slots__ = ("name", "help", "options", "args", "defaults")

    def __init__(self, name: str, *, help: str, options: tuple[Opt, ...] = (),
                 args: tuple[Arg, ...] = (), **defaults) -> None:
        self.name = name
        self.help = help
        self.options = options
        self.args = args
        self.defaults = defaults

    def add_to(self, sub) -> None:
        """Add this command's parser to argparse subparsers ``sub``."""
        parser = sub.add_parser(self.name, help=self.help)
        for opt in self.options:
            opt.add_to(parser)
        for arg in self.args:
            parser.add_argument(arg.dest, metavar=arg.metavar, help=arg.help)
        parser.set_defaults(**self.defaults)


def _take(options: tuple[Opt, ...], argv: list[str], i: int, into: dict) -> int | None:
    """Store the option at ``argv[i]`` (and its value) in ``into``; the index after it, or
    None where argparse must look (an unknown or abbreviated option, a value that argparse
    might read as an option)."""
    word = argv[i]
    name, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
    opt = next((o for o in options if name in o.flags), None)
    if opt is None or (eq and not opt.value):
        return None
    if not opt.value:
        into[opt.dest] = True
        return i + 1
    if not eq:
        if i + 1 == len(argv) or argv[i + 1].startswith("-"):
            return None
        i += 1
        value = argv[i]
    into[opt.dest] = [*into[opt.dest], value] if opt.repeat else value
    return i + 1


def parse_regular(argv: list[str], global_options: tuple[Opt, ...],
                  find: Callable[[str], Command | None]) -> SimpleNamespace | None:
    """``argv`` parsed as argparse would (global options, then the command and its own
    options and positionals in any order), or None unless it is plainly regular.
    ``find(name)`` is the Command of that name, or None where argparse parses it."""
    into = {o.dest: o.default for o in global_options}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i = _take(global_options, argv, i, into)
        if i is None:
            return None
    command = find(argv[i]) if i < len(argv) else None
    if command is None:
        return None
    into.update((o.dest, o.default) for o in command.options)
    words = []
    i += 1
    while i < len(argv):
        if argv[i].startswith("-") and argv[i] != "-":
            i = _take(command.options, argv, i, into)
            if i is None:
                return None
        else:
            words.append(argv[i])
            i += 1
    if len(words) != len(command.args):
        return None
    into.update(zip((a.dest for a in command.args), words, strict=True))
    return SimpleNamespace(command=command.name, **into, **command.defaults)
