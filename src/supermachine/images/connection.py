"""One HTTP/1.1 connection to a registry (or where it redirects): the socket side of
http11.py. A connection carries one request at a time; its response's body is read through
the Response, and the connection may carry the next request once that body is read to its
end and the server keeps it open.

TLS: pass an ``ssl.SSLContext``; the socket is wrapped with the host as SNI name (the
context decides whether the certificate and name are checked). ssl is imported by whoever
builds the context, never here.

Plain connections use ``_socket``, the C module under ``socket``: importing socket (its
enums, selectors) is ~4.5 ms of a small pull, and a plain connection needs none of it. ssl
wraps only ``socket.socket`` objects, so a TLS connection makes one of the same descriptor.
"""

from __future__ import annotations

import _socket
import io

from .http11 import (
    CHUNKED,
    LENGTH,
    MAX_CHUNK_LINE,
    MAX_FIELDS,
    MAX_LINE,
    NONE,
    Head,
    ProtocolError,
    encode_request,
    framing,
    parse_chunk_size,
    parse_field,
    parse_status_line,
)

READ_BUFFER = 64 << 10


class ConnectionClosed(ConnectionResetError):
    """The server closed the connection before it answered (a stale kept-alive one)."""


class _SocketReader(io.RawIOBase):
    """A ``_socket.socket`` as a raw stream, for the buffered reader over it (what
    ``socket.makefile("rb")`` gives, without importing socket). Timeouts raise
    TimeoutError, as from the socket itself."""

    def __init__(self, sock) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        return self._sock.recv_into(buf)


def _connect(host: bytes | str, port: int, timeout: float):
    """A ``_socket.socket`` connected to the first address of ``host`` that answers (as
    socket.create_connection does): each address is tried within ``timeout``."""
    last: OSError | None = None
    for family, kind, proto, _name, address in _socket.getaddrinfo(
            host, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last or OSError(f"no address for {host!r}")


class Connection:
    """A lazily opened connection to ``host:port``."""

    def __init__(self, host: str, port: int, *, timeout: float, ssl_context=None) -> None:
        self.host = host
        self.port = port
        self._timeout = timeout
        self._ssl = ssl_context
        self._sock = None  # a _socket.socket, or an ssl.SSLSocket
        self._file: io.BufferedReader | None = None
        self._method = ""

    def _open(self) -> None:
        # An ASCII name goes to getaddrinfo and to ssl as bytes: as str it is IDNA-encoded
        # first, and that codec's import (unicodedata, stringprep) is 2 ms of a small pull.
        host = self.host.encode() if self.host.isascii() else self.host
        sock = _connect(host, self.port, self._timeout)
        if self._ssl is not None:
            import socket  # ssl's import has already paid for it

            plain = socket.socket(fileno=sock.detach())
            try:
                sock = self._ssl.wrap_socket(plain, server_hostname=host)
            except BaseException:
                plain.close()  # its descriptor, unless ssl took it (and closed it) already
                raise
        self._sock = sock
        self._file = io.BufferedReader(_SocketReader(sock), READ_BUFFER)

    def request(self, method: str, target: str, headers: dict[str, str]) -> None:
        """Send a request head (no body); the answer comes from `getresponse`."""
        default_port = 443 if self._ssl is not None else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        head = {"Host": host if self.port == default_port else f"{host}:{self.port}",
                "Accept-Encoding": "identity"}
        head.update(headers)
        data = encode_request(method, target, head)
        if self._sock is None:
            self._open()
        assert self._sock is not None
        self._sock.sendall(data)
        self._method = method

    def getresponse(self) -> Response:
        """Read the answer's head (informational 1xx answers skipped)."""
        while True:
            head = self._read_head()
            if head.status >= 200:
                return Response(self, head, *framing(self._method, head))

    def _readline(self, limit: int, what: str) -> bytes:
        assert self._file is not None
        line = self._file.readline(limit + 1)
        if len(line) > limit:
            raise ProtocolError(f"{what} longer than {limit} bytes")
        return line

    def _read_head(self) -> Head:
        line = self._readline(MAX_LINE, "status line")
        if not line:
            raise ConnectionClosed(f"{self.host} closed the connection without an answer")
        version, status, reason = parse_status_line(line)
        fields = []
        while True:
            line = self._readline(MAX_LINE, "header line")
            if line in (b"\r\n", b"\n"):
                return Head(version, status, reason, fields)
            if not line.endswith(b"\n"):
                raise ProtocolError("the connection ended inside the response head")
            if len(fields) == MAX_FIELDS:
                raise ProtocolError(f"more than {MAX_FIELDS} header fields")
            fields.append(parse_field(line))

    def close(self) -> None:
        sock, file, self._sock, self._file = self._sock, self._file, None, None
        if file is not None:
            file.close()
        if sock is not None:
            sock.close()


class Response:
    """A response whose body is still on the wire. ``read`` returns b"" at its end;
    ``isclosed()`` says the body was read to its end; ``will_close`` that the connection
    cannot carry another request."""

    def __init__(self, conn: Connection, head: Head, kind: str, length: int) -> None:
        self._conn = conn
        self._head = head
        self.status = head.status
        self._kind = kind
        self._left = length  # LENGTH: bytes still to come; CHUNKED: of the current chunk
        self._done = kind == NONE or (kind == LENGTH and length == 0)
        self.will_close = not head.keep_alive or kind not in (NONE, LENGTH, CHUNKED)

    def getheader(self, name: str) -> str | None:
        return self._head.get(name)

    def isclosed(self) -> bool:
        return self._done

    def read(self, amt: int | None = None) -> bytes:
        """Up to ``amt`` bytes of the body (fewer only at its end), or all of the rest;
        b"" once it is read."""
        if amt is None:
            return b"".join(iter(lambda: self.read(READ_BUFFER), b""))
        if self._done or amt <= 0:
            return b""
        file = self._conn._file
        assert file is not None
        if self._kind == LENGTH:
            data = file.read(min(amt, self._left))
            if not data:
                raise ProtocolError(f"the body ended {self._left} bytes early")
            self._left -= len(data)
            self._done = self._left == 0
            return data
        if self._kind == CHUNKED:
            return self._read_chunked(amt)
        data = file.read(amt)  # until the connection closes
        self._done = not data
        return data

    def _read_chunked(self, amt: int) -> bytes:
        out = []
        while amt > 0:
            if self._left == 0:
                self._left = parse_chunk_size(self._conn._readline(MAX_CHUNK_LINE,
                                                                    "chunk size line"))
                if self._left == 0:
                    self._read_trailer()
                    self._done = True
                    break
            data = self._conn._file.read(min(amt, self._left))
            if not data:
                raise ProtocolError("the body ended inside a chunk")
            out.append(data)
            amt -= len(data)
            self._left -= len(data)
            if self._left == 0 and self._conn._readline(2, "chunk end") not in (b"\r\n", b"\n"):
                raise ProtocolError("a chunk does not end with a line break")
        return b"".join(out)

    def _read_trailer(self) -> None:
        for _ in range(MAX_FIELDS + 1):
            line = self._conn._readline(MAX_LINE, "trailer line")
            if line in (b"\r\n", b"\n"):
                return
            if not line:
                raise ProtocolError("the connection ended inside the trailer")
        raise ProtocolError(f"more than {MAX_FIELDS} trailer fields")

    def close(self) -> None:
        """Done with the body: an unread rest makes the connection unusable."""
        if not self._done:
            self.will_close = True
