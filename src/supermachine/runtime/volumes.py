"""Mounts of a VM: host directories and files, named volumes and tmpfs, as share devices
for the machine and mount steps for the guest.

Every machine has `spec.MAX_SHARES` virtio-9p devices (engine `Share`s), used or not, so the
automatic snapshot (baked with none mounted: QEMU cannot save a guest with a 9p share
mounted) restores into a VM with any mounts: the restored QEMU's command line points the
devices at this VM's directories, and the guest mounts them right after the HELLO, before
any workload runs. Unused devices export an empty read-only directory.

A single host file is shared through a directory of its own holding a hard link to it (the
guest mounts that directory out of sight and bind-mounts the file onto the target), so the
guest never sees the file's neighbours. Read-only shares are read-only in QEMU too
(``readonly=on``): a guest root that remounts them read-write still cannot write.

A named volume with a size cap is an ext4 image on one of `spec.MAX_SHARES` disk slots
(engine `Disk`s) instead, the same way: unused slots are zero-sized null devices, the
restored QEMU attaches this VM's images, and the guest re-probes the slot (so it sees the
image's size and read-only flag, not those of the bake) before it mounts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agent.protocol import MountFlag
from ..engine.base import Disk, Share
from ..errors import UsageError
from ..home import Home
from ..spec import MAX_SHARES, Mount, VMSpec
from . import volume_store

#: where the guest mounts shares that carry a single file (out of the workload's way)
FILE_SHARES = "/run/supermachine/files"
#: 9p mount options: 9P2000.L (POSIX semantics); cache=mmap: no page cache for reads and
#: writes (host and guest see each other's writes at once, as with a bind mount), only for
#: mmap, which cache=none refuses for shared writable mappings (SQLite's WAL, LMDB); 512 KiB
#: messages
NINEP = "trans=virtio,version=9p2000.L,cache=mmap,msize=524288"
#: ext4 read-only: "noload" mounts an image whose writer was killed mid-write (its journal
#: not replayed: the read-only device could not take the replay)
EXT4_READONLY = "noload"


@dataclass(frozen=True)
class GuestMount:
    """One mount(2) the guest makes (agent `mount`)."""

    source: str
    target: str
    fstype: str
    data: str
    flags: int


@dataclass(frozen=True)
class HostFile:
    """A single host file shared through slot ``slot``: the VM links it into a directory of
    its own at start (`stage_files`)."""

    slot: int
    path: Path


@dataclass(frozen=True)
class NamedVolume:
    """A named volume the VM uses: locked while it runs, marked populated once the image's
    files were copied in (`volume_store`)."""

    volume: Any  # volume_store.Volume
    readonly: bool


@dataclass(frozen=True)
class FileCopy:
    """A host file copied into the guest at start (a VM whose root is a host directory:
    an OCI bundle's single-file mounts, like the engine's /etc/hosts), written to ``path``
    out of the workload's sight, then bind-mounted onto its target."""

    path: str
    data: bytes
    mode: int


@dataclass(frozen=True)
class VolumePlan:
    shares: tuple[Share, ...]  # every slot, used or not
    blank: tuple[Share, ...]  # every slot unused: for helper machines (bakes)
    mounts: tuple[GuestMount, ...]  # in order: parents before children, read-only root last
    files: tuple[HostFile, ...]
    named: tuple[NamedVolume, ...] = ()
    disks: tuple[Disk, ...] = ()  # every disk slot, used or not
    copies: tuple[FileCopy, ...] = ()  # written into the guest before the mounts

    @property
    def uses_host_storage(self) -> bool:
        """Whether the guest mounts anything of the host's (a share or a volume's disk)."""
        return any(m.fstype == "9p" or m.flags & MountFlag.BLOCK for m in self.mounts)

    @property
    def writes_disks(self) -> bool:
        """Whether a disk is mounted read-write: the guest must sync before it is stopped."""
        return any(d.path is not None and not d.readonly for d in self.disks)


def tag(slot: int) -> str:
    return f"sm{slot}"


def empty_share(home: Home) -> Path:
    """The empty read-only directory unused share devices export."""
    path = home.guest / "share-empty"
    if not path.is_dir():
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    if stat.S_IMODE(path.stat().st_mode) != 0o555:
        path.chmod(0o555)
    return path


def empty_shares(home: Home) -> tuple[Share, ...]:
    empty = empty_share(home)
    return tuple(Share(tag(i), empty, True) for i in range(MAX_SHARES))


def serial(slot: int) -> str:
    return f"sm-disk{slot}"


