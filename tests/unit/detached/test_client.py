"""remote.py and terminal.pump over real socket pairs and pipes, with a scripted supervisor
on the other end: stream routing, stdin EOF, resize, exit codes and a misbehaving peer.

The supervisor is scripted because the real one runs a VM (seconds under TCG, and these are
VM-free unit tests) and cannot be made to send malformed or out-of-range frames. The real
client and supervisor are tested together end to end in tests/e2e/test_detached.py (exec
streams, stdin, exit codes, a VM dying mid-exec) and tests/e2e/test_interactive.py (resize).
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from supermachine import terminal
from supermachine.detached import protocol as c
from supermachine.detached.client import FrameSocket, RemoteProcess
from supermachine.detached.protocol import ControlError, Kind
from supermachine.errors import VMError


def _pair() -> tuple[RemoteProcess, FrameSocket]:
    a, b = socket.socketpair()
    return RemoteProcess(FrameSocket(a), "cmd"), FrameSocket(b)


def _echo_supervisor(peer: FrameSocket, seen: list[c.Frame]) -> None:
    """Echo STDIN back as STDOUT (and its length on STDERR); EXIT 3 after the EOF frame."""
    while (frame := peer.recv()) is not None:
        seen.append(frame)
        if frame.kind == Kind.STDIN:
            peer.send(c.encode(Kind.STDOUT, frame.payload))
            peer.send(c.encode(Kind.STDERR, str(len(frame.payload)).encode()))
        elif frame.kind == Kind.EOF:
            peer.send(c.encode_json(Kind.EXIT, {"code": 3, "error": "because"}))
            return


def test_pump_routes_streams_and_ends_stdin():
    proc, peer = _pair()
    seen: list[c.Frame] = []
    t = threading.Thread(target=_echo_supervisor, args=(peer, seen))
    t.start()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.write(in_w, b"hello\x00world")
    os.close(in_w)
    status = terminal.pump(proc, stdin_fd=in_r, stdout_fd=out_w, stderr_fd=err_w)
    t.join(5)
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    assert (status.exit_code, status.error) == (3, "because")
    assert os.read(out_r, 100) == b"hello\x00world"
    assert os.read(err_r, 100) == b"11"
    assert [f.kind for f in seen] == [Kind.STDIN, Kind.EOF]
    proc.close()
    peer.close()


def test_resize_and_signal_frames():
    proc, peer = _pair()
    proc.resize(33, 99)
    proc.signal(2)
    assert c.parse_resize(peer.recv()) == (33, 99)
    assert c.parse_signal(peer.recv()) == 2
    proc.close()
    peer.close()


@pytest.mark.parametrize(("reply", "error"), [
    (c.encode_json(Kind.EXIT, {"code": 300}), ControlError),  # out of range
    (c.encode_json(Kind.EXIT, {"code": True}), ControlError),
    (c.encode(Kind.EXIT, b"not json"), ControlError),
    (c.encode(Kind.RESIZE, b"\0\0\0\0"), ControlError),  # not a supervisor -> client frame
    (c.encode(Kind.STDOUT, b"abc")[:-1], ControlError),  # cut off mid-frame
    (b"", VMError),  # the supervisor went away: the VM stopped
])
def test_misbehaving_or_vanishing_supervisor(reply, error):
    proc, peer = _pair()
    peer.send(reply)
    peer.close()
    with pytest.raises(error):
        proc.wait()
    proc.close()
