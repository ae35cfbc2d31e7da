"""The process that owns one detached VM, and how the CLI starts it.

`launch` (CLI side) reserves the name, takes the VM's lock, writes the first record and
starts ``python -m supermachine.detached.supervisor`` in a new session with the lock and a
readiness pipe inherited; the supervisor forks once more (so it is no session leader and can never
gain a controlling terminal), boots the VM from its main thread (QEMU's PR_SET_PDEATHSIG is
tied to that thread, which lives as long as the VM), starts the main workload with its
output going to the log, reports "ready" (or the one-line error) through the pipe, and
serves the control socket: one thread per connection.

When the main workload exits (or `stop` ends it, or the supervisor gets SIGTERM) the VM is
destroyed and the record says "exited" with the code. If the supervisor is SIGKILLed, QEMU
dies with it and the free lock tells everyone the VM is dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import Error, VMError
from ..home import Home
from ..runtime.threads import ThreadGroup
from ..spec import VMSpec, WorkloadSpec
from . import state as detached
from .client import FrameSocket, socket_path
from .logfile import DEFAULT_MAX_BYTES, LogWriter, StderrCap
from .protocol import (
    ControlError,
    ExecRequest,
    Kind,
    ReadRequest,
    SnapshotRequest,
    StopRequest,
    WriteRequest,
    encode_data,
    encode_json,
    parse_request,
    parse_resize,
    parse_signal,
)
from .state import VMDir, VMRecord

log = logging.getLogger("supermachine.detached.supervisor")

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0  # a client must send its request this soon after connecting
STOP_KILL_GRACE = 5.0  # after SIGKILL, how long to wait for the workload before tearing down
SIGNAL_STOP_GRACE = 10.0  # SIGTERM to the supervisor: the workload's grace period


# ---- CLI side ---------------------------------------------------------------------------

def launch(home: Home, name: str | None, spec: VMSpec, workload: WorkloadSpec, *,
           verbose: bool = False, log_max_bytes: int = DEFAULT_MAX_BYTES,
           remove: bool = False) -> str:
    """Start a detached VM; returns its name once it runs, raises with the boot error.

    The VM and its workload travel to the supervisor as their specs, in state.json; its
    output log is capped at ``log_max_bytes`` (twice that on disk, see logfile.py).
    ``remove``: the VM's directory (record, log) goes when it exits (`run --rm -d`)."""
    options = {"vm": spec.to_json(), "workload": workload.to_json(), "verbose": verbose,
               "log_max_bytes": log_max_bytes, "remove": remove}
    d = detached.create(home, name)
    try:
        lock_fd = os.open(d.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        _rmtree_quiet(d)
        raise
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        d.write(VMRecord(name=d.name, id=detached.new_id(), image=spec.image, command=[],
                         created=time.time(), options=options))
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            _start_process(d, lock_fd, ready_w)
        finally:
            os.close(ready_w)
    except BaseException:
        _rmtree_quiet(d)
        raise
    finally:
        os.close(lock_fd)  # the supervisor holds the lock from here on
    # Interrupted while waiting (Ctrl-C), we leave: the supervisor finds the pipe closed
    # when it reports, and then destroys the VM and its directory itself.
    report = _read_report(ready_r)
    if report.get("ok"):
        return d.name
    # Nothing ran: free the name again, once the supervisor has let go of the directory.
    deadline = time.monotonic() + 30
    while d.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    _rmtree_quiet(d)
    err = VMError(str(report.get("error") or "the supervisor failed; see --debug"))
    code = report.get("code")
    if isinstance(code, int) and 1 <= code <= 255:
        err.exit_code = code
    raise err


def _start_process(d: VMDir, lock_fd: int, ready_w: int) -> None:
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    with open(d.supervisor_log, "ab") as errlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supermachine.detached.supervisor", str(d.path),
             str(lock_fd), str(ready_w)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
            pass_fds=(lock_fd, ready_w), start_new_session=True, cwd="/", env=env)
    proc.wait()  # the intermediate process exits as soon as it has forked the supervisor


