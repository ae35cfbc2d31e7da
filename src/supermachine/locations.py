"""Where the state home is, and whether a lock file is held: the two facts the quickest
commands need (the CLI's way into the service), with nothing but `os` and `fcntl`
imported. home.py builds on these."""

from __future__ import annotations

import fcntl
import os

#: the home's directory of detached VMs (``Home.vms``), named here for the commands that
#: reach it without building a Home (`ps`, `exec`, ...)
VMS = "vms"


def home_root() -> str:
    """$SUPERMACHINE_HOME, else $XDG_CACHE_HOME/supermachine, else ~/.cache/supermachine."""
    env = os.environ.get("SUPERMACHINE_HOME")
    if env:
        return os.path.expanduser(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "supermachine")


def lock_held(path: str | os.PathLike[str], *, by_any: bool) -> bool:
    """Whether someone holds an flock on ``path`` (a missing file: no): ``by_any`` counts
    shared holders too, else only an exclusive one. Probes without waiting or creating."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if by_any else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
