"""Control-socket connections of detached VMs: the socket shell around protocol.py, and the
client side the CLI uses (exec, file copies, stop, snapshot).

The socket is reached through ``/proc/self/fd/<dirfd>/sock`` so the unix-socket path limit
(108 bytes) never depends on how deep the home directory is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import UsageError, VMError
from . import wire
from .protocol import (
    MAX_PAYLOAD,
    ControlError,
    Decoder,
    ExecRequest,
    Frame,
    Kind,
    ReadRequest,
    Request,
    SnapshotRequest,
    StopRequest,
    WriteRequest,
    encode,
    encode_request,
    encode_resize,
    encode_signal,
    parse_json,
)
from .state import VMDir

STDOUT, STDERR = 1, 2  # the agent's stream numbers; not imported, to keep `exec` start-up cheap


@dataclass(frozen=True)
class RemoteExit:
    """How an exec in a detached VM ended, in shell terms (like agent.client.ExitStatus)."""

    exit_code: int
    error: str | None = None


class FrameSocket(wire.FrameSocket):
    """wire.FrameSocket whose frames carry protocol `Kind`s."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, Decoder())


def socket_path(dirfd: int, name: str = "sock") -> str:
    return f"/proc/self/fd/{dirfd}/{name}"


def connect(d: VMDir) -> FrameSocket:
    try:
        dirfd = os.open(d.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VMError(f"no such VM: {d.name}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(socket_path(dirfd))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise VMError(f"VM {d.name} is not running; see `supermachine ps -a`") from None
    finally:
        os.close(dirfd)
    return FrameSocket(sock)


def _exit_of(frame: Frame) -> tuple[int, str | None, int | None]:
    obj = parse_json(frame)
    code, error, err_no = obj.get("code"), obj.get("error"), obj.get("errno")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        raise ControlError("EXIT frame has a malformed code")
    return (code, error if isinstance(error, str) else None,
            err_no if isinstance(err_no, int) and not isinstance(err_no, bool) else None)


class RemoteProcess:
    """A process running in a detached VM, driven over its control socket.

    Offers what terminal.pump needs of `agent.client.Process`: write, close_stdin, resize,
    signal, iteration over ``(stream, bytes)`` and wait().
    """

    def __init__(self, conn: FrameSocket, label: str) -> None:
        self._conn = conn
        self.label = label
        self._status: RemoteExit | None = None

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), MAX_PAYLOAD):
            self._conn.send(encode(Kind.STDIN, bytes(view[i:i + MAX_PAYLOAD])))

    def close_stdin(self) -> None:
        self._conn.send(encode(Kind.EOF))

    def resize(self, rows: int, cols: int) -> None:
        self._conn.send(encode_resize(rows, cols))

    def signal(self, signo: int) -> None:
        self._conn.send(encode_signal(signo))

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while self._status is None:
            frame = self._conn.recv()
            if frame is None:
                raise VMError(f"the VM stopped while {self.label} was running")
            if frame.kind == Kind.STDOUT:
                yield STDOUT, frame.payload
            elif frame.kind == Kind.STDERR:
                yield STDERR, frame.payload
            elif frame.kind == Kind.EXIT:
                code, error, _ = _exit_of(frame)
                self._status = RemoteExit(code, error)
            else:
                raise ControlError(f"unexpected {frame.kind.name} frame from the supervisor")

    def wait(self) -> RemoteExit:
        for _ in self:
            pass
        assert self._status is not None
        return self._status

    def close(self) -> None:
        self._conn.close()

    def release(self) -> None:
        """Let go of the connection in this process only (see FrameSocket.release)."""
        self._conn.release()


def exec_in(d: VMDir, req: ExecRequest) -> RemoteProcess:
    conn = connect(d)
    try:
        conn.send(encode_request(req))
    except BaseException:
        conn.close()
        raise
    return RemoteProcess(conn, req.argv[0])


def _finish(conn: FrameSocket, what: str, frame: Frame | None = None) -> None:
    """Wait for (or take ``frame`` as) the EXIT of an operation; raise with its message."""
    frame = frame or conn.recv()
    if frame is None:
        raise VMError(f"the VM stopped during {what}")
    if frame.kind != Kind.EXIT:
        raise ControlError(f"unexpected {frame.kind.name} frame from the supervisor")
    code, error, err_no = _exit_of(frame)
    if code:
        err = VMError(error or f"{what} failed")
        err.errno = err_no  # type: ignore[attr-defined]
        raise err


