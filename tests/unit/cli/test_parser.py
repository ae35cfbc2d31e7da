"""The command line's parser: --version, and no prefix matching of long options."""

from __future__ import annotations

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
    ["run", "--init", "/x", "/y", "IMAGE"],   # once silently taken as --initrd
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
