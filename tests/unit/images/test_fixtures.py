"""The fixture builders themselves: variants share layers, and build-all lists everything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from supermachine.home import Home
from supermachine.images import open_image
from tests.fixtures import images as fx


def test_variant_overrides_config_and_shares_layers(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    base = open_image(str(fx.busybox()), home)
    path = fx.variant(fx.busybox(), "bb-test", entrypoint=["/bin/echo"], cmd=["hi"],
                      env=["A=1"], working_dir="/tmp", user="app")
    img = open_image(str(path), home)
    c = img.config
    assert (c.entrypoint, c.cmd, c.env, c.working_dir, c.user) == (
        ("/bin/echo",), ("hi",), ("A=1",), "/tmp", "app")
    assert [x.digest for x in img.layers] == [x.digest for x in base.layers]
    assert img.config_digest != base.config_digest
    assert fx.variant(fx.busybox(), "bb-test", entrypoint=["/bin/echo"], cmd=["hi"],
                      env=["A=1"], working_dir="/tmp", user="app") == path
    removed = open_image(str(fx.variant(fx.busybox(), "bb-nocmd", cmd=None)), home)
    assert removed.config.cmd == ()


def test_busybox_fixture_contents() -> None:
    manifest, config = fx.read_layout(fx.busybox())
    assert config["config"]["Cmd"] == ["sh"]
    assert len(manifest["layers"]) == 1


def test_build_all_prints_paths() -> None:
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-m", "tests.fixtures.images", "build-all"], cwd=root,
                         capture_output=True, text=True, check=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    paths = dict(line.split("\t") for line in out.splitlines())
    assert set(paths) == set(fx.BUILDERS)
    assert all(Path(p).exists() for p in paths.values())
