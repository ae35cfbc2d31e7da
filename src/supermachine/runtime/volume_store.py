"""Named volumes: directories the home keeps across VMs, created on first use.

Layout (``home.volumes``)::

    volumes/<name>/data          what VMs see at the mount point (shared over 9p), or
    volumes/<name>/disk.ext4     for a volume with a size cap: a sparse ext4 image
    volumes/<name>/volume.json   name, created, size, populated (the image's files copied in)
    volumes/<name>/lock          flock: exclusive for a read-write user, shared for readers
    volumes/<name>/holder        who holds it read-write (for the "in use" error)

A volume is shared with QEMU's ``security_model=mapped-xattr``: the guest's owners, groups,
modes, device nodes and symlinks are kept in ``user.virtfs.*`` xattrs of plain host files
(mode 0600/0700), so the guest sees full POSIX ownership (a non-root image user owns its
files) and nothing in the directory means anything to the host. This needs a home on a
filesystem with user xattrs (ext4, xfs, btrfs; tmpfs only from Linux 6.6), checked when a
volume is made.

One VM may use a volume read-write at a time, or many read-only: a second writer gets an
error naming the VM that holds it. The locks are flocks held by the process that runs the
VM (for detached VMs, their supervisor), so they end with it, however it ends.

A volume made with a size (`volume create --size`) is an ext4 image of that size instead,
attached as a disk (virtio-blk): QEMU refuses every access beyond its end, so a guest that
fills it gets ENOSPC and the host never holds more than the size. The host never mounts or
reads the image (its contents are the guest's, untrusted); it only makes it, with mke2fs.
Disks are also much faster than a 9p share under emulation (bench/bench_volumes.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import Error, UsageError
from ..home import Home, atomic_write_bytes, lock_held

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_MAX_RECORD = 64 << 10
#: a size-capped volume's bounds: ext4 with a journal needs a few MiB; 16 TiB is ext4's limit
#: with 4 KiB blocks and no 64-bit feature
MIN_SIZE = 16 << 20
MAX_SIZE = 16 << 40


class VolumeInUse(Error):
    exit_code = 125


@dataclass(frozen=True)
class Volume:
    name: str
    path: Path

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def disk(self) -> Path:
        return self.path / "disk.ext4"

    @property
    def size(self) -> int | None:
        """The cap in bytes of a disk volume; None for a directory volume."""
        size = self.record.get("size")
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    @property
    def record(self) -> dict:
        try:
            with open(self.path / "volume.json", "rb") as f:
                rec = json.loads(f.read(_MAX_RECORD))
            return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            return {}

    @property
    def populated(self) -> bool:
        return self.record.get("populated") is True

    def mark_populated(self) -> None:
        rec = {**self.record, "populated": True}
        atomic_write_bytes(self.path / "volume.json", json.dumps(rec).encode(), 0o600)

    def in_use(self) -> bool:
        return lock_held(self.path / "lock", by_any=True)

    def holder(self) -> str:
        try:
            return (self.path / "holder").read_text()[:200].strip() or "another VM"
        except OSError:
            return "another VM"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"invalid volume name {str(name)[:64]!r}: use letters, digits, _ . - "
                         "(at most 128, starting with a letter or digit)")
    return name


def _root(home: Home) -> Path:
    path = home.root / "volumes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def get(home: Home, name: str) -> Volume | None:
    v = Volume(check_name(name), _root(home) / name)
    if not (v.path / "volume.json").is_file():
        return None
    return v if (v.disk.is_file() if v.size is not None else v.data.is_dir()) else None


def create(home: Home, name: str, *, exist_ok: bool = False, size: int | None = None) -> Volume:
    """Make volume ``name`` (``exist_ok``: or return the existing one, as ``-v NAME:`` does);
    with ``size``, an ext4 image capped at that many bytes instead of a directory."""
    existing = get(home, name)
    if existing is not None:
        if exist_ok:
            return existing
        raise UsageError(f"volume {name} already exists")
    if size is not None and not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"invalid volume size {size}: from {MIN_SIZE >> 20} MiB to "
                         f"{MAX_SIZE >> 40} TiB")
    root = _root(home)
    stage = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(mode=0o700)
    try:
        rec: dict = {"name": name, "created": time.time(), "populated": False}
        if size is None:
            (stage / "data").mkdir(mode=0o700)
            _check_xattrs(stage / "data")
        else:
            _make_ext4(stage / "disk.ext4", size)
            rec["size"] = size
        (stage / "volume.json").write_text(json.dumps(rec))
        (stage / "lock").touch(0o600)
        os.chmod(stage, 0o700)
        try:
            os.rename(stage, root / name)
        except OSError:
            if (v := get(home, name)) is not None and exist_ok:  # made by a racing process
                return v
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Volume(name, root / name)


def _e2fs_tool(name: str) -> str:
    # Debian keeps e2fsprogs in /sbin, which is not on an ordinary user's PATH.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise Error(f"{name} not found: volumes with a size need e2fsprogs (Debian: apt-get "
                    "install e2fsprogs)")
    return found


def _make_ext4(path: Path, size: int) -> None:
    """A sparse ext4 image of ``size`` bytes with an empty root directory owned by root
    (0755), as a new docker volume looks. No reserved blocks: the guest gets the whole size."""
    with open(path, "xb") as f:
        f.truncate(size)
    os.chmod(path, 0o600)
    steps = [[_e2fs_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-m", "0",
              "-E", "root_owner=0:0,nodiscard", str(path)],
             # mke2fs always makes lost+found; an empty volume is empty (and copy-up fills
             # only an empty one). e2fsck makes it again should it ever need it.
             [_e2fs_tool("debugfs"), "-w", "-R", "rmdir lost+found", str(path)]]
    for argv in steps:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           env={**os.environ, "LC_ALL": "C"})
        # debugfs exits 0 whatever happens: anything but its banner on stderr is a failure
        problems = [line for line in r.stderr.splitlines()
                    if line.strip() and not line.startswith("debugfs 1.")]
        if r.returncode != 0 or problems:
            why = (problems or ["failed"])[-1][:200]
            raise Error(f"cannot make the volume's ext4 image: {Path(argv[0]).name}: {why}")


def _check_xattrs(path: Path) -> None:
    try:
        os.setxattr(path, "user.supermachine.check", b"1")
        os.removexattr(path, "user.supermachine.check")
    except OSError as e:
        raise Error(f"named volumes need user extended attributes, which {path.parent.parent} "
                    f"does not support ({e.strerror}); put the home (SUPERMACHINE_HOME) on "
                    "ext4, xfs or btrfs") from None


def list_all(home: Home) -> list[Volume]:
    out = []
    for entry in sorted(_root(home).iterdir()):
        if NAME_RE.match(entry.name) and (v := get(home, entry.name)) is not None:
            out.append(v)
    return out


def remove(home: Home, name: str) -> None:
    v = get(home, name)
    if v is None:
        raise UsageError(f"no such volume: {name}")
    try:
        fd = os.open(v.path / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"no such volume: {name}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeInUse(f"volume {name} is in use by {v.holder()}; stop it first") \
                from None
        # Renamed away first, under the lock: no VM can start using it half-removed.
        gone = v.path.with_name(f".tmp-rm-{name}-{os.getpid()}")
        os.rename(v.path, gone)
    finally:
        os.close(fd)
    shutil.rmtree(gone, ignore_errors=True)


#: how long a VM waits for a volume's lock: `volume ls` and friends take it for a moment
LOCK_PATIENCE = 1.0


def acquire(v: Volume, *, readonly: bool, holder: str) -> int:
    """Lock ``v`` for a VM's lifetime; returns the fd to close when the VM ends."""
    gone = UsageError(f"volume {v.name} was removed while this VM started; run it again")
    try:
        fd = os.open(v.path / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise gone from None
    try:
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) |
                            fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    how = "read-only" if readonly else "read-write"
                    raise VolumeInUse(f"volume {v.name} is in use by {v.holder()}: it cannot "
                                      f"be mounted {how} now") from None
                time.sleep(0.02)
        # `volume rm` renames the volume away under this lock: a lock on the old file would
        # guard nothing
        try:
            same = os.fstat(fd).st_ino == os.stat(v.path / "lock").st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise gone
    except BaseException:
        os.close(fd)
        raise
    if not readonly:
        with contextlib.suppress(OSError):
            atomic_write_bytes(v.path / "holder", holder.encode(), 0o600)
    return fd
