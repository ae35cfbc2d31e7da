"""The CLI's way into the service: `supermachine run` handed over its run socket.

This is the quickest path in the package, so it imports almost nothing (os, sys, json,
fcntl, the C `_socket` module and the frame layer, wire.py): a `run` through a warm pool
is mostly Python's own start-up. `try_forward` sends the command line itself (plus the
caller's directory, environment and stdin kind) and the service parses it exactly as the
CLI would (cli/run.py `forwarded_run`); `run_request` sends typed specs, for a `run` whose
options the CLI has parsed already. Either way the output, the exit status, `-t`, `-i` and
Ctrl-C behave as in-process.
"""

from __future__ import annotations

import json
import os
import sys

from ..detached import wire
from ..fdio import stdin_kind, winsize, write_all

#: run's options that mean the CLI answers in-process (help is the parser's own)
_LOCAL = ("--no-service", "-h", "--help")


class _Conn(wire.FrameSocket):
    def kill_now(self) -> bool:
        """For INTERRUPTS: cut the connection; the service ends the workload and its VM."""
        return self.shutdown()

    def recv(self):
        try:
            return super().recv()
        except OSError:  # cut (Ctrl-C): as if the service had gone
            return None


def connect(directory: str):
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    path = os.path.join(directory, "run.sock")
    try:
        if len(path.encode()) < 100:
            sock.connect(path)
        else:  # beyond sun_path's 108 bytes: through the directory's descriptor
            dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/run.sock")
            finally:
                os.close(dirfd)
    except OSError:
        sock.close()
        raise
    return _Conn(sock)


def try_forward(argv: list[str]) -> int | None:
    """``supermachine run ARGV...`` through the running service of the default home, or
    None when there is none (or the command is the CLI's own): then run it in-process."""
    if any(a in _LOCAL for a in argv) or os.environ.get("SUPERMACHINE_NO_SERVICE", "") \
            not in ("", "0"):
        return None
    from ..locations import home_root
    from . import address

    service = address.find(home_root())
    if service is None:
        return None
    stdin = stdin_kind()
    env = [f"{k}={v}" for k, v in os.environ.items()]
    request = {"op": "runargs", "argv": argv, "cwd": os.getcwd(), "env": env, "stdin": stdin,
               "winsize": winsize(0) if stdin == "tty" else None}
    payload = json.dumps(request, separators=(",", ":")).encode()
    if len(payload) > wire.MAX_PAYLOAD:
        return None  # an enormous environment: the in-process path has no such limit
    try:
        conn = connect(service.directory)
    except OSError:
        return None  # going away: in-process still works
    return _finish(conn, wire.encode(wire.REQUEST, payload))


def run_request(directory: str, request: bytes, *, tty: bool, stdin: bool,
                detach: bool) -> int:
    """Send a typed `RunRequest` (already encoded) and relay its run."""
    try:
        conn = connect(directory)
    except OSError as e:
        from ..errors import UsageError

        raise UsageError(f"the service at {directory} does not answer ({e.strerror}); "
                         "use --no-service") from None
    return _finish(conn, request, (tty, stdin, detach))


def _finish(conn: _Conn, request: bytes, how: tuple[bool, bool, bool] | None = None) -> int:
    """Send ``request`` and relay the run. ``how`` (tty, stdin, detach) when the CLI parsed
    the options; else the service's STARTED frame says."""
    from ..cli.interrupts import INTERRUPTS

    try:
        with INTERRUPTS.guarding(conn):
            conn.send(request)
            return _relay(conn, how)
    finally:
        conn.close()


def _relay(conn: _Conn, how: tuple[bool, bool, bool] | None) -> int:
    from ..cli.interrupts import INTERRUPTS

    if how is None:
        frame = conn.recv()
        if frame is None or frame.kind != wire.STARTED:  # a parse error, or gone
            return _exit(_json(frame) if frame is not None else _GONE)
        answer = _json(frame)
        how = (answer.get("tty") is True, answer.get("stdin") is True,
               answer.get("detach") is True)
    tty, stdin, detach = how
    if detach:  # one EXIT frame: the VM's name, or why it did not start
        frame = conn.recv()
        return _exit(_json(frame) if frame is not None else _GONE, detached=True)
    if tty:  # the terminal pump (threads, raw mode), as in-process
        return _pump(conn, stdin)
    if stdin:
        import threading

        threading.Thread(target=_feed, args=(conn,), daemon=True).start()
    frame = conn.recv()
    while frame is not None:
        if frame.kind == wire.EXIT:
            return _exit(_json(frame))
        write_all(2 if frame.kind == wire.STDERR else 1, frame.payload)
        frame = conn.recv()
    if INTERRUPTS.exit_code is not None:
        return INTERRUPTS.exit_code
    return _exit(_GONE)


_GONE = {"code": 125, "error": "the service went away during the run"}


def _feed(conn: _Conn) -> None:
    """stdin (a pipe or file) to the workload, then EOF; ends quietly when the run does."""
    try:
        while True:
            data = os.read(0, wire.MAX_PAYLOAD)
            if not data:
                break
            conn.send(wire.encode(wire.STDIN, data))
        conn.send(wire.encode(wire.EOF))
    except OSError:
        pass


def _pump(conn: _Conn, stdin: bool) -> int:
    from .. import terminal
    from ..detached.client import RemoteProcess

    proc = RemoteProcess(conn, "the command")
    with terminal.raw_mode(0):
        status = terminal.pump(proc, stdin_fd=0 if stdin else None, tty_fd=0)
    if status.error:
        print(f"supermachine: {status.error}", file=sys.stderr)
    return status.exit_code


def _json(frame) -> dict:
    try:
        obj = json.loads(frame.payload)
    except ValueError:
        obj = None
    return obj if isinstance(obj, dict) else {"code": 125, "error": "a malformed answer"}


def _exit(obj: dict, detached: bool = False) -> int:
    code, error = obj.get("code"), obj.get("error")
    if detached and code == 0 and isinstance(obj.get("name"), str):
        print(obj["name"])
        return 0
    if isinstance(error, str) and error:
        print(f"supermachine: {error}", file=sys.stderr)
    return code if isinstance(code, int) and 0 <= code <= 255 else 125
