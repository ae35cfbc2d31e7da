"""Host side of the host-guest agent protocol (docs/protocol.md), as pure code.

Bytes in, events out; bytes out from method calls. No sockets, threads, clocks or
randomness live here (the h11 style), which is what makes hostile-input tests cheap:
`client.py` is the thin I/O shell around it.

Three layers:

* encoders (``encode_*``) build single frames; the host->guest ones are what the host
  sends, the guest->host ones exist so tests can play a fake guest;
* `Decoder` turns the guest's byte stream into typed events, enforcing every framing limit
  and resynchronising on the guest's HELLO;
* `Connection` adds per-session state on top: channel allocation, credit windows in both
  directions and session life cycle, rejecting anything the guest may not send.

The guest is untrusted: every length it controls is checked before it sizes anything, and
any violation raises `ProtocolError`, after which the connection is dead.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import AgentError, ProtocolError

VERSION = 1
MAGIC = 0x4D53  # b"SM" little-endian
MAX_PAYLOAD = 65536
INITIAL_WINDOW = 262144
RESYNC_LIMIT = 1 << 20
MAX_SESSIONS = 1024
MAX_ARGS = 4096
MAX_MESSAGE = 1024
MAX_CHANNEL = (1 << 31) - 1
NONCE_SIZE = 16

_HEADER = struct.Struct("<HBBII")
HEADER_SIZE = _HEADER.size  # 12
_TLV = struct.Struct("<HI")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EXIT = struct.Struct("<B3xi")
_WINSIZE = struct.Struct("<HH")

DEFAULT_MODE = 0o644


class FrameType(enum.IntEnum):
    HELLO = 1
    EXEC = 2
    STARTED = 3
    DATA = 4
    EOF = 5
    CREDIT = 6
    SIGNAL = 7
    RESIZE = 8
    EXIT = 9
    CLOSE = 10
    PING = 11
    PONG = 12
    ERROR = 13
    SHUTDOWN = 14


class Stream(enum.IntEnum):
    STDIN = 0
    STDOUT = 1
    STDERR = 2


class ExitKind(enum.IntEnum):
    EXITED = 0
    SIGNALED = 1
    START_FAILED = 2
    FAILED = 3


class Op(enum.IntEnum):
    RUN = 0
    READ_FILE = 1
    WRITE_FILE = 2
    MOUNT = 3


class MountFlag(enum.IntFlag):
    """MODE bits of a MOUNT session."""

    RDONLY = 1
    MKDIR = 2  # create the target directory and its parents
    MKFILE = 4  # create the target as an empty file (single-file bind mounts)
    BIND = 8
    REMOUNT = 16
    NOSUID = 32  # nosuid and nodev
    COPYUP = 64  # first copy what the image has at the target into the new mount
    BLOCK = 128  # the source is a virtio-blk serial: re-probe that disk, mount its device
    PIVOT = 256  # the target (a mounted directory) becomes the root (OCI bundles); alone


class SetupTag(enum.IntEnum):
    TIME_NS = 1
    ENTROPY = 2
    HOSTNAME = 3
    MACHINE_ID = 4
    NETWORK = 5  # "ADDR/PREFIX,GW,MTU,MAC": eth0's new set-up (a NIC on a tap, engine/tap.py)


class ExecTag(enum.IntEnum):
    ARGV = 1
    ENV = 2
    CWD = 3
    USER = 4
    FLAGS = 5
    WINSIZE = 6
    OP = 7
    MODE = 8
    RLIMITS = 9  # u32 resource | u64 soft | u64 hard, repeated: setrlimit before exec


MAX_RLIMITS = 16
RLIMIT_RESOURCES = 16  # RLIMIT_CPU .. RLIMIT_RTTIME
_RLIMIT = struct.Struct("<IQQ")

FLAG_STDIN = 1
FLAG_TTY = 2
FLAG_KEEP = 4


# --------------------------------------------------------------------------- events
# What the guest can tell us. Frozen dataclasses so events are plain values.


@dataclass(frozen=True)
class Hello:
    version: int
    nonce: bytes


@dataclass(frozen=True)
class Started:
    channel: int
    pid: int


@dataclass(frozen=True)
class Data:
    channel: int
    stream: Stream
    data: bytes


@dataclass(frozen=True)
class Eof:
    channel: int
    stream: Stream


@dataclass(frozen=True)
class Credit:
    channel: int
    stream: Stream
    amount: int


@dataclass(frozen=True)
class Exit:
    channel: int
    kind: ExitKind
    code: int
    message: str


@dataclass(frozen=True)
class Ping:
    nonce: int


@dataclass(frozen=True)
class Pong:
    nonce: int


@dataclass(frozen=True)
class GuestReset:
    """The guest's ERROR frame: it reset its side and says why (channel 0 or a session)."""

    channel: int
    message: str


