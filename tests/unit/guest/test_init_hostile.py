"""Malformed host input: every protocol violation yields ERROR and a reset, after which a new
HELLO works. The same frames, plus random garbage, also run under an ASan+UBSan build."""

from __future__ import annotations

import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
from test_init_support import (
    CREDIT,
    DATA,
    EOF,
    ERROR,
    EXEC,
    EXIT,
    HDR,
    HELLO,
    INIT_DIR,
    INITIAL_WINDOW,
    MAGIC,
    PING,
    PONG,
    RESIZE,
    SHUTDOWN,
    SIGNAL,
    STARTED,
    Agent,
    alive,
    exec_payload,
    frame,
    tlv,
)

ARGV_TRUE = tlv(1, b"true")

MALFORMED = {
    "bad magic": b"XX" + frame(PING, 0, b"\0" * 8)[2:],
    "oversized length": HDR.pack(MAGIC, DATA, 0, 1, 65537),
    "unknown type": frame(99, 0),
    "type from the guest only": frame(STARTED, 1, b"\0" * 4),
    "control on a session channel": frame(PING, 5, b"\0" * 8),
    "session frame on channel 0": frame(SIGNAL, 0, struct.pack("<I", 9)),
    "channel above 2^31-1": frame(EXEC, 0x80000000, ARGV_TRUE),
    "stdin credit from host": frame(CREDIT, 1, struct.pack("<I", 1), stream=0),
    "zero credit": frame(CREDIT, 1, struct.pack("<I", 0), stream=1),
    "ping wrong size": frame(PING, 0, b"\0" * 7),
    "shutdown with payload": frame(SHUTDOWN, 0, b"x"),
    "signal out of range": frame(SIGNAL, 1, struct.pack("<I", 65)),
    "resize short": frame(RESIZE, 1, b"\0\0"),
    "empty data": frame(DATA, 1, b""),
    "eof with payload": frame(EOF, 1, b"x"),
    "truncated TLV header": frame(EXEC, 1, ARGV_TRUE + b"\x01\x00"),
    "TLV overruns payload": frame(EXEC, 1, struct.pack("<HI", 1, 100) + b"true"),
    "unknown TLV tag": frame(EXEC, 1, ARGV_TRUE + tlv(42, b"")),
    "no ARGV": frame(EXEC, 1, tlv(2, b"A=1")),
    "NUL in ARGV": frame(EXEC, 1, tlv(1, b"tr\0ue")),
    "ENV without =": frame(EXEC, 1, ARGV_TRUE + tlv(2, b"NOEQUALS")),
    "ENV empty key": frame(EXEC, 1, ARGV_TRUE + tlv(2, b"=x")),
    "relative CWD": frame(EXEC, 1, ARGV_TRUE + tlv(3, b"tmp")),
    "repeated CWD": frame(EXEC, 1, ARGV_TRUE + tlv(3, b"/") + tlv(3, b"/")),
    "FLAGS wrong size": frame(EXEC, 1, ARGV_TRUE + tlv(5, b"\1\0")),
    "unknown FLAGS bit": frame(EXEC, 1, ARGV_TRUE + tlv(5, struct.pack("<I", 8))),
    "unknown OP": frame(EXEC, 1, ARGV_TRUE + tlv(7, struct.pack("<I", 4))),
    "MODE out of range": frame(EXEC, 1, ARGV_TRUE + tlv(8, struct.pack("<I", 0o10000))),
    "too many ARGV": frame(EXEC, 1, tlv(1, b"") * 4097),
    "HELLO bad version": frame(HELLO, 0, struct.pack("<I", 2) + b"\0" * 16),
    "HELLO bad setup": frame(HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 + tlv(2, b"short")),
    "HELLO machine id too short": frame(
        HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 + tlv(4, b"ab" * 15)
    ),
    "HELLO machine id not lowercase hex": frame(
        HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 + tlv(4, b"ABCDEF0123456789" * 2)
    ),
    "HELLO unknown setup tag": frame(HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 + tlv(6, b"x")),
    "RLIMITS bad length": frame(EXEC, 1, ARGV_TRUE + tlv(9, b"\0" * 19)),
    "RLIMITS unknown resource": frame(EXEC, 1, ARGV_TRUE + tlv(9, struct.pack("<IQQ", 16, 1, 1))),
    "RLIMITS soft above hard": frame(EXEC, 1, ARGV_TRUE + tlv(9, struct.pack("<IQQ", 7, 2, 1))),
    "RLIMITS too many": frame(EXEC, 1, ARGV_TRUE + tlv(9, struct.pack("<IQQ", 7, 1, 1) * 17)),
    "HELLO empty NETWORK": frame(HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 + tlv(5, b"")),
    "HELLO long NETWORK": frame(HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 +
                                tlv(5, b"1" * 97)),
    "HELLO repeated setup": frame(
        HELLO, 0, struct.pack("<I", 1) + b"\0" * 16 + tlv(3, b"a") + tlv(3, b"b")
    ),
}


