"""AgentClient against the real guest init, run as a host process (`sm-init --agent-fd N`).

These processes run on the host, so the tests never send HELLO setup fields (they would
set the host's clock and hostname) nor SHUTDOWN.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import kill_tree
from supermachine.agent import protocol as p
from supermachine.agent.client import ExecResult, GuestFileError
from supermachine.agent.protocol import Stream
from supermachine.errors import AgentError, ExecTimeout


def test_echo(agent):
    r = agent.exec(["echo", "hello", "world"])
    assert r == ExecResult(0, b"hello world\n", b"")
    assert r.ok


def test_exit_codes_and_stderr(agent):
    r = agent.exec(["sh", "-c", "echo out; echo err >&2; exit 42"])
    assert (r.exit_code, r.stdout, r.stderr, r.signal) == (42, b"out\n", b"err\n", None)


def test_signal_death_is_128_plus_n(agent):
    r = agent.exec(["sh", "-c", "kill -9 $$"])
    assert (r.exit_code, r.signal) == (137, 9)


def test_not_found_is_127_with_message(agent):
    r = agent.exec(["/no/such/program"])
    assert r.exit_code == 127
    assert r.error  # the guest's message, for the CLI to print
    r = agent.exec(["no-such-program-in-path"])
    assert r.exit_code == 127


def test_not_executable_is_126(agent, tmp_path):
    script = tmp_path / "script"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    assert agent.exec([str(script)]).exit_code == 126


def test_env_and_cwd(agent, tmp_path):
    r = agent.exec(["sh", "-c", "echo $FOO; pwd"], env={"FOO": "bar"}, cwd=str(tmp_path / "new"))
    assert r.stdout == f"bar\n{tmp_path / 'new'}\n".encode()


def test_stdin_larger_than_the_window(agent):
    data = os.urandom(3 * p.INITIAL_WINDOW + 123)
    r = agent.exec(["cat"], stdin=data)
    assert r.exit_code == 0
    assert r.stdout == data


def test_stdin_ignored_by_the_process(agent):
    r = agent.exec(["true"], stdin=b"x" * (2 * p.INITIAL_WINDOW))
    assert r.exit_code == 0


def test_concurrent_execs(agent):
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: agent.exec(["sh", "-c", f"sleep 0.1; echo {i}"]), range(16))
        )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(16)]


def test_large_output_is_streamed_with_bounded_buffering(agent):
    size = 12 * 1024 * 1024
    with agent.spawn(["head", "-c", str(size), "/dev/zero"]) as proc:
        total = 0
        peak = 0
        for stream, chunk in proc:
            assert stream == Stream.STDOUT
            total += len(chunk)
            peak = max(peak, sum(len(c) for _, c in proc._s.chunks))
            assert chunk.count(0) == len(chunk)
        assert proc.wait(timeout=30).exit_code == 0
    assert total == size
    assert peak <= p.INITIAL_WINDOW


def test_slow_reader_does_not_stall_another_session(agent):
    with agent.spawn(["sh", "-c", "yes flood"]) as flood:
        # Let the flood fill its window; nobody reads it.
        first = flood.recv(timeout=10)
        assert first is not None
        time.sleep(0.3)
        # A stall would hang here (until pytest's timeout), so no time bound is needed.
        assert agent.exec(["echo", "quick"]).stdout == b"quick\n"
        assert sum(len(c) for _, c in flood._s.chunks) <= p.INITIAL_WINDOW


def test_timeout_kills_and_keeps_partial_output(agent):
    # The command never ends by itself: only the timeout's kill ends the call.
    with pytest.raises(ExecTimeout) as info:
        agent.exec(["sh", "-c", "echo partial; echo $$ >&2; exec sleep 100000"], timeout=1.0)
    assert info.value.stdout == b"partial\n"
    wait_gone(int(info.value.stderr))
    # The session was cleaned up: the agent still works.
    assert agent.exec(["true"]).exit_code == 0


def test_spawn_signal_and_wait(agent):
    with agent.spawn(["sleep", "30"]) as proc:
        deadline = time.monotonic() + 5
        while proc.pid is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.pid and proc.pid > 0
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=5)
    assert (status.exit_code, status.signal) == (143, 15)


def test_interactive_stdin_stdout(agent):
    with agent.spawn(["cat"], stdin=True) as proc:
        proc.write(b"ping\n")
        assert proc.recv(timeout=5) == (Stream.STDOUT, b"ping\n")
        proc.write(b"pong\n")
        assert proc.recv(timeout=5) == (Stream.STDOUT, b"pong\n")
        proc.close_stdin()
        assert proc.recv(timeout=5) is None
        assert proc.wait(timeout=5).exit_code == 0


def test_tty_and_resize(agent):
    with agent.spawn(
        ["sh", "-c", "stty size; read x; stty size"], stdin=True, tty=True, winsize=(33, 77)
    ) as proc:
        buf = b""
        while b"33 77" not in buf:
            buf += proc.recv(timeout=5)[1]
        proc.resize(40, 100)
        proc.write(b"\n")
        while b"40 100" not in buf:
            chunk = proc.recv(timeout=5)
            assert chunk is not None, buf
            buf += chunk[1]
        assert proc.wait(timeout=5).exit_code == 0


def wait_gone(pid: int) -> None:
    """Wait until a process of the (host-run) guest has died (gone, or a zombie not yet
    reaped); one that is never killed hangs here until pytest's timeout."""
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)


def test_close_kills_a_running_process(agent):
    proc = agent.spawn(["sleep", "100000"])  # never ends by itself
    while proc.pid is None:
        time.sleep(0.01)
    pid = proc.pid
    proc.close()
    assert proc.exit_status is not None and proc.exit_status.signal == signal.SIGKILL
    wait_gone(pid)
    assert agent.exec(["true"]).ok


def test_file_round_trip_binary_safe(agent, tmp_path):
    data = bytes(range(256)) * 2000 + b"\0\r\n"  # 512 KB: spans several windows
    target = tmp_path / "sub" / "file.bin"
    (tmp_path / "sub").mkdir()
    agent.write_file(str(target), data, mode=0o600)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert agent.read_file(str(target)) == data
    agent.write_file(str(target), b"short")  # truncates
    assert agent.read_file(str(target)) == b"short"


def test_file_streaming_variants(agent, tmp_path):
    import io

    src = io.BytesIO(os.urandom(300_000))
    n = agent.write_file_from(str(tmp_path / "f"), src)
    assert n == 300_000
    dst = io.BytesIO()
    assert agent.read_file_to(str(tmp_path / "f"), dst) == 300_000
    assert dst.getvalue() == src.getvalue()


def test_file_errors(agent, tmp_path):
    with pytest.raises(GuestFileError) as info:
        agent.read_file(str(tmp_path / "missing"))
    assert info.value.errno == 2
    with pytest.raises(GuestFileError):
        agent.write_file(str(tmp_path / "no" / "dir" / "f"), b"x")
    (tmp_path / "big").write_bytes(b"b" * 1000)
    with pytest.raises(GuestFileError, match="larger than 999"):
        agent.read_file(str(tmp_path / "big"), max_size=999)
    assert agent.exec(["true"]).ok  # the agent is still usable


def test_ping(agent):
    assert 0 <= agent.ping(timeout=5) < 5


def test_guest_killed_mid_exec_is_a_clear_error(real):
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            real.client.exec(["sleep", "30"])
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    kill_tree(real.proc.pid)  # sm-init and its sleep, so nothing is left behind
    t.join(timeout=5)
    assert not t.is_alive()
    assert isinstance(result[0], AgentError)
    assert "VM exited" in str(result[0])
