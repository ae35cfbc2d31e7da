"""Unit tests of the pure protocol module: encoders, Decoder limits, Connection state."""

from __future__ import annotations

import struct

import pytest

from supermachine.agent import protocol as p
from supermachine.agent.protocol import Stream
from supermachine.errors import AgentError, ProtocolError

NONCE = bytes(range(16))
HDR = struct.Struct("<HBBII")


def header(ftype: int, channel: int = 0, length: int = 0, stream: int = 0) -> bytes:
    return HDR.pack(p.MAGIC, ftype, stream, channel, length)


def synced() -> p.Decoder:
    d = p.Decoder(NONCE)
    assert d.feed(p.encode_guest_hello(NONCE)) == [p.Hello(1, NONCE)]
    return d


def parse_tlvs(payload: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(payload):
        tag, n = struct.unpack_from("<HI", payload, i)
        out.append((tag, payload[i + 6 : i + 6 + n]))
        i += 6 + n
    assert i == len(payload)
    return out


# --------------------------------------------------------------- encoders


def test_frame_header_layout_is_little_endian_sm_magic():
    frame = p.encode_data(7, Stream.STDIN, b"abc")
    assert frame[:2] == b"SM"
    assert HDR.unpack(frame[:12]) == (0x4D53, p.FrameType.DATA, 0, 7, 3)
    assert frame[12:] == b"abc"


def test_hello_with_all_setup_fields():
    frame = p.encode_hello(NONCE, time_ns=123, entropy=b"e" * 16, hostname=b"box",
                           machine_id=b"0123456789abcdef" * 2)
    payload = frame[12:]
    assert struct.unpack_from("<I", payload)[0] == 1
    assert payload[4:20] == NONCE
    assert parse_tlvs(payload[20:]) == [
        (1, struct.pack("<Q", 123)),
        (2, b"e" * 16),
        (3, b"box"),
        (4, b"0123456789abcdef" * 2),
    ]
    assert p.encode_hello(NONCE)[12:] == struct.pack("<I", 1) + NONCE


@pytest.mark.parametrize(
    "kwargs",
    [{"entropy": b"x" * 15}, {"entropy": b"x" * 513}, {"hostname": b""}, {"hostname": b"h" * 65},
     {"machine_id": b"0" * 31}, {"machine_id": b"0" * 33}, {"machine_id": b"A" * 32},
     {"machine_id": b"g" * 32}],
)
def test_hello_rejects_out_of_range_setup(kwargs):
    with pytest.raises(ValueError):
        p.encode_hello(NONCE, **kwargs)


def test_exec_tlvs_in_order():
    frame = p.encode_exec(
        3,
        [b"/bin/sh", b"-c", b""],
        env=[b"A=1", b"B="],
        cwd=b"/work",
        user=b"1000:1000",
        flags=p.FLAG_STDIN | p.FLAG_TTY,
        winsize=(24, 80),
        op=p.Op.WRITE_FILE,
        mode=0o600,
    )
    assert HDR.unpack(frame[:12])[1:4] == (p.FrameType.EXEC, 0, 3)
    assert parse_tlvs(frame[12:]) == [
        (1, b"/bin/sh"),
        (1, b"-c"),
        (1, b""),
        (2, b"A=1"),
        (2, b"B="),
        (3, b"/work"),
        (4, b"1000:1000"),
        (5, struct.pack("<I", 3)),
        (6, struct.pack("<HH", 24, 80)),
        (7, struct.pack("<I", 2)),
        (8, struct.pack("<I", 0o600)),
    ]


@pytest.mark.parametrize(
    "argv,kwargs",
    [
        ([], {}),
        ([b"a\0b"], {}),
        ([b"x"], {"env": [b"NOEQUALS"]}),
        ([b"x"], {"env": [b"=value"]}),
        ([b"x"], {"cwd": b"relative"}),
        ([b"x"], {"flags": 8}),
        ([b"x"] * 4097, {}),
        ([b"x" * 70000], {}),
        ([b"x"], {"rlimits": [(16, 1, 1)]}),
        ([b"x"], {"rlimits": [(7, 2, 1)]}),
        ([b"x"], {"rlimits": [(7, 1, 1 << 64)]}),
        ([b"x"], {"rlimits": [(7, 1, 1)] * 17}),
    ],
)
def test_exec_rejects_bad_requests(argv, kwargs):
    with pytest.raises(ValueError):
        p.encode_exec(1, argv, **kwargs)


def test_exec_rejects_control_channel():
    with pytest.raises(ValueError):
        p.encode_exec(0, [b"x"])


def test_small_frames():
    assert p.encode_eof(2, Stream.STDIN) == header(p.FrameType.EOF, 2)
    assert p.encode_credit(2, Stream.STDOUT, 5) == header(
        p.FrameType.CREDIT, 2, 4, 1
    ) + struct.pack("<I", 5)
    assert p.encode_signal(2, 15)[12:] == struct.pack("<I", 15)
    assert p.encode_resize(2, 50, 132)[12:] == struct.pack("<HH", 50, 132)
    assert p.encode_close(9) == header(p.FrameType.CLOSE, 9)
    assert p.encode_ping(2**64 - 1)[12:] == b"\xff" * 8
    assert p.encode_pong(1)[:12] == header(p.FrameType.PONG, 0, 8)
    assert p.encode_shutdown() == header(p.FrameType.SHUTDOWN)
    for bad in (lambda: p.encode_signal(1, 0), lambda: p.encode_signal(1, 65)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        p.encode_credit(1, Stream.STDOUT, 0)
    with pytest.raises(ValueError):
        p.encode_data(1, Stream.STDIN, b"")
    with pytest.raises(ValueError):
        p.encode_data(1, Stream.STDIN, b"x" * (p.MAX_PAYLOAD + 1))


# --------------------------------------------------------------- decoder


def test_guest_frames_round_trip():
    d = synced()
    stream = (
        p.encode_started(5, 42)
        + p.encode_frame(p.FrameType.DATA, 5, b"out", Stream.STDOUT)
        + p.encode_frame(p.FrameType.DATA, 5, b"err", Stream.STDERR)
        + p.encode_frame(p.FrameType.EOF, 5, b"", Stream.STDOUT)
        + p.encode_frame(p.FrameType.CREDIT, 5, struct.pack("<I", 9), Stream.STDIN)
        + p.encode_exit(5, p.ExitKind.SIGNALED, 9, "killé".encode())
        + p.encode_frame(p.FrameType.PING, 0, struct.pack("<Q", 7))
        + p.encode_frame(p.FrameType.PONG, 0, struct.pack("<Q", 8))
        + p.encode_error(0, b"bad frame")
    )
    assert d.feed(stream) == [
        p.Started(5, 42),
        p.Data(5, Stream.STDOUT, b"out"),
        p.Data(5, Stream.STDERR, b"err"),
        p.Eof(5, Stream.STDOUT),
        p.Credit(5, Stream.STDIN, 9),
        p.Exit(5, p.ExitKind.SIGNALED, 9, "killé"),
        p.Ping(7),
        p.Pong(8),
        p.GuestReset(0, "bad frame"),
    ]
    assert d.buffered == 0


def test_byte_at_a_time_feeding_gives_the_same_events():
    frames = p.encode_guest_hello(NONCE) + p.encode_started(1, 1) + p.encode_exit(1, 0, 3, b"m")
    d = p.Decoder(NONCE)
    events = []
    for i in range(len(frames)):
        events += d.feed(frames[i : i + 1])
    assert events == [p.Hello(1, NONCE), p.Started(1, 1), p.Exit(1, p.ExitKind.EXITED, 3, "m")]


HOSTILE = [
    (b"XX" + header(p.FrameType.STARTED, 1, 4)[2:] + b"\0" * 4, "magic"),
    (header(0, 1), "type 0"),
    (header(15, 1), "type 15"),
    (header(p.FrameType.EXEC, 1), "host-only EXEC"),
    (header(p.FrameType.SIGNAL, 1, 4) + b"\0" * 4, "host-only SIGNAL"),
    (header(p.FrameType.CLOSE, 1), "host-only CLOSE"),
    (header(p.FrameType.SHUTDOWN), "host-only SHUTDOWN"),
    (header(p.FrameType.RESIZE, 1, 4) + b"\0" * 4, "host-only RESIZE"),
    (header(p.FrameType.DATA, 1, 1, 0) + b"x", "DATA on stdin"),
    (header(p.FrameType.DATA, 1, 1, 3) + b"x", "DATA on stream 3"),
    (header(p.FrameType.DATA, 0, 1, 1) + b"x", "DATA on control"),
    (header(p.FrameType.DATA, 1, 0, 1), "empty DATA"),
    (header(p.FrameType.DATA, 2**31, 1, 1) + b"x", "channel 2^31"),
    (header(p.FrameType.EOF, 1, 1, 1) + b"x", "EOF with payload"),
    (header(p.FrameType.EOF, 1, 0, 0), "EOF on stdin"),
    (header(p.FrameType.CREDIT, 1, 4, 1) + b"\1\0\0\0", "CREDIT on stdout"),
    (header(p.FrameType.CREDIT, 1, 4, 0) + b"\0\0\0\0", "zero CREDIT"),
    (header(p.FrameType.CREDIT, 1, 5, 0) + b"\1\0\0\0\0", "long CREDIT"),
    (header(p.FrameType.STARTED, 1, 3) + b"\0" * 3, "short STARTED"),
    (header(p.FrameType.STARTED, 0, 4) + b"\0" * 4, "STARTED on control"),
    (header(p.FrameType.STARTED, 1, 4, 1) + b"\0" * 4, "STARTED on stream 1"),
    (header(p.FrameType.PING, 1, 8) + b"\0" * 8, "PING on a session"),
    (header(p.FrameType.PONG, 0, 9) + b"\0" * 9, "long PONG"),
    (header(p.FrameType.HELLO, 0, 20) + b"\1\0\0\0" + NONCE, "second HELLO is framed fine"),
    (header(p.FrameType.EXIT, 1, 7) + b"\0" * 7, "short EXIT"),
    (header(p.FrameType.EXIT, 1, 8) + b"\4\0\0\0\0\0\0\0", "EXIT kind 4"),
    (header(p.FrameType.EXIT, 1, 8) + b"\0\0\0\0" + struct.pack("<i", 256), "status 256"),
    (header(p.FrameType.EXIT, 1, 8) + b"\1\0\0\0" + struct.pack("<i", 0), "signal 0"),
    (header(p.FrameType.EXIT, 1, 8) + b"\1\0\0\0" + struct.pack("<i", 65), "signal 65"),
    (header(p.FrameType.EXIT, 1, 8) + b"\2\0\0\0" + struct.pack("<i", -1), "errno -1"),
    (header(p.FrameType.EXIT, 1, 8 + 1025) + b"\0" * (8 + 1025), "EXIT message 1025"),
    (header(p.FrameType.ERROR, 0, 1025) + b"e" * 1025, "ERROR message 1025"),
    (header(p.FrameType.DATA, 1, p.MAX_PAYLOAD + 1, 1), "oversized"),
]


@pytest.mark.parametrize("frame,why", HOSTILE, ids=[w for _, w in HOSTILE])
def test_decoder_rejects_hostile_frames(frame, why):
    d = synced()
    if why == "second HELLO is framed fine":
        # The framing accepts it; Connection rejects a second HELLO (tested below).
        assert d.feed(frame) == [p.Hello(1, NONCE)]
        return
    with pytest.raises(ProtocolError):
        d.feed(frame)
    # A failed decoder stays failed and holds nothing.
    assert d.buffered == 0
    with pytest.raises(ProtocolError):
        d.feed(p.encode_started(1, 1))


def test_oversized_length_fails_on_the_header_alone():
    d = synced()
    with pytest.raises(ProtocolError, match="exceeds"):
        d.feed(header(p.FrameType.DATA, 1, 2**32 - 1, 1))


def test_limits_at_the_edge_are_accepted():
    d = synced()
    big = b"x" * p.MAX_PAYLOAD
    msg = "é" * 512  # 1024 bytes of UTF-8
    assert d.feed(p.encode_frame(p.FrameType.DATA, 2**31 - 1, big, 2)) == [
        p.Data(2**31 - 1, Stream.STDERR, big)
    ]
    assert d.feed(p.encode_exit(1, 0, 255, msg.encode())) == [p.Exit(1, 0, 255, msg)]
    assert d.feed(p.encode_error(3, b"\xff" * 1024)) == [p.GuestReset(3, "\ufffd" * 1024)]


def test_decoder_buffers_at_most_one_frame():
    d = synced()
    frame = p.encode_frame(p.FrameType.DATA, 1, b"y" * p.MAX_PAYLOAD, 1)
    assert d.feed(frame[:-1]) == []
    assert d.buffered == len(frame) - 1 <= p.HEADER_SIZE + p.MAX_PAYLOAD
    assert d.feed(frame[-1:] + frame[:5]) == [p.Data(1, Stream.STDOUT, b"y" * p.MAX_PAYLOAD)]
    assert d.buffered == 5


# --------------------------------------------------------------- resync


def test_resync_discards_stale_frames_and_other_nonces():
    d = p.Decoder(NONCE)
    stale = p.encode_started(9, 1) + p.encode_guest_hello(b"z" * 16) + b"garbage\x53\x4d"
    assert d.feed(stale) == []
    assert not d.synced
    assert d.buffered < p.HEADER_SIZE
    events = d.feed(p.encode_guest_hello(NONCE) + p.encode_started(1, 5))
    assert events == [p.Hello(1, NONCE), p.Started(1, 5)]
    assert d.synced


def test_resync_finds_hello_split_across_feeds():
    d = p.Decoder(NONCE)
    data = b"\0" * 1000 + p.encode_guest_hello(NONCE) + p.encode_started(2, 2)
    events = []
    for i in range(0, len(data), 7):
        events += d.feed(data[i : i + 7])
    assert events == [p.Hello(1, NONCE), p.Started(2, 2)]


def test_resync_gives_up_after_the_limit():
    d = p.Decoder(NONCE)
    chunk = p.encode_guest_hello(b"q" * 16) * 1000  # stale HELLOs: worst case for the search
    fed = 0
    with pytest.raises(ProtocolError, match="HELLO"):
        while True:
            d.feed(chunk)
            fed += len(chunk)
            assert fed <= p.RESYNC_LIMIT + len(chunk)
    assert fed >= p.RESYNC_LIMIT - len(chunk)


def test_resync_limit_counts_garbage_before_the_hello():
    d = p.Decoder(NONCE)
    with pytest.raises(ProtocolError):
        d.feed(b"\0" * (p.RESYNC_LIMIT + 1) + p.encode_guest_hello(NONCE))
    d = p.Decoder(NONCE)
    assert d.feed(b"\0" * p.RESYNC_LIMIT + p.encode_guest_hello(NONCE)) == [p.Hello(1, NONCE)]


def test_resync_rejects_a_guest_speaking_another_version():
    d = p.Decoder(NONCE)
    with pytest.raises(ProtocolError, match="version 2"):
        d.feed(p.encode_guest_hello(NONCE, version=2))


# --------------------------------------------------------------- connection


def ready_conn(**kwargs) -> p.Connection:
    c = p.Connection(NONCE, **kwargs)
    c.hello()
    assert c.receive(p.encode_guest_hello(NONCE)) == [p.Hello(1, NONCE)]
    assert c.ready
    return c


def out(channel: int, data: bytes, stream: Stream = Stream.STDOUT) -> bytes:
    return p.encode_frame(p.FrameType.DATA, channel, data, stream)


def test_connection_needs_hello_before_sessions():
    c = p.Connection(NONCE)
    with pytest.raises(AgentError, match="not ready"):
        c.open([b"true"])
    with pytest.raises(ProtocolError, match="before the host"):
        c.receive(p.encode_guest_hello(NONCE))
    c = p.Connection(NONCE)
    c.hello()
    with pytest.raises(AgentError):
        c.hello()


def test_second_guest_hello_is_an_error():
    c = ready_conn()
    with pytest.raises(ProtocolError, match="second HELLO"):
        c.receive(p.encode_guest_hello(NONCE))


def test_channels_are_allocated_fresh_and_freed_by_exit():
    c = ready_conn()
    a, _ = c.open([b"a"])
    b, _ = c.open([b"b"])
    assert (a, b) == (1, 2)
    c.receive(p.encode_exit(a, 2, 2, b"no such file"))
    assert a not in c.sessions
    assert c.open([b"c"])[0] == 3  # not reused right away
    with pytest.raises(ProtocolError, match="unknown session"):
        c.receive(p.encode_started(a, 1))


def test_max_open_sessions():
    c = ready_conn(max_sessions=3)
    for _ in range(3):
        c.open([b"x"])
    with pytest.raises(AgentError, match="already open"):
        c.open([b"x"])
    c.receive(p.encode_exit(2, 0, 0))
    assert c.open([b"x"])[0] == 4


def test_output_window_enforced_and_replenished_by_grant():
    c = ready_conn()
    ch, _ = c.open([b"cat"])
    c.receive(p.encode_started(ch, 10))
    chunk = b"z" * p.MAX_PAYLOAD
    for _ in range(p.INITIAL_WINDOW // p.MAX_PAYLOAD):
        c.receive(out(ch, chunk))
    assert c.session(ch).recv_window[Stream.STDOUT] == 0
    # stderr has its own window
    c.receive(out(ch, b"e", Stream.STDERR))
    with pytest.raises(AgentError):
        c.grant(ch, Stream.STDOUT, p.INITIAL_WINDOW + 1)  # more than consumed
    assert c.grant(ch, Stream.STDOUT, 100) == p.encode_credit(ch, Stream.STDOUT, 100)
    c.receive(out(ch, b"y" * 100))
    with pytest.raises(ProtocolError, match="overran"):
        c.receive(out(ch, b"!"))


def test_output_rules():
    c = ready_conn()
    ch, _ = c.open([b"x"], tty=True)
    with pytest.raises(ProtocolError, match="before STARTED"):
        c.receive(out(ch, b"early"))
    c = ready_conn()
    ch, _ = c.open([b"x"], tty=True)
    c.receive(p.encode_started(ch, 1))
    with pytest.raises(ProtocolError, match="STARTED twice"):
        c.receive(p.encode_started(ch, 1))
    c = ready_conn()
    ch, _ = c.open([b"x"], tty=True)
    c.receive(p.encode_started(ch, 1))
    with pytest.raises(ProtocolError, match="no STDERR"):
        c.receive(out(ch, b"e", Stream.STDERR))
    c = ready_conn()
    ch, _ = c.open([b"x"])
    c.receive(p.encode_started(ch, 1) + p.encode_eof(ch, Stream.STDOUT))
    with pytest.raises(ProtocolError, match="after its EOF"):
        c.receive(out(ch, b"late"))
    c = ready_conn()
    ch, _ = c.open([b"/etc/hosts"], op=p.Op.READ_FILE)
    c.receive(p.encode_started(ch, 0))
    with pytest.raises(ProtocolError, match="no STDERR"):
        c.receive(out(ch, b"e", Stream.STDERR))


def test_stdin_window_and_guest_credit():
    c = ready_conn()
    ch, _ = c.open([b"cat"], stdin=True)
    assert c.send_window(ch) == p.INITIAL_WINDOW
    frames = c.send_data(ch, b"a" * (p.MAX_PAYLOAD + 1))
    assert len(frames) == 2 * p.HEADER_SIZE + p.MAX_PAYLOAD + 1  # split into two DATA frames
    assert c.send_window(ch) == p.INITIAL_WINDOW - p.MAX_PAYLOAD - 1
    with pytest.raises(AgentError, match="exceed"):
        c.send_data(ch, b"b" * p.INITIAL_WINDOW)
    credit = p.encode_frame(p.FrameType.CREDIT, ch, struct.pack("<I", 10), Stream.STDIN)
    c.receive(credit)
    assert c.send_window(ch) == p.INITIAL_WINDOW - p.MAX_PAYLOAD - 1 + 10
    too_much = struct.pack("<I", p.MAX_PAYLOAD + 1)
    with pytest.raises(ProtocolError, match="outstanding"):
        c.receive(p.encode_frame(p.FrameType.CREDIT, ch, too_much, Stream.STDIN))


def test_stdin_eof_and_sessions_without_stdin():
    c = ready_conn()
    ch, _ = c.open([b"true"])
    assert c.send_window(ch) == 0
    with pytest.raises(AgentError, match="without stdin"):
        c.send_data(ch, b"x")
    credit = p.encode_frame(p.FrameType.CREDIT, ch, struct.pack("<I", 1), Stream.STDIN)
    with pytest.raises(ProtocolError, match="has none"):
        c.receive(credit)
    c = ready_conn()
    ch, _ = c.open([b"cat"], stdin=True)
    assert c.send_eof(ch) == p.encode_eof(ch, Stream.STDIN)
    assert c.send_eof(ch) == b""  # only once
    assert c.send_window(ch) == 0
    with pytest.raises(AgentError, match="closed"):
        c.send_data(ch, b"x")


def test_close_keeps_the_channel_until_exit():
    c = ready_conn()
    ch, _ = c.open([b"sleep", b"9"])
    assert c.close(ch) == p.encode_close(ch)
    assert c.close(ch) == b""
    c.receive(p.encode_started(ch, 3) + out(ch, b"in flight"))  # frames already on the way
    assert c.sessions[ch].closed
    c.receive(p.encode_exit(ch, 1, 9))
    assert ch not in c.sessions
    assert c.grant(ch, Stream.STDOUT, 5) == b""


def test_guest_error_frames():
    c = ready_conn()
    assert c.receive(p.encode_error(0, b"reset")) == [p.GuestReset(0, "reset")]
    with pytest.raises(ProtocolError, match="unknown session"):
        c.receive(p.encode_error(77, b"x"))


def test_exec_rlimits_field():
    frame = p.encode_exec(1, [b"x"], rlimits=[(7, 1024, 2048), (4, 0, (1 << 64) - 1)])
    assert struct.pack("<HI", 9, 40) + struct.pack("<IQQ", 7, 1024, 2048) + \
        struct.pack("<IQQ", 4, 0, (1 << 64) - 1) in frame
