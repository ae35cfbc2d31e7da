"""sm-init's agent protocol in host mode (sm-init --agent-fd) against raw frames."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import struct
import time
from collections.abc import Iterator

import pytest
from test_init_support import (
    CLOSE,
    CREDIT,
    DATA,
    EOF,
    F_KEEP,
    F_STDIN,
    F_TTY,
    HELLO,
    INITIAL_WINDOW,
    PING,
    PONG,
    RESIZE,
    SHUTDOWN,
    SIGNAL,
    STARTED,
    Agent,
    alive,
    children,
    frame,
    tlv,
)


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent()
    a.hello()
    yield a
    a.close()


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.01)
    return False


def test_handshake_echoes_nonce_and_answers_ping() -> None:
    a = Agent()
    try:
        nonce = os.urandom(16)
        # Setup fields are validated (and only applied inside a VM).
        setup = tlv(1, struct.pack("<Q", time.time_ns())) + tlv(2, os.urandom(32))
        setup += tlv(3, b"box") + tlv(4, os.urandom(16).hex().encode())
        a.hello(nonce, setup)
        a.send(frame(PING, 0, struct.pack("<Q", 0xDEADBEEF12345678)))
        assert a.expect(PONG).payload == struct.pack("<Q", 0xDEADBEEF12345678)
    finally:
        assert a.close() == 0


def test_frames_before_hello_are_ignored() -> None:
    a = Agent()
    try:
        a.send(frame(PING, 0, b"\0" * 8) + b"junk")
        a.hello()
        a.send(frame(PING, 0, b"\1" * 8))
        assert a.expect(PONG).payload == b"\1" * 8
    finally:
        a.close()


def test_exec_stdout_stderr_and_exit_code(agent: Agent) -> None:
    r = agent.run(1, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert r.started and r.started > 0
    assert (r.stdout, r.stderr, r.kind, r.code, r.message) == (b"out\n", b"err\n", 0, 7, "")
    assert sorted(r.eofs) == [1, 2]


def test_signal_death_reports_kind_1(agent: Agent) -> None:
    r = agent.run(1, ["sh", "-c", "kill -USR1 $$"])
    assert (r.kind, r.code) == (1, signal.SIGUSR1)


def test_not_found_reports_kind_2_enoent(agent: Agent) -> None:
    r = agent.run(1, ["no-such-program-xyz"])
    assert r.started is None
    assert (r.kind, r.code) == (2, errno.ENOENT)
    assert r.message == "exec: no-such-program-xyz: not found"
    r = agent.run(2, ["/nonexistent/prog"])
    assert (r.kind, r.code) == (2, errno.ENOENT)


def test_not_executable_reports_eacces(agent: Agent, tmp_path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = agent.run(1, [str(script)])
    assert (r.kind, r.code) == (2, errno.EACCES)


def test_path_search_uses_session_env(agent: Agent, tmp_path) -> None:
    prog = tmp_path / "myprog"
    prog.write_text('#!/bin/sh\necho found "$@"\n')
    prog.chmod(0o755)
    r = agent.run(1, ["myprog", "a"], env=[f"PATH=/nonexistent:{tmp_path}"])
    assert (r.stdout, r.kind, r.code) == (b"found a\n", 0, 0)
    r = agent.run(2, ["myprog"], env=["PATH=/nonexistent"])
    assert (r.kind, r.code) == (2, errno.ENOENT)


def test_env_is_exactly_the_sessions_plus_home(agent: Agent) -> None:
    r = agent.run(1, ["/usr/bin/env"], env=["A=1", "B=x=y"])
    lines = sorted(r.stdout.decode().splitlines())
    assert lines[:2] == ["A=1", "B=x=y"] and lines[2].startswith("HOME=")
    assert len(lines) == 3
    r = agent.run(2, ["/usr/bin/env"], env=["HOME=/custom"])
    assert r.stdout == b"HOME=/custom\n"


def test_stdin_is_piped_with_credit_flow(agent: Agent) -> None:
    data = os.urandom(INITIAL_WINDOW * 3 + 123)
    agent.exec(1, ["sha256sum"], flags=F_STDIN)
    window, sent, credited = INITIAL_WINDOW, 0, 0
    while sent < len(data):
        if window == 0:
            f = agent.expect(CREDIT)
            assert (f.channel, f.stream) == (1, 0)
            (n,) = struct.unpack("<I", f.payload)
            window += n
            credited += n
            continue
        chunk = data[sent : sent + min(window, 65536)]
        agent.send(frame(DATA, 1, chunk))
        sent += len(chunk)
        window -= len(chunk)
    agent.send(frame(EOF, 1))
    r = agent.wait(1)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert credited >= len(data) - INITIAL_WINDOW


def test_stdin_without_flag_is_dev_null(agent: Agent) -> None:
    r = agent.run(1, ["cat"])
    assert (r.stdout, r.kind, r.code) == (b"", 0, 0)


def test_stdin_after_process_closed_it_is_credited_back(agent: Agent) -> None:
    agent.exec(1, ["sh", "-c", "exec 0<&-; sleep 0.2; echo done"], flags=F_STDIN)
    agent.expect(STARTED)
    time.sleep(0.05)
    agent.stdin(1, b"x" * 1000)
    r = agent.wait(1)
    assert (r.stdout, r.kind, r.code) == (b"done\n", 0, 0)


def test_credit_window_stalls_one_session_not_others(agent: Agent) -> None:
    total = INITIAL_WINDOW * 2 + 5000
    agent.exec(1, ["head", "-c", str(total), "/dev/zero"])
    # Nothing is credited for session 1: it must stop at exactly one window.
    got = 0
    deadline = time.monotonic() + 5
    while got < INITIAL_WINDOW and time.monotonic() < deadline:
        f = agent.recv()
        if f.type == DATA:
            assert f.channel == 1
            got += len(f.payload)
    assert got == INITIAL_WINDOW
    r = agent.run(2, ["echo", "other"])  # flows while session 1 is stalled
    assert (r.stdout, r.code) == (b"other\n", 0)
    assert all(f.type != DATA or f.channel != 1 for f in agent.quiet(0.3))
    # Granting credit resumes it.
    agent.send(frame(CREDIT, 1, struct.pack("<I", INITIAL_WINDOW), stream=1))
    r1 = agent.wait(1)
    assert len(r1.stdout) + got == total and r1.code == 0


def test_close_kills_and_still_sends_exit(agent: Agent) -> None:
    agent.exec(1, ["sleep", "100"])
    pid = struct.unpack("<I", agent.expect(STARTED).payload)[0]
    agent.send(frame(CLOSE, 1))
    r = agent.wait(1)
    assert (r.kind, r.code) == (1, signal.SIGKILL)
    assert wait_gone(pid)


def test_close_discards_pending_output(agent: Agent) -> None:
    agent.exec(1, ["sh", "-c", "yes | head -c 2000000; sleep 100"])
    agent.expect(STARTED)
    agent.send(frame(CLOSE, 1))
    r = agent.wait(1, credit=False)
    assert r.kind == 1 and len(r.stdout) <= INITIAL_WINDOW


def test_signal_frame_delivers_signal(agent: Agent) -> None:
    agent.exec(1, ["sleep", "100"])
    agent.expect(STARTED)
    agent.send(frame(SIGNAL, 1, struct.pack("<I", signal.SIGTERM)))
    r = agent.wait(1)
    assert (r.kind, r.code) == (1, signal.SIGTERM)


def test_frames_for_finished_channel_are_ignored(agent: Agent) -> None:
    r = agent.run(1, ["true"])
    assert r.code == 0
    agent.send(frame(SIGNAL, 1, struct.pack("<I", 9)) + frame(CLOSE, 1))
    agent.send(frame(CREDIT, 1, struct.pack("<I", 5), stream=1))
    agent.send(frame(PING, 0, b"\7" * 8))
    assert agent.expect(PONG).payload == b"\7" * 8


def test_file_write_then_read(agent: Agent, tmp_path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(300_000)
    agent.exec(1, [str(path)], op=2, mode=0o640, flags=F_STDIN)
    assert struct.unpack("<I", agent.expect(STARTED).payload) == (0,)
    for i in range(0, INITIAL_WINDOW, 65536):
        agent.send(frame(DATA, 1, data[i : i + 65536]))
    agent.expect(CREDIT)
    agent.send(frame(DATA, 1, data[INITIAL_WINDOW:]) + frame(EOF, 1))
    r = agent.wait(1)
    assert (r.kind, r.code) == (0, 0)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    r = agent.run(2, [str(path)], op=1)
    assert (r.started, r.kind, r.code, r.eofs) == (0, 0, 0, [1])
    assert r.stdout == data


def test_file_write_default_mode_truncates_and_chowns(agent: Agent, tmp_path) -> None:
    path = tmp_path / "g"
    path.write_bytes(b"old content that is long")
    path.chmod(0o600)
    user = f"{os.getuid()}:{os.getgid()}"
    r = agent.run(1, [str(path)], op=2, user=user, stdin=b"new")
    assert (r.kind, r.code) == (0, 0)
    assert path.read_bytes() == b"new"
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and (st.st_uid, st.st_gid) == (
        os.getuid(),
        os.getgid(),
    )


def test_file_errors_report_kind_3(agent: Agent, tmp_path) -> None:
    r = agent.run(1, [str(tmp_path / "missing")], op=1)
    assert (r.started, r.kind, r.code) == (None, 3, errno.ENOENT)
    assert "missing" in r.message
    r = agent.run(2, [str(tmp_path)], op=1)
    assert (r.kind, r.code) == (3, errno.EISDIR)
    r = agent.run(3, [str(tmp_path / "nodir" / "x")], op=2, stdin=b"")
    assert (r.kind, r.code) == (3, errno.ENOENT)
    r = agent.run(4, ["relative/path"], op=1)
    assert (r.kind, r.code) == (3, errno.EINVAL)


def test_cwd_is_created(agent: Agent, tmp_path) -> None:
    cwd = tmp_path / "a" / "b" / "c"
    r = agent.run(1, ["pwd"], cwd=str(cwd))
    assert (r.stdout, r.code) == (f"{cwd}\n".encode(), 0)
    assert cwd.is_dir() and stat.S_IMODE(cwd.stat().st_mode) == 0o755
    (tmp_path / "file").write_text("")
    r = agent.run(2, ["pwd"], cwd=str(tmp_path / "file"))
    assert (r.kind, r.code) == (3, errno.ENOTDIR)


def test_user_resolution(agent: Agent) -> None:
    uid, gid = os.getuid(), os.getgid()
    r = agent.run(1, ["sh", "-c", "id -u; id -g"], user=f"{uid}:{gid}")
    assert r.stdout == f"{uid}\n{gid}\n".encode()
    r = agent.run(2, ["true"], user="no-such-user-xyz")
    assert (r.kind, r.code) == (3, errno.ENOENT)
    assert "no-such-user-xyz" in r.message
    r = agent.run(3, ["true"], user=f"{uid}:no-such-group-xyz")
    assert (r.kind, r.code) == (3, errno.ENOENT)


def test_tty_session(agent: Agent) -> None:
    r = agent.run(1, ["sh", "-c", "tty; stty size; echo err >&2"], flags=F_TTY, winsize=(30, 100))
    out = r.stdout.replace(b"\r\n", b"\n")
    assert out.startswith(b"/dev/pts/") and b"\n30 100\nerr\n" in out
    assert (r.kind, r.code, r.stderr, r.eofs) == (0, 0, b"", [1])


def test_hello_resets_running_sessions(agent: Agent) -> None:
    agent.exec(1, ["sleep", "100"])
    pid = struct.unpack("<I", agent.expect(STARTED).payload)[0]
    agent.hello(b"N" * 16)
    assert wait_gone(pid)
    # No frame for the killed session may follow, and its id is free again.
    assert agent.quiet(0.2) == []
    r = agent.run(1, ["echo", "again"])
    assert r.stdout == b"again\n"


def test_keep_session_survives_reset_and_holds_exit() -> None:
    a = Agent()
    a.hello()
    a.exec(1, ["sh", "-c", "sleep 0.6; echo late"], flags=F_KEEP)
    pid = struct.unpack("<I", a.expect(STARTED).payload)[0]
    a.hello(b"K" * 16)
    assert alive(pid)
    assert a.quiet(0.1) == []
    # Host mode exits only once every child is gone: the KEEP session holds it.
    t0 = time.monotonic()
    assert a.close() == 0
    assert time.monotonic() - t0 > 0.3
    assert not alive(pid)


def test_no_zombies_left(agent: Agent) -> None:
    # Orphans (background grandchildren) are reparented to the subreaper and reaped too.
    for ch in range(1, 6):
        r = agent.run(ch, ["sh", "-c", "sleep 0.1 & echo $!"])
        assert r.code == 0
    time.sleep(0.4)
    assert children(agent.proc.pid) == []


def test_many_sessions_concurrently(agent: Agent) -> None:
    for ch in range(1, 41):
        agent.exec(ch, ["sh", "-c", f"echo {ch}"])
    for ch in range(1, 41):
        r = agent.wait(ch)
        assert (r.stdout, r.code) == (f"{ch}\n".encode(), 0)


def test_shutdown_exits_and_kills_everything() -> None:
    a = Agent()
    a.hello()
    a.exec(1, ["sleep", "100"], flags=F_KEEP)
    pid = struct.unpack("<I", a.expect(STARTED).payload)[0]
    a.send(frame(SHUTDOWN))
    assert a.proc.wait(timeout=5) == 0
    assert wait_gone(pid)
    a.close()


def test_exits_on_eof_and_kills_sessions() -> None:
    a = Agent()
    a.hello()
    a.exec(1, ["sleep", "100"])
    pid = struct.unpack("<I", a.expect(STARTED).payload)[0]
    assert a.close() == 0
    assert wait_gone(pid)


def test_hello_reply_only_once_ready() -> None:
    a = Agent()
    try:
        a.send(frame(HELLO, 0, struct.pack("<I", 1) + b"A" * 16))
        f = a.recv()
        assert (f.type, f.payload) == (HELLO, struct.pack("<I", 1) + b"A" * 16)
        assert f.channel == 0 and f.stream == 0
        r = a.run(1, ["true"])
        assert r.code == 0 and r.kind == 0
    finally:
        a.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_outbound_buffer_is_bounded_when_host_is_slow(agent: Agent) -> None:
    # 16 sessions x one 256 KiB window = 4 MiB the guest could buffer if it read every pipe
    # with credit; it must stop reading while the buffer to a host that does not read is full.
    base = rss_kib(agent.proc.pid)
    n = 16
    for ch in range(1, n + 1):
        agent.exec(ch, ["head", "-c", "600000", "/dev/zero"])
    time.sleep(1.0)
    grown = rss_kib(agent.proc.pid) - base
    assert grown < 1536, f"sm-init grew by {grown} KiB"
    for ch in range(1, n + 1):
        r = agent.wait(ch, timeout=30)
        assert (len(r.stdout), r.code) == (600000, 0)


def test_tty_stdin_and_resize(agent: Agent) -> None:
    agent.exec(1, ["sh", "-c", "read x; stty size; echo got $x"], flags=F_TTY | F_STDIN)
    agent.expect(STARTED)
    agent.send(frame(RESIZE, 1, struct.pack("<HH", 40, 120)))
    agent.stdin(1, b"hello\n")  # EOF on a pty is ignored: the process ends by itself
    r = agent.wait(1)
    out = r.stdout.replace(b"\r\n", b"\n")
    assert b"40 120\ngot hello\n" in out and (r.kind, r.code) == (0, 0)
