"""The readiness pipe between a launcher and the process it starts to own a VM (a detached
VM's supervisor, an OCI container's process): one JSON object, written once, then closed.
``{"ok": true, ...}`` when the VM runs; ``{"error": "...", ...}`` when it could not start."""

from __future__ import annotations

import json
import os

MAX_REPORT = 65536


def send(fd: int, report: dict[str, object]) -> bool:
    """Write ``report`` and close ``fd``; False when the launcher no longer listens."""
    try:
        os.write(fd, json.dumps(report).encode()[:MAX_REPORT])
        return True
    except OSError:  # EPIPE: the launcher was interrupted
        return False
    finally:
        os.close(fd)


def receive(fd: int) -> dict[str, object] | None:
    """The report, once the other end is closed; None when it closed without one (died)."""
    data = b""
    try:
        while len(data) < MAX_REPORT and (chunk := os.read(fd, MAX_REPORT)):
            data += chunk
    finally:
        os.close(fd)
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
