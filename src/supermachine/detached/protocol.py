"""The CLI <-> supervisor protocol of detached VMs: pure code, bytes in, frames out.

One unix-socket connection carries one operation. The client sends a REQUEST frame (a JSON
object, validated by `parse_request`), then STDIN/EOF/RESIZE/SIGNAL frames as the operation
needs; the supervisor answers with STDOUT/STDERR frames and ends with one EXIT frame (JSON:
``{"code": N, "error": "..."}``). The same frame format stores a detached VM's log file
(STDOUT/STDERR records), so `logs` can tell the two streams apart.

The service speaks it too: on its run socket (RUN with typed specs; RUNARGS with a `run`
command line, answered STARTED first) and, as WebSocket messages, for a streaming exec.
The framing itself is wire.py's.

Frame: ``u8 kind | u32 length (little-endian) | payload``, length <= MAX_PAYLOAD. Either side
is a different process of the same user, but a buggy or stale peer must not make the other
allocate without bound: every length is capped and anything malformed raises ControlError.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

from . import wire
from .wire import MAX_PAYLOAD, ControlError, Frame, encode

__all__ = ["MAX_PAYLOAD", "ControlError", "Frame", "encode", "Decoder", "Kind"]

MAX_ARGS = 4096  # argv or env entries in one request
MAX_PATH = 4096
_RESIZE = struct.Struct("<HH")
_SIGNAL = struct.Struct("<B")


class Kind(IntEnum):
    REQUEST = 1  # client -> supervisor, JSON object, first frame only
    STDIN = 2  # client -> supervisor, bytes
    EOF = 3  # client -> supervisor, stdin ended (empty payload)
    RESIZE = 4  # client -> supervisor, u16 rows, u16 cols
    SIGNAL = 5  # client -> supervisor, u8 signal number
    STDOUT = 6  # supervisor -> client (and log records)
    STDERR = 7  # supervisor -> client (and log records)
    EXIT = 8  # supervisor -> client, JSON object, last frame
    STARTED = 9  # service -> CLI, JSON object: how a forwarded `run` was parsed


def encode_data(kind: Kind, data: bytes) -> bytes:
    """Any amount of data as as many frames as it takes."""
    view = memoryview(data)
    return b"".join(encode(kind, bytes(view[i:i + MAX_PAYLOAD]))
                    for i in range(0, len(view), MAX_PAYLOAD))


def encode_json(kind: Kind, obj: dict[str, object]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ControlError("the request is too large (too many or too long arguments)")
    return encode(kind, payload)


def encode_resize(rows: int, cols: int) -> bytes:
    return encode(Kind.RESIZE, _RESIZE.pack(min(max(rows, 0), 0xFFFF), min(max(cols, 0), 0xFFFF)))


def encode_signal(signo: int) -> bytes:
    if not 1 <= signo <= 64:
        raise ValueError(f"invalid signal number {signo}")
    return encode(Kind.SIGNAL, _SIGNAL.pack(signo))


class Decoder(wire.Decoder):
    """Incremental frame parser (wire.py) whose frames carry `Kind`s."""

    def __init__(self) -> None:
        super().__init__(Kind)


def parse_json(frame: Frame) -> dict[str, object]:
    try:
        obj = json.loads(frame.payload)
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"{frame.kind.name} frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ControlError(f"{frame.kind.name} frame is not a JSON object")
    return obj


def parse_resize(frame: Frame) -> tuple[int, int]:
    if len(frame.payload) != _RESIZE.size:
        raise ControlError("RESIZE frame has the wrong size")
    rows, cols = _RESIZE.unpack(frame.payload)
    return rows, cols


def parse_signal(frame: Frame) -> int:
    if len(frame.payload) != _SIGNAL.size or not 1 <= frame.payload[0] <= 64:
        raise ControlError("SIGNAL frame is malformed")
    return frame.payload[0]


# ---- requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExecRequest:
    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str | None = None
    user: str | None = None
    stdin: bool = False
    tty: bool = False
    winsize: tuple[int, int] | None = None
    rlimits: tuple[tuple[str, int, int], ...] = ()  # (name, soft, hard), checked by the VM


@dataclass(frozen=True)
class ReadRequest:
    path: str


@dataclass(frozen=True)
class WriteRequest:
    path: str
    mode: int = 0o644


@dataclass(frozen=True)
class StopRequest:
    timeout: float = 10.0


@dataclass(frozen=True)
class SnapshotRequest:
    name: str


@dataclass(frozen=True)
class StartRequest:
    """Start the main workload of a VM prepared without it (an OCI container's `start`)."""


@dataclass(frozen=True)
class SignalRequest:
    """Send a signal to the main workload."""

    signo: int


@dataclass(frozen=True)
class PauseRequest:
    """Pause (freeze every vCPU) or resume the VM."""

    pause: bool


@dataclass(frozen=True)
class RunRequest:
    """Make a VM and run a workload in it (the service's answer to `supermachine run`).

    ``vm`` and ``workload`` are a `VMSpec` and a `WorkloadSpec` as JSON, checked by the
    service with their own validation. Attached (not ``detach``), the connection then
    carries the workload's stdio as an exec's does; detached, the EXIT frame names the VM."""

    vm: dict
    workload: dict
    detach: bool = False
    name: str | None = None
    remove: bool = False
    log_max_bytes: int | None = None
    winsize: tuple[int, int] | None = None


@dataclass(frozen=True)
class RunArgsRequest:
    """`supermachine run ARGS...` handed to the service as typed (service/runclient.py),
    with what the arguments are relative to: the caller's directory and environment, and
    whether its stdin is a terminal ("tty"), a pipe or file ("pipe") or absent ("none").
    The service parses them as the CLI would, answers STARTED (``{"tty", "stdin",
    "detach"}``) and then as for a `RunRequest`."""

    argv: tuple[str, ...]
    cwd: str
    env: tuple[str, ...]
    stdin: str = "none"
    winsize: tuple[int, int] | None = None


Request = (ExecRequest | ReadRequest | WriteRequest | StopRequest | SnapshotRequest |
           StartRequest | SignalRequest | PauseRequest | RunRequest | RunArgsRequest)


def encode_request(req: Request) -> bytes:
    if isinstance(req, ExecRequest):
        obj: dict[str, object] = {
            "op": "exec", "argv": list(req.argv), "env": list(req.env), "cwd": req.cwd,
            "user": req.user, "stdin": req.stdin, "tty": req.tty,
            "winsize": list(req.winsize) if req.winsize else None,
            "rlimits": [list(r) for r in req.rlimits]}
    elif isinstance(req, ReadRequest):
        obj = {"op": "read", "path": req.path}
    elif isinstance(req, WriteRequest):
        obj = {"op": "write", "path": req.path, "mode": req.mode}
    elif isinstance(req, SnapshotRequest):
        obj = {"op": "snapshot", "name": req.name}
    elif isinstance(req, StartRequest):
        obj = {"op": "start"}
    elif isinstance(req, SignalRequest):
        obj = {"op": "signal", "signo": req.signo}
    elif isinstance(req, PauseRequest):
        obj = {"op": "pause" if req.pause else "resume"}
    elif isinstance(req, RunArgsRequest):
        obj = {"op": "runargs", "argv": list(req.argv), "cwd": req.cwd, "env": list(req.env),
               "stdin": req.stdin, "winsize": list(req.winsize) if req.winsize else None}
    elif isinstance(req, RunRequest):
        obj = {"op": "run", "vm": req.vm, "workload": req.workload, "detach": req.detach,
               "name": req.name, "remove": req.remove, "log_max_bytes": req.log_max_bytes,
               "winsize": list(req.winsize) if req.winsize else None}
    else:
        obj = {"op": "stop", "timeout": req.timeout}
    return encode_json(Kind.REQUEST, obj)


def parse_request(frame: Frame) -> Request:
    """Validate the first frame of a connection into a typed request."""
    if frame.kind != Kind.REQUEST:
        raise ControlError(f"expected a REQUEST frame, got {frame.kind.name}")
    obj = parse_json(frame)
    op = obj.get("op")
    if op == "exec":
        argv = _str_list(obj.get("argv"), "argv")
        if not argv:
            raise ControlError("exec request has an empty argv")
        return ExecRequest(argv=argv, env=_str_list(obj.get("env", []), "env"),
                           cwd=_opt_str(obj.get("cwd"), "cwd"),
                           user=_opt_str(obj.get("user"), "user"),
                           stdin=_bool(obj.get("stdin", False), "stdin"),
                           tty=_bool(obj.get("tty", False), "tty"),
                           winsize=_winsize(obj.get("winsize")),
                           rlimits=_rlimits(obj.get("rlimits", [])))
    if op == "runargs":
        stdin = obj.get("stdin", "none")
        if stdin not in ("tty", "pipe", "none"):
            raise ControlError("runargs request has a malformed stdin")
        cwd = _path(obj.get("cwd"))
        return RunArgsRequest(argv=_str_list(obj.get("argv"), "argv"), cwd=cwd,
                              env=_str_list(obj.get("env", []), "env"), stdin=stdin,
                              winsize=_winsize(obj.get("winsize")))
    if op == "run":
        vm, work, cap = obj.get("vm"), obj.get("workload"), obj.get("log_max_bytes")
        if not isinstance(vm, dict) or not isinstance(work, dict):
            raise ControlError("run request needs vm and workload objects")
        if cap is not None and (not _is_int(cap) or not 0 < cap <= 1 << 40):
            raise ControlError("run request has a malformed log_max_bytes")
        return RunRequest(vm=vm, workload=work, detach=_bool(obj.get("detach", False),
                                                               "detach"),
                          name=_opt_str(obj.get("name"), "name"),
                          remove=_bool(obj.get("remove", False), "remove"),
                          log_max_bytes=cap, winsize=_winsize(obj.get("winsize")))
    if op == "read":
        return ReadRequest(_path(obj.get("path")))
    if op == "write":
        mode = obj.get("mode", 0o644)
        if not _is_int(mode) or not 0 <= mode <= 0o7777:
            raise ControlError("write request has a malformed mode")
        return WriteRequest(_path(obj.get("path")), mode)
    if op == "stop":
        timeout = obj.get("timeout", 10.0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or \
                not 0 <= timeout <= 86400:
            raise ControlError("stop request has a malformed timeout")
        return StopRequest(float(timeout))
    if op == "snapshot":
        name = obj.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise ControlError("snapshot request has a malformed name")
        return SnapshotRequest(name)
    if op == "start":
        return StartRequest()
    if op == "signal":
        signo = obj.get("signo")
        if not _is_int(signo) or not 1 <= signo <= 64:
            raise ControlError("signal request has a malformed signal number")
        return SignalRequest(signo)
    if op in ("pause", "resume"):
        return PauseRequest(op == "pause")
    raise ControlError(f"unknown request {str(op)[:32]!r}")


def _winsize(v: object) -> tuple[int, int] | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and
            all(_is_int(n) and 0 <= n <= 0xFFFF for n in v)):
        raise ControlError("request has a malformed winsize")
    return (v[0], v[1])


def _rlimits(v: object) -> tuple[tuple[str, int, int], ...]:
    if not isinstance(v, list) or len(v) > 16 or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and len(r[0]) <= 16
            and _is_int(r[1]) and _is_int(r[2]) for r in v):
        raise ControlError("request field rlimits must be a list of [name, soft, hard]")
    return tuple((r[0], r[1], r[2]) for r in v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v: object, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_ARGS or not all(isinstance(s, str) for s in v):
        raise ControlError(f"request field {what} must be a list of strings")
    if any("\0" in s for s in v):
        raise ControlError(f"request field {what} contains a NUL byte")
    return tuple(v)


def _opt_str(v: object, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or "\0" in v or len(v) > MAX_PATH:
        raise ControlError(f"request field {what} must be a string")
    return v


def _path(v: object) -> str:
    path = _opt_str(v, "path")
    if not path or not path.startswith("/"):
        raise ControlError("request path must be absolute")
    return path


def _bool(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise ControlError(f"request field {what} must be true or false")
    return v
