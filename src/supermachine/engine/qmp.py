"""A small QMP (QEMU Machine Protocol) client over an already-connected socket.

QMP is newline-delimited JSON: a greeting, then ``qmp_capabilities``, then commands whose
replies are ``{"return": ...}`` or ``{"error": ...}``, interleaved with ``{"event": ...}``
messages. QEMU is trusted less than our own code but more than the guest; lines are still
capped so a broken QEMU cannot make us buffer without bound.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from ..errors import EngineError

MAX_LINE = 1 << 20


class QMPClient:
    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = b""
        # One command in flight at a time: replies carry no id, so callers on different
        # threads (a snapshot, a port forward) must not interleave.
        self._lock = threading.RLock()
        self._negotiated = False

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError("QEMU did not answer on its control socket in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise EngineError(f"lost QEMU's control socket: {e}") from e
            if not chunk:
                raise EngineError("QEMU closed its control socket (it exited)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise EngineError("QEMU sent an oversized QMP message")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise EngineError(f"QEMU sent malformed QMP: {line[:80]!r}") from e
        if not isinstance(msg, dict):
            raise EngineError("QEMU sent a QMP message that is not an object")
        return msg

    def handshake(self, timeout: float = 10.0) -> None:
        """Read the greeting and negotiate; later calls return at once."""
        with self._lock:
            if self._negotiated:
                return
            deadline = time.monotonic() + timeout
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise EngineError("QEMU's control socket did not greet with QMP")
            self._execute("qmp_capabilities", None, timeout)
            self._negotiated = True

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 30.0, *, fd: int | None = None) -> Any:
        """Run ``command`` and return its result; ``fd`` is attached with SCM_RIGHTS (as
        ``getfd`` and ``add-fd`` need)."""
        with self._lock:
            return self._execute(command, arguments, timeout, fd)

    def _execute(self, command: str, arguments: dict[str, Any] | None, timeout: float,
                 fd: int | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fd is None:
                self._sock.sendall(data)
            else:
                socket.send_fds(self._sock, [data], [fd])
        except OSError as e:
            raise EngineError(f"lost QEMU's control socket: {e}") from e
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                continue  # asynchronous events: nothing here waits for one
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise EngineError(f"QEMU refused {command}: {desc}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self._sock.close()
