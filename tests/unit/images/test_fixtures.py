"""The fixture builders themselves: variants share layers, build-all lists everything, and
the cache is keyed by the builders' code and inputs."""

from __future__ import annotations

import importlib.util
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


MODULE = '''
SIZE = {size}


def helper(n, pad={pad!r}):
    return [n] * SIZE + [pad]


def build():
    def inner():
        return helper({arg})
    return inner
'''


def _load(path: Path, **fields):
    path.write_text(MODULE.format(**fields))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_key_covers_helpers_constants_and_defaults(tmp_path: Path) -> None:
    base = {"size": 1, "pad": 0, "arg": 2}
    key = fx.code_key(_load(tmp_path / "m0.py", **base).build)
    assert fx.code_key(_load(tmp_path / "m1.py", **base).build) == key  # same code, same key
    for i, change in enumerate([{"size": 2}, {"pad": 1}, {"arg": 3}]):
        changed = _load(tmp_path / f"m{i + 2}.py", **{**base, **change})
        assert fx.code_key(changed.build) != key, change


def test_fixture_keys_follow_the_builders_code() -> None:
    assert {"busybox", "_busybox_layer", "write_oci_layout", "tar_entry", "tar_entry()",
            "layer_tar", "PATH_ENV", "BUSYBOX"} <= set(fx.code_parts(fx.busybox))
    assert {"python", "write_oci_layout", "apt_sources_digest"} <= set(fx.code_parts(fx.python))
    assert "_busybox_layer" not in fx.code_parts(fx.python)  # unrelated code: no rebuild
    assert {"scratch", "variant", "multilayer_layers"} <= set(
        fx.code_parts(fx.scratch) | fx.code_parts(fx.variant) | fx.code_parts(fx.multilayer))


def test_a_stale_fixture_is_never_used_and_prune_removes_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUPERMACHINE_FIXTURES", str(tmp_path / "fx"))
    other = tmp_path / "busybox"
    other.write_bytes(Path(fx.BUSYBOX).read_bytes() + b"\0")  # another build of the input
    other.chmod(0o755)
    monkeypatch.setattr(fx, "BUSYBOX", str(other))
    stale = fx.busybox()  # built from the other input
    monkeypatch.undo()
    monkeypatch.setenv("SUPERMACHINE_FIXTURES", str(tmp_path / "fx"))
    old_style = tmp_path / "fx" / "busybox-1"
    old_style.mkdir()
    current = fx.busybox()
    assert current.name == f"busybox-{fx.busybox_key()}" and current not in (stale, old_style)
    _, config = fx.read_layout(current)
    assert config["config"]["Cmd"] == ["sh"]
    assert fx.stale_entries() == sorted([old_style, stale])
    assert fx.main(["prune"]) == 0
    assert sorted((tmp_path / "fx").glob("busybox-*")) == [current]
