"""The command line's parser: --version, and no prefix matching of long options."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import supermachine
from supermachine.cli import app as cli


def test_version_prints_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "supermachine", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"supermachine {supermachine.__version__}\n")


@pytest.mark.parametrize("argv", [
    ["run", "--initr", "/y", "IMAGE"],        # --initrd (`--init` is a flag of its own)
    ["run", "--no-snap", "IMAGE"],            # --no-snapshot
    ["pull", "--insecure", "h", "REF"],       # --insecure-registry
    ["ps", "--al"],                           # --all
    ["--deb", "ps"],                          # --debug
])
def test_abbreviated_long_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_full_option_names_still_parse():
    args = cli.build_parser().parse_args(["run", "--initrd", "/y", "--kernel", "/x",
                                          "--no-snapshot", "IMAGE", "echo", "--init"])
    assert (args.initrd, args.kernel, args.no_snapshot) == ("/y", "/x", True)
    assert args.cmd == ["echo", "--init"]  # after the image, everything is the command


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest == "command").choices


def test_a_parser_for_one_command_parses_and_helps_as_the_whole_one():
    full = _subparsers(cli.build_parser())
    assert list(full) == list(cli.COMMANDS)
    # every group's add_<command>(sub) is in the table: none can be left out of it
    adders = set()
    for g in set(cli.COMMANDS.values()):
        module = cli.group(g)
        for name, fn in vars(module).items():
            if name.startswith("add_") and fn.__module__ == module.__name__ and \
                    fn.__code__.co_varnames[:1] == ("sub",):
                adders.add((g, name.removeprefix("add_")))
    assert adders == {(g, n) for n, g in cli.COMMANDS.items()}
    for name in full:
        one = _subparsers(cli.build_parser(name))
        assert list(one) == [name]
        assert one[name].format_help() == full[name].format_help()


@pytest.mark.parametrize(("argv", "command"), [
    (["ps"], "ps"),
    (["--debug", "-v", "--home", "/h", "run", "IMAGE"], "run"),
    (["--home=/h", "ps", "-a"], "ps"),
    (["--home", "ps"], None),           # ps is --home's value: no command
    (["-h", "ps"], None),               # the top-level help lists every command
    (["-vh", "ps"], None),              # an option we do not know: the whole parser
    (["--version"], None),
    (["nosuchcommand"], None),          # the error lists every command
    ([], None),
])
def test_command_named(argv, command):
    assert cli.command_named(argv) == command


def _modules_loaded(code: str, modules: set[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    check = f"{code}\nimport sys\nprint(sorted(set({sorted(modules)!r}) & set(sys.modules)))\n"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.splitlines()[-1])


def test_ps_imports_stay_light(tmp_path):
    """`ps` must not pull in what only other commands need (start-up time, issue 10)."""
    code = ("from supermachine.cli import main\n"
            f"assert main(['--home', {str(tmp_path)!r}, 'ps']) == 0")
    heavy = {"dataclasses", "inspect", "hashlib", "tempfile", "json", "logging", "shutil",
             "typing", "pathlib", "contextlib", "supermachine.runtime", "supermachine.images",
             "supermachine.cli.run", "supermachine.cli.images"}
    assert _modules_loaded(code, heavy) == []


def test_pull_imports_no_logging():
    """`pull` sets up no logging (logs_nothing): its code must not log, nor import logging
    at start-up (a module-level getLogger would log unformatted)."""
    code = "import supermachine.images.pull, supermachine.cli.images"
    assert _modules_loaded(code, {"logging", "concurrent.futures", "shutil",
                                  "subprocess"}) == []