Event = Hello | Started | Data | Eof | Credit | Exit | Ping | Pong | GuestReset


# --------------------------------------------------------------------------- encoders


def encode_frame(ftype: int, channel: int = 0, payload: bytes = b"", stream: int = 0) -> bytes:
    """One raw frame. Checks only what keeps the framing itself valid."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= channel <= 0xFFFFFFFF:
        raise ValueError(f"channel {channel} out of range")
    return _HEADER.pack(MAGIC, ftype, stream, channel, len(payload)) + payload


def _tlv(tag: int, value: bytes) -> bytes:
    return _TLV.pack(tag, len(value)) + value


def _check_string(what: str, value: bytes, *, allow_empty: bool = False) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{what} must be bytes")
    if b"\0" in value:
        raise ValueError(f"{what} must not contain NUL bytes: {bytes(value)!r}")
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    return bytes(value)


def _check_channel(channel: int) -> None:
    if not 1 <= channel <= MAX_CHANNEL:
        raise ValueError(f"session channel {channel} out of range 1..{MAX_CHANNEL}")


def encode_hello(
    nonce: bytes,
    *,
    time_ns: int | None = None,
    entropy: bytes | None = None,
    hostname: bytes | None = None,
    machine_id: bytes | None = None,
    network: bytes | None = None,
) -> bytes:
    """The host's HELLO: version, nonce and optional setup fields."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    payload = _U32.pack(VERSION) + bytes(nonce)
    if time_ns is not None:
        if not 0 <= time_ns < 1 << 64:
            raise ValueError("time_ns out of range")
        payload += _tlv(SetupTag.TIME_NS, _U64.pack(time_ns))
    if entropy is not None:
        if not 16 <= len(entropy) <= 512:
            raise ValueError("entropy must be 16..512 bytes")
        payload += _tlv(SetupTag.ENTROPY, bytes(entropy))
    if hostname is not None:
        if not 1 <= len(hostname) <= 64:
            raise ValueError("hostname must be 1..64 bytes")
        payload += _tlv(SetupTag.HOSTNAME, _check_string("hostname", hostname))
    if machine_id is not None:
        if not is_machine_id(machine_id):
            raise ValueError("machine_id must be 32 lowercase hex digits")
        payload += _tlv(SetupTag.MACHINE_ID, bytes(machine_id))
    if network is not None:
        if not 1 <= len(network) <= 96:
            raise ValueError("network must be 1..96 bytes")
        payload += _tlv(SetupTag.NETWORK, _check_string("network", network))
    return encode_frame(FrameType.HELLO, 0, payload)


def is_machine_id(value: bytes) -> bool:
    """/etc/machine-id's format: 32 lowercase hex digits (systemd's machine-id(5))."""
    return len(value) == 32 and all(c in b"0123456789abcdef" for c in value)


