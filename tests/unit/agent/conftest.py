"""Fixtures for the agent client tests: the real guest init, and a scripted fake guest."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from supermachine.agent import protocol as p
from supermachine.agent.client import AgentClient

INIT_DIR = Path(__file__).resolve().parents[3] / "src" / "supermachine" / "guest" / "init"
_HDR = struct.Struct("<HBBII")


# --------------------------------------------------------------------------- real guest


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (sessions run in their own groups)."""
    pids, todo = [], [pid]
    while todo:
        cur = todo.pop()
        pids.append(cur)
        todo += _children(cur)
    for cur in pids:
        try:
            os.kill(cur, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def sm_init() -> Path:
    """Build the real guest init (``make``); the tests below run it as a host process."""
    subprocess.run(["make", "-s", "-C", str(INIT_DIR)], check=True, timeout=240)
    binary = INIT_DIR / "sm-init"
    assert binary.is_file()
    return binary


class RealGuest:
    def __init__(self, binary: Path) -> None:
        host, guest = socket.socketpair()
        self.proc = subprocess.Popen(
            [str(binary), "--agent-fd", str(guest.fileno())], pass_fds=[guest.fileno()]
        )
        guest.close()
        self.client = AgentClient(host)

    def close(self) -> None:
        self.client.close()
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=10)


@pytest.fixture
def real(sm_init: Path) -> Iterator[RealGuest]:
    g = RealGuest(sm_init)
    try:
        g.client.hello(timeout=10)
        yield g
    finally:
        g.close()


@pytest.fixture
def agent(real: RealGuest) -> AgentClient:
    return real.client


# --------------------------------------------------------------------------- fake guest


class FakeGuest:
    """The guest end of a socketpair, scripted by a test (for failure injection only)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.buf = b""

    def read_frame(self) -> tuple[int, int, int, bytes]:
        """(type, stream, channel, payload) of the next host frame."""
        while True:
            if len(self.buf) >= 12:
                magic, ftype, stream, channel, n = _HDR.unpack_from(self.buf)
                assert magic == p.MAGIC
                if len(self.buf) >= 12 + n:
                    payload = self.buf[12 : 12 + n]
                    self.buf = self.buf[12 + n :]
                    return ftype, stream, channel, payload
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("host closed")
            self.buf += data

    def expect(self, ftype: int) -> tuple[int, int, int, bytes]:
        frame = self.read_frame()
        assert frame[0] == ftype, f"expected {p.FrameType(ftype).name}, got {frame}"
        return frame

    def handshake(self) -> None:
        _, _, _, payload = self.expect(p.FrameType.HELLO)
        self.send(p.encode_guest_hello(payload[4:20]))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class FakePair:
    def __init__(self, **client_kwargs: object) -> None:
        host, guest = socket.socketpair()
        self.client = AgentClient(host, **client_kwargs)  # type: ignore[arg-type]
        self.guest = FakeGuest(guest)
        self.pool = ThreadPoolExecutor(4)

    def connect(self) -> None:
        fut = self.pool.submit(self.client.hello, 5)
        self.guest.handshake()
        fut.result(timeout=5)

    def close(self) -> None:
        self.client.close()
        self.guest.sock.close()
        self.pool.shutdown(wait=True)


@pytest.fixture
def fake() -> Iterator[FakePair]:
    pair = FakePair()
    try:
        pair.connect()
        yield pair
    finally:
        pair.close()
