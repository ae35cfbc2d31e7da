"""Named volumes in the home: directories and size-capped ext4 images (real mke2fs and
debugfs; no VM)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from supermachine.errors import UsageError
from supermachine.home import Home
from supermachine.runtime import volume_store as store


def debugfs(image: Path, request: str) -> str:
    tool = store._e2fs_tool("debugfs")
    return subprocess.run([tool, "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


def test_a_sized_volume_is_a_sparse_empty_ext4_image(tmp_path):
    home = Home(tmp_path)
    v = store.create(home, "capped", size=64 << 20)
    assert store.get(home, "capped") == v and v.size == 64 << 20
    st = v.disk.stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 16 << 20  # sparse: metadata and journal only
    assert oct(st.st_mode & 0o777) == oct(0o600)
    assert not v.data.exists()
    # an empty root directory owned by root, as docker's new volumes; no lost+found
    names = debugfs(v.disk, "ls /").split()
    assert "lost+found" not in names
    stat_root = debugfs(v.disk, "stat /")
    assert "User:     0   Group:     0" in stat_root and "Mode:  0755" in stat_root
    assert [x.name for x in store.list_all(home)] == ["capped"]


@pytest.mark.parametrize("size", [0, 1 << 20, store.MIN_SIZE - 1, store.MAX_SIZE + 1])
def test_sizes_out_of_bounds_are_refused(tmp_path, size):
    with pytest.raises(UsageError, match="invalid volume size"):
        store.create(Home(tmp_path), "v", size=size)
    assert not list((tmp_path / "volumes").iterdir())  # nothing left behind


def test_a_failed_mkfs_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_e2fs_tool", lambda name: "/bin/false")
    with pytest.raises(Exception, match="cannot make the volume's ext4 image"):
        store.create(Home(tmp_path), "v", size=store.MIN_SIZE)
    assert os.listdir(tmp_path / "volumes") == []