def encode_exec(
    channel: int,
    argv: Sequence[bytes],
    *,
    env: Sequence[bytes] = (),
    cwd: bytes | None = None,
    user: bytes | None = None,
    flags: int = 0,
    winsize: tuple[int, int] | None = None,
    op: Op = Op.RUN,
    mode: int | None = None,
    rlimits: Sequence[tuple[int, int, int]] = (),
) -> bytes:
    """EXEC opening ``channel``. Raises ValueError when it would not fit or is malformed.
    ``rlimits``: ``(resource, soft, hard)`` (Linux RLIMIT_* numbers; RLIM_INFINITY as
    2**64-1), set in the process before its ids change."""
    _check_channel(channel)
    if not argv:
        raise ValueError("argv must have at least one entry")
    if len(argv) > MAX_ARGS or len(env) > MAX_ARGS:
        raise ValueError(f"at most {MAX_ARGS} argv and env entries are allowed")
    parts = [_tlv(ExecTag.ARGV, _check_string("argv entry", a, allow_empty=True)) for a in argv]
    for entry in env:
        entry = _check_string("env entry", entry)
        key, sep, _ = entry.partition(b"=")
        if not sep or not key:
            raise ValueError(f"env entry must be KEY=VALUE with a non-empty KEY: {entry!r}")
        parts.append(_tlv(ExecTag.ENV, entry))
    if cwd is not None:
        cwd = _check_string("cwd", cwd)
        if not cwd.startswith(b"/"):
            raise ValueError(f"cwd must be an absolute path: {cwd!r}")
        parts.append(_tlv(ExecTag.CWD, cwd))
    if user is not None:
        parts.append(_tlv(ExecTag.USER, _check_string("user", user)))
    if flags & ~(FLAG_STDIN | FLAG_TTY | FLAG_KEEP):
        raise ValueError(f"unknown exec flags {flags:#x}")
    if flags:
        parts.append(_tlv(ExecTag.FLAGS, _U32.pack(flags)))
    if winsize is not None:
        rows, cols = winsize
        parts.append(_tlv(ExecTag.WINSIZE, _WINSIZE.pack(rows, cols)))
    if op != Op.RUN:
        parts.append(_tlv(ExecTag.OP, _U32.pack(op)))
    if mode is not None:
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:#o} is not a permission mode")
        parts.append(_tlv(ExecTag.MODE, _U32.pack(mode)))
    if rlimits:
        if len(rlimits) > MAX_RLIMITS:
            raise ValueError(f"at most {MAX_RLIMITS} rlimits are allowed")
        entries = b""
        for resource, soft, hard in rlimits:
            if not 0 <= resource < RLIMIT_RESOURCES or not 0 <= soft <= hard < 1 << 64:
                raise ValueError(f"malformed rlimit {(resource, soft, hard)!r}")
            entries += _RLIMIT.pack(resource, soft, hard)
        parts.append(_tlv(ExecTag.RLIMITS, entries))
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"command line and environment take {len(payload)} bytes; the limit is {MAX_PAYLOAD}"
        )
    return encode_frame(FrameType.EXEC, channel, payload)


def encode_data(channel: int, stream: Stream, data: bytes) -> bytes:
    if not 1 <= len(data) <= MAX_PAYLOAD:
        raise ValueError("DATA carries 1..MAX_PAYLOAD bytes")
    return encode_frame(FrameType.DATA, channel, bytes(data), stream)


def encode_eof(channel: int, stream: Stream) -> bytes:
    return encode_frame(FrameType.EOF, channel, b"", stream)


def encode_credit(channel: int, stream: Stream, amount: int) -> bytes:
    if not 0 < amount <= 0xFFFFFFFF:
        raise ValueError("credit must be positive")
    return encode_frame(FrameType.CREDIT, channel, _U32.pack(amount), stream)


def encode_signal(channel: int, signo: int) -> bytes:
    if not 1 <= signo <= 64:
        raise ValueError(f"signal {signo} out of range 1..64")
    return encode_frame(FrameType.SIGNAL, channel, _U32.pack(signo))


def encode_resize(channel: int, rows: int, cols: int) -> bytes:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError("rows and cols must fit in 16 bits")
    return encode_frame(FrameType.RESIZE, channel, _WINSIZE.pack(rows, cols))


def encode_close(channel: int) -> bytes:
    return encode_frame(FrameType.CLOSE, channel)


def encode_ping(nonce: int) -> bytes:
    return encode_frame(FrameType.PING, 0, _U64.pack(nonce))


def encode_pong(nonce: int) -> bytes:
    return encode_frame(FrameType.PONG, 0, _U64.pack(nonce))


def encode_shutdown() -> bytes:
    return encode_frame(FrameType.SHUTDOWN)


# Guest->host encoders: used by tests that play the guest.


def encode_guest_hello(nonce: bytes, version: int = VERSION) -> bytes:
    return encode_frame(FrameType.HELLO, 0, _U32.pack(version) + bytes(nonce))


def encode_started(channel: int, pid: int) -> bytes:
    return encode_frame(FrameType.STARTED, channel, _U32.pack(pid))


def encode_exit(channel: int, kind: int, code: int, message: bytes = b"") -> bytes:
    return encode_frame(FrameType.EXIT, channel, _EXIT.pack(kind, code) + message)


def encode_error(channel: int, message: bytes) -> bytes:
    return encode_frame(FrameType.ERROR, channel, message)


