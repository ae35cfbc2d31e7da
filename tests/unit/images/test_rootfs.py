"""Squashfs building: contents read back with squashfs-tools-ng, caching, races, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supermachine.errors import ImageError
from supermachine.home import Home
from supermachine.images import ensure_rootfs, open_image, rootfs
from supermachine.images.rootfs import rootfs_path
from tests.fixtures import images as fx
from tests.fixtures.images import layer_tar, tar_entry

from .helpers import make_image, make_layer


def stat(sqfs: Path, path: str) -> dict[str, str]:
    out = subprocess.run(["rdsquashfs", "-s", path, str(sqfs)], capture_output=True, text=True,
                         check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def cat(sqfs: Path, path: str) -> bytes:
    return subprocess.run(["rdsquashfs", "-c", path, str(sqfs)], capture_output=True,
                          check=True).stdout


def listing(sqfs: Path) -> set[str]:
    out = subprocess.run(["sqfs2tar", str(sqfs)], capture_output=True, check=True).stdout
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        return {m.name for m in tf}


def test_multilayer_squashfs(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    img = open_image(str(fx.multilayer()), home)
    sqfs = ensure_rootfs(img, home)
    assert sqfs == home.rootfs / f"{img.config_digest[7:]}-{rootfs.builder_version()}.sqfs"
    names = listing(sqfs)
    assert "etc/removed" not in names and "opaque/lower" not in names
    assert {"opaque/upper", "data/link", "bin/busybox", "bin/sh"} <= names
    assert cat(sqfs, "/data/link") == b"shared inode\n"
    s = stat(sqfs, "/usr/bin/suid")
    assert s["Access"] == "04755"
    s = stat(sqfs, "/usr/bin/sgid")
    assert (s["Access"], s["GID"].split()[0]) == ("02711", "50")
    s = stat(sqfs, "/home/app/file")
    assert (s["Access"], s["UID"].split()[0], s["GID"].split()[0]) == ("0600", "1000", "1000")
    assert stat(sqfs, "/tmp")["Access"] == "01777"
    assert stat(sqfs, "/etc/passwd")["Last modified"].endswith("(1700000000)")
    xattrs = subprocess.run(["rdsquashfs", "-x", "/usr/bin/cap", str(sqfs)], capture_output=True,
                            text=True, check=True).stdout
    assert "security.capability=0x0100000200040000" in xattrs and "user.note=hello" in xattrs


def test_hardlinks_become_one_inode(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    layers = [make_layer(tmp_path / "b", layer_tar([tar_entry("a", data=b"x" * 100, uid=9)])),
              make_layer(tmp_path / "b", layer_tar([tar_entry("b", fx.tarfile.LNKTYPE,
                                                              linkname="a")]))]
    sqfs = ensure_rootfs(make_image(layers), home)
    a, b = stat(sqfs, "/a"), stat(sqfs, "/b")
    assert a["Inode number"] == b["Inode number"] and b["UID"].split()[0] == "9"


def test_busybox_and_python_fixture_rootfs(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    sqfs = ensure_rootfs(open_image(str(fx.busybox()), home), home)
    assert stat(sqfs, "/bin/busybox")["Access"] == "0755"
    assert b"app:x:1000:1000" in cat(sqfs, "/etc/passwd")
    py = ensure_rootfs(open_image(str(fx.python()), home), home)
    names = listing(py)
    assert "usr/bin/python3" in names or "usr/bin/python3.11" in names
    assert "dev/null" not in names  # device nodes from mmdebstrap are skipped


def test_cached_by_config_digest(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    img = open_image(str(fx.busybox()), home)
    first = ensure_rootfs(img, home)
    mtime = first.stat().st_mtime_ns
    again = ensure_rootfs(open_image(str(fx.busybox_docker_archive()), home), home)
    assert again == first and again.stat().st_mtime_ns == mtime


RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from supermachine.home import Home
    from supermachine.images import open_image, rootfs
    builds = Path(sys.argv[2])
    real = rootfs.build_squashfs
    def counting(image, final):
        with open(builds, "a") as f:
            f.write("build\\n")
        time.sleep(0.3)  # widen the race window
        real(image, final)
    rootfs.build_squashfs = counting
    home = Home(Path(sys.argv[1]))
    img = open_image(sys.argv[3], home)
    print(rootfs.ensure_rootfs(img, home))
""")


def test_concurrent_builds_happen_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    builds = tmp_path / "builds"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(home), str(builds),
                               str(fx.multilayer())], stdout=subprocess.PIPE, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and outs[0].strip().endswith(b".sqfs")
    assert builds.read_text() == "build\n"


def leftovers(home: Home) -> list[str]:
    return sorted(p.name for p in home.rootfs.iterdir() if not p.name.endswith(".lock"))


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    good = make_layer(tmp_path / "b", layer_tar([tar_entry("a", data=b"x" * 300_000)]))
    bad = make_layer(tmp_path / "b", layer_tar([tar_entry("../escape", data=b"x")]))
    img = make_image([good, bad])
    with pytest.raises(ImageError, match="escapes"):
        ensure_rootfs(img, home)
    assert leftovers(home) == []
    # A layer whose bytes no longer match its digest fails mid-build and leaves nothing.
    blob = bytearray(good.path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    good.path.write_bytes(bytes(blob))
    with pytest.raises(ImageError):
        ensure_rootfs(make_image([good], key="2"), home)
    assert leftovers(home) == []
    assert not rootfs_path(img, home).exists()


def test_missing_tar2sqfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home(tmp_path / "home")
    monkeypatch.setenv("PATH", str(tmp_path))
    layer = make_layer(tmp_path / "b", layer_tar([tar_entry("a", data=b"x")]))
    with pytest.raises(ImageError, match="tar2sqfs not found.*squashfs-tools-ng"):
        ensure_rootfs(make_image([layer]), home)
    assert leftovers(home) == []
