"""Host side of the host-guest agent protocol (docs/protocol.md).

`protocol` is the pure part (bytes in, events out); `client` is the I/O shell the VM code
uses: ``AgentClient(sock).hello(timeout)`` then ``exec``/``spawn``/``read_file``/...
"""

from __future__ import annotations

from .client import (
    AgentClient,
    ExecResult,
    ExitStatus,
    GuestFileError,
    Process,
    ProcessExited,
    WaitTimeout,
)

__all__ = [
    "AgentClient",
    "ExecResult",
    "ExitStatus",
    "GuestFileError",
    "Process",
    "ProcessExited",
    "WaitTimeout",
]