# --------------------------------------------------------------------------- decoder

# Which stream each guest->host type may carry; types absent here may not come from the guest.
_GUEST_STREAMS: dict[int, frozenset[int]] = {
    FrameType.HELLO: frozenset({0}),
    FrameType.STARTED: frozenset({0}),
    FrameType.DATA: frozenset({Stream.STDOUT, Stream.STDERR}),
    FrameType.EOF: frozenset({Stream.STDOUT, Stream.STDERR}),
    FrameType.CREDIT: frozenset({Stream.STDIN}),
    FrameType.EXIT: frozenset({0}),
    FrameType.PING: frozenset({0}),
    FrameType.PONG: frozenset({0}),
    FrameType.ERROR: frozenset({0}),
}
_CONTROL_ONLY = frozenset({FrameType.HELLO, FrameType.PING, FrameType.PONG})
_SESSION_ONLY = frozenset(
    {FrameType.STARTED, FrameType.DATA, FrameType.EOF, FrameType.CREDIT, FrameType.EXIT}
)


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError(f"guest {what} message of {len(raw)} bytes exceeds {MAX_MESSAGE}")
    return raw.decode("utf-8", errors="replace")


def _parse(ftype: int, stream: int, channel: int, payload: bytes) -> Event:
    """Payload of one header-validated frame -> event; exact sizes are enforced here."""
    n = len(payload)

    def need(size: int) -> None:
        if n != size:
            raise ProtocolError(
                f"guest {FrameType(ftype).name} payload is {n} bytes, expected {size}"
            )

    if ftype == FrameType.HELLO:
        need(4 + NONCE_SIZE)
        (version,) = _U32.unpack_from(payload)
        return Hello(version, payload[4:])
    if ftype == FrameType.STARTED:
        need(4)
        return Started(channel, _U32.unpack(payload)[0])
    if ftype == FrameType.DATA:
        if n == 0:
            raise ProtocolError("guest sent an empty DATA frame")
        return Data(channel, Stream(stream), payload)
    if ftype == FrameType.EOF:
        need(0)
        return Eof(channel, Stream(stream))
    if ftype == FrameType.CREDIT:
        need(4)
        (amount,) = _U32.unpack(payload)
        if amount == 0:
            raise ProtocolError("guest sent a zero CREDIT")
        return Credit(channel, Stream(stream), amount)
    if ftype == FrameType.EXIT:
        if n < _EXIT.size:
            raise ProtocolError(f"guest EXIT payload is {n} bytes, expected at least {_EXIT.size}")
        kind, code = _EXIT.unpack_from(payload)
        if kind > max(ExitKind):
            raise ProtocolError(f"guest EXIT has unknown kind {kind}")
        if kind == ExitKind.EXITED and not 0 <= code <= 255:
            raise ProtocolError(f"guest EXIT status {code} out of range 0..255")
        if kind == ExitKind.SIGNALED and not 1 <= code <= 64:
            raise ProtocolError(f"guest EXIT signal {code} out of range 1..64")
        if kind >= ExitKind.START_FAILED and code < 0:
            raise ProtocolError(f"guest EXIT errno {code} is negative")
        return Exit(channel, ExitKind(kind), code, _text(payload[_EXIT.size :], "EXIT"))
    if ftype in (FrameType.PING, FrameType.PONG):
        need(8)
        (nonce,) = _U64.unpack(payload)
        return Ping(nonce) if ftype == FrameType.PING else Pong(nonce)
    assert ftype == FrameType.ERROR
    return GuestReset(channel, _text(payload, "ERROR"))


