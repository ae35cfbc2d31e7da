"""control.py: the CLI <-> supervisor framing and request validation, with hostile input.

Invariants: feeding bytes only ever returns frames or raises ControlError, the decoder never
holds more than one frame, how the input is split does not change the result, and requests
either parse into typed values or raise ControlError.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.detached import protocol as c
from supermachine.detached.protocol import ControlError, Kind

BOUND = 5 + c.MAX_PAYLOAD

frames = st.lists(st.tuples(st.sampled_from(list(Kind)), st.binary(max_size=300)), max_size=20)


def _feed_split(data: bytes, cuts: list[int]) -> list[c.Frame]:
    dec = c.Decoder()
    out: list[c.Frame] = []
    prev = 0
    for cut in sorted(x % (len(data) + 1) for x in cuts) + [len(data)]:
        out += dec.feed(data[prev:cut])
        prev = cut
        assert dec.pending <= BOUND
    assert dec.pending == 0
    return out


@given(frames, st.lists(st.integers(0, 10_000), max_size=10))
def test_round_trip_whatever_the_split(items, cuts):
    data = b"".join(c.encode(k, p) for k, p in items)
    assert [(f.kind, f.payload) for f in _feed_split(data, cuts)] == items


@settings(max_examples=300)
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda k, n, body: struct.pack("<BI", k, n) + body,
              st.integers(0, 12), st.sampled_from([0, 1, 5, c.MAX_PAYLOAD, c.MAX_PAYLOAD + 1,
                                                   2**32 - 1]), st.binary(max_size=32)),
), max_size=8))
def test_hostile_streams_only_yield_frames_or_control_errors(chunks):
    dec = c.Decoder()
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert isinstance(frame.kind, Kind)
                assert len(frame.payload) <= c.MAX_PAYLOAD
            assert dec.pending <= BOUND
    except ControlError:
        pass


def test_oversized_and_unknown_frames_are_rejected_from_the_header_alone():
    with pytest.raises(ControlError, match="exceeds"):
        c.Decoder().feed(struct.pack("<BI", Kind.STDOUT, c.MAX_PAYLOAD + 1))
    with pytest.raises(ControlError, match="unknown"):
        c.Decoder().feed(struct.pack("<BI", 99, 0))
    with pytest.raises(ValueError):
        c.encode(Kind.STDIN, b"x" * (c.MAX_PAYLOAD + 1))


def test_encode_data_splits_large_payloads():
    data = bytes(range(256)) * 1000
    got = c.Decoder().feed(c.encode_data(Kind.STDOUT, data))
    assert len(got) == 4 and b"".join(f.payload for f in got) == data
    assert c.encode_data(Kind.STDOUT, b"") == b""


requests = st.one_of(
    st.builds(c.ExecRequest,
              argv=st.lists(st.text(min_size=1).filter(lambda s: "\0" not in s), min_size=1,
                            max_size=5).map(tuple),
              env=st.lists(st.text().filter(lambda s: "\0" not in s), max_size=5).map(tuple),
              cwd=st.one_of(st.none(), st.just("/tmp")), user=st.one_of(st.none(), st.just("1")),
              stdin=st.booleans(), tty=st.booleans(),
              winsize=st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF),
                                                     st.integers(0, 0xFFFF)))),
    st.builds(c.ReadRequest, st.just("/etc/hostname")),
    st.builds(c.WriteRequest, st.just("/tmp/x"), st.integers(0, 0o7777)),
    st.builds(c.StopRequest, st.floats(0, 86400)),
)


@given(requests)
def test_requests_round_trip(req):
    (frame,) = c.Decoder().feed(c.encode_request(req))
    assert c.parse_request(frame) == req


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["op", "argv", "env", "cwd", "user", "stdin", "tty",
                                        "winsize", "path", "mode", "timeout"]),
                       json_values, max_size=8),
       st.sampled_from(["exec", "read", "write", "stop", "bogus", None]))
def test_arbitrary_json_requests_parse_or_raise_control_error(obj, op):
    if op is not None:
        obj["op"] = op
    frame = c.Frame(Kind.REQUEST, json.dumps(obj).encode())
    try:
        req = c.parse_request(frame)
    except ControlError:
        return
    assert isinstance(req, c.ExecRequest | c.ReadRequest | c.WriteRequest | c.StopRequest)
    if isinstance(req, c.ExecRequest):
        assert req.argv and all(isinstance(a, str) for a in req.argv)


@pytest.mark.parametrize("payload", [b"", b"[1]", b"\xff", b'{"op": "read", "path": "rel"}',
                                     b'{"op": "exec", "argv": []}',
                                     b'{"op": "exec", "argv": ["a\\u0000b"]}',
                                     b'{"op": "write", "path": "/x", "mode": true}',
                                     b'{"op": "stop", "timeout": -1}'])
def test_bad_requests(payload):
    with pytest.raises(ControlError):
        c.parse_request(c.Frame(Kind.REQUEST, payload))


def test_first_frame_must_be_a_request():
    with pytest.raises(ControlError, match="expected a REQUEST"):
        c.parse_request(c.Frame(Kind.STDIN, b"{}"))


def test_resize_and_signal():
    (f,) = c.Decoder().feed(c.encode_resize(40, 120))
    assert c.parse_resize(f) == (40, 120)
    (f,) = c.Decoder().feed(c.encode_signal(15))
    assert c.parse_signal(f) == 15
    with pytest.raises(ControlError):
        c.parse_signal(c.Frame(Kind.SIGNAL, b"\x00"))
    with pytest.raises(ControlError):
        c.parse_resize(c.Frame(Kind.RESIZE, b"\x00"))
