"""Interactive TTY sessions through a real pseudo-terminal: `run -it` and `exec -it`.

The CLI runs with a pty as its stdin/stdout/stderr, as under a terminal emulator; the test
types into the master side like a user: Enter is "\\r", Ctrl-C is the byte 0x03.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from tests.e2e.conftest import CLI, run_cli, vm_name

pytestmark = pytest.mark.e2e


class Terminal:
    """The CLI on the slave side of a fresh pty; we are the user on the master side."""

    def __init__(self, home, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.master, slave = os.openpty()
        self.set_size(rows, cols, fd=slave)
        self.saved = termios.tcgetattr(slave)
        self.slave = slave
        self.proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=slave, stderr=slave,
                                     env={**os.environ, "SUPERMACHINE_HOME": str(home)},
                                     start_new_session=True)
        self.seen = b""

    def set_size(self, rows: int, cols: int, fd: int | None = None) -> None:
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ,
                    struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def expect(self, pattern: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while pattern not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"did not see {pattern!r}; got {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the CLI exited and closed the slave
                    chunk = b""
                assert chunk, f"terminal closed before {pattern!r}; got {self.seen[-500:]!r}"
                self.seen += chunk
        before, _, after = self.seen.partition(pattern)
        self.seen = after
        return before

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_run_it_types_interrupts_and_exits_with_the_shells_status(home, busybox):
    term = Terminal(home, "run", "-it", str(busybox), "sh")
    try:
        term.expect(b"# ")
        term.type(b"echo hi$((1+1))\r")
        term.expect(b"hi2\r\n")
        term.type(b"sleep 30; echo not-interrupted\r")
        time.sleep(1.0)
        term.type(b"\x03")  # Ctrl-C: a byte to the guest's terminal, SIGINT for sleep there
        term.type(b"echo after-$((6*7))\r")
        before = term.expect(b"after-42")
        # Had the sleep not been interrupted, it would have printed this first.
        assert b"\nnot-interrupted" not in before  # only the echo of what was typed
        term.type(b"exit 3\r")
        assert term.wait() == 3
        # The host terminal is back in its original mode.
        assert termios.tcgetattr(term.slave) == term.saved
    finally:
        term.close()


def test_exec_it_follows_the_window_size(home, busybox):
    name = vm_name("e2e-tty")
    r = run_cli(home, "run", "-d", "--name", name, str(busybox), "sleep", "1000")
    assert r.returncode == 0, r.stderr
    try:
        term = Terminal(home, "exec", "-it", "-e", "PS1=tty$ ", name, "sh", rows=30, cols=100)
        try:
            term.expect(b"tty$ ")
            term.type(b"stty size; tty\r")
            term.expect(b"30 100\r\n/dev/pts/")
            term.set_size(50, 132)
            os.kill(term.proc.pid, signal.SIGWINCH)  # what the terminal does on a resize
            time.sleep(0.5)
            term.type(b"stty size\r")
            term.expect(b"50 132\r\n")
            term.type(b"exit 4\r")
            assert term.wait() == 4
            assert termios.tcgetattr(term.slave) == term.saved
        finally:
            term.close()
    finally:
        assert run_cli(home, "rm", "-f", name).returncode == 0


def test_tty_needs_a_terminal(cli, busybox):
    r = cli("run", "-t", str(busybox), "true")
    assert r.returncode == 2 and b"not a TTY" in r.stderr
