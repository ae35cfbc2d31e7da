"""Caches are keyed by the code that builds them: a change to a builder's source makes the
next use rebuild that artifact (and only that one), never reuse the old one.

A code change is modelled truthfully: the package's sources are copied, the copy is edited,
and `codeversion.SOURCE_ROOT` points at it — the same digests a real upgrade would change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from supermachine import codeversion
from supermachine.guest import assets, kernel
from supermachine.home import Home
from supermachine.images import ensure_rootfs, open_image, rootfs
from supermachine.runtime.bake import BAKE_SOURCES, bake_version
from tests.fixtures import images as fx


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the package's sources that the digests are read from; returns an editor."""
    copy = tmp_path / "src"
    shutil.copytree(codeversion.SOURCE_ROOT, copy,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "sm-init", "*.o"))
    monkeypatch.setattr(codeversion, "SOURCE_ROOT", copy)
    codeversion.clear_cache()

    def edit(relpath: str, extra: str = "\n# a change\n") -> None:
        with open(copy / relpath, "a") as f:
            f.write(extra)
        codeversion.clear_cache()

    yield edit
    codeversion.clear_cache()


def test_digest_follows_the_files_and_their_names(sources):
    before = codeversion.code_version("images/flatten.py")
    assert codeversion.code_version("images/flatten.py") == before
    assert codeversion.code_version("images/rootfs.py") != before
    sources("images/flatten.py")
    assert codeversion.code_version("images/flatten.py") != before


def test_every_builder_names_files_that_exist():
    for rel in (*rootfs.BUILDER_SOURCES, *kernel.LAYOUT_SOURCES, *assets.BUILDER_SOURCES,
                *BAKE_SOURCES):
        assert (codeversion.SOURCE_ROOT / rel).is_file(), rel


def test_a_flattener_change_rebuilds_the_rootfs_and_nothing_else(tmp_path, sources):
    home = Home(tmp_path / "home")
    image = open_image(str(fx.busybox()), home)
    first = ensure_rootfs(image, home)
    ino = first.stat().st_ino
    assert ensure_rootfs(image, home) == first  # a cache hit: same file, no rebuild

    sources("cli/app.py")  # unrelated code: the rootfs stays
    assert ensure_rootfs(image, home) == first and first.stat().st_ino == ino

    kernel_layout, initrd_builder, bake = kernel.layout_version(), \
        codeversion.code_version(*assets.BUILDER_SOURCES), bake_version()
    sources("images/flatten.py")
    second = ensure_rootfs(image, home)
    assert second != first and second.is_file()
    assert second.read_bytes() == first.read_bytes()  # same inputs, same (deterministic) result
    # ... and only the rootfs is affected
    assert (kernel.layout_version(), codeversion.code_version(*assets.BUILDER_SOURCES),
            bake_version()) == (kernel_layout, initrd_builder, bake)

    rootfs.prune_stale_builds(home)
    assert not first.exists() and second.exists()


def test_bake_and_kernel_layout_follow_their_code(sources):
    bake, layout = bake_version(), kernel.layout_version()
    sources("runtime/prefetch.py")
    assert bake_version() != bake and kernel.layout_version() == layout
    sources("guest/vmlinux.py")
    assert kernel.layout_version() != layout


def test_a_new_kernel_layout_reassembles_from_the_kept_package_without_apt(
        tmp_path, sources, monkeypatch):
    """After an upgrade of the assembling code, the same (pinned) kernel is reassembled from
    the downloaded package: no apt-get, no apt-cache, and no change of kernel version."""
    home = Home(tmp_path / "home")
    first = kernel.fetch_kernel(home)  # the real package: downloaded once per machine
    sources("guest/kernel.py")
    bin_dir = tmp_path / "bin"  # dpkg-deb only: apt is not needed and not reachable
    bin_dir.mkdir()
    os.symlink(shutil.which("dpkg-deb"), bin_dir / "dpkg-deb")
    os.symlink(shutil.which("dpkg"), bin_dir / "dpkg")  # dpkg-deb -x runs tar via dpkg's PATH
    os.symlink(shutil.which("tar"), bin_dir / "tar")
    monkeypatch.setenv("PATH", str(bin_dir))
    second = kernel.fetch_kernel(home)
    assert second.version == first.version and second.sha256 == first.sha256
    assert second.vmlinuz.parent != first.vmlinuz.parent
    assert second.vmlinuz.parent.name == kernel.kernel_dirname(first.version)
    assert kernel.cached_kernel(home) == second
    kernel.prune_stale_layouts(home)
    assert not first.vmlinuz.parent.exists() and second.vmlinuz.is_file()
