"""Connect a streaming guest process to this process's terminal or pipes.

`pump` copies stdin to the process (from a thread that waits in select(), so it never blocks
exit), its output to stdout/stderr, and terminal size changes (SIGWINCH) to RESIZE. With a
TTY, `raw_mode` hands every key to the guest: Ctrl-C travels as the byte 0x03 and the
guest's line discipline turns it into SIGINT for the foreground process there. The terminal
is restored on every way out (exceptions and SIGTERM included, via ``with``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Iterator
from typing import Any, Protocol

from .errors import Error, UsageError
from .fdio import winsize, write_all

__all__ = ["Streaming", "winsize", "require_tty", "raw_mode", "pump"]


class Streaming(Protocol):
    """What pump needs: agent.client.Process and remote.RemoteProcess both fit."""

    def write(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def resize(self, rows: int, cols: int) -> None: ...
    def __iter__(self) -> Iterator[tuple[Any, bytes]]: ...
    def wait(self) -> Any: ...


def require_tty(fd: int = 0) -> None:
    if not os.isatty(fd):
        raise UsageError("the input device is not a TTY; drop -t (use -i to pass stdin)")


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal on ``fd`` in raw mode for the block (no-op when it is not one)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def pump(proc: Streaming, *, stdin_fd: int | None, tty_fd: int | None = None,
         stdout_fd: int = 1, stderr_fd: int = 2) -> Any:
    """Run the process to its end connected to our fds; returns its wait() status.

    ``tty_fd``: the terminal whose size is followed (SIGWINCH -> resize), if any.
    """
    from .runtime.threads import ThreadGroup

    winch_r, winch_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    old_handler = None
    if tty_fd is not None and threading.current_thread() is threading.main_thread():
        def on_winch(_signo: int, _frame: object) -> None:
            with contextlib.suppress(OSError):  # only async-signal-safe work here
                os.write(winch_w, b"w")
        old_handler = signal.signal(signal.SIGWINCH, on_winch)
    try:
        with ThreadGroup("terminal") as threads:  # stops and joins the feeder on the way out
            threads.start(_feed, proc, stdin_fd, tty_fd, winch_r, threads.stop_event(),
                          name="stdin")
            out = {2: stderr_fd}
            for stream, data in proc:
                write_all(out.get(int(stream), stdout_fd), data)
            return proc.wait()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGWINCH, old_handler)
        for fd in (winch_r, winch_w):
            os.close(fd)


def _feed(proc: Streaming, stdin_fd: int | None, tty_fd: int | None, winch_r: int,
          stop) -> None:
    stop_r = stop.fileno()
    watch = [stop_r, winch_r] + ([stdin_fd] if stdin_fd is not None else [])
    try:
        while True:
            ready, _, _ = select.select(watch, [], [])
            if stop_r in ready:
                return
            if winch_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(winch_r, 64)
                size = winsize(tty_fd) if tty_fd is not None else None
                if size:
                    proc.resize(*size)
            if stdin_fd is not None and stdin_fd in ready:
                data = os.read(stdin_fd, 65536)
                if data:
                    proc.write(data)
                else:
                    proc.close_stdin()
                    watch.remove(stdin_fd)
    except (Error, OSError, ValueError):
        return  # the process ended or the connection closed: output side reports it
