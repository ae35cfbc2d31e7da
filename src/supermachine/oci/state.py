"""Where the runtime keeps its containers: ``ROOT/ID/`` with ``state.json``, ``lock`` and
``sock`` (the container process's control socket, detached/server.py).

The container process (oci/shim.py) holds ``lock`` for as long as it lives, so a container
whose lock is free is stopped whatever its record says, even after a SIGKILL; the record
only says how far a living one got (creating, created, running, paused).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..home import atomic_write_bytes, lock_held

OCI_VERSION = "1.0.2"
CREATING, CREATED, RUNNING, PAUSED, STOPPED = "creating", "created", "running", "paused", \
    "stopped"
MAX_STATE_BYTES = 1 << 20
#: runc's rule for container ids, with a length bound
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+.-]{0,1023}$")


class ContainerError(UsageError):
    """No such container, one that exists already, or one in the wrong state."""


def check_id(container_id: str) -> str:
    if not isinstance(container_id, str) or not ID_PATTERN.match(container_id):
        raise ContainerError(f"invalid container id {str(container_id)[:64]!r}: use letters, "
                             "digits, _ + . - (at most 1024)")
    return container_id


def default_root() -> Path:
    if os.geteuid() == 0:
        return Path("/run/supermachine-runtime")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "supermachine-runtime" if runtime else \
        Path(f"/tmp/supermachine-runtime-{os.geteuid()}")


class Container:
    """One container's directory under the runtime's root. A plain class: `state`, `kill`
    and `delete` are whole processes, and dataclasses alone would cost them ~10 ms."""

    __slots__ = ("root", "id")

    def __init__(self, root: Path, container_id: str) -> None:
        self.root = root
        self.id = container_id

    @property
    def name(self) -> str:  # what detached/client.py calls a VM in its messages
        return self.id

    @property
    def path(self) -> Path:
        return self.root / self.id

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def record_path(self) -> Path:
        return self.path / "state.json"

    @property
    def shim_log(self) -> Path:
        return self.path / "shim.log"

    def exists(self) -> bool:
        return self.record_path.exists()

    def alive(self) -> bool:
        return lock_held(self.lock, by_any=True)

    def read(self) -> dict[str, Any]:
        try:
            with open(self.record_path, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            raise ContainerError(f"container {self.id} does not exist") from None
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise ContainerError(f"container {self.id}: its state file is damaged")
        return obj

    def write(self, record: dict[str, Any]) -> None:
        atomic_write_bytes(self.record_path, json.dumps(record).encode(), 0o600)

    def update(self, **changes: Any) -> dict[str, Any]:
        record = {**self.read(), **changes}
        self.write(record)
        return record

    def status(self, record: dict[str, Any] | None = None) -> str:
        record = self.read() if record is None else record
        if not self.alive():
            return STOPPED
        status = record.get("status")
        return status if status in (CREATING, CREATED, RUNNING, PAUSED) else STOPPED

    def state(self) -> dict[str, Any]:
        """The OCI state of the container (runtime-spec "state")."""
        record = self.read()
        status = self.status(record)
        out: dict[str, Any] = {"ociVersion": OCI_VERSION, "id": self.id, "status": status,
                               "pid": record.get("pid", 0) if status != STOPPED else 0,
                               "bundle": record.get("bundle", ""),
                               "rootfs": record.get("rootfs", ""),
                               "created": record.get("created", ""),
                               "annotations": record.get("annotations", {})}
        if status == STOPPED and isinstance(record.get("exit_code"), int):
            out["exitCode"] = record["exit_code"]
        return out

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def container(root: Path, container_id: str) -> Container:
    return Container(root, check_id(container_id))


def create_dir(c: Container) -> None:
    """Claim ``c``'s directory; an existing one with a live or recorded container is an
    error (a leftover without a record, from a create killed early, is taken over)."""
    c.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        c.path.mkdir(mode=0o700)
    except FileExistsError:
        if c.exists() or c.alive():
            raise ContainerError(f"container {c.id} already exists") from None


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def list_containers(root: Path) -> list[Container]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(root.iterdir()):
            with contextlib.suppress(UsageError):
                out.append(container(root, entry.name))
    return out


class RuntimeLog:
    """runc's --log: one line per message, text or JSON."""

    def __init__(self, path: str | None, fmt: str) -> None:
        self.path, self.fmt = path, fmt

    def write(self, level: str, msg: str) -> None:
        if not self.path:
            return
        now = rfc3339(time.time())
        line = json.dumps({"level": level, "msg": msg, "time": now}) if self.fmt == "json" \
            else f'time="{now}" level={level} msg={json.dumps(msg)}'
        with contextlib.suppress(OSError):
            with open(self.path, "a") as f:
                f.write(line + "\n")