def empty_disks() -> tuple[Disk, ...]:
    return tuple(Disk(serial(i)) for i in range(MAX_SHARES))


#: where the guest mounts a host directory that becomes its root, with the mounts under it
NEW_ROOT = "/run/supermachine/root"
#: a single file bind-mounted into a VM with a host directory as its root is copied in
MAX_COPY = 1 << 20
MAX_COPIES_TOTAL = 8 << 20


def plan(spec: VMSpec, home: Home) -> VolumePlan:
    """The shares and guest mount steps for ``spec``'s mounts (checked here: sources exist
    and are directories or regular files, volume names are valid).

    With ``spec.root_dir`` the first share is that directory: the guest mounts it at
    `NEW_ROOT`, makes every mount under it, and then takes it as its root (PIVOT), so the
    workload sees the directory as ``/``. Single files are then copied in (`FileCopy`)
    rather than shared: an engine bind-mounts several (/etc/hosts, /etc/resolv.conf,
    /etc/hostname, ...) and there are only `spec.MAX_SHARES` shares."""
    blank = empty_shares(home)
    shares = list(blank)
    disks = list(empty_disks())
    mounts: list[GuestMount] = []
    files: list[HostFile] = []
    named: list[NamedVolume] = []
    copies: list[FileCopy] = []
    slot = disk = 0
    root = ""
    if spec.root_dir is not None:
        root = NEW_ROOT
        root_ro = MountFlag.RDONLY if spec.read_only else 0
        shares[0] = Share(tag(0), _directory(spec.root_dir, "root directory"), spec.read_only)
        mounts.append(GuestMount(tag(0), root, "9p", NINEP, MountFlag.MKDIR | root_ro))
        slot = 1
    for m in sorted(spec.mounts, key=lambda m: m.target.count("/")):
        ro = MountFlag.RDONLY if m.readonly else 0
        target = root + m.target
        if m.type == "tmpfs":
            data = "mode=1777" + (f",size={m.size}" if m.size else "")
            mounts.append(GuestMount("tmpfs", target, "tmpfs", data,
                                     MountFlag.MKDIR | MountFlag.NOSUID | ro))
            continue
        if m.type == "volume":
            v = volume_store.create(home, m.source or "", exist_ok=True)
            named.append(NamedVolume(v, m.readonly))
            copyup = MountFlag.COPYUP if not (v.populated or m.readonly) else 0
            if v.size is not None:
                disks[disk] = Disk(serial(disk), v.disk, m.readonly)
                mounts.append(GuestMount(serial(disk), target, "ext4",
                                         EXT4_READONLY if m.readonly else "",
                                         MountFlag.MKDIR | MountFlag.BLOCK | copyup | ro))
                disk += 1
                continue
            _check_slot(slot)
            shares[slot] = Share(tag(slot), v.data, m.readonly, "mapped-xattr")
            mounts.append(GuestMount(tag(slot), target, "9p", NINEP,
                                     MountFlag.MKDIR | copyup | ro))
            slot += 1
            continue
        host = _source(m, home)
        if root and not host.is_dir():
            copies.append(_copy(host, len(copies)))
            mounts.append(GuestMount(copies[-1].path, target, "", "",
                                     MountFlag.MKFILE | MountFlag.BIND | ro))
            continue
        _check_slot(slot)
        if host.is_dir():
            shares[slot] = Share(tag(slot), host, m.readonly)
            mounts.append(GuestMount(tag(slot), target, "9p", NINEP, MountFlag.MKDIR | ro))
        else:
            hidden = f"{FILE_SHARES}/{slot}"
            shares[slot] = Share(tag(slot), blank[slot].path, m.readonly)  # staged at start
            files.append(HostFile(slot, host))
            mounts.append(GuestMount(tag(slot), hidden, "9p", NINEP, MountFlag.MKDIR | ro))
            mounts.append(GuestMount(f"{hidden}/{host.name}", m.target, "", "",
                                     MountFlag.MKFILE | MountFlag.BIND | ro))
        slot += 1
    if root:
        if spec.read_only:  # the guest cannot make mount points in a read-only root
            for m in mounts:
                if m.target.startswith(root + "/"):
                    _make_mountpoint(shares[0].path, m.target[len(root) + 1:],
                                     file=bool(m.flags & MountFlag.MKFILE))
        mounts.append(GuestMount("", root, "", "", MountFlag.PIVOT))
    elif spec.read_only:
        mounts.append(GuestMount("", "/", "", "", MountFlag.REMOUNT | MountFlag.RDONLY))
    if sum(len(c.data) for c in copies) > MAX_COPIES_TOTAL:
        raise UsageError(f"the single files to mount add up to more than "
                         f"{MAX_COPIES_TOTAL >> 20} MiB")
    return VolumePlan(tuple(shares), blank, tuple(mounts), tuple(files), tuple(named),
                      tuple(disks), tuple(copies))


