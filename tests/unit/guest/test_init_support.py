"""Test harness for sm-init's host mode: builds the binary, runs ``sm-init --agent-fd`` on a
socketpair and speaks raw protocol frames (docs/protocol.md) to it.

Deliberately independent of supermachine.agent (written concurrently): the frames are packed
here by hand so the C side is checked against the document, not against another
implementation.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

INIT_DIR = Path(__file__).resolve().parents[3] / "src" / "supermachine" / "guest" / "init"

MAGIC = 0x4D53
HDR = struct.Struct("<HBBII")
HELLO, EXEC, STARTED, DATA, EOF, CREDIT, SIGNAL, RESIZE, EXIT, CLOSE = range(1, 11)
PING, PONG, ERROR, SHUTDOWN = range(11, 15)
ARGV, ENV, CWD, USER, FLAGS, WINSIZE, OP, MODE = range(1, 9)
F_STDIN, F_TTY, F_KEEP = 1, 2, 4
INITIAL_WINDOW = 262144
NONCE = bytes(range(16))


@functools.cache
def build() -> Path:
    """Builds sm-init once per test run (make is a no-op when it is up to date)."""
    subprocess.run(["make", "-s", "-C", str(INIT_DIR)], check=True, timeout=120)
    return INIT_DIR / "sm-init"


def frame(type_: int, channel: int = 0, payload: bytes = b"", stream: int = 0) -> bytes:
    return HDR.pack(MAGIC, type_, stream, channel, len(payload)) + payload


def tlv(tag: int, value: bytes) -> bytes:
    return struct.pack("<HI", tag, len(value)) + value


def exec_payload(
    argv: list[str],
    env: list[str] | None = None,
    *,
    cwd: str | None = None,
    user: str | None = None,
    flags: int = 0,
    op: int | None = None,
    mode: int | None = None,
    winsize: tuple[int, int] | None = None,
) -> bytes:
    out = b"".join(tlv(ARGV, a.encode()) for a in argv)
    out += b"".join(tlv(ENV, e.encode()) for e in (env or ["PATH=/usr/bin:/bin"]))
    if cwd is not None:
        out += tlv(CWD, cwd.encode())
    if user is not None:
        out += tlv(USER, user.encode())
    if flags:
        out += tlv(FLAGS, struct.pack("<I", flags))
    if op is not None:
        out += tlv(OP, struct.pack("<I", op))
    if mode is not None:
        out += tlv(MODE, struct.pack("<I", mode))
    if winsize is not None:
        out += tlv(WINSIZE, struct.pack("<HH", *winsize))
    return out


@dataclass
class Frame:
    type: int
    stream: int
    channel: int
    payload: bytes


@dataclass
class Result:
    """Everything one session sent, up to and including EXIT."""

    started: int | None = None
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    eofs: list[int] = field(default_factory=list)
    kind: int | None = None
    code: int | None = None
    message: str = ""

    @property
    def stdout(self) -> bytes:
        return bytes(self.out)

    @property
    def stderr(self) -> bytes:
        return bytes(self.err)


class Agent:
    """One sm-init process in host mode and the host end of its socketpair."""

    def __init__(self, binary: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [str(binary or build()), "--agent-fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        self.buf = b""
        self.pending: list[Frame] = []
        self.results: dict[int, Result] = {}
        self.stderr = ""

    # -- raw I/O -------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> Frame:
        """Next frame; asserts it is well-formed (the guest must be as strict as we are)."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= HDR.size:
                magic, t, s, ch, n = HDR.unpack_from(self.buf)
                assert magic == MAGIC, self.buf[:32]
                assert n <= 65536
                if len(self.buf) >= HDR.size + n:
                    payload = self.buf[HDR.size : HDR.size + n]
                    self.buf = self.buf[HDR.size + n :]
                    return Frame(t, s, ch, payload)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from sm-init")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("sm-init closed the socket")
            self.buf += chunk

    def expect(self, type_: int, timeout: float = 5.0) -> Frame:
        """Next control frame of a type, keeping session frames for later."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv(max(deadline - time.monotonic(), 0.01))
            if f.type == type_:
                return f
            self._absorb(f)

    def quiet(self, seconds: float) -> list[Frame]:
        """Frames that arrive within seconds (expects none to be missing)."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.recv(left))
            except TimeoutError:
                break
        return got

    # -- protocol helpers ----------------------------------------------------------------
    def hello(self, nonce: bytes = NONCE, setup: bytes = b"") -> None:
        self.send(frame(HELLO, 0, struct.pack("<I", 1) + nonce + setup))
        f = self.expect(HELLO)
        assert f.payload == struct.pack("<I", 1) + nonce
        self.results.clear()

    def exec(self, ch: int, argv: list[str], **kw) -> None:
        self.results[ch] = Result()
        self.send(frame(EXEC, ch, exec_payload(argv, **kw)))

    def stdin(self, ch: int, data: bytes, eof: bool = True) -> None:
        if data:
            self.send(frame(DATA, ch, data, stream=0))
        if eof:
            self.send(frame(EOF, ch, stream=0))

    def _absorb(self, f: Frame) -> None:
        r = self.results.setdefault(f.channel, Result())
        if f.type == STARTED:
            assert r.started is None and r.kind is None
            (r.started,) = struct.unpack("<I", f.payload)
        elif f.type == DATA:
            assert f.stream in (1, 2) and r.kind is None
            (r.out if f.stream == 1 else r.err).extend(f.payload)
        elif f.type == EOF:
            assert f.stream not in r.eofs
            r.eofs.append(f.stream)
        elif f.type == EXIT:
            assert r.kind is None
            r.kind, r.code = struct.unpack_from("<B3xi", f.payload)
            r.message = f.payload[8:].decode()
        elif f.type == CREDIT:
            assert f.stream == 0
        else:
            self.pending.append(f)

    def wait(self, ch: int, timeout: float = 10.0, credit: bool = True) -> Result:
        """Collects frames until the session's EXIT, granting output credit as we read."""
        deadline = time.monotonic() + timeout
        r = self.results.setdefault(ch, Result())
        while r.kind is None:
            f = self.recv(max(deadline - time.monotonic(), 0.01))
            if f.type == ERROR:
                raise AssertionError(f"guest ERROR: {f.payload!r}")
            self._absorb(f)
            if credit and f.type == DATA:
                self.send(frame(CREDIT, f.channel, struct.pack("<I", len(f.payload)), f.stream))
        return r

    def run(self, ch: int, argv: list[str], stdin: bytes | None = None, **kw) -> Result:
        flags = kw.pop("flags", 0) | (F_STDIN if stdin is not None else 0)
        self.exec(ch, argv, flags=flags, **kw)
        if stdin is not None:
            self.stdin(ch, stdin)
        return self.wait(ch)

    def close(self) -> int:
        """Ends the connection; returns sm-init's exit status."""
        self.sock.close()
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.stderr = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it vanished mid-read
        return False


def children(pid: int) -> list[int]:
    """Direct children of pid (zombies included)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out
