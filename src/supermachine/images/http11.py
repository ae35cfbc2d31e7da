"""HTTP/1.1 for the registry client, as pure protocol code: bytes in, values out, no I/O.

Requests are formatted, response heads parsed and bodies framed (RFC 9112) here;
connection.py does the socket work. Ours rather than http.client because http.client
imports the email package to parse headers (~20 ms, a fifth of a small `pull`), and a
registry client needs little of HTTP: GET and HEAD, no request bodies, responses framed
by Content-Length, chunked encoding or the connection's end.

Everything a server sends is bounded: a head line, the number of header fields, a chunk
size line, the trailer. What breaks a rule raises ProtocolError with a one-line reason.
"""

from __future__ import annotations

MAX_LINE = 64 << 10  # a head line (a signed redirect URL is a few KiB)
MAX_FIELDS = 100
MAX_CHUNK_LINE = 1 << 10  # "1a2b;ext=..." chunk size line

# How a response's body ends (`framing`): after LENGTH bytes, after the chunk of size zero,
# when the server closes the connection, or at once (NONE: HEAD, 1xx, 204, 304).
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = "none", "length", "chunked", "until-close"

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class ProtocolError(Exception):
    """The server's bytes are not HTTP/1.1 we accept; the connection must not be reused."""


class InvalidRequest(ValueError):
    """A request we refuse to send (a method, target or header that would break framing)."""


class Head:
    """A response's status line and header fields (names lower-cased, in order)."""

    __slots__ = ("version", "status", "reason", "fields")

    def __init__(self, version: str, status: int, reason: str,
                 fields: list[tuple[str, str]]) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.fields = fields

    def get(self, name: str) -> str | None:
        """The field's value (several fields of the name: joined with ", ", as RFC 9110
        allows for list-valued fields), or None."""
        name = name.lower()
        values = [v for k, v in self.fields if k == name]
        return ", ".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        """Whether the server lets the connection carry another request."""
        tokens = {t.strip().lower() for t in (self.get("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def encode_request(method: str, target: str, headers: dict[str, str]) -> bytes:
    """The request head for ``method target`` with ``headers`` (no body)."""
    if not method or not all(c in _TOKEN for c in method.encode()):
        raise InvalidRequest(f"invalid HTTP method {method[:20]!r}")
    if not target or not target.isascii() or not target.isprintable() or " " in target:
        raise InvalidRequest(f"invalid request target {target[:100]!r}")
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers.items():
        if not name or not all(c in _TOKEN for c in name.encode()):
            raise InvalidRequest(f"invalid header name {name[:40]!r}")
        if any(c in value for c in "\r\n\0"):
            raise InvalidRequest(f"header {name} has a line break in its value")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_status_line(line: bytes) -> tuple[str, int, str]:
    """``HTTP/1.1 200 OK\\r\\n`` -> ("HTTP/1.1", 200, "OK")."""
    text = line.rstrip(b"\r\n").decode("latin-1")
    version, _, rest = text.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(f"not an HTTP/1.x status line: {text[:60]!r}")
    if len(code) != 3 or not code.isdigit() or code[0] == "0":
        raise ProtocolError(f"bad status code in {text[:60]!r}")
    return version, int(code), reason.strip()


def parse_field(line: bytes) -> tuple[str, str]:
    """``Name: value\\r\\n`` -> ("name", "value")."""
    text = line.rstrip(b"\r\n").decode("latin-1")
    name, colon, value = text.partition(":")
    if not colon or not name or not all(c in _TOKEN for c in name.encode("latin-1")):
        # A line starting with whitespace (obsolete folding) lands here too: refused.
        raise ProtocolError(f"bad header line {text[:60]!r}")
    return name.lower(), value.strip(" \t")


def framing(method: str, head: Head) -> tuple[str, int]:
    """How the body of ``head`` (the answer to ``method``) ends: (kind, length)."""
    if method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return NONE, 0
    codings = head.get("transfer-encoding")
    if codings is not None:
        # Transfer-Encoding wins over Content-Length (RFC 9112 6.3); chunked must be last.
        last = codings.split(",")[-1].strip().lower()
        return (CHUNKED, 0) if last == "chunked" else (UNTIL_CLOSE, 0)
    length = head.get("content-length")
    if length is None:
        return UNTIL_CLOSE, 0
    values = {v.strip() for v in length.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length {length[:60]!r}")
    value = values.pop()
    if not value.isdigit() or not value.isascii() or len(value) > 19:
        raise ProtocolError(f"bad Content-Length {value[:60]!r}")
    return LENGTH, int(value)


def parse_chunk_size(line: bytes) -> int:
    """``1a2b;name=value\\r\\n`` -> 0x1a2b (extensions are ignored)."""
    size = line.rstrip(b"\r\n").partition(b";")[0].strip(b" \t")
    if not size or len(size) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size):
        raise ProtocolError(f"bad chunk size line {line[:40]!r}")
    return int(size, 16)
