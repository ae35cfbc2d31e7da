"""Snapshot files on disk: checksums, identity fast path, corruption, baking once.

The bake here is a stand-in (``fake_bake``): a real one boots a VM (seconds under TCG), and
what is tested here, the store, treats the files as opaque bytes; a stand-in also makes bakes
that fail, race or write exactly the holes a test needs. Real bakes, restores and a corrupt
real snapshot are tested end to end in tests/e2e/test_snapshots.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from supermachine.errors import SnapshotError, UsageError
from supermachine.home import Home
from supermachine.runtime import snapshot as snap

MIB = 1 << 20
INPUTS = {"format": snap.FORMAT, "guest": "g1", "image": "sha256:aa", "memory_mib": 4,
          "cpus": 1, "accel": "tcg", "engine": "QEMU 7.2", "bake": "b1"}


def fake_bake(mem: Path, state: Path) -> None:
    """Writes files shaped like a real bake: a sparse RAM file and a small state file."""
    with open(mem, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(b"kernel" * 1000)
    state.write_bytes(b"QEVM" + os.urandom(1000))


def test_content_digest_covers_data_and_layout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(MIB)
            f.seek(4096)
            f.write(b"x" * 100)
    assert snap.content_digest(a) == snap.content_digest(b)
    with open(b, "r+b") as f:
        f.seek(4096 + 50)
        f.write(b"y")
    assert snap.content_digest(a) != snap.content_digest(b)


def test_auto_snapshot_is_baked_once_then_reused(tmp_path):
    home = Home(tmp_path)
    calls = []

    def bake(mem, state):
        calls.append(1)
        fake_bake(mem, state)

    s1, baked1 = snap.ensure_auto(home, INPUTS, bake)
    s2, baked2 = snap.ensure_auto(home, INPUTS, bake)
    assert (baked1, baked2) == (True, False) and len(calls) == 1
    assert s1.path == s2.path and s1.mem.stat().st_size == 4 * MIB
    # different inputs -> a different snapshot
    s3, baked3 = snap.ensure_auto(home, {**INPUTS, "memory_mib": 8}, bake)
    assert baked3 and s3.path != s1.path


def test_corrupt_memory_is_refused_and_rebaked(tmp_path):
    home = Home(tmp_path)
    s, _ = snap.ensure_auto(home, INPUTS, fake_bake)
    with open(s.mem, "r+b") as f:
        f.seek(MIB + 10)
        f.write(b"CORRUPT")
    with pytest.raises(SnapshotError, match="memory file is corrupt"):
        snap.load(s.path).verify()
    notices = []
    s2, baked = snap.ensure_auto(home, INPUTS, fake_bake, on_invalid=notices.append)
    assert baked and notices and "corrupt" in notices[0]
    s2.verify()


def test_truncated_memory_and_corrupt_state_are_refused(tmp_path):
    home = Home(tmp_path)
    s, _ = snap.ensure_auto(home, INPUTS, fake_bake)
    os.truncate(s.mem, MIB)
    with pytest.raises(SnapshotError, match="truncated"):
        s.verify()
    s, _ = snap.ensure_auto(home, INPUTS, fake_bake)  # rebaked
    s.state.write_bytes(s.state.read_bytes()[:-1] + b"!")
    with pytest.raises(SnapshotError, match="device state is corrupt"):
        s.verify()


def test_touched_but_intact_memory_is_accepted_and_identity_updated(tmp_path):
    home = Home(tmp_path)
    s, _ = snap.ensure_auto(home, INPUTS, fake_bake)
    data = s.mem.read_bytes()
    s.mem.unlink()
    s.mem.write_bytes(data)  # same content, new inode and times
    s.verify()
    assert snap.load(s.path).meta["mem_identity"] == snap.file_identity(s.mem)


@pytest.mark.parametrize("meta", [b"", b"[]", b"{}", b'{"format": 99, "inputs": {}}',
                                  b'{"format": 1, "inputs": {"memory_mib": "x"}, '
                                  b'"state_sha256": "a", "mem_sha256": "b", '
                                  b'"mem_identity": {}}',
                                  b"\xff" * 100])
def test_hostile_metadata_is_a_clear_error(tmp_path, meta):
    (tmp_path / "meta.json").write_bytes(meta)
    with pytest.raises(SnapshotError, match="unreadable metadata|no snapshot"):
        snap.load(tmp_path)


def test_oversized_metadata_is_refused(tmp_path):
    (tmp_path / "meta.json").write_bytes(b" " * (snap.MAX_META + 10))
    with pytest.raises(SnapshotError, match="too large"):
        snap.load(tmp_path)


def test_failed_bake_leaves_nothing(tmp_path):
    home = Home(tmp_path)

    def broken(mem, state):
        fake_bake(mem, state)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        snap.ensure_auto(home, INPUTS, broken)
    assert [p.name for p in (home.snapshots / "auto").iterdir()
            if not p.name.endswith(".lock")] == []


def test_named_snapshots(tmp_path):
    home = Home(tmp_path)
    snap.create_named(home, "warm", INPUTS, fake_bake, {"image_source": "/img"})
    s = snap.open_named(home, "warm")
    assert s.meta["image_source"] == "/img" and s.name == "warm"
    assert [x.name for x in snap.list_named(home)] == ["warm"]
    assert s.mismatch(INPUTS) == []
    assert s.mismatch({**INPUTS, "guest": "g2"}) == ["guest"]
    snap.remove_named(home, "warm")
    with pytest.raises(SnapshotError, match="no snapshot named"):
        snap.open_named(home, "warm")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(UsageError):
            snap.check_name(bad)


def _bake_in_process(root: str, out: str) -> None:
    def bake(mem, state):
        with open(out, "a") as f:
            f.write("baked\n")
        time.sleep(0.3)
        fake_bake(mem, state)
    snap.ensure_auto(Home(Path(root)), INPUTS, bake)


def test_concurrent_processes_bake_once(tmp_path):
    out = tmp_path / "calls"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bake_in_process, args=(str(tmp_path / "h"), str(out)))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert out.read_text() == "baked\n"
    meta = json.loads(next((tmp_path / "h" / "snapshots" / "auto").glob("*/meta.json"))
                      .read_text())
    assert meta["inputs"] == INPUTS


def test_digest_ignores_sparseness_even_with_small_holes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with open(a, "wb") as f:  # data, a one-page hole, data: two extents in one 64 KiB block
        f.truncate(MIB)
        f.write(b"1" * 4096)
        f.seek(8192)
        f.write(b"2" * 4096)
    b.write_bytes(a.read_bytes())  # dense copy
    assert snap.content_digest(a) == snap.content_digest(b)


def test_prune_removes_only_snapshots_that_can_never_be_restored(tmp_path):
    home = Home(tmp_path)
    rootfs = tmp_path / "root.sqfs"
    rootfs.write_bytes(b"squash")
    ident = {k: v for k, v in snap.file_identity(rootfs).items()
             if k in ("ino", "size", "mtime_ns")}
    live, _ = snap.ensure_auto(home, {**INPUTS, "rootfs": ident, "engine": "E1"}, fake_bake,
                               extra={"rootfs_path": str(rootfs)})
    old_engine, _ = snap.ensure_auto(home, {**INPUTS, "rootfs": ident, "engine": "E0"},
                                     fake_bake, extra={"rootfs_path": str(rootfs)})
    gone_rootfs, _ = snap.ensure_auto(home, {**INPUTS, "rootfs": {"ino": 1}, "engine": "E1"},
                                      fake_bake, extra={"rootfs_path": str(rootfs)})
    # baked by another version of the bake code: never chosen again
    old_bake, _ = snap.ensure_auto(home, {**INPUTS, "rootfs": ident, "engine": "E1",
                                          "bake": "0ld"}, fake_bake,
                                   extra={"rootfs_path": str(rootfs)})
    removed = snap.prune_auto(home, "E1", INPUTS["bake"])
    assert sorted(removed) == sorted([old_engine.path, gone_rootfs.path, old_bake.path])
    assert live.path.exists()


def test_discarded_auto_snapshot_is_baked_again(tmp_path):
    home = Home(tmp_path)
    s, _ = snap.ensure_auto(home, INPUTS, fake_bake)
    snap.discard_auto(home, s)
    assert not s.path.exists()
    _, baked = snap.ensure_auto(home, INPUTS, fake_bake)
    assert baked


def test_zero_blocks_become_holes_and_the_digest_stays(tmp_path):
    mem = tmp_path / "mem"
    block = snap.BLOCK
    with open(mem, "wb") as f:
        f.write(b"\x01" * block)          # data
        f.write(bytes(3 * block))         # written zeros: three blocks to punch
        f.seek(6 * block)                 # a hole already
        f.write(b"\x00" * 100 + b"\x02")  # a block with data at its end
        f.write(bytes(block - 101))
        f.write(bytes(block))             # more written zeros, up to the end
    before_blocks, digest, content = mem.stat().st_blocks, snap.content_digest(mem), \
        mem.read_bytes()
    covered = snap.punch_zero_blocks(mem)
    assert covered == 4 * block
    assert mem.read_bytes() == content and mem.stat().st_size == len(content)
    assert snap.content_digest(mem) == digest
    assert mem.stat().st_blocks <= before_blocks - 4 * block // 512
