"""Network namespaces, by the calling thread: setns(2) and unshare(2) move only the thread
that calls them (and what it forks later), never the whole process. Safe in a forked
child before exec (no allocation beyond ctypes' call)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_path(path: str) -> None:
    """`enter` the namespace at ``path`` (/run/netns/NAME, /proc/PID/ns/net)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(fd)
    finally:
        os.close(fd)


def new() -> int:
    """Move the calling thread into a new network namespace; returns an fd of the one it
    left (the caller closes it). Raises OSError (EPERM without CAP_SYS_ADMIN)."""
    left = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    if _libc().unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        os.close(left)
        raise OSError(err, os.strerror(err))
    return left
