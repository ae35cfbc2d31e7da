"""The one state directory: where caches, images and VM state live, and how they are written.

Layout (all under ``Home.root``)::

    blobs/sha256/<hex>          content-addressed blob store (layers, configs, manifests),
                                shared by every image; the same layout as an OCI image layout
    refs/<sha256 of ref>.json   reference -> manifest digest records (pulled/imported images)
    rootfs/<config-hex>.sqfs    flattened root filesystems, keyed by the image config digest
    guest/<key>/                guest kernel, modules and generated initramfs
    snapshots/<key>/            snapshots (automatic and user-named)
    vms/<name>/                 state of detached VMs
    tmp/                        scratch space; every entry is removed by its owner, and
                                entries of dead processes are swept on start
    downloads/                  downloaded inputs (the guest kernel's .deb), verified by
                                digest before use and shared by every version of the code
    kernels/                    guest kernels built from source (guest/kbuild.py), keyed by
                                source, config and compiler

``SUPERMACHINE_HOME`` overrides the root; otherwise ``$XDG_CACHE_HOME/supermachine``
(default ``~/.cache/supermachine``). ``SUPERMACHINE_DOWNLOADS`` puts ``downloads/``
elsewhere, so several homes (test sessions, benchmarks) share what was downloaded and
nothing that was built. ``SUPERMACHINE_KERNELS`` does the same for ``kernels/``: a kernel
takes minutes to build, so homes share the one the install built.

Everything built from inputs is keyed by those inputs and by the version of the code that
built it (`codeversion`), so an upgrade rebuilds what its changes touch.

Everything is written atomically (write to a temp file in the same directory, fsync, rename)
and guarded by ``flock`` locks so concurrent processes never see half-written entries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from .errors import Error
from .locations import VMS, home_root
from .locations import lock_held as lock_held  # re-exported: callers import it from here

# Paths are strings inside (os.path) and pathlib.Path at the edges: importing pathlib (with
# urllib.parse, ipaddress and fnmatch) is ~6 ms, a tenth of a small `pull`, whose path
# (images/pull.py, store.py) uses the string forms only. pathlib is imported by the first
# caller that asks for a Path.


def _path(path: str):
    from pathlib import Path

    return Path(path)


def default_root():
    return _path(home_root())


class Home:
    """The state directory at ``root``; immutable, equal to another Home of the same root.

    A plain class rather than a frozen dataclass: every command imports this module, and
    importing dataclasses (inspect, ast, dis, tokenize) would cost `ps` most of its start-up.
    """

    __slots__ = ("_root",)

    def __init__(self, root: str | os.PathLike) -> None:
        self._root = os.path.normpath(os.fspath(root))

    @property
    def root(self):
        """The directory, a pathlib.Path (``dir()`` for the string)."""
        return _path(self._root)

    def __eq__(self, other: object) -> bool:
        return self._root == other._root if isinstance(other, Home) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._root)

    def __repr__(self) -> str:
        return f"Home(root={self._root!r})"

    @classmethod
    def default(cls) -> Home:
        return cls(home_root())

    def dir(self, *parts: str) -> str:
        """The directory ``parts`` under the root (the root itself with none), created if
        missing: a string path."""
        path = os.path.join(self._root, *parts)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise Error(f"cannot create {path}: {e.strerror}") from e
        return path

    @property
    def blobs(self):
        return _path(self.dir("blobs", "sha256"))

    @property
    def refs(self):
        return _path(self.dir("refs"))

    @property
    def rootfs(self):
        return _path(self.dir("rootfs"))

    @property
    def guest(self):
        return _path(self.dir("guest"))

    @property
    def snapshots(self):
        return _path(self.dir("snapshots"))

    @property
    def vms(self):
        return _path(self.dir(VMS))

    @property
    def tmp(self):
        return _path(self.dir("tmp"))

    @property
    def downloads(self):
        return self._shared("SUPERMACHINE_DOWNLOADS", "downloads")

    @property
    def kernels(self):
        return self._shared("SUPERMACHINE_KERNELS", "kernels")

    def _shared(self, variable: str, name: str):
        shared = os.environ.get(variable)
        if shared:
            path = os.path.expanduser(shared)
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise Error(f"cannot create {path}: {e.strerror}") from e
            return _path(path)
        return _path(self.dir(name))

    def blob_file(self, digest: str) -> str:
        """Where a blob lives in the store (a string path); ``digest`` must already be
        validated."""
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64 or \
                not all(c in "0123456789abcdef" for c in hexpart):
            raise Error(f"invalid digest {digest!r}")
        return os.path.join(self.dir("blobs", "sha256"), hexpart)

    def blob_path(self, digest: str):
        """``blob_file`` as a pathlib.Path."""
        return _path(self.blob_file(digest))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing) for the duration of the block.

    flock locks die with their process, so a crashed or killed holder never wedges others.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temp path (a string) next to ``final``; on success it is fsynced and renamed
    into place.

    On any exception (Ctrl-C included) the temp file is removed, so no half-written
    entry is ever visible under the final name.
    """
    directory, name = os.path.split(os.fspath(final))
    os.makedirs(directory or ".", exist_ok=True)
    tmp_path = _create_temp(directory, f".tmp-{name}-", suffix)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def _create_temp(directory: str, prefix: str, suffix: str) -> str:
    """A new empty file (0600) with a random name, as tempfile.mkstemp makes one: not
    tempfile itself, which imports shutil, bz2, lzma and random (~6 ms of a small pull)."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {directory}")


def atomic_write_bytes(final: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    import hashlib  # here, not at the top: ~5 ms (OpenSSL) that `ps` and `--help` never use

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range of a file (it reads back as zeros); False where the
    filesystem cannot (EOPNOTSUPP) or libc has no fallocate."""
    import ctypes  # rare (snapshot bakes): kept off the start-up path

    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate", None)
    if fallocate is None:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def disk_full_message(e: OSError, what: str | os.PathLike) -> str:
    if e.errno == errno.ENOSPC:
        return f"out of disk space while writing {what}; free some space (try `supermachine prune`)"
    return f"cannot write {what}: {e.strerror or e}"