def _read_report(fd: int) -> dict[str, object]:
    """The supervisor's one-line JSON report; EOF without one means it died."""
    data = b""
    try:
        while len(data) < 65536:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        obj = json.loads(data)
    except ValueError:
        return {"error": "the VM's supervisor died while starting; run again with --debug"}
    return obj if isinstance(obj, dict) else {"error": "the VM's supervisor misbehaved"}


def _rmtree_quiet(d: VMDir) -> None:
    import shutil

    shutil.rmtree(d.path, ignore_errors=True)


# ---- supervisor side ----------------------------------------------------------------------

class Supervisor:
    def __init__(self, d: VMDir, ready_fd: int) -> None:
        self.d = d
        self._ready_fd: int | None = ready_fd
        self._record = d.read()
        self._opts = self._record.options
        self.vm: Any = None
        self._main: Any = None  # the main workload's Process
        self._workload_done = threading.Event()
        self._done = threading.Event()  # time to tear the VM down
        self._exit: tuple[int, str | None] = (255, None)
        self._stop_signal = signal.SIGTERM
        self._listener: socket.socket | None = None
        self._conns: set[FrameSocket] = set()
        self._conns_lock = threading.Lock()
        self._threads = ThreadGroup("supervisor")
        self._signalled = False

    # -- lifecycle (main thread)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # Only a flag: Event.set() takes a lock the interrupted main thread may hold.
            signal.signal(sig, self._on_signal)
        with contextlib.suppress(Error, OSError):  # `stop` can find us while we boot
            self.d.update(supervisor_pid=os.getpid())
        try:
            self._boot()
        except Error as e:
            reported = self._report({"error": str(e), "code": e.exit_code})
            self._teardown(record=False)
            if not reported:  # else the launcher removes the directory
                _rmtree_quiet(self.d)
            return 1
        if not self._report({"ok": True}):
            log.warning("the launcher went away before the VM was ready; destroying it")
            self._teardown(record=False)
            _rmtree_quiet(self.d)
            return 1
        while not self._signalled and not self._done.wait(0.2):
            pass
        if self._signalled and not self._workload_done.is_set():
            self._stop(SIGNAL_STOP_GRACE)  # like `stop`: the workload may clean up
        self._teardown()
        if self._opts.get("remove") is True:  # run --rm -d
            _rmtree_quiet(self.d)
        return 0

    def _on_signal(self, _signo: int, _frame: object) -> None:
        self._signalled = True

    def _boot(self) -> None:
        from ..runtime.vm import VM

        o = self._opts
        spec = VMSpec.from_json(o.get("vm"))
        if spec.hostname is None:
            spec = spec.replace(hostname=self._record.name[:64])  # docker names the host too
        workload = WorkloadSpec.from_json(o.get("workload"))
        self.vm = VM(spec, home=self.d.path.parent.parent, verbose=bool(o.get("verbose")),
                     on_notice=lambda m: log.info("%s", m))
        self.vm.start()
        self._stop_signal = parse_stop_signal(self.vm.image.config.stop_signal)
        work = self.vm.workload(workload)
        self._main = self.vm.start_workload(workload)
        # Report a program that cannot start as the run's error, as `docker run -d` does.
        deadline = time.monotonic() + 30
        while self._main.pid is None and self._main.exit_status is None and \
                time.monotonic() < deadline:
            time.sleep(0.005)
        status = self._main.exit_status
        if status is not None and status.error:
            err = VMError(f"cannot start {work.argv[0]}: {status.error}")
            err.exit_code = status.exit_code
            raise err
        self._serve()
        self.d.update(status=detached.RUNNING, command=list(work.argv), started=time.time(),
                      supervisor_pid=os.getpid(), qemu_pid=self.vm.pid,
                      memory_mib=self.vm.memory_mib, cpus=self.vm.cpus,
                      ports=[str(p) for p in self.vm.ports])
        self._threads.start(self._log_workload, name="workload-log")

    def _report(self, obj: dict[str, object]) -> bool:
        """Tell the launcher how the start went; False if it is no longer listening."""
        fd, self._ready_fd = self._ready_fd, None
        if fd is None:
            return False
        try:
            os.write(fd, json.dumps(obj).encode())
            return True
        except OSError:  # EPIPE: the launcher was interrupted
            return False
        finally:
            os.close(fd)

    def _teardown(self, record: bool = True) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.d.sock.unlink()
        if self.vm is not None:
            self.vm.close()  # fails every agent waiter: exec handlers end promptly
        with self._conns_lock:
            for conn in list(self._conns):
                conn.close()
        self._threads.join(timeout=2.0)
        if not record:
            return
        if not self._workload_done.is_set():
            self._exit = (128 + signal.SIGKILL, "the VM was stopped")
        code, error = self._exit
        with contextlib.suppress(Error, OSError):
            self.d.update(status=detached.EXITED, exit_code=code, error=error,
                          finished=time.time(), qemu_pid=None)

    # -- the main workload

    def _log_workload(self) -> None:
        code, error = 255, None
        try:
            cap = self._opts.get("log_max_bytes")
            f = LogWriter(self.d.log, cap if isinstance(cap, int) else DEFAULT_MAX_BYTES)
        except OSError as e:
            log.warning("cannot open the log: %s", e)
            f = None
        try:
            for stream, data in self._main:
                if f is not None:
                    try:
                        f.write(encode_data(Kind.STDERR if stream == 2 else Kind.STDOUT, data))
                    except OSError as e:  # e.g. disk full: keep draining, stop logging
                        log.warning("cannot write the log: %s", e)
                        f.close()
                        f = None
            status = self._main.wait()
            code, error = status.exit_code, status.error
        except Error as e:
            error = str(e)
        finally:
            if f is not None:
                f.close()
        self._exit = (code, error)
        self._workload_done.set()
        self._done.set()

    def _stop(self, timeout: float) -> None:
        with contextlib.suppress(Error):
            self._main.signal(self._stop_signal)
        if not self._workload_done.wait(timeout):
            with contextlib.suppress(Error):
                self._main.kill()
            self._workload_done.wait(STOP_KILL_GRACE)
        self._done.set()

    # -- the control socket

    def _serve(self) -> None:
        dirfd = os.open(self.d.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.d.sock.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.bind(socket_path(dirfd))
        finally:
            os.close(dirfd)
        os.chmod(self.d.sock, 0o600)
        sock.listen(16)
        self._listener = sock
        self._threads.start(self._accept_loop, name="accept")

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._done.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = FrameSocket(sock)
            with self._conns_lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    busy = True
                else:
                    busy = False
                    self._conns.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.send(_exit_frame(125, "too many connections to this VM; try again"))
                conn.close()
                continue
            self._threads.start(self._serve_conn, conn, name="conn")

    def _serve_conn(self, conn: FrameSocket) -> None:
        # An exec's input pump reads from ``conn``: it ends when the finally below closes
        # the connection, and is joined then.
        with ThreadGroup("conn") as threads:
            self._handle_conn(conn, threads)

    def _handle_conn(self, conn: FrameSocket, threads: ThreadGroup) -> None:
        try:
            conn.sock.settimeout(REQUEST_TIMEOUT)
            frame = conn.recv()
            conn.sock.settimeout(None)
            if frame is None:
                return
            req = parse_request(frame)
            if isinstance(req, ExecRequest):
                self._exec(conn, req, threads)
            elif isinstance(req, ReadRequest):
                self._read(conn, req)
            elif isinstance(req, WriteRequest):
                self._write(conn, req)
            elif isinstance(req, StopRequest):
                self._stop(req.timeout)
                conn.send(_exit_frame(0))
            elif isinstance(req, SnapshotRequest):
                self.vm.snapshot(req.name)
                conn.send(_exit_frame(0))
        except (OSError, ControlError) as e:
            log.debug("connection ended: %s", e)
        except Error as e:
            with contextlib.suppress(OSError):
                conn.send(_exit_frame(125, str(e)))
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _exec(self, conn: FrameSocket, req: ExecRequest, threads: ThreadGroup) -> None:
        proc = self.vm.spawn(list(req.argv), env=list(req.env), cwd=req.cwd, user=req.user,
                             stdin=req.stdin, tty=req.tty, winsize=req.winsize)
        with proc:
            threads.start(_pump_client_input, conn, proc, name="exec-in")
            for stream, data in proc:
                conn.send(encode_data(Kind.STDERR if stream == 2 else Kind.STDOUT, data))
            status = proc.wait()
        conn.send(_exit_frame(status.exit_code, status.error))

    def _read(self, conn: FrameSocket, req: ReadRequest) -> None:
        from ..agent.client import GuestFileError

        class Sink:
            def write(self, data: bytes) -> int:
                conn.send(encode_data(Kind.STDOUT, data))
                return len(data)

        try:
            self.vm.read_file_to(req.path, Sink())
        except GuestFileError as e:
            conn.send(_exit_frame(1, str(e), e.errno))
            return
        conn.send(_exit_frame(0))

    def _write(self, conn: FrameSocket, req: WriteRequest) -> None:
        from ..agent.client import GuestFileError

        try:
            self.vm.write_file_from(req.path, _ClientInput(conn), mode=req.mode)
        except GuestFileError as e:
            conn.send(_exit_frame(1, str(e), e.errno))
            return
        conn.send(_exit_frame(0))


class _ClientInput:
    """A file-like reader over a client's STDIN frames, ending at its EOF frame."""

    def __init__(self, conn: FrameSocket) -> None:
        self._conn = conn
        self._buf = b""
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            frame = self._conn.recv()
            if frame is None:
                raise VMError("the client went away before the end of the file")
            if frame.kind == Kind.STDIN:
                self._buf = frame.payload
            elif frame.kind == Kind.EOF:
                self._eof = True
            else:
                raise ControlError(f"unexpected {frame.kind.name} frame in a file copy")
        n = len(self._buf) if n < 0 else n
        data, self._buf = self._buf[:n], self._buf[n:]
        return data


def _pump_client_input(conn: FrameSocket, proc: Any) -> None:
    """Client frames -> the process; the client going away kills the process."""
    try:
        while True:
            frame = conn.recv()
            if frame is None:
                break
            if frame.kind == Kind.STDIN:
                proc.write(frame.payload)
            elif frame.kind == Kind.EOF:
                proc.close_stdin()
            elif frame.kind == Kind.RESIZE:
                proc.resize(*parse_resize(frame))
            elif frame.kind == Kind.SIGNAL:
                proc.signal(parse_signal(frame))
            else:
                break
    except (Error, OSError):
        pass
    with contextlib.suppress(Error):
        proc.close()


def _exit_frame(code: int, error: str | None = None, err_no: int | None = None) -> bytes:
    obj: dict[str, object] = {"code": code}
    if error:
        obj["error"] = error[:4096]
    if err_no is not None:
        obj["errno"] = err_no
    return encode_json(Kind.EXIT, obj)


def parse_stop_signal(text: str) -> int:
    """An image's StopSignal ("SIGQUIT", "QUIT", "3") as a number; SIGTERM by default."""
    text = (text or "").strip().upper()
    if not text:
        return signal.SIGTERM
    if text.isdigit():
        n = int(text)
        return n if 1 <= n <= 64 else signal.SIGTERM
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        return signal.SIGTERM


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m supermachine.detached.supervisor VMDIR LOCKFD READYFD",
              file=sys.stderr)
        return 2
    path, lock_fd, ready_fd = Path(argv[0]), int(argv[1]), int(argv[2])
    # The lock and the pipe must not leak into QEMU or the guest helpers we start.
    os.set_inheritable(lock_fd, False)
    os.set_inheritable(ready_fd, False)
    if os.fork() > 0:
        os._exit(0)  # the launcher waits for this one; the supervisor goes on in the child
    d = VMDir(path)
    stderr = StderrCap(d.supervisor_log)  # bounded: console echo and passt write here too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor: %(message)s")
    try:
        return Supervisor(d, ready_fd).run()
    except Exception as e:  # still report something, so `run -d` never waits in vain
        log.exception("supervisor failed")
        with contextlib.suppress(OSError):
            os.write(ready_fd, json.dumps({"error": f"internal error: {e}"}).encode())
        return 1
    finally:
        sys.stderr.flush()
        stderr.close()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # daemon threads may still be blocked in I/O; do not wait for them
