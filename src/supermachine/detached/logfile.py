"""A detached VM's output log, bounded on disk.

The supervisor appends the workload's output to ``log`` as protocol.py STDOUT/STDERR frames.
When a frame would take the file past its cap, ``log`` becomes ``log.1`` (replacing the one
before) and a new ``log`` starts: a workload that floods its output holds at most twice the
cap on disk, and `supermachine logs` shows its newest output (docker's json-file driver with
``max-size`` and ``max-file=2``). Frames are never split across files.
"""

from __future__ import annotations

import os
import threading

from ..errors import UsageError

DEFAULT_MAX_BYTES = 64 << 20
MIN_MAX_BYTES = 128 << 10  # above one frame (a 64 KiB payload and its header)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def rotated(path: str | os.PathLike[str]) -> str:
    """Where ``path``'s previous part goes when it is rotated."""
    return os.fspath(path) + ".1"


def parse_size(text: str) -> int:
    """``10m``, ``512k``, ``1g`` or a byte count -> bytes (at least 128 KiB)."""
    s = text.strip().lower()
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[:-1] if unit else s
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise UsageError(f"invalid log size {text!r}: use e.g. 10m or 512k") from None
    if not MIN_MAX_BYTES <= size <= 1 << 40:
        raise UsageError(f"log size {text!r} out of range: use 128k to 1t")
    return size


class LogWriter:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max(max_bytes, MIN_MAX_BYTES)
        self._f = open(path, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        self._size = self._f.tell()

    def write(self, frames: bytes) -> None:
        if self._size and self._size + len(frames) > self.max_bytes:
            self._rotate()
        self._f.write(frames)
        self._size += len(frames)

    def _rotate(self) -> None:
        self._f.close()
        os.replace(self.path, rotated(self.path))
        self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._f.close()


#: the supervisor's own stderr (`supervisor.log`): its messages, and with --verbose the guest
#: console and passt's output, which a guest controls
STDERR_MAX_BYTES = 4 << 20


class StderrCap:
    """Points this process's fd 2 (and so every child's that inherits it) at a pipe, and
    appends what comes through it to ``path``, rotated at ``max_bytes`` like the output log:
    a guest flooding its console through `--verbose` holds at most twice that on disk."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = STDERR_MAX_BYTES) -> None:
        self._writer = LogWriter(path, max_bytes)
        r, w = os.pipe2(os.O_CLOEXEC)
        os.dup2(w, 2)  # the new fd 2 is inheritable; the pipe's own ends are not
        os.close(w)
        self._read = r
        self._thread = threading.Thread(target=self._drain, name="stderr-cap", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while chunk := os.read(self._read, 65536):
                try:
                    self._writer.write(chunk)
                except OSError:  # e.g. disk full: keep draining so no writer blocks
                    pass
        finally:
            os.close(self._read)
            self._writer.close()

    def close(self, timeout: float = 1.0) -> None:
        """Close our fd 2 and wait (bounded: a child may still hold it) for the rest to be
        written."""
        os.close(2)
        self._thread.join(timeout)