class Decoder:
    """Incremental decoder of the guest->host byte stream.

    ``feed(data)`` returns the events completed by ``data``. It never holds more than one
    partial frame (header + MAX_PAYLOAD bytes) plus, while resynchronising, less than one
    HELLO frame. Any violation raises ProtocolError and the decoder stays failed.

    Until the guest's HELLO carrying ``nonce`` has been seen, everything else is discarded
    (stale frames from an earlier connection), up to RESYNC_LIMIT bytes.
    """

    def __init__(self, nonce: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._nonce = bytes(nonce)
        # The HELLO we wait for is fully known except its version; search for its header.
        self._hello_header = _HEADER.pack(MAGIC, FrameType.HELLO, 0, 0, 4 + NONCE_SIZE)
        self._synced = False
        self._discarded = 0
        self._buf = bytearray()
        self._failed: ProtocolError | None = None

    @property
    def synced(self) -> bool:
        return self._synced

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._feed(data)
        except ProtocolError as e:
            self._failed = e
            self._buf.clear()
            raise

    def _feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        view = memoryview(data)
        if not self._synced:
            view = self._resync(view, events)
        while view:
            # Top the buffer up to one header, then to one frame, never beyond.
            if len(self._buf) < HEADER_SIZE:
                take = HEADER_SIZE - len(self._buf)
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < HEADER_SIZE:
                    break
                self._check_header()
            length = _HEADER.unpack_from(self._buf)[4]
            take = HEADER_SIZE + length - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == HEADER_SIZE + length:
                _, ftype, stream, channel, _ = _HEADER.unpack_from(self._buf)
                payload = bytes(self._buf[HEADER_SIZE:])
                self._buf.clear()
                events.append(_parse(ftype, stream, channel, payload))
        return events

    def _check_header(self) -> None:
        magic, ftype, stream, channel, length = _HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {magic:#06x} from the guest")
        allowed = _GUEST_STREAMS.get(ftype)
        if allowed is None:
            raise ProtocolError(f"guest sent frame type {ftype}, which it may not send")
        if stream not in allowed:
            raise ProtocolError(f"guest {FrameType(ftype).name} on stream {stream} not allowed")
        if ftype in _CONTROL_ONLY and channel != 0:
            raise ProtocolError(f"guest {FrameType(ftype).name} on channel {channel}, not 0")
        if ftype in _SESSION_ONLY and not 1 <= channel <= MAX_CHANNEL:
            raise ProtocolError(f"guest {FrameType(ftype).name} on invalid channel {channel}")
        if channel > MAX_CHANNEL:
            raise ProtocolError(f"guest frame on invalid channel {channel}")
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"guest frame of {length} bytes exceeds {MAX_PAYLOAD}")

    def _resync(self, view: memoryview, events: list[Event]) -> memoryview:
        """Discard input until the guest's HELLO with our nonce; return what follows it."""
        want = HEADER_SIZE + 4 + NONCE_SIZE
        self._buf += view
        buf = self._buf
        pos = 0
        try:
            while True:
                at = buf.find(self._hello_header, pos)
                if at < 0:
                    # Keep only a tail that could still begin the header.
                    pos = max(pos, len(buf) - (HEADER_SIZE - 1))
                    return memoryview(b"")
                pos = at
                if len(buf) - at < want:
                    return memoryview(b"")
                if buf[at + HEADER_SIZE + 4 : at + want] != self._nonce:
                    pos = at + 1  # a stale HELLO (another nonce): keep looking past it
                    continue
                (version,) = _U32.unpack_from(buf, at + HEADER_SIZE)
                if version != VERSION:
                    raise ProtocolError(
                        f"the guest speaks agent protocol version {version}, the host "
                        f"{VERSION}; rebuild the guest assets with this supermachine version"
                    )
                events.append(Hello(version, self._nonce))
                self._discard(at)
                pos = 0
                rest = bytes(buf[want:])
                buf.clear()
                self._synced = True
                return memoryview(rest)
        finally:
            self._discard(pos)

    def _discard(self, n: int) -> None:
        """Drop ``n`` leading bytes (one memmove per feed, never per candidate)."""
        if n <= 0:
            return
        del self._buf[:n]
        self._discarded += n
        if self._discarded > RESYNC_LIMIT:
            raise ProtocolError(
                f"no agent HELLO from the guest within {RESYNC_LIMIT} bytes of output; "
                "the guest init is not speaking the agent protocol"
            )


# --------------------------------------------------------------------------- connection


@dataclass
class SessionState:
    """What the host knows about one open channel."""

    channel: int
    op: Op
    stdin: bool
    tty: bool
    pid: int | None = None
    closed: bool = False  # host sent CLOSE
    stdin_eof: bool = False  # host sent EOF on stdin
    #: stdin bytes we may still send (guest's window for us)
    send_window: int = INITIAL_WINDOW
    #: stdin bytes sent and not yet credited back
    send_outstanding: int = 0
    #: output bytes the guest may still send, per stream (our window for it)
    recv_window: dict[Stream, int] = field(default_factory=dict)
    #: output bytes received and not yet credited back, per stream
    recv_uncredited: dict[Stream, int] = field(default_factory=dict)
    eof: set[Stream] = field(default_factory=set)

    def output_streams(self) -> tuple[Stream, ...]:
        if self.tty or self.op != Op.RUN:
            return (Stream.STDOUT,)
        return (Stream.STDOUT, Stream.STDERR)


class Connection:
    """Per-connection state machine on top of `Decoder` (still pure).

    Methods that send return the bytes to write, in order; ``receive`` returns events
    after checking them against session state. A session is forgotten when its EXIT
    arrives, which is the last event for its channel.
    """

    def __init__(self, nonce: bytes, *, max_sessions: int = MAX_SESSIONS) -> None:
        self._nonce = bytes(nonce)
        self._decoder = Decoder(nonce)
        self._sessions: dict[int, SessionState] = {}
        self._next_channel = 1
        self._max_sessions = max_sessions
        self._hello_sent = False
        self.ready = False  # guest's HELLO seen

    # -- host -> guest

    def hello(
        self,
        *,
        time_ns: int | None = None,
        entropy: bytes | None = None,
        hostname: bytes | None = None,
        machine_id: bytes | None = None,
        network: bytes | None = None,
    ) -> bytes:
        if self._hello_sent:
            raise AgentError("HELLO was already sent on this connection; open a new one")
        out = encode_hello(self._nonce, time_ns=time_ns, entropy=entropy, hostname=hostname,
                           machine_id=machine_id, network=network)
        self._hello_sent = True
        return out

    def open(
        self,
        argv: Sequence[bytes],
        *,
        env: Sequence[bytes] = (),
        cwd: bytes | None = None,
        user: bytes | None = None,
        stdin: bool = False,
        tty: bool = False,
        keep: bool = False,
        winsize: tuple[int, int] | None = None,
        op: Op = Op.RUN,
        mode: int | None = None,
        rlimits: Sequence[tuple[int, int, int]] = (),
    ) -> tuple[int, bytes]:
        """Open a session: returns its channel and the EXEC frame."""
        if not self.ready:
            raise AgentError("the guest agent is not ready; wait for hello() first")
        if len(self._sessions) >= self._max_sessions:
            raise AgentError(
                f"{self._max_sessions} sessions are already open in this VM; close some first"
            )
        channel = self._allocate()
        flags = (FLAG_STDIN if stdin else 0) | (FLAG_TTY if tty else 0) | (FLAG_KEEP if keep else 0)
        frame = encode_exec(
            channel, argv, env=env, cwd=cwd, user=user, flags=flags,
            winsize=winsize, op=op, mode=mode, rlimits=rlimits,
        )  # fmt: skip
        state = SessionState(channel, op, stdin, tty)
        state.send_window = INITIAL_WINDOW if stdin else 0
        for s in state.output_streams():
            state.recv_window[s] = INITIAL_WINDOW
            state.recv_uncredited[s] = 0
        self._sessions[channel] = state
        self._next_channel = channel + 1
        return channel, frame

    def _allocate(self) -> int:
        # Monotonic ids, so a late frame for a finished session is never mistaken for a
        # new one; wraps after 2^31 and then skips ids still open.
        channel = self._next_channel
        while True:
            if channel > MAX_CHANNEL:
                channel = 1
            if channel not in self._sessions:
                return channel
            channel += 1

    def session(self, channel: int) -> SessionState:
        try:
            return self._sessions[channel]
        except KeyError:
            raise AgentError(f"session {channel} is not open") from None

    @property
    def sessions(self) -> dict[int, SessionState]:
        return self._sessions

    def send_window(self, channel: int) -> int:
        """Stdin bytes that may be sent right now."""
        s = self.session(channel)
        return 0 if s.stdin_eof or s.closed else s.send_window

    def send_data(self, channel: int, data: bytes) -> bytes:
        """DATA frames for stdin; ``data`` must fit in the current window."""
        s = self.session(channel)
        if not s.stdin:
            raise AgentError("this session was opened without stdin")
        if s.stdin_eof or s.closed:
            raise AgentError("stdin of this session is already closed")
        if len(data) > s.send_window:
            raise AgentError(f"{len(data)} bytes exceed the stdin window of {s.send_window}")
        s.send_window -= len(data)
        s.send_outstanding += len(data)
        return b"".join(
            encode_data(channel, Stream.STDIN, data[i : i + MAX_PAYLOAD])
            for i in range(0, len(data), MAX_PAYLOAD)
        )

    def send_eof(self, channel: int) -> bytes:
        s = self.session(channel)
        if s.stdin_eof or s.closed or not s.stdin:
            return b""
        s.stdin_eof = True
        return encode_eof(channel, Stream.STDIN)

    def grant(self, channel: int, stream: Stream, amount: int) -> bytes:
        """CREDIT for ``amount`` output bytes the user consumed (b"" when nothing to send)."""
        s = self._sessions.get(channel)
        if s is None or amount <= 0 or s.closed or stream in s.eof:
            return b""  # nothing more will come on that stream: no point granting
        if amount > s.recv_uncredited.get(stream, 0):
            raise AgentError(f"cannot grant {amount} bytes: only consumed ones may be granted")
        s.recv_uncredited[stream] -= amount
        s.recv_window[stream] += amount
        return encode_credit(channel, stream, amount)

    def signal(self, channel: int, signo: int) -> bytes:
        self.session(channel)
        return encode_signal(channel, signo)

    def resize(self, channel: int, rows: int, cols: int) -> bytes:
        self.session(channel)
        return encode_resize(channel, rows, cols)

    def close(self, channel: int) -> bytes:
        """CLOSE: abandon the session; it stays allocated until the guest's EXIT."""
        s = self._sessions.get(channel)
        if s is None or s.closed:
            return b""
        s.closed = True
        return encode_close(channel)

    def ping(self, nonce: int) -> bytes:
        return encode_ping(nonce)

    def shutdown(self) -> bytes:
        return encode_shutdown()

    # -- guest -> host

    def receive(self, data: bytes) -> list[Event]:
        """Feed guest bytes; returns the validated events. Raises ProtocolError."""
        events = self._decoder.feed(data)
        for ev in events:
            self._check(ev)
        return events

    def _check(self, ev: Event) -> None:
        if isinstance(ev, Hello):
            if self.ready:
                raise ProtocolError("guest sent a second HELLO")
            if not self._hello_sent:
                raise ProtocolError("guest sent HELLO before the host did")
            self.ready = True
            return
        if isinstance(ev, Ping | Pong):
            return
        if isinstance(ev, GuestReset):
            if ev.channel and ev.channel not in self._sessions:
                raise ProtocolError(f"guest ERROR for unknown session {ev.channel}")
            return
        s = self._sessions.get(ev.channel)
        if s is None:
            raise ProtocolError(f"guest sent {type(ev).__name__} for unknown session {ev.channel}")
        if isinstance(ev, Started):
            if s.pid is not None:
                raise ProtocolError(f"guest sent STARTED twice for session {ev.channel}")
            s.pid = ev.pid
        elif isinstance(ev, Data | Eof):
            if s.pid is None:
                raise ProtocolError(f"guest sent output for session {ev.channel} before STARTED")
            if ev.stream not in s.recv_window:
                raise ProtocolError(f"session {ev.channel} has no {ev.stream.name} stream")
            if ev.stream in s.eof:
                raise ProtocolError(
                    f"guest sent {ev.stream.name} of session {ev.channel} after its EOF"
                )
            if isinstance(ev, Eof):
                s.eof.add(ev.stream)
                return
            if len(ev.data) > s.recv_window[ev.stream]:
                raise ProtocolError(
                    f"guest overran the {ev.stream.name} window of session {ev.channel}"
                )
            s.recv_window[ev.stream] -= len(ev.data)
            s.recv_uncredited[ev.stream] += len(ev.data)
        elif isinstance(ev, Credit):
            if not s.stdin:
                raise ProtocolError(f"guest credited stdin of session {ev.channel}, which has none")
            if ev.amount > s.send_outstanding:
                raise ProtocolError(
                    f"guest credited {ev.amount} stdin bytes of session {ev.channel}, "
                    f"but only {s.send_outstanding} are outstanding"
                )
            s.send_outstanding -= ev.amount
            s.send_window += ev.amount
        else:
            assert isinstance(ev, Exit)
            del self._sessions[ev.channel]


def encode_strings(values: Iterable[str | bytes]) -> list[bytes]:
    """argv/env items as bytes (str is UTF-8 encoded, as Docker does)."""
    return [v.encode() if isinstance(v, str) else bytes(v) for v in values]
