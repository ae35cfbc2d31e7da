"""The cpio writer (checked by GNU cpio itself) and the initramfs builder's module ordering."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard

from supermachine.errors import GuestError
from supermachine.guest import initramfs as ir

ELF = b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 57  # enough of an ELF header for read_module


def unpack(archive: bytes, dest: Path) -> list[str]:
    """Extract with the real `cpio` and return its listing."""
    dest.mkdir()
    proc = subprocess.run(
        ["cpio", "-idv", "--no-absolute-filenames", "--quiet"],
        input=archive, cwd=dest, capture_output=True, check=True,
    )
    return proc.stderr.decode().split()


def test_cpio_roundtrip_modes_contents_symlinks(tmp_path: Path) -> None:
    entries = [
        ir.file_entry("init", b"#!/bin/sh\necho hi\n", 0o755),
        ir.file_entry("etc/deep/file.txt", b"x" * 1001, 0o640),  # odd size: exercises padding
        ir.file_entry("empty", b""),
        ir.symlink_entry("bin/sh", "busybox"),
        ir.dir_entry("proc", 0o555),
    ]
    archive = ir.write_cpio(entries)
    assert len(archive) % 512 == 0
    listing = unpack(archive, tmp_path / "x")
    # parents come before children, and missing parents were added
    assert listing.index("etc") < listing.index("etc/deep") < listing.index("etc/deep/file.txt")
    root = tmp_path / "x"
    assert (root / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((root / "init").stat().st_mode) == 0o755
    assert (root / "etc/deep/file.txt").read_bytes() == b"x" * 1001
    assert stat.S_IMODE((root / "etc/deep/file.txt").stat().st_mode) == 0o640
    assert (root / "empty").read_bytes() == b""
    assert os.readlink(root / "bin/sh") == "busybox"
    assert stat.S_IMODE((root / "proc").stat().st_mode) == 0o555


def test_cpio_listing_shows_devices_owner_and_fixed_mtime() -> None:
    archive = ir.write_cpio([ir.chardev_entry("dev/console", 5, 1), ir.file_entry("a", b"1")])
    out = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    console = next(line for line in out.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console or "5, 1" in console
    for line in out.splitlines():
        assert " root " in line and "1970" in line  # uid/gid 0, mtime 0


def test_cpio_is_deterministic_and_sorted() -> None:
    a = [ir.file_entry("b", b"2"), ir.file_entry("a/x", b"1")]
    assert ir.write_cpio(a) == ir.write_cpio(list(reversed(a)))
    names = subprocess.run(
        ["cpio", "-it", "--quiet"], input=ir.write_cpio(a), capture_output=True, check=True
    ).stdout.decode().split()
    assert names == ["a", "a/x", "b"]


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "./a", "a//b", "a\0b", ".."])
def test_cpio_rejects_bad_paths(bad: str) -> None:
    with pytest.raises(GuestError):
        ir.write_cpio([ir.file_entry(bad, b"")])


def test_cpio_rejects_duplicates() -> None:
    with pytest.raises(GuestError, match="duplicate"):
        ir.write_cpio([ir.file_entry("a", b""), ir.file_entry("/a", b"")])


@pytest.mark.parametrize("method", ["gzip", "zstd"])
def test_compression_roundtrips(method: str) -> None:
    data = ir.write_cpio([ir.file_entry("a", b"hello" * 100)])
    packed = ir.compress(data, method)
    assert len(packed) < len(data)
    if method == "gzip":
        assert gzip.decompress(packed) == data
    else:
        assert zstandard.ZstdDecompressor().decompress(packed) == data  # needs content size
    with pytest.raises(GuestError):
        ir.compress(data, "lzop")


V = "kernel/drivers/virtio/"
DEP = f"""\
{V}virtio_ring.ko:
{V}virtio.ko: {V}virtio_ring.ko
{V}virtio_mmio.ko: {V}virtio.ko {V}virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: {V}virtio_ring.ko {V}virtio.ko kernel/drivers/net/net_failover.ko
kernel/drivers/char/hw_random/virtio-rng.ko: {V}virtio.ko {V}virtio_ring.ko
"""


def test_load_order_puts_dependencies_first() -> None:
    deps = ir.parse_modules_dep(DEP)
    order = ir.load_order(deps, ["virtio_net", "virtio-rng", "virtio_mmio"])
    names = [ir.module_name(p) for p in order]
    assert sorted(names) == sorted(
        ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net", "virtio_rng",
         "virtio_mmio"]
    )
    for path in order:  # every module comes after all of its dependencies
        for dep in deps[path]:
            assert order.index(dep) < order.index(path)


def test_load_order_builtin_optional_missing_and_cycles() -> None:
    deps = ir.parse_modules_dep(DEP)
    assert ir.load_order(deps, ["squashfs"], builtin=["squashfs"]) == []
    assert ir.load_order(deps, [], optional=["fuse"]) == []
    with_optional = ir.load_order(deps, ["virtio_mmio"], optional=["fuse", "virtio-rng"])
    assert [ir.module_name(p) for p in with_optional][-1] == "virtio_rng"
    with pytest.raises(GuestError, match="overlay not found"):
        ir.load_order(deps, ["overlay"])
    cyclic = ir.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(GuestError, match="cycle"):
        ir.load_order(cyclic, ["a"])
    dangling = ir.parse_modules_dep("a.ko: gone.ko\n")
    with pytest.raises(GuestError, match="gone.ko"):
        ir.load_order(dangling, ["a"])
    with pytest.raises(GuestError, match="malformed"):
        ir.parse_modules_dep("no colon here\n")


def make_modules_dir(root: Path) -> Path:
    mods = root / "modules"
    for rel in ir.parse_modules_dep(DEP):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(ELF + rel.encode())
    (mods / "modules.dep").write_text(DEP)
    (mods / "modules.builtin").write_text("kernel/fs/squashfs/squashfs.ko\n")
    return mods


def test_build_initramfs_packs_init_modules_and_list(tmp_path: Path) -> None:
    mods = make_modules_dir(tmp_path)
    # a compressed module is unpacked on the host: the guest loads plain ELF
    xz = mods / "kernel/drivers/virtio/virtio_ring.ko"
    xz.with_name("virtio_ring.ko.xz").write_bytes(lzma.compress(xz.read_bytes()))
    xz.unlink()
    (mods / "modules.dep").write_text(DEP.replace("virtio_ring.ko", "virtio_ring.ko.xz"))
    init = tmp_path / "sm-init"
    init.write_bytes(b"\x7fELF fake init")
    data = ir.build_initramfs(
        init, mods, ["virtio_mmio", "virtio_net", "squashfs"], optional=["fuse"]
    )
    unpack(data, tmp_path / "x")
    root = tmp_path / "x"
    assert (root / "init").read_bytes() == b"\x7fELF fake init"
    assert os.access(root / "init", os.X_OK)
    listed = (root / "sm/modules").read_text().splitlines()
    assert listed[0] in ("/sm/ko/virtio_ring.ko", "/sm/ko/failover.ko")
    assert listed.index("/sm/ko/virtio_ring.ko") < listed.index("/sm/ko/virtio.ko")
    assert listed.index("/sm/ko/virtio.ko") < listed.index("/sm/ko/virtio_mmio.ko")
    assert listed.index("/sm/ko/net_failover.ko") < listed.index("/sm/ko/virtio_net.ko")
    assert len(listed) == 6  # squashfs is built in, fuse optional and absent
    for p in listed:
        assert (root / p.lstrip("/")).read_bytes().startswith(b"\x7fELF")
    assert (root / "sm/ko/virtio_ring.ko").read_bytes() == ELF + (
        b"kernel/drivers/virtio/virtio_ring.ko"
    )
    for d in ir.MOUNT_POINTS:
        assert (root / d).is_dir()


def test_build_initramfs_without_modules_and_bad_inputs(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_bytes(b"x")
    unpack(ir.build_initramfs(init, None, ["virtio_mmio"]), tmp_path / "x")
    assert (tmp_path / "x/sm/modules").read_text() == ""
    with pytest.raises(GuestError, match="cannot read guest init"):
        ir.build_initramfs(tmp_path / "missing", None, [])
    with pytest.raises(GuestError, match="modules.dep"):
        ir.build_initramfs(init, tmp_path, ["virtio_mmio"])
    mods = make_modules_dir(tmp_path / "m")
    (mods / "kernel/drivers/virtio/virtio.ko").write_bytes(b"not an elf")
    with pytest.raises(GuestError, match="not an ELF"):
        ir.build_initramfs(init, mods, ["virtio_mmio"])
