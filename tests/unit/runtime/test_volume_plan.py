"""The volume plan of a VM whose root is a host directory (an OCI bundle's): the root is the
first share, every mount lands under it, single files are copied, the pivot comes last, and
a read-only root gets its mount points made on the host without leaving the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supermachine.agent.protocol import MountFlag
from supermachine.errors import UsageError
from supermachine.home import Home
from supermachine.runtime import volumes
from supermachine.spec import Mount, VMSpec


def spec(root: Path, *mounts: Mount, read_only: bool = False) -> VMSpec:
    return VMSpec(image="oci:x", root_dir=str(root), mounts=mounts, read_only=read_only)


def test_root_directory_plan(tmp_path: Path) -> None:
    root, data = tmp_path / "root", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    hosts.chmod(0o640)
    plan = volumes.plan(spec(root, Mount("bind", "/data", str(data), True),
                             Mount("bind", "/etc/hosts", str(hosts)),
                             Mount("tmpfs", "/run")), Home(tmp_path / "home"))
    assert plan.shares[0].path == root and not plan.shares[0].readonly
    assert plan.shares[1].path == data and plan.shares[1].readonly
    first, last = plan.mounts[0], plan.mounts[-1]
    assert (first.source, first.target, first.fstype) == ("sm0", volumes.NEW_ROOT, "9p")
    assert (last.target, last.flags) == (volumes.NEW_ROOT, MountFlag.PIVOT)
    assert all(m.target.startswith(volumes.NEW_ROOT + "/") for m in plan.mounts[1:-1])
    assert plan.copies == (volumes.FileCopy("/.sm-copy-0", b"127.0.0.1 localhost\n", 0o640),)
    bind = next(m for m in plan.mounts if m.target.endswith("/etc/hosts"))
    assert bind.source == "/.sm-copy-0" and bind.flags & MountFlag.BIND
    assert plan.uses_host_storage


def test_read_only_root_gets_its_mount_points_on_the_host(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "etc").symlink_to(outside)  # hostile: a mount point through it would escape
    f = tmp_path / "f"
    f.write_text("x")
    plan = volumes.plan(spec(root, Mount("tmpfs", "/run/a"), Mount("bind", "/etc/f", str(f)),
                             Mount("bind", "/file", str(f)), read_only=True),
                        Home(tmp_path / "home"))
    assert plan.mounts[0].flags & MountFlag.RDONLY and plan.shares[0].readonly
    assert (root / "run" / "a").is_dir() and (root / "file").is_file()
    assert os.listdir(outside) == []  # nothing made through the symlink


def test_too_many_directories_with_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dirs = []
    for i in range(4):
        (tmp_path / f"d{i}").mkdir()
        dirs.append(Mount("bind", f"/d{i}", str(tmp_path / f"d{i}")))
    with pytest.raises(UsageError, match="a host directory as the root takes one"):
        volumes.plan(spec(root, *dirs), Home(tmp_path / "home"))


def test_large_single_files_are_refused(tmp_path: Path) -> None:
    root, big = tmp_path / "root", tmp_path / "big"
    root.mkdir()
    big.write_bytes(b"x" * (volumes.MAX_COPY + 1))
    with pytest.raises(UsageError, match="mount its directory instead"):
        volumes.plan(spec(root, Mount("bind", "/big", str(big))), Home(tmp_path / "home"))
