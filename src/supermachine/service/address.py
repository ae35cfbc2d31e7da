"""Where a user's service listens, and how a client finds it. Light: the CLI imports this on
every `run`, so it costs a few stat calls and no imports beyond the stdlib's basics.

The service's runtime directory (0700) holds::

    api.sock      the HTTP API (mode 0600)
    run.sock      the CLI's `run` requests, in the detached-VM control protocol (0600)
    service.json  {"pid", "home", "version", "tcp"}: which home this service serves
    lock          flock-held by the service for its whole life: free lock = no service
    token         the bearer token TCP clients must send (0600; made when --listen is used)
"""

from __future__ import annotations

import json
import os

MAX_INFO = 1 << 16
#: set to 1 to keep every command in-process even when a service runs
NO_SERVICE_ENV = "SUPERMACHINE_NO_SERVICE"
#: where Python clients connect: unix:///path/api.sock or http://HOST:PORT
HOST_ENV = "SUPERMACHINE_HOST"
TOKEN_ENV = "SUPERMACHINE_TOKEN"


def runtime_dir():
    """$SUPERMACHINE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/supermachine, else
    /tmp/supermachine-UID (a directory only this user may enter; see `ensure_private`)."""
    from pathlib import Path

    return Path(runtime_dir_text())


def runtime_dir_text() -> str:
    explicit = os.environ.get("SUPERMACHINE_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "supermachine")
    return f"/tmp/supermachine-{os.getuid()}"


def ensure_private(path) -> None:
    """Create ``path`` 0700, or check that an existing one is this user's and private (in
    /tmp another user could have made it first)."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    import stat

    from ..errors import Error

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise Error(f"{path} is not a directory of this user's: remove it or set "
                    "SUPERMACHINE_RUNTIME_DIR")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class ServiceInfo:
    """A running service, as its service.json says (a plain class: this module is on the
    CLI's quickest path, and dataclasses costs more to import than the whole request)."""

    __slots__ = ("directory", "pid", "home", "version", "tcp")

    def __init__(self, directory: str, pid: int, home: str, version: str,
                 tcp: str | None) -> None:
        self.directory = directory
        self.pid = pid
        self.home = home
        self.version = version
        self.tcp = tcp  # "HOST:PORT" when it also listens on TCP


def find(home: str | os.PathLike[str], directory: str | None = None) -> ServiceInfo | None:
    """The service serving ``home`` that is running now, if any."""
    directory = str(directory or runtime_dir_text())
    try:
        with open(os.path.join(directory, "service.json"), "rb") as f:
            obj = json.loads(f.read(MAX_INFO))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("home") != os.path.realpath(home):
        return None
    pid = obj.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    from ..locations import lock_held

    if not lock_held(os.path.join(directory, "lock"), by_any=False):
        return None  # a service that died (even SIGKILLed) left its lock free
    tcp = obj.get("tcp")
    return ServiceInfo(directory, pid, obj["home"], str(obj.get("version", "")),
                       tcp if isinstance(tcp, str) else None)


def disabled() -> bool:
    return os.environ.get(NO_SERVICE_ENV, "") not in ("", "0")