def _make_mountpoint(root: Path, relative: str, *, file: bool) -> None:
    """Create ``relative`` under the host directory ``root`` if missing, as runc makes mount
    points in a root it then makes read-only. Each component is opened without following
    symlinks: a hostile root cannot point this outside itself (a symlinked component is
    left alone, and the guest's mount then fails on the read-only root, with its reason)."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                if last and file:
                    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW |
                                     os.O_CLOEXEC, 0o644, dir_fd=fd))
                    return
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError:
                return
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def _check_slot(slot: int) -> None:
    if slot >= MAX_SHARES:
        raise UsageError(f"too many host directories and volumes: a VM has {MAX_SHARES} "
                         "shares, and a host directory as the root takes one")


def _directory(path: str, what: str) -> Path:
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is not a directory")
    return Path(os.path.realpath(path))


def _copy(host: Path, index: int) -> FileCopy:
    """A host file read now (at most `MAX_COPY` bytes), to be written into the guest."""
    try:
        with open(host, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_COPY + 1)
    except OSError as e:
        raise UsageError(f"bind source {host}: {e.strerror}") from None
    if len(data) > MAX_COPY:
        raise UsageError(f"bind source {host} is larger than {MAX_COPY >> 10} KiB: a single "
                         "file is copied into a VM whose root is a host directory; mount its "
                         "directory instead")
    # In the guest's own root, which the PIVOT step leaves behind: out of the workload's sight.
    return FileCopy(f"/.sm-copy-{index}", data, stat.S_IMODE(st.st_mode))


def settle_copy_up(plan_: VolumePlan) -> VolumePlan:
    """``plan_`` without copy-up for volumes filled since it was made (call it once the VM
    holds its volumes' locks: another VM may have filled one meanwhile)."""
    filled = {str(p) for nv in plan_.named if nv.volume.populated
              for p in (nv.volume.data, nv.volume.disk)}
    if not filled:
        return plan_
    by_source = {s.tag: str(s.path) for s in plan_.shares}
    by_source.update((d.serial, str(d.path)) for d in plan_.disks)
    mounts = tuple(dataclasses.replace(m, flags=m.flags & ~MountFlag.COPYUP)
                   if by_source.get(m.source) in filled else m for m in plan_.mounts)
    return dataclasses.replace(plan_, mounts=mounts)


def _source(m: Mount, home: Home) -> Path:
    path = Path(m.source or "")
    try:
        st = os.stat(path)  # follows symlinks, as docker resolves a bind source
    except FileNotFoundError:
        raise UsageError(f"bind source path does not exist: {path}") from None
    except OSError as e:
        raise UsageError(f"bind source {path}: {e.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UsageError(f"bind source {path} is not a directory or a regular file (sockets, "
                         "devices and FIFOs cannot be shared with a VM)")
    return Path(os.path.realpath(path))


STAGING_PREFIX = "vm-files-"


def staging_dir(home: Home) -> Path:
    """A new directory for one VM's single-file shares, named after this process, after
    removing those of processes that died without cleaning up (SIGKILL)."""
    for entry in home.tmp.glob(f"{STAGING_PREFIX}*"):
        pid = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=home.tmp))


def stage_files(plan_: VolumePlan, tmp: Path) -> tuple[Share, ...]:
    """The plan's shares with each single-file slot pointed at a new directory under ``tmp``
    holding a hard link to its file (the caller removes ``tmp`` when the VM ends)."""
    shares = list(plan_.shares)
    for f in plan_.files:
        d = Path(tempfile.mkdtemp(prefix=f"file-share-{f.slot}-", dir=tmp))
        readonly = shares[f.slot].readonly
        try:
            os.link(f.path, d / f.path.name)
        except OSError as e:
            if not readonly:
                raise UsageError(
                    f"cannot share the file {f.path} read-write: {e.strerror} (a single file "
                    f"is shared through a hard link, which needs the same filesystem as {tmp};"
                    " mount its directory, or add :ro)") from None
            shutil.copy2(f.path, d / f.path.name)  # read-only: a copy reads the same
        shares[f.slot] = Share(tag(f.slot), d, readonly)
    return tuple(shares)
