"""The registry client's HTTP/1.1 (http11.py, connection.py) against a real loopback TCP
server that sends scripted bytes: framing, keep-alive, bounds and hostile answers."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supermachine.images import http11
from supermachine.images.connection import Connection, ConnectionClosed
from supermachine.images.http11 import InvalidRequest, ProtocolError


class Scripted:
    """A TCP server on 127.0.0.1 that answers each connection with the next script: it
    reads the request head, sends the bytes, then closes (or keeps the connection open
    for ``requests`` heads when the script is a list)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.scripts: list[list[bytes]] = []
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                answers = self.scripts.pop(0) if self.scripts else []
                for answer in answers:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    self.requests.append(head)
                    conn.sendall(answer)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept(), which close() alone does not
        self.sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def server():
    s = Scripted()
    yield s
    s.close()


def fetch(server: Scripted, answer: bytes, method: str = "GET") -> tuple[http11.Head, bytes,
                                                                          bool]:
    server.scripts.append([answer])
    conn = Connection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, "/v2/", {})
        resp = conn.getresponse()
        body = b""
        while chunk := resp.read(7):  # small reads cross chunk and buffer edges
            body += chunk
        return resp._head, body, resp.will_close
    finally:
        conn.close()


def test_request_head_has_host_and_identity_encoding(server):
    fetch(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    head = server.requests[0].decode()
    assert head.startswith("GET /v2/ HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head
    assert "Accept-Encoding: identity\r\n" in head


@pytest.mark.parametrize(("answer", "body", "closes"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: y\r\n\r\n", b"hello", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 99\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", b"hello", False),  # chunked wins over a length
    (b"HTTP/1.1 200 OK\r\n\r\nhello", b"hello", True),  # no length: until the close
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello", b"hello",
     False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", b"", False),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b"", False),
])
def test_bodies_end_where_their_framing_says(server, answer, body, closes):
    _, got, will_close = fetch(server, answer)
    assert (got, will_close) == (body, closes)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 200_000,  # until the close, read whole
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n30d40\r\n" + b"z" * 200_000
    + b"\r\n0\r\n\r\n",
])
def test_read_without_a_size_reads_the_rest(server, answer):
    server.scripts.append([answer])
    conn = Connection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/", {})
        resp = conn.getresponse()
        assert resp.read(3) == b"zzz" and resp.read() == b"z" * 199_997 and resp.isclosed()
    finally:
        conn.close()


def test_head_answers_have_no_body(server):
    head, body, _ = fetch(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", "HEAD")
    assert (head.status, head.get("content-length"), body) == (200, "1234", b"")


def test_a_kept_alive_connection_carries_the_next_request(server):
    server.scripts.append([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
                           b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\nDocker-X: 1\r\n"
                           b"docker-x: 2\r\n\r\nb"])
    conn = Connection("127.0.0.1", server.port, timeout=5)
    try:
        for want_status, want_body in ((200, b"a"), (404, b"b")):
            conn.request("GET", "/x", {"Authorization": "Bearer t"})
            resp = conn.getresponse()
            assert (resp.status, resp.read(), resp.isclosed()) == (want_status, want_body, True)
        assert resp.getheader("DOCKER-X") == "1, 2"  # case-insensitive, repeated: joined
    finally:
        conn.close()
    assert len(server.requests) == 2 and b"Authorization: Bearer t" in server.requests[1]


def test_a_closed_kept_alive_connection_says_so(server):
    server.scripts.append([b""])  # reads the request, answers nothing, closes
    conn = Connection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/", {})
        with pytest.raises(ConnectionClosed):
            conn.getresponse()
    finally:
        conn.close()


@pytest.mark.parametrize(("answer", "message"), [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status code"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n", "longer than"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 header fields"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello", "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", "ended 5 bytes early"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", "does not end"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "inside a chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: x\r\n" * 102,
     "more than 100 trailer fields"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "inside the response head"),
])
def test_hostile_answers_are_one_clear_error(server, answer, message):
    with pytest.raises(ProtocolError, match=message):
        fetch(server, answer)


@pytest.mark.parametrize(("method", "target", "headers"), [
    ("GET", "/a b", {}), ("GET", "/a\r\nX: y", {}), ("G ET", "/", {}), ("GET", "", {}),
    ("GET", "/", {"X": "a\r\nInjected: 1"}), ("GET", "/", {"Bad Name": "v"}),
])
def test_requests_that_would_break_framing_are_refused(method, target, headers):
    with pytest.raises(InvalidRequest):
        http11.encode_request(method, target, headers)


_field_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_field_value = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
       fields=st.lists(st.tuples(_field_name, _field_value), max_size=8),
       body=st.binary(max_size=3000), chunked=st.booleans(),
       cuts=st.lists(st.integers(1, 500), max_size=10))
def test_well_formed_answers_round_trip(server, status, fields, body, chunked, cuts):
    fields = [(k, v) for k, v in fields if k not in ("content-length", "transfer-encoding",
                                                     "connection")]
    head = b"".join(f"{k}: {v}\r\n".encode() for k, v in fields)
    if chunked:
        pieces, rest = [], body
        for n in cuts:
            if rest:
                pieces.append(rest[:n])
                rest = rest[n:]
        pieces.append(rest)
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
        head += b"Transfer-Encoding: chunked\r\n"
    else:
        payload = body
        head += b"Content-Length: %d\r\n" % len(body)
    got_head, got_body, closes = fetch(server, b"HTTP/1.1 %d X\r\n%s\r\n%s" % (status, head,
                                                                             payload))
    assert (got_head.status, got_body, closes) == (status, body, False)
    for k, v in fields:
        assert v in (got_head.get(k) or "")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=st.one_of(
    st.binary(max_size=400),
    st.builds(lambda head, rest: b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + rest,
              st.binary(max_size=200), st.binary(max_size=200))))
def test_any_bytes_end_in_a_body_or_a_clear_error(server, answer):
    """Whatever a server sends, the client returns a body no longer than what was sent or
    raises one of its own errors: nothing else escapes, nothing reads without end."""
    try:
        _, body, _ = fetch(server, answer)
    except (ProtocolError, ConnectionClosed):
        return
    assert len(body) <= len(answer)
