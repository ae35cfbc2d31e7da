"""Snapshots on disk: a guest's RAM file plus its device state, with what they depend on.

A snapshot is a directory::

    mem         guest RAM, exactly memory_mib MiB, sparse (untouched pages are holes); a
                restored VM maps it privately (copy-on-write), so clones share its pages
    state       QEMU device state saved with x-ignore-shared (~100 KB: RAM is not in it)
    meta.json   format, fingerprint inputs, checksums, file identity, creation time

Automatic snapshots live in ``snapshots/auto/<fingerprint>``; user-named ones in
``snapshots/named/<name>``. Both are published by renaming a finished temp directory, so a
crash or Ctrl-C never leaves a half-written snapshot under its final name.

Verification before every use: the state file's SHA-256 (it is small); the memory file's
size and identity (inode, size, mtime, ctime: any write through the filesystem changes the
ctime, which user space cannot set back). When the identity differs from the recorded one the
memory file is hashed in full (its data extents only; holes are zeros) and refused unless the
digest matches. So a corrupt or truncated snapshot is never restored, while an intact one
costs a few stat() calls instead of hashing hundreds of MiB on the restore path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SnapshotError, UsageError
from ..home import Home, atomic_write_bytes, file_lock, punch_hole, sha256_file

FORMAT = 1
MAX_META = 1 << 20
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


@dataclass(frozen=True)
class SnapshotKey:
    """Everything a snapshot depends on: it is restored only into a machine whose key is
    equal. Persisted as ``meta.json``'s ``inputs``; `FORMAT` names this record's layout
    (changing a field's meaning or adding one bumps it, and older snapshots are then
    rebaked or refused)."""

    guest: str  # kernel, initramfs and command line (GuestAssets.fingerprint)
    image: str  # config digest
    rootfs: tuple[int, int, int]  # inode, size, mtime_ns of the root filesystem file
    memory_mib: int
    cpus: int
    accel: str
    engine: str  # monitor build and machine layout
    network: tuple[str, ...]  # the NIC: mode and the guest's network arguments
    bake: str | None = None  # the bake procedure's version (automatic snapshots only)

    def inputs(self) -> dict[str, Any]:
        ino, size, mtime = self.rootfs
        out: dict[str, Any] = {
            "format": FORMAT, "guest": self.guest, "image": self.image,
            "rootfs": {"ino": ino, "size": size, "mtime_ns": mtime},
            "memory_mib": self.memory_mib, "cpus": self.cpus, "accel": self.accel,
            "engine": self.engine, "network": list(self.network)}
        if self.bake is not None:
            out["bake"] = self.bake
        return out

    @staticmethod
    def rootfs_identity(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns


def file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "ino": st.st_ino, "dev": st.st_dev,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the non-hole parts of a file (the whole file if unsupported)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset; EINVAL: SEEK_DATA unsupported
            if offset == 0 and size:
                try:
                    os.lseek(fd, 0, os.SEEK_HOLE)
                except OSError:
                    yield 0, size
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


BLOCK = 1 << 16
_ZERO_BLOCK = bytes(BLOCK)


def content_digest(path: Path) -> str:
    """SHA-256 of a (sparse) file's logical content that reads only its data extents.

    Every non-zero 64 KiB block is hashed with its offset; zero blocks, whether holes or
    written zeros, are skipped, so copying the file (sparse or not) keeps the digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        done = 0  # extents can share a block (holes are page-sized): hash each block once
        for start, length in _data_extents(f.fileno(), size):
            offset = max(start - start % BLOCK, done)
            end = start + length
            f.seek(offset)
            while offset < end:
                block = f.read(BLOCK)
                if not block:
                    raise SnapshotError(f"snapshot memory file {path} is truncated")
                if block != _ZERO_BLOCK[: len(block)]:
                    h.update(offset.to_bytes(8, "little"))
                    h.update(block)
                offset += len(block)
            done = offset
    return h.hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    path: Path
    meta: dict[str, Any]

    @property
    def mem(self) -> Path:
        return self.path / "mem"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def inputs(self) -> dict[str, Any]:
        return self.meta["inputs"]

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name

    def verify(self) -> None:
        """Refuse a snapshot whose files are missing, truncated or altered (see module doc)."""
        try:
            if sha256_file(self.state) != self.meta["state_sha256"]:
                raise SnapshotError(f"snapshot {self.name}: device state is corrupt "
                                    "(checksum mismatch); remove it and snapshot again")
            ident = file_identity(self.mem)
        except FileNotFoundError as e:
            raise SnapshotError(f"snapshot {self.name} is incomplete: {e.filename} is "
                                "missing") from None
        expected_size = self.inputs["memory_mib"] << 20
        if ident["size"] != expected_size:
            raise SnapshotError(f"snapshot {self.name}: memory file is {ident['size']} bytes, "
                                f"expected {expected_size} (truncated?)")
        if ident == self.meta["mem_identity"]:
            return
        if content_digest(self.mem) != self.meta["mem_sha256"]:
            raise SnapshotError(f"snapshot {self.name}: memory file is corrupt "
                                "(checksum mismatch); remove it and snapshot again")
        # Intact but touched (copied, restored from backup): remember its new identity.
        meta = dict(self.meta, mem_identity=ident)
        with contextlib.suppress(OSError):
            atomic_write_bytes(self.path / "meta.json", json.dumps(meta, indent=1).encode())

    def mismatch(self, current: dict[str, Any]) -> list[str]:
        """Names of the inputs that differ from ``current`` (empty when it fits)."""
        keys = set(self.inputs) | set(current)
        return sorted(k for k in keys if self.inputs.get(k) != current.get(k))