def read_file_to(d: VMDir, path: str, out: BinaryIO) -> int:
    """Stream a file of the VM into ``out``; returns its size."""
    conn = connect(d)
    total = 0
    try:
        conn.send(encode_request(ReadRequest(path)))
        while True:
            frame = conn.recv()
            if frame is None:
                raise VMError(f"the VM stopped while copying {path}")
            if frame.kind != Kind.STDOUT:
                break
            out.write(frame.payload)
            total += len(frame.payload)
        _finish(conn, f"copying {path}", frame)
    finally:
        conn.close()
    return total


def write_file_from(d: VMDir, path: str, src: BinaryIO, mode: int) -> int:
    """Stream ``src`` into a file of the VM; returns the bytes written."""
    conn = connect(d)
    total = 0
    try:
        conn.send(encode_request(WriteRequest(path, mode)))
        try:
            while chunk := src.read(MAX_PAYLOAD):
                conn.send(encode(Kind.STDIN, chunk))
                total += len(chunk)
            conn.send(encode(Kind.EOF))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the supervisor gave up early (e.g. no such directory): its EXIT says why
        _finish(conn, f"copying to {path}")
    finally:
        conn.close()
    return total


def request_stop(d: VMDir, timeout: float) -> None:
    """Ask the supervisor to stop the main workload (it answers once the request is taken)."""
    conn = connect(d)
    try:
        conn.send(encode_request(StopRequest(timeout)))
        with contextlib.suppress(OSError, VMError):
            _finish(conn, "stop")
    finally:
        conn.close()


def request_snapshot(d: VMDir, name: str) -> None:
    """Have the supervisor save its running VM as snapshot ``name`` (waits until saved)."""
    request(d, SnapshotRequest(name), "snapshot")


def request(d: VMDir, req: Request, what: str) -> None:
    """Send ``req`` and wait until it is done; raises with the owner's error."""
    conn = connect(d)
    try:
        conn.send(encode_request(req))
        _finish(conn, what)
    finally:
        conn.close()


def is_dir_error(e: VMError) -> bool:
    return getattr(e, "errno", None) == errno.EISDIR


def copy_in(d: VMDir, src: str, target: str) -> None:
    """Copy the host file ``src`` to ``target`` in the VM, mode preserved; a ``target``
    that is a directory in the VM (or ends in /) receives the file inside it, as cp does."""
    if os.path.isdir(src):
        raise UsageError(f"{src} is a directory; cp copies files (tar it, copy the archive, and "
                      "`exec ... tar x` it)")
    if target.endswith("/"):
        target += os.path.basename(src)
    with open(src, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o7777
        try:
            write_file_from(d, target, f, mode)
        except VMError as e:
            if not is_dir_error(e):
                raise
            f.seek(0)
            write_file_from(d, f"{target}/{os.path.basename(src)}", f, mode)


def copy_out(d: VMDir, source: str, dst: str) -> None:
    """Copy the VM file ``source`` to ``dst`` here (into it when it is a directory), written
    atomically."""
    from pathlib import Path

    from ..home import atomic_path

    target = os.path.join(dst, os.path.basename(source.rstrip("/"))) if os.path.isdir(dst) \
        else dst
    try:
        with atomic_path(Path(target)) as tmp, open(tmp, "wb") as f:
            read_file_to(d, source, f)
    except VMError as e:
        if is_dir_error(e):
            raise VMError(f"{source} is a directory in the VM; cp copies files (tar it "
                          "there with `exec`, then copy the archive)") from None
        raise


def stop(d: VMDir, timeout: float) -> None:
    """Stop signal, then a kill after ``timeout``; returns once the supervisor (and so QEMU)
    is gone. A supervisor that does not answer is signalled, then killed."""
    import signal
    import time

    if not d.alive():
        return
    try:
        request_stop(d, timeout)
    except VMError:
        _signal_supervisor(d, signal.SIGTERM)  # still starting: no socket yet
    deadline = time.monotonic() + timeout + 30
    killed = False
    while d.alive():
        if time.monotonic() > deadline:
            if killed:
                raise VMError(f"VM {d.name} does not stop; its supervisor pid is in "
                              f"`supermachine inspect {d.name}`")
            _signal_supervisor(d, signal.SIGKILL)  # QEMU dies with it (PR_SET_PDEATHSIG)
            killed = True
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def _signal_supervisor(d: VMDir, signo: int) -> None:
    try:
        record = d.read()
    except VMError:
        return
    if record.options.get("service") is True:
        return  # its host is the service, which hosts other VMs too: never signal it
    pid = record.supervisor_pid
    # The lock is still held, so the recorded pid is the live supervisor's, not a reused one.
    if pid and d.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signo)
