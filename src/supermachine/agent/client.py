"""The I/O shell around `protocol.Connection`: one socket, one reader and one writer thread.

Threads and locking: all state (the pure `Connection`, per-session output queues, the
outgoing byte queue) is guarded by one condition variable. Callers never touch the socket;
they queue bytes and the writer thread sends them, so neither the reader nor a caller is
ever blocked by a guest that is not reading (a reader stuck in `send` could deadlock
against a guest stuck writing to us). The outgoing queue is bounded by the credit windows.

Liveness: while anybody waits on the guest, the reader pings a guest that has been silent
for ``keepalive`` seconds and fails the connection when ``dead_after`` more pass without a
byte. The VM owner can also call `AgentClient.fail` (e.g. when QEMU exits). Either way every
waiting call raises AgentError promptly; nothing waits forever on a dead guest.

Exit statuses follow docker and the shells: exited -> its status; killed by signal N ->
128+N (``signal`` says N); failed to start -> 127 when the program does not exist, 126 when
it cannot be run (EACCES, ENOEXEC, ...) or a setup step failed (USER, cwd), with the guest's
message in ``error``. exec() does not raise for those: a missing program is an ordinary
result, as in a shell. Agent failures (dead or hostile guest) always raise AgentError.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import AgentError, ExecTimeout, ProtocolError, VMError
from . import protocol as p
from .protocol import ExitKind, Op, Stream

_TICK = 0.1  # how often the reader and writer look at deadlines and the closing flag
_RECV_SIZE = 65536
_GRANT_BATCH = 32768  # coalesce CREDIT frames; the window is 256 KiB
_CLOSE_GRACE = 10.0
_MAX_UNSENT_PONGS = 1024  # how long close() waits for the guest's EXIT after CLOSE
DEFAULT_MAX_FILE = 1 << 30

StrOrBytes = str | bytes


class ProcessExited(VMError):
    """The process ended (or closed its stdin) before all of the input was written."""


class WaitTimeout(VMError):
    """A wait on a process ran past its timeout; the process is still running."""


class GuestFileError(VMError):
    """A file operation failed in the guest; ``errno`` says why."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class ExitStatus:
    """How a session ended, in shell terms (see the module docstring)."""

    exit_code: int
    signal: int | None = None
    error: str | None = None  # guest's message when the process failed to start
    kind: ExitKind = ExitKind.EXITED
    errno: int | None = None


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    error: str | None = None  # why it failed to start (exit_code 126/127), else None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def exit_status(ev: p.Exit) -> ExitStatus:
    """Map the guest's EXIT to host semantics (128+N for signals, 127/126 for start failures)."""
    if ev.kind == ExitKind.EXITED:
        return ExitStatus(ev.code, kind=ev.kind)
    if ev.kind == ExitKind.SIGNALED:
        return ExitStatus(128 + ev.code, signal=ev.code, kind=ev.kind)
    code = 127 if ev.kind == ExitKind.START_FAILED and ev.code == errno.ENOENT else 126
    message = ev.message or (os.strerror(ev.code) if ev.code else "failed")
    return ExitStatus(code, error=message, kind=ev.kind, errno=ev.code)