def load(path: Path) -> Snapshot:
    try:
        raw = (path / "meta.json").read_bytes()[: MAX_META + 1]
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot at {path}") from None
    if len(raw) > MAX_META:
        raise SnapshotError(f"snapshot {path.name}: meta.json is too large")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
                not isinstance(meta.get("inputs"), dict):
            raise ValueError("unknown format")
        for key in ("state_sha256", "mem_sha256"):
            if not isinstance(meta.get(key), str):
                raise ValueError(key)
        if not isinstance(meta.get("mem_identity"), dict) or \
                not isinstance(meta["inputs"].get("memory_mib"), int):
            raise ValueError("mem_identity")
    except ValueError as e:
        raise SnapshotError(f"snapshot {path.name}: unreadable metadata ({e}); remove it") \
            from None
    return Snapshot(path, meta)


Bake = Callable[[Path, Path], None]  # bake(mem_path, state_path)


def punch_zero_blocks(path: Path) -> int:
    """Turn a file's all-zero 64 KiB blocks into holes; returns how many bytes that covered.

    A guest's RAM holds many zeroed pages (~23% of a fresh busybox VM's written memory).
    As holes they take no disk, still read back as zeros, and leave content_digest as it
    was (it skips zero blocks). Filesystems that cannot punch holes keep the file as is.
    """
    with open(path, "r+b") as f:
        fd = f.fileno()
        runs: list[list[int]] = []  # [start, length] of consecutive zero blocks
        for start, length in list(_data_extents(fd, os.fstat(fd).st_size)):
            offset, end = start - start % BLOCK, start + length
            f.seek(offset)
            while offset < end and (block := f.read(BLOCK)):
                if block == _ZERO_BLOCK[: len(block)]:
                    if runs and runs[-1][0] + runs[-1][1] == offset:
                        runs[-1][1] += len(block)
                    else:
                        runs.append([offset, len(block)])
                offset += len(block)
        covered = 0
        with contextlib.suppress(OSError):  # an optimisation: the content is right either way
            for start, length in runs:
                if not punch_hole(fd, start, length):
                    break
                covered += length
    return covered


def _publish(root: Path, final: Path, inputs: dict[str, Any], bake: Bake,
             extra: dict[str, Any]) -> Snapshot:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        mem, state = tmp / "mem", tmp / "state"
        bake(mem, state)
        punch_zero_blocks(mem)
        for f in (mem, state):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        meta = {"format": FORMAT, "inputs": inputs, "created": time.time(),
                "state_sha256": sha256_file(state), "mem_sha256": content_digest(mem),
                "mem_identity": file_identity(mem), **extra}
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load(final)


