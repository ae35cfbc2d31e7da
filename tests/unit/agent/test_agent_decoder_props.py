"""Property tests: arbitrary and hostile byte streams against the Decoder and Connection.

Invariants: feeding only ever returns events or raises ProtocolError (never another
exception), the decoder never holds more than one frame, and how the input is split into
feeds does not change the outcome.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.agent import protocol as p
from supermachine.errors import ProtocolError

NONCE = b"N" * 16
HELLO = p.encode_guest_hello(NONCE)
BOUND = p.HEADER_SIZE + p.MAX_PAYLOAD

# Frames that are almost valid: real headers with fuzzed fields, so the fuzzer reaches
# payload parsing instead of dying on the magic every time.
fuzzed_frame = st.builds(
    lambda t, s, ch, payload, lie: (
        struct.pack("<HBBII", p.MAGIC, t, s, ch, max(0, len(payload) + lie)) + payload
    ),
    st.integers(0, 16),
    st.integers(0, 3),
    st.sampled_from([0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1]),
    st.binary(max_size=40),
    st.sampled_from([0, 0, 0, 1, -1]),  # sometimes the length lies
)
valid_guest_frame = st.one_of(
    st.builds(p.encode_started, st.integers(1, 5), st.integers(0, 2**32 - 1)),
    st.builds(
        lambda ch, s, d: p.encode_frame(p.FrameType.DATA, ch, d, s),
        st.integers(1, 5),
        st.sampled_from([1, 2]),
        st.binary(min_size=1, max_size=300),
    ),
    st.builds(
        p.encode_exit, st.integers(1, 5), st.just(0), st.integers(0, 255), st.binary(max_size=50)
    ),
    st.builds(
        p.encode_frame, st.just(p.FrameType.PING), st.just(0), st.binary(min_size=8, max_size=8)
    ),
)
stream_pieces = st.lists(
    st.one_of(st.binary(max_size=64), fuzzed_frame, valid_guest_frame, st.just(HELLO)),
    max_size=30,
)


def feed_all(dec: p.Decoder, chunks: list[bytes]) -> list | None:
    """Events, or None when the stream was rejected (the connection is then dropped, so
    which events came before the bad frame does not matter)."""
    events: list = []
    for chunk in chunks:
        try:
            events += dec.feed(chunk)
        except ProtocolError:
            assert dec.buffered == 0
            return None
        assert dec.buffered <= BOUND
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in points + [len(data)]:
        out.append(data[last:c])
        last = c
    return out


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_only_events_or_protocol_error(data):
    for synced in (False, True):
        dec = p.Decoder(NONCE)
        feed_all(dec, [HELLO] if synced else [])
        feed_all(dec, [data])


@settings(max_examples=400, deadline=None)
@given(stream_pieces, st.lists(st.integers(0, 10**6), max_size=20))
def test_split_points_do_not_change_the_outcome(pieces, cuts):
    data = HELLO + b"".join(pieces)
    whole = feed_all(p.Decoder(NONCE), [data])
    chunked = feed_all(p.Decoder(NONCE), split(data, cuts))
    assert whole == chunked


@settings(max_examples=60, deadline=None)
@given(stream_pieces)
def test_byte_at_a_time_equals_whole(pieces):
    data = HELLO + b"".join(pieces)
    whole = feed_all(p.Decoder(NONCE), [data])
    one_by_one = feed_all(p.Decoder(NONCE), [data[i : i + 1] for i in range(len(data))])
    assert whole == one_by_one


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_guest_frame, max_size=20), st.binary(max_size=200))
def test_garbage_before_hello_is_skipped(frames, garbage):
    # A stale tail from an earlier connection never changes what follows our HELLO.
    body = b"".join(frames)
    clean = feed_all(p.Decoder(NONCE), [HELLO + body])
    dirty = feed_all(p.Decoder(NONCE), [garbage + HELLO + body])
    assert clean == dirty


@settings(max_examples=300, deadline=None)
@given(stream_pieces, st.lists(st.integers(0, 10**6), max_size=10))
def test_connection_only_events_or_protocol_error(pieces, cuts):
    conn = p.Connection(NONCE)
    conn.hello()
    conn.receive(HELLO)
    for _ in range(3):
        conn.open([b"x"], stdin=True)
    for chunk in split(b"".join(pieces), cuts):
        try:
            conn.receive(chunk)
        except ProtocolError:
            break
    # Whatever happened, windows stay within their bounds.
    for s in conn.sessions.values():
        assert 0 <= s.send_window <= p.INITIAL_WINDOW
        for stream, w in s.recv_window.items():
            assert 0 <= w <= p.INITIAL_WINDOW
            assert w + s.recv_uncredited[stream] == p.INITIAL_WINDOW
