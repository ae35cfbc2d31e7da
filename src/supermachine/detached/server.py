"""The server side of a VM's control socket (protocol.py): one thread per connection.

A detached VM's supervisor and an OCI container's process (oci/shim.py) both own one VM
and serve the same socket: exec, file reads and writes, plus the requests only their owner
understands (stop and snapshot; start, signal, pause), which it passes in as ``handlers``.
The server owns its listener, its connections and their threads, and ends them in
`close()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Error, VMError
from ..runtime.threads import ThreadGroup
from .client import FrameSocket, socket_path
from .protocol import (
    ControlError,
    ExecRequest,
    Kind,
    ReadRequest,
    Request,
    WriteRequest,
    encode_data,
    encode_json,
    parse_request,
    parse_resize,
    parse_signal,
)

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0  # a client must send its request this soon after connecting

#: an owner's own requests: called with the request; answers EXIT 0 when it returns
Handler = Callable[[Any], None]
#: an owner's requests that answer for themselves: called with (connection, request,
#: the connection's ThreadGroup); must send the EXIT frame
StreamHandler = Callable[[Any, Any, ThreadGroup], None]


class ControlServer:
    """Serves ``vm`` on ``directory``/``name`` (mode 0600) until `close()`."""

    def __init__(self, vm: Any, directory: Path,
                 handlers: dict[type, Handler] | None = None, *,
                 streams: dict[type, StreamHandler] | None = None,
                 name: str = "sock") -> None:
        self.vm = vm
        self._directory = directory
        self._handlers = handlers or {}
        self._streams = streams or {}
        self._name = name
        self._listener: socket.socket | None = None
        self._conns: set[FrameSocket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads = ThreadGroup("control")

    @property
    def sock_path(self) -> Path:
        return self._directory / self._name

    def start(self) -> None:
        dirfd = os.open(self._directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            # no 108-byte limit on the directory's depth
            sock.bind(socket_path(dirfd, self._name))
        finally:
            os.close(dirfd)
        os.chmod(self.sock_path, 0o600)
        sock.listen(16)
        self._listener = sock
        self._threads.start(self._accept_loop, name="accept")

    def close(self) -> None:
        """Stop accepting and end every connection (call after the VM is closed, so that
        exec handlers waiting on it have ended); joins the threads."""
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
        with self._lock:
            for conn in list(self._conns):
                conn.close()
        self._threads.join(timeout=2.0)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = FrameSocket(sock)
            with self._lock:
                busy = len(self._conns) >= MAX_CONNECTIONS
                if not busy:
                    self._conns.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.send(exit_frame(125, "too many connections to this VM; try again"))
                conn.close()
                continue
            self._threads.start(self._serve_socket, conn, name="conn")

    def _serve_socket(self, conn: FrameSocket) -> None:
        try:
            conn.sock.settimeout(REQUEST_TIMEOUT)
            first = conn.recv()
            conn.sock.settimeout(None)
        except (OSError, ControlError) as e:
            log.debug("connection ended: %s", e)
            first = None
        if first is None:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            return
        self.serve_conn(conn, first)

    def serve_conn(self, conn: Any, frame: Any) -> None:
        """Serve one connection whose first frame (the request) is ``frame``; ``conn`` is
        anything with send(bytes), recv() -> Frame | None and close() (a `FrameSocket`, or
        the service's WebSocket bridge). Closes ``conn`` when done."""
        # An exec's input pump reads from ``conn``: it ends when the finally below closes
        # the connection, and is joined then.
        with self._lock:
            self._conns.add(conn)
        with ThreadGroup("conn") as threads:
            try:
                if frame is not None:
                    self._handle(conn, parse_request(frame), threads)
            except (OSError, ControlError) as e:
                log.debug("connection ended: %s", e)
            except Error as e:
                with contextlib.suppress(OSError):
                    conn.send(exit_frame(125, str(e)))
            finally:
                with self._lock:
                    self._conns.discard(conn)
                conn.close()

    def _handle(self, conn: FrameSocket, req: Request, threads: ThreadGroup) -> None:
        if self.vm is None and type(req) not in self._streams and \
                type(req) not in self._handlers:
            conn.send(exit_frame(125, f"this socket does not take {type(req).__name__}"))
        elif isinstance(req, ExecRequest):
            self._exec(conn, req, threads)
        elif isinstance(req, ReadRequest):
            self._read(conn, req)
        elif isinstance(req, WriteRequest):
            self._write(conn, req)
        elif type(req) in self._streams:
            self._streams[type(req)](conn, req, threads)
        elif type(req) in self._handlers:
            self._handlers[type(req)](req)
            conn.send(exit_frame(0))
        else:
            conn.send(exit_frame(125, f"this VM does not take {type(req).__name__}"))

    def _exec(self, conn: FrameSocket, req: ExecRequest, threads: ThreadGroup) -> None:
        proc = self.vm.spawn(list(req.argv), env=list(req.env), cwd=req.cwd, user=req.user,
                             stdin=req.stdin, tty=req.tty, winsize=req.winsize,
                             rlimits=req.rlimits)
        stream_process(conn, proc, threads)

    def _read(self, conn: FrameSocket, req: ReadRequest) -> None:
        from ..agent.client import GuestFileError

        class Sink:
            def write(self, data: bytes) -> int:
                conn.send(encode_data(Kind.STDOUT, data))
                return len(data)

        try:
            self.vm.read_file_to(req.path, Sink())
        except GuestFileError as e:
            conn.send(exit_frame(1, str(e), e.errno))
            return
        conn.send(exit_frame(0))

    def _write(self, conn: FrameSocket, req: WriteRequest) -> None:
        from ..agent.client import GuestFileError

        try:
            self.vm.write_file_from(req.path, _ClientInput(conn), mode=req.mode)
        except GuestFileError as e:
            conn.send(exit_frame(1, str(e), e.errno))
            return
        conn.send(exit_frame(0))


class _ClientInput:
    """A file-like reader over a client's STDIN frames, ending at its EOF frame."""

    def __init__(self, conn: FrameSocket) -> None:
        self._conn = conn
        self._buf = b""
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            frame = self._conn.recv()
            if frame is None:
                raise VMError("the client went away before the end of the file")
            if frame.kind == Kind.STDIN:
                self._buf = frame.payload
            elif frame.kind == Kind.EOF:
                self._eof = True
            else:
                raise ControlError(f"unexpected {frame.kind.name} frame in a file copy")
        n = len(self._buf) if n < 0 else n
        data, self._buf = self._buf[:n], self._buf[n:]
        return data


def _pump_client_input(conn: FrameSocket, proc: Any) -> None:
    """Client frames -> the process; the client going away kills the process."""
    try:
        while True:
            frame = conn.recv()
            if frame is None:
                break
            if frame.kind == Kind.STDIN:
                proc.write(frame.payload)
            elif frame.kind == Kind.EOF:
                proc.close_stdin()
            elif frame.kind == Kind.RESIZE:
                proc.resize(*parse_resize(frame))
            elif frame.kind == Kind.SIGNAL:
                proc.signal(parse_signal(frame))
            else:
                break
    except (Error, OSError):
        pass
    with contextlib.suppress(Error):
        proc.close()


def stream_process(conn: Any, proc: Any, threads: ThreadGroup) -> None:
    """Relay a started process: its output and exit status to ``conn``, the client's
    input, resizes and signals to it; the client going away kills it."""
    with proc:
        threads.start(_pump_client_input, conn, proc, name="exec-in")
        for stream, data in proc:
            conn.send(encode_data(Kind.STDERR if stream == 2 else Kind.STDOUT, data))
        status = proc.wait()
    conn.send(exit_frame(status.exit_code, status.error))


def exit_frame(code: int, error: str | None = None, err_no: int | None = None) -> bytes:
    obj: dict[str, object] = {"code": code}
    if error:
        obj["error"] = error[:4096]
    if err_no is not None:
        obj["errno"] = err_no
    return encode_json(Kind.EXIT, obj)
