"""The control protocol's framing (protocol.py): ``u8 kind | u32 length (LE) | payload``.

Apart from protocol.py so that the CLI's way into the service (service/runclient.py) can
speak it without protocol.py's imports (enum, dataclasses: tens of milliseconds of every
`run`'s start-up): kinds are plain numbers here, protocol.Kind names them.
"""

from __future__ import annotations

import struct
import threading

from ..errors import VMError

MAX_PAYLOAD = 1 << 16
HEADER = struct.Struct("<BI")
# the kinds (protocol.Kind): client -> host, then host -> client
REQUEST, STDIN, EOF, RESIZE, SIGNAL, STDOUT, STDERR, EXIT, STARTED = range(1, 10)
KINDS = range(REQUEST, STARTED + 1)


class ControlError(VMError):
    """A malformed or oversized message on a control socket."""


class Frame:
    __slots__ = ("kind", "payload")

    def __init__(self, kind: int, payload: bytes) -> None:
        self.kind = kind
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.kind, self.payload) == \
            (other.kind, other.payload)

    def __repr__(self) -> str:
        return f"Frame({self.kind!r}, {self.payload[:64]!r})"


def encode(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


class Decoder:
    """Incremental frame parser; holds at most one partial frame (<= MAX_PAYLOAD + 5 bytes).
    ``kind_of`` turns a kind number into what frames carry (protocol.Kind, or int)."""

    def __init__(self, kind_of=int) -> None:
        self._buf = bytearray()
        self._kind_of = kind_of

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            if kind not in KINDS:
                raise ControlError(f"unknown control frame type {kind}")
            if length > MAX_PAYLOAD:
                raise ControlError(f"control frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(self._kind_of(kind), bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (non-zero at EOF means the peer was cut off)."""
        return len(self._buf)


class FrameSocket:
    """Frames over one connected unix socket (a `socket.socket`, or the C module's
    `_socket.socket` on the quickest path); send() is safe from several threads."""

    RECV = 1 << 16

    def __init__(self, sock, decoder: Decoder | None = None) -> None:
        self.sock = sock
        self._decoder = decoder or Decoder()
        self._frames: list[Frame] = []
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self) -> Frame | None:
        """Next frame, or None when the peer closed the connection between frames."""
        while not self._frames:
            data = self.sock.recv(self.RECV)
            if not data:
                if self._decoder.pending:
                    raise ControlError("the connection was cut off in the middle of a frame")
                return None
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)

    def shutdown(self) -> bool:
        """Cut the connection both ways (safe in a signal handler); False if it was not
        connected any more."""
        try:
            self.sock.shutdown(2)  # SHUT_RDWR
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.shutdown()
        self.sock.close()

    def release(self) -> None:
        """Close this process's descriptor only: a forked child that shares the connection
        keeps it working (close() would shut it down for both)."""
        self.sock.close()