def check_error_then_recovery(a: Agent, bad: bytes) -> None:
    a.send(bad)
    f = a.expect(ERROR)
    assert f.channel == 0 and 0 < len(f.payload) <= 1024
    f.payload.decode()
    # Reset: nothing is served until a new HELLO.
    a.send(frame(PING, 0, b"\1" * 8))
    assert a.quiet(0.05) == []
    a.hello(b"R" * 16)
    r = a.run(7, ["echo", "ok"])
    assert (r.stdout, r.kind, r.code) == (b"ok\n", 0, 0)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_errors_and_resets(name: str) -> None:
    a = Agent()
    try:
        a.hello()
        check_error_then_recovery(a, MALFORMED[name])
    finally:
        assert a.close() == 0


def test_session_level_violations() -> None:
    a = Agent()
    try:
        a.hello()
        a.exec(1, ["sleep", "100"])
        pid = struct.unpack("<I", a.expect(STARTED).payload)[0]
        # EXEC on an open channel is an error, and the reset kills the session.
        check_error_then_recovery(a, frame(EXEC, 1, exec_payload(["true"])))
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(pid)

        a.exec(2, ["sleep", "100"])  # no STDIN flag
        a.expect(STARTED)
        check_error_then_recovery(a, frame(DATA, 2, b"x"))

        a.exec(3, ["sleep", "100"], flags=1)
        a.expect(STARTED)
        a.send(frame(EOF, 3))
        check_error_then_recovery(a, frame(DATA, 3, b"late"))

        a.exec(4, ["sleep", "100"], flags=1)
        a.expect(STARTED)
        for _ in range(INITIAL_WINDOW // 65536):
            a.send(frame(DATA, 4, b"x" * 65536))
        # The guest credits what the pipe took; one byte beyond that is a violation.
        credited = sum(struct.unpack("<I", f.payload)[0] for f in a.quiet(0.3) if f.type == CREDIT)
        assert credited < INITIAL_WINDOW
        if credited:
            a.send(frame(DATA, 4, b"y" * credited))
            assert a.quiet(0.1) == []
        check_error_then_recovery(a, frame(DATA, 4, b"z"))
    finally:
        a.close()


def test_garbage_after_error_is_skipped_until_hello() -> None:
    a = Agent()
    try:
        a.hello()
        # An oversized header followed by its "payload", which even contains a magic.
        a.send(HDR.pack(MAGIC, DATA, 0, 1, 1 << 30) + b"SM" + b"\xff" * 5000)
        a.expect(ERROR)
        a.hello(b"Z" * 16)
        assert a.run(1, ["true"]).code == 0
    finally:
        a.close()


def test_exec_beyond_session_limit_fails_cleanly() -> None:
    # Not a protocol error (detached sessions take slots the host cannot see): EXIT kind 3.
    a = Agent()
    try:
        a.hello()
        a.send(b"".join(frame(EXEC, ch, exec_payload(["sleep", "100"])) for ch in range(1, 1025)))
        started = 0
        while started < 1024:
            f = a.recv(30)
            assert f.type == STARTED, f
            started += 1
        a.send(frame(EXEC, 2000, exec_payload(["true"])))
        f = a.expect(EXIT, 10)
        assert f.channel == 2000 and f.payload[0] == 3
    finally:
        a.close()


@pytest.fixture(scope="module")
def asan_binary(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("asan") / "sm-init-asan"
    subprocess.run(
        ["make", "-s", "-C", str(INIT_DIR), "asan", f"ASAN_OUT={out}"], check=True, timeout=180
    )
    return out


def test_hostile_frames_under_asan(asan_binary: Path) -> None:
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1", "PATH": "/usr/bin:/bin"}
    a = Agent(asan_binary, env=env)
    rng = random.Random(1234)
    try:
        a.hello()
        assert a.run(1, ["echo", "hi"]).stdout == b"hi\n"
        for name in sorted(MALFORMED):
            check_error_then_recovery(a, MALFORMED[name])
        # Random garbage and mutated valid frames; the agent must survive all of it.
        seeds = [
            frame(EXEC, 9, exec_payload(["true"], cwd="/", user="0")),
            frame(PING, 0, b"p" * 8),
        ]
        for _ in range(200):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            a.send(bytes(data) + rng.randbytes(rng.randint(0, 64)))
        # Complete any frame a mutated length left open; 0xff is never a magic byte.
        a.send(b"\xff" * 70000)
        a.quiet(0.5)
        a.buf = b""
        a.pending.clear()
        a.hello(b"F" * 16)
        a.send(frame(PING, 0, b"\2" * 8))
        assert a.expect(PONG).payload == b"\2" * 8
    finally:
        status = a.close()
    assert status == 0, a.stderr
    assert "Sanitizer" not in a.stderr and "runtime error" not in a.stderr, a.stderr
