"""Small facts and writes about this process's file descriptors, with nothing heavier than
`os`, `fcntl`, `termios` and `struct` imported: the CLI's quickest path (the service's
run client) uses them as much as the terminal pump and the in-process run do."""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may take only part of it, e.g. to a pipe)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def stdin_kind(fd: int = 0) -> str:
    """"tty" (a terminal), "pipe" (a pipe or a file: something to pass on) or "none"."""
    try:
        os.fstat(fd)
    except OSError:  # closed
        return "none"
    return "tty" if os.isatty(fd) else "pipe"


def winsize(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``, or None if it is not a terminal."""
    import fcntl
    import struct
    import termios

    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None
