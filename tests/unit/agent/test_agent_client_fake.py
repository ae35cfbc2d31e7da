"""AgentClient against a scripted fake guest over a socketpair.

Only for failures the real guest init cannot be made to produce on demand: a guest that
dies or goes silent mid-call, hostile or window-violating frames, a guest-side reset, the
VM owner declaring the VM dead, and the exact CREDIT frames the client emits. Real
behaviour is tested against the real init in test_agent_client_real.py.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from conftest import FakePair
from supermachine.agent import protocol as p
from supermachine.agent.client import AgentClient
from supermachine.agent.protocol import FrameType, Stream
from supermachine.errors import AgentError, ProtocolError


def start_exec(pair: FakePair, argv=("prog",), **kw):
    fut = pair.pool.submit(pair.client.exec, list(argv), **kw)
    _, _, channel, _ = pair.guest.expect(FrameType.EXEC)
    return fut, channel


def out(channel: int, data: bytes, stream: int = Stream.STDOUT) -> bytes:
    return p.encode_frame(FrameType.DATA, channel, data, stream)


def test_exec_happy_path_over_fake(fake):
    fut, ch = start_exec(fake)
    fake.guest.send(
        p.encode_started(ch, 7)
        + out(ch, b"hi\n")
        + out(ch, b"oops", Stream.STDERR)
        + p.encode_eof(ch, Stream.STDOUT)
        + p.encode_eof(ch, Stream.STDERR)
        + p.encode_exit(ch, p.ExitKind.SIGNALED, 15)
    )
    r = fut.result(timeout=5)
    assert (r.exit_code, r.signal, r.stdout, r.stderr) == (143, 15, b"hi\n", b"oops")


def test_guest_dies_mid_exec_raises_promptly(fake):
    fut, ch = start_exec(fake)
    fake.guest.send(p.encode_started(ch, 7) + out(ch, b"partial"))
    fake.guest.sock.close()
    with pytest.raises(AgentError, match="VM exited"):  # raised, not a hang (TimeoutError)
        fut.result(timeout=5)
    with pytest.raises(AgentError):  # the client stays failed
        fake.client.exec(["again"])


def test_silent_guest_is_declared_dead():
    pair = FakePair(keepalive=0.2, dead_after=0.5)
    try:
        pair.connect()
        fut, ch = start_exec(pair)
        pair.guest.send(p.encode_started(ch, 7))
        pair.guest.expect(FrameType.PING)  # the client noticed the silence
        with pytest.raises(AgentError, match="stopped responding"):
            fut.result(timeout=5)
    finally:
        pair.close()


def test_slow_but_alive_guest_is_not_declared_dead():
    pair = FakePair(keepalive=0.1, dead_after=1.0)  # slack for a loaded 2-core machine
    try:
        pair.connect()
        fut, ch = start_exec(pair)
        pair.guest.send(p.encode_started(ch, 7))
        end = time.monotonic() + 1.5
        pings = 0
        while time.monotonic() < end:
            ftype, _, _, payload = pair.guest.expect(FrameType.PING)
            pair.guest.send(p.encode_frame(FrameType.PONG, 0, payload))
            pings += 1
        pair.guest.send(p.encode_exit(ch, 0, 0))
        assert fut.result(timeout=5).exit_code == 0
        assert pings >= 3
    finally:
        pair.close()


def test_output_beyond_the_window_is_a_protocol_error(fake):
    proc = fake.client.spawn(["gen"])  # nobody reads its output, so no CREDIT is granted
    _, _, ch, _ = fake.guest.expect(FrameType.EXEC)
    waiter = fake.pool.submit(fake.client.ping, 5)
    fake.guest.expect(FrameType.PING)
    chunk = b"x" * p.MAX_PAYLOAD
    burst = b"".join(out(ch, chunk, Stream.STDERR) for _ in range(4)) + out(ch, b"!", 2)
    fake.guest.send(p.encode_started(ch, 1) + burst)
    with pytest.raises(ProtocolError, match="overran"):
        waiter.result(timeout=5)
    with pytest.raises(ProtocolError):
        proc.recv(timeout=5)


@pytest.mark.parametrize(
    "frame",
    [
        p.encode_started(999, 1),  # unknown session
        p.encode_frame(FrameType.SIGNAL, 1, b"\x09\0\0\0"),  # host-only type
        b"\x00" * 12,  # bad magic
        p.encode_exit(1, 7, 0),  # unknown exit kind
    ],
)
def test_hostile_frames_fail_every_waiter(fake, frame):
    fut, ch = start_exec(fake)
    assert ch == 1
    pong = fake.pool.submit(fake.client.ping, 5)
    fake.guest.expect(FrameType.PING)
    fake.guest.send(frame)
    for f in (fut, pong):
        with pytest.raises(ProtocolError):
            f.result(timeout=5)


def test_guest_reset_message_reaches_the_caller(fake):
    fut, ch = start_exec(fake)
    fake.guest.send(p.encode_error(0, b"unknown EXEC tag 99"))
    with pytest.raises(AgentError, match="unknown EXEC tag 99"):
        fut.result(timeout=5)


def test_fail_hook_wakes_all_waiters(fake):
    futs = [start_exec(fake, (f"p{i}",))[0] for i in range(3)]
    fake.client.fail("the VM exited with status 1; see its console")
    for f in futs:
        with pytest.raises(AgentError, match="exited with status 1"):
            f.result(timeout=2)


def test_close_wakes_waiters(fake):
    fut, _ = start_exec(fake)
    fake.client.close()
    with pytest.raises(AgentError, match="closed"):
        fut.result(timeout=5)


def test_hello_timeout_on_a_guest_that_never_answers():
    pair = FakePair()
    try:
        with pytest.raises(AgentError, match="did not answer within 0.3s"):
            pair.client.hello(0.3)
    finally:
        pair.close()


def test_hello_skips_a_stale_tail_and_sends_setup():
    pair = FakePair()
    try:
        fut = pair.pool.submit(pair.client.hello, 5, time_ns=5, hostname="box")
        _, _, _, payload = pair.guest.expect(FrameType.HELLO)
        assert payload[20:] == (struct.pack("<HIQ", 1, 8, 5) + struct.pack("<HI", 3, 3) + b"box")
        stale = p.encode_started(4, 1) + out(4, b"old output") + b"\x53\x4d\x01"
        pair.guest.send(stale + p.encode_guest_hello(payload[4:20]))
        fut.result(timeout=5)
        assert pair.client.ready
    finally:
        pair.close()


def test_guest_ping_is_answered(fake):
    fake.guest.send(p.encode_frame(FrameType.PING, 0, struct.pack("<Q", 99)))
    assert fake.guest.expect(FrameType.PONG)[3] == struct.pack("<Q", 99)


def test_credit_is_returned_only_as_output_is_consumed(fake):
    """Exact CREDIT frames: nothing until the user reads, then what was read."""
    proc = fake.client.spawn(["gen"])
    _, _, ch, _ = fake.guest.expect(FrameType.EXEC)
    chunk = b"d" * p.MAX_PAYLOAD
    fake.guest.send(p.encode_started(ch, 1) + b"".join(out(ch, chunk) for _ in range(4)))
    fake.guest.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        fake.guest.read_frame()  # window used up, nothing read: no CREDIT
    fake.guest.sock.settimeout(5)
    got = proc.recv(timeout=5)
    assert got == (Stream.STDOUT, chunk)
    _, stream, cch, payload = fake.guest.expect(FrameType.CREDIT)
    assert (stream, cch, struct.unpack("<I", payload)[0]) == (Stream.STDOUT, ch, p.MAX_PAYLOAD)
    fake.guest.send(out(ch, chunk))  # exactly the credited amount is now allowed
    for _ in range(4):
        assert proc.recv(timeout=5) == (Stream.STDOUT, chunk)
    fake.guest.send(p.encode_eof(ch, 1) + p.encode_eof(ch, 2) + p.encode_exit(ch, 0, 3))
    assert proc.recv(timeout=5) is None
    assert proc.wait(timeout=5).exit_code == 3


def test_stdin_write_blocks_on_the_guest_window(fake):
    proc = fake.client.spawn(["cat"], stdin=True)
    _, _, ch, _ = fake.guest.expect(FrameType.EXEC)
    fake.guest.send(p.encode_started(ch, 1))
    fut = fake.pool.submit(proc.write, b"i" * (p.INITIAL_WINDOW + 10))
    received = 0
    while received < p.INITIAL_WINDOW:
        _, stream, _, payload = fake.guest.expect(FrameType.DATA)
        assert stream == Stream.STDIN
        received += len(payload)
    assert received == p.INITIAL_WINDOW
    time.sleep(0.2)
    assert not fut.done()  # blocked: window exhausted
    fake.guest.send(p.encode_frame(FrameType.CREDIT, ch, struct.pack("<I", 10), Stream.STDIN))
    assert len(fake.guest.expect(FrameType.DATA)[3]) == 10
    fut.result(timeout=5)
    proc.close_stdin()
    fake.guest.expect(FrameType.EOF)
    fake.guest.send(p.encode_exit(ch, 0, 0))
    assert proc.wait(timeout=5).exit_code == 0


def test_exit_codes_for_start_failures(fake):
    for err, message, code in [(2, b"sh: not found", 127), (13, b"permission denied", 126)]:
        fut, ch = start_exec(fake)
        fake.guest.send(p.encode_exit(ch, p.ExitKind.START_FAILED, err, message))
        r = fut.result(timeout=5)
        assert (r.exit_code, r.error, r.stdout) == (code, message.decode(), b"")


def test_client_requires_hello_first():
    pair = FakePair()
    try:
        with pytest.raises(AgentError, match="hello"):
            pair.client.exec(["true"])
    finally:
        pair.close()


def test_context_manager_closes_socket():
    import socket

    a, b = socket.socketpair()
    with AgentClient(a):
        pass
    assert a.fileno() == -1
    b.close()


def test_ping_flood_without_reading_is_a_protocol_error(fake):
    """A guest that pings but never reads would grow the PONG queue without bound."""
    fake.guest.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    waiter = fake.pool.submit(fake.client.ping, 10)
    ping = p.encode_frame(FrameType.PING, 0, struct.pack("<Q", 1))
    try:
        for _ in range(200):
            fake.guest.send(ping * 1000)
    except OSError:
        pass  # the client dropped the connection
    with pytest.raises(ProtocolError, match="without reading"):
        waiter.result(timeout=10)