def _b(value: StrOrBytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _env_list(env: Mapping[str, str] | Sequence[StrOrBytes]) -> list[bytes]:
    if isinstance(env, Mapping):
        return [_b(f"{k}={v}") for k, v in env.items()]
    return [_b(e) for e in env]


@dataclass
class _Session:
    channel: int
    chunks: deque[tuple[Stream, bytes]] = field(default_factory=deque)
    pid: int | None = None
    exit: ExitStatus | None = None
    abandoned: bool = False  # CLOSE sent; output is dropped
    consumed: dict[Stream, int] = field(default_factory=dict)  # taken, not yet granted


class AgentClient:
    """Host end of one agent connection. Owns ``sock`` (closes it in close())."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        keepalive: float | None = 5.0,
        dead_after: float = 30.0,
    ) -> None:
        self._sock = sock
        sock.settimeout(_TICK)
        self._conn = p.Connection(os.urandom(p.NONCE_SIZE))
        self._cond = threading.Condition()  # RLock inside: helpers may nest
        self._out: deque[bytes] = deque()
        self._sessions: dict[int, _Session] = {}
        self._failure: AgentError | None = None
        self._closing = False
        self._keepalive = keepalive
        self._dead_after = dead_after
        self._last_rx = time.monotonic()
        self._ping_at: float | None = None
        self._ping_seq = 0
        self._pings: set[int] = set()  # nonces of ping() calls in flight
        self._pongs: set[int] = set()  # ... and those answered
        self._waiters = 0
        self._unsent_pongs = 0
        self._reader = threading.Thread(target=self._read_loop, name="sm-agent-reader", daemon=True)
        self._writer = threading.Thread(
            target=self._write_loop, name="sm-agent-writer", daemon=True
        )
        self._reader.start()
        self._writer.start()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop both threads and close the socket. Waiting calls raise AgentError."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join(timeout=1.0)  # flushes what was queued (SHUTDOWN, CLOSEs)
        self.fail("the agent connection was closed")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() not in (self._reader, self._writer):
            self._reader.join()
            self._writer.join()
        self._sock.close()

    def fail(self, reason: str) -> None:
        """Declare the connection dead (e.g. the VM exited); every waiter raises AgentError."""
        self._fail(AgentError(reason))

    def _fail(self, error: AgentError) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = error
            self._cond.notify_all()

    @property
    def failure(self) -> AgentError | None:
        return self._failure

    @property
    def ready(self) -> bool:
        return self._conn.ready

    # ------------------------------------------------------------------ control

    def hello(
        self,
        timeout: float,
        *,
        time_ns: int | None = None,
        entropy: bytes | None = None,
        hostname: StrOrBytes | None = None,
        machine_id: StrOrBytes | None = None,
        network: StrOrBytes | None = None,
    ) -> None:
        """Send HELLO and wait until the guest answers: it is then ready for work."""
        with self._cond:
            self._queue(
                self._conn.hello(
                    time_ns=time_ns,
                    entropy=entropy,
                    hostname=None if hostname is None else _b(hostname),
                    machine_id=None if machine_id is None else _b(machine_id),
                    network=None if network is None else _b(network),
                )
            )
        if not self._wait(lambda: self._conn.ready, time.monotonic() + timeout):
            raise AgentError(
                f"the guest agent did not answer within {timeout:g}s; "
                "check the VM's console output (--debug) or raise the boot timeout"
            )

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the guest agent, in seconds."""
        start = time.monotonic()
        with self._cond:
            self._ping_seq += 1
            nonce = self._ping_seq
            self._pings.add(nonce)
            self._queue(self._conn.ping(nonce))
        try:
            if not self._wait(lambda: nonce in self._pongs, start + timeout):
                raise AgentError(
                    f"the VM stopped responding: no answer to a ping within {timeout:g}s"
                )
        finally:
            with self._cond:
                self._pings.discard(nonce)
                self._pongs.discard(nonce)
        return time.monotonic() - start

    def shutdown(self) -> None:
        """Ask the guest to sync and power off (fire and forget; watch the VM process)."""
        with self._cond:
            self._queue(self._conn.shutdown())

    # ------------------------------------------------------------------ sessions

    def spawn(
        self,
        argv: Sequence[StrOrBytes],
        *,
        env: Mapping[str, str] | Sequence[StrOrBytes] = (),
        cwd: StrOrBytes | None = None,
        user: StrOrBytes | None = None,
        stdin: bool = False,
        tty: bool = False,
        winsize: tuple[int, int] | None = None,
        keep: bool = False,
        rlimits: Sequence[tuple[int, int, int]] = (),
    ) -> Process:
        """Start a process and return a streaming handle (see `Process`). ``rlimits``:
        ``(resource, soft, hard)`` set in it (see `protocol.encode_exec`)."""
        return Process(
            self,
            self._open(
                [_b(a) for a in argv],
                env=_env_list(env),
                cwd=None if cwd is None else _b(cwd),
                user=None if user is None else _b(user),
                stdin=stdin,
                tty=tty,
                winsize=winsize,
                keep=keep,
                rlimits=rlimits,
            ),
            label=_b(argv[0]).decode(errors="replace") if argv else "?",
        )

    def exec(
        self,
        argv: Sequence[StrOrBytes],
        *,
        env: Mapping[str, str] | Sequence[StrOrBytes] = (),
        cwd: StrOrBytes | None = None,
        user: StrOrBytes | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to completion and collect its output in memory.

        A program that cannot start is a result (exit_code 127/126, ``error`` set), not an
        exception. Past ``timeout`` the process is killed and ExecTimeout is raised, with
        the partial output in its ``stdout``/``stderr`` attributes. Use spawn() to stream
        output that should not be held in memory.
        """
        proc = self.spawn(argv, env=env, cwd=cwd, user=user, stdin=stdin is not None)
        deadline = None if timeout is None else time.monotonic() + timeout
        out = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        pending = memoryview(stdin or b"")
        with proc:
            try:
                while True:
                    if stdin is not None:
                        pending = proc._feed(pending, eof=True)
                    chunk = proc._next_chunk(deadline, wake_on_credit=bool(pending))
                    if chunk is None:
                        break
                    if chunk is not False:
                        out[chunk[0]] += chunk[1]
            except WaitTimeout:
                proc.close()
                err = ExecTimeout(
                    f"{proc.label} ran past its timeout of {timeout:g}s and was killed; "
                    "raise the timeout or make the command finish sooner"
                )
                err.stdout = bytes(out[Stream.STDOUT])  # type: ignore[attr-defined]
                err.stderr = bytes(out[Stream.STDERR])  # type: ignore[attr-defined]
                raise err from None
            status = proc.wait()
        return ExecResult(
            status.exit_code,
            bytes(out[Stream.STDOUT]),
            bytes(out[Stream.STDERR]),
            status.signal,
            status.error,
        )

    # ------------------------------------------------------------------ files

    def read_file(self, path: StrOrBytes, *, max_size: int = DEFAULT_MAX_FILE) -> bytes:
        """Whole content of a guest file; GuestFileError if it cannot be read or is too big."""
        buf = io.BytesIO()
        self.read_file_to(path, buf, max_size=max_size)
        return buf.getvalue()

    def read_file_to(
        self, path: StrOrBytes, fileobj: BinaryIO, *, max_size: int | None = None
    ) -> int:
        """Stream a guest file into ``fileobj``; returns its size."""
        proc = Process(self, self._open([_b(path)], op=Op.READ_FILE), label=str(path))
        total = 0
        with proc:
            for _, chunk in proc:
                total += len(chunk)
                if max_size is not None and total > max_size:
                    raise GuestFileError(
                        f"{path} is larger than {max_size} bytes; raise max_size or stream it"
                    )
                fileobj.write(chunk)
            _check_file_op(proc.wait(), "read", path)
        return total

    def write_file(
        self,
        path: StrOrBytes,
        data: bytes,
        *,
        mode: int = p.DEFAULT_MODE,
        user: StrOrBytes | None = None,
    ) -> None:
        """Create or truncate a guest file with ``data``, ``mode``, owned by ``user``."""
        self.write_file_from(path, io.BytesIO(data), mode=mode, user=user)

    def write_file_from(
        self,
        path: StrOrBytes,
        fileobj: BinaryIO,
        *,
        mode: int = p.DEFAULT_MODE,
        user: StrOrBytes | None = None,
    ) -> int:
        """Stream ``fileobj`` into a guest file; returns the bytes written."""
        channel = self._open(
            [_b(path)],
            user=None if user is None else _b(user),
            stdin=True,
            op=Op.WRITE_FILE,
            mode=mode,
        )
        total = 0
        with Process(self, channel, label=str(path)) as proc:
            try:
                while chunk := fileobj.read(p.MAX_PAYLOAD):
                    proc.write(chunk)
                    total += len(chunk)
                proc.close_stdin()
            except ProcessExited:
                pass  # the guest gave up early; its EXIT says why
            _check_file_op(proc.wait(), "write", path)
        return total

    def write_files(self, files: Sequence[tuple[str, bytes, int]]) -> None:
        """Create or truncate each ``(path, data, mode)``: all sessions opened at once, so
        the VM pays about one round trip rather than one per file."""
        procs = []
        try:
            for path, _, mode in files:
                procs.append(Process(self, self._open([_b(path)], stdin=True,
                                                      op=Op.WRITE_FILE, mode=mode),
                                     label=path))
            for proc, (_, data, _) in zip(procs, files, strict=True):
                try:
                    proc.write(data)
                    proc.close_stdin()
                except ProcessExited:
                    pass  # the guest gave up early; its EXIT says why
            for proc, (path, _, _) in zip(procs, files, strict=True):
                _check_file_op(proc.wait(), "write", path)
        finally:
            for proc in procs:
                proc.close()

    # ------------------------------------------------------------------ internals

    def mount(self, mounts: Sequence[tuple[str, str, str, str, int]]) -> None:
        """mount(2) in the guest for each ``(source, target, fstype, data, flags)`` (flags:
        `MountFlag`), in order; raises with the guest's first error.

        All requests are sent at once: the guest makes each mount before it reads the next
        request, so order holds, and the VM pays one round trip instead of one per mount."""
        procs = []
        try:
            for source, target, fstype, data, flags in mounts:
                argv = [_b(source), _b(target), _b(fstype), _b(data)]
                procs.append(Process(self, self._open(argv, op=Op.MOUNT, mode=int(flags)),
                                     label=target))
            for proc in procs:
                status = proc.wait()
                if status.kind != ExitKind.EXITED or status.exit_code != 0:
                    raise GuestFileError(status.error or f"mounting {proc.label} failed",
                                         status.errno)
        finally:
            for proc in procs:
                proc.close()

    def _open(
        self,
        argv: list[bytes],
        *,
        env: Sequence[bytes] = (),
        cwd: bytes | None = None,
        user: bytes | None = None,
        stdin: bool = False,
        tty: bool = False,
        winsize: tuple[int, int] | None = None,
        keep: bool = False,
        op: Op = Op.RUN,
        mode: int | None = None,
        rlimits: Sequence[tuple[int, int, int]] = (),
    ) -> _Session:
        with self._cond:
            self._raise_if_failed()
            try:
                channel, frame = self._conn.open(
                    argv, env=env, cwd=cwd, user=user, stdin=stdin, tty=tty,
                    keep=keep, winsize=winsize, op=op, mode=mode, rlimits=rlimits,
                )  # fmt: skip
            except ValueError as e:
                raise VMError(f"cannot run that command: {e}") from None
            session = _Session(channel)
            self._sessions[channel] = session
            self._queue(frame)
            return session

    def _queue(self, data: bytes) -> None:
        """Queue bytes for the writer (caller holds the lock)."""
        self._raise_if_failed()
        if data:
            self._out.append(data)
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            # A fresh exception per caller: the stored one may be raised in many threads.
            raise type(self._failure)(str(self._failure))

    def _wait(self, predicate: Callable[[], bool], deadline: float | None) -> bool:
        """Wait until ``predicate()`` (lock held) is true; False at the deadline."""
        with self._cond:
            self._waiters += 1
            try:
                while True:
                    self._raise_if_failed()
                    if predicate():
                        return True
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._waiters -= 1

    def _grant(self, session: _Session, stream: Stream, n: int, *, force: bool) -> None:
        """Credit consumed output back to the guest, in batches (caller holds the lock)."""
        session.consumed[stream] = session.consumed.get(stream, 0) + n
        amount = session.consumed[stream]
        if amount and (force or amount >= _GRANT_BATCH):
            session.consumed[stream] = 0
            if not session.abandoned and self._failure is None:
                self._queue(self._conn.grant(session.channel, stream, amount))

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except TimeoutError:
                if self._closing:
                    return
                self._tick()
                continue
            except OSError as e:
                self._fail(_channel_lost(e))
                return
            if not data:
                self._fail(_channel_lost(None))
                return
            with self._cond:
                self._last_rx = time.monotonic()
                try:
                    for ev in self._conn.receive(data):
                        self._dispatch(ev)
                except ProtocolError as e:
                    # Fatal for the connection (docs/protocol.md): drop it, the guest resets.
                    self._fail(ProtocolError(f"{e}; the VM's agent misbehaved, restart the VM"))
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                    return
                finally:
                    self._cond.notify_all()

    def _dispatch(self, ev: p.Event) -> None:
        if isinstance(ev, p.Ping):
            # A guest that pings without reading our answers would grow this queue forever.
            self._unsent_pongs += 1
            if self._unsent_pongs > _MAX_UNSENT_PONGS:
                raise ProtocolError("the guest sends PINGs without reading the answers")
            self._out.append(p.encode_pong(ev.nonce))
        elif isinstance(ev, p.Pong):
            if ev.nonce in self._pings:
                self._pongs.add(ev.nonce)
        elif isinstance(ev, p.GuestReset):
            self._fail(AgentError(f"the guest agent reset the connection: {ev.message}"))
        elif isinstance(ev, p.Hello | p.Credit):
            pass  # Connection tracked it; waiters re-check on notify
        else:
            session = self._sessions[ev.channel]
            if isinstance(ev, p.Started):
                session.pid = ev.pid
            elif isinstance(ev, p.Data):
                if not session.abandoned:
                    session.chunks.append((ev.stream, ev.data))
            elif isinstance(ev, p.Exit):
                session.exit = exit_status(ev)
                del self._sessions[ev.channel]

    def _tick(self) -> None:
        """Keep-alive: ping a silent guest while someone waits on it; fail it when dead."""
        if self._keepalive is None:
            return
        with self._cond:
            if self._failure is not None or not self._conn.ready:
                return
            if not (self._sessions or self._waiters):
                self._ping_at = None
                return
            now = time.monotonic()
            pinged = self._ping_at is not None and self._ping_at >= self._last_rx
            if not pinged and now - self._last_rx >= self._keepalive:
                self._ping_seq += 1
                self._out.append(self._conn.ping(self._ping_seq))
                self._ping_at = now
                self._cond.notify_all()
            elif pinged and now - self._ping_at >= self._dead_after:  # type: ignore[operator]
                self._fail(
                    AgentError(
                        f"the VM stopped responding (no answer to a keep-alive ping in "
                        f"{self._dead_after:g}s); it is hung or overloaded, restart it"
                    )
                )

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._out and not self._closing and self._failure is None:
                    self._cond.wait()
                if self._failure is not None or not self._out:
                    return
                data = b"".join(self._out)
                self._out.clear()
                self._unsent_pongs = 0
            if not self._send_all(data):
                return

    def _send_all(self, data: bytes) -> bool:
        view = memoryview(data)
        give_up = None
        while view:
            try:
                sent = self._sock.send(view)
            except TimeoutError:
                if self._failure is not None:
                    return False
                if self._closing:  # don't hang close() on a guest that stopped reading
                    give_up = give_up or time.monotonic() + 1.0
                    if time.monotonic() > give_up:
                        return False
                continue
            except OSError as e:
                self._fail(_channel_lost(e))
                return False
            view = view[sent:]
        return True


def _channel_lost(e: OSError | None) -> AgentError:
    # EOF, ECONNRESET and EPIPE all mean the same to the user: the other end went away.
    why = f" ({e.strerror or e})" if e is not None else ""
    return AgentError(
        f"the VM exited or closed its agent channel{why}; see its console output (--debug)"
    )


def _check_file_op(status: ExitStatus, verb: str, path: StrOrBytes) -> None:
    if status.kind == ExitKind.EXITED and status.exit_code == 0:
        return
    why = status.error or f"exit status {status.exit_code}"
    raise GuestFileError(f"cannot {verb} {path!s} in the VM: {why}", status.errno)


class Process:
    """A running guest process (or file transfer) on one channel.

    Output is a stream of ``(stream, bytes)`` chunks: iterate, or call recv(). The guest
    only sends what we have credited, and credit is returned only as chunks are taken, so
    at most INITIAL_WINDOW bytes per stream are ever buffered, however much it prints.
    wait() discards output not yet read. close() (or leaving ``with``) kills the process
    if it is still running.
    """

    def __init__(self, client: AgentClient, session: _Session, *, label: str = "?") -> None:
        self._client = client
        self._s = session
        self.label = label

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> int:
        return self._s.channel

    @property
    def pid(self) -> int | None:
        """Guest pid once STARTED has arrived, else None."""
        return self._s.pid

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._s.exit

    # -- input

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send stdin, blocking while the guest's window is full.

        Raises ProcessExited if the process ends first, WaitTimeout past ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = memoryview(data)
        c = self._client
        ch = self._s.channel
        with c._cond:
            st = c._conn.sessions.get(ch)
            if st is not None and (not st.stdin or st.stdin_eof):
                raise VMError(f"stdin of {self.label} is closed; spawn it with stdin=True")
        while pending:
            ok = c._wait(lambda: self._s.exit is not None or c._conn.send_window(ch) > 0, deadline)
            if not ok:
                raise WaitTimeout(f"{self.label} did not read its input in time")
            if self._s.exit is not None:
                raise ProcessExited(f"{self.label} exited before reading all of its input")
            pending = self._feed(pending, eof=False)

    def _feed(self, pending: memoryview, *, eof: bool) -> memoryview:
        """Send what the window allows of ``pending``; with ``eof``, EOF once all is sent."""
        c = self._client
        ch = self._s.channel
        with c._cond:
            if self._s.exit is not None:
                return memoryview(b"")
            n = min(len(pending), c._conn.send_window(ch))
            if n:
                c._queue(c._conn.send_data(ch, bytes(pending[:n])))
                pending = pending[n:]
            if eof and not pending:
                c._queue(c._conn.send_eof(ch))  # b"" when already sent
            return pending

    def close_stdin(self) -> None:
        c = self._client
        with c._cond:
            if self._s.exit is None:
                c._queue(c._conn.send_eof(self._s.channel))

    # -- control

    def signal(self, signo: int) -> None:
        c = self._client
        with c._cond:
            if self._s.exit is None:
                c._queue(c._conn.signal(self._s.channel, signo))

    def kill(self) -> None:
        self.signal(9)

    def resize(self, rows: int, cols: int) -> None:
        c = self._client
        with c._cond:
            if self._s.exit is None:
                c._queue(c._conn.resize(self._s.channel, rows, cols))

    # -- output

    def recv(self, timeout: float | None = None) -> tuple[Stream, bytes] | None:
        """Next output chunk, or None once the process has exited and all output was read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            chunk = self._next_chunk(deadline)
            if chunk is not False:
                return chunk

    def __iter__(self) -> Iterator[tuple[Stream, bytes]]:
        while (chunk := self.recv()) is not None:
            yield chunk

    def _next_chunk(
        self, deadline: float | None, *, wake_on_credit: bool = False
    ) -> tuple[Stream, bytes] | None | bool:
        """One chunk; None at the end; False when woken by stdin credit (wake_on_credit)."""
        c = self._client
        s = self._s

        def ready() -> bool:
            if s.chunks or s.exit is not None:
                return True
            return wake_on_credit and s.exit is None and c._conn.send_window(s.channel) > 0

        if not c._wait(ready, deadline):
            raise WaitTimeout(f"{self.label} produced no output and did not exit in time")
        with c._cond:
            if s.chunks:
                stream, data = s.chunks.popleft()
                if s.exit is None:
                    c._grant(s, stream, len(data), force=not s.chunks)
                return stream, data
            return None if s.exit is not None else False

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for exit, discarding unread output. WaitTimeout if it is still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._next_chunk(deadline) is not None:
            pass
        assert self._s.exit is not None
        return self._s.exit

    def close(self) -> None:
        """Abandon the session: the guest kills the process and frees the channel."""
        c = self._client
        s = self._s
        with c._cond:
            if s.exit is not None or s.abandoned or c._failure is not None:
                return
            s.abandoned = True
            s.chunks.clear()
            c._queue(c._conn.close(s.channel))
        # The channel stays allocated until the guest's EXIT; wait a little so ids and
        # session slots are not leaked, but never hang on a dead guest.
        with contextlib.suppress(AgentError):
            c._wait(lambda: s.exit is not None, time.monotonic() + _CLOSE_GRACE)