def _sweep_temp(root: Path) -> None:
    """Remove temp directories of bakes that died (their lock is free, they are old)."""
    now = time.time()
    for entry in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > 3600:
                shutil.rmtree(entry, ignore_errors=True)


def ensure_auto(home: Home, inputs: dict[str, Any], bake: Bake,
                on_invalid: Callable[[str], None] | None = None,
                extra: dict[str, Any] | None = None) -> tuple[Snapshot, bool]:
    """The automatic snapshot for ``inputs``, baked on first use. Returns (snapshot, baked).

    Concurrent processes bake it once (file lock). A snapshot that fails verification is
    reported through ``on_invalid`` and baked again. ``inputs`` holds everything the
    snapshot depends on, the version of the bake procedure included (bake.py).
    """
    root = home.snapshots / "auto"
    root.mkdir(exist_ok=True)
    fp = fingerprint(inputs)
    final = root / fp
    with file_lock(root / f".{fp}.lock"):
        if final.exists():
            try:
                snap = load(final)
                if not snap.mismatch(inputs):
                    snap.verify()
                    return snap, False
                problem = "fingerprint mismatch"
            except SnapshotError as e:
                problem = str(e)
            if on_invalid:
                on_invalid(f"{problem}; making a new snapshot")
        _sweep_temp(root)
        return _publish(root, final, inputs, bake, extra or {}), True


def discard_auto(home: Home, snap: Snapshot) -> None:
    """Delete an automatic snapshot that failed to restore, so it is baked afresh."""
    root = home.snapshots / "auto"
    if snap.path.parent != root:
        return
    with file_lock(root / f".{snap.path.name}.lock"):
        shutil.rmtree(snap.path, ignore_errors=True)


def prune_auto(home: Home, engine_identity: str, bake_version: str) -> list[Path]:
    """Delete automatic snapshots that can never be restored again: made by another QEMU
    build or machine layout, by another version of the bake procedure, or for a root
    filesystem that is gone or was rebuilt.
    (Snapshots still in use by running VMs stay mapped; their files vanish with them.)"""
    root = home.snapshots / "auto"
    removed = []
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        with file_lock(root / f".{entry.name}.lock"):
            try:
                snap = load(entry)
                rootfs = Path(snap.meta.get("rootfs_path", ""))
                current = {k: v for k, v in file_identity(rootfs).items()
                           if k in ("ino", "size", "mtime_ns")} if rootfs.is_file() else None
                stale = snap.inputs.get("engine") != engine_identity or \
                    current != snap.inputs.get("rootfs") or \
                    snap.inputs.get("bake") != bake_version
            except (SnapshotError, OSError):
                stale = True
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    _sweep_temp(root)
    return removed


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid snapshot name {name!r}: use letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit)")
    return name


def create_named(home: Home, name: str, inputs: dict[str, Any], bake: Bake,
                 extra: dict[str, Any]) -> Snapshot:
    root = home.snapshots / "named"
    root.mkdir(exist_ok=True)
    final = root / check_name(name)
    with file_lock(root / f".{name}.lock"):
        return _publish(root, final, inputs, bake, {"name": name, **extra})


def open_named(home: Home, name: str) -> Snapshot:
    final = home.snapshots / "named" / check_name(name)
    if not final.exists():
        raise SnapshotError(f"no snapshot named {name!r}; see `supermachine snapshots`")
    snap = load(final)
    snap.verify()
    return snap


def list_named(home: Home) -> list[Snapshot]:
    root = home.snapshots / "named"
    out = []
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if entry.is_dir() and not entry.name.startswith("."):
            with contextlib.suppress(SnapshotError):
                out.append(load(entry))
    return out


def remove_named(home: Home, name: str) -> None:
    root = home.snapshots / "named"
    final = root / check_name(name)
    with file_lock(root / f".{name}.lock"):
        if not final.exists():
            raise SnapshotError(f"no snapshot named {name!r}")
        shutil.rmtree(final)
