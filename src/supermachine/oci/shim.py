"""The container's process: the pid an engine gets from `create --pid-file`.

runc's container process *is* the workload; ours owns a VM whose guest runs it. It is what
the engine (conmon, containerd's shim) waits for and reaps, so it lives exactly as long as
the container and exits with the workload's status (128+N when a signal N ended it). Its
stdin, stdout and stderr are the container's: the engine's pipes, or with a terminal the pty
whose master `create` sent to the console socket. It:

1. takes the container's lock (held while it lives: a free lock means "stopped"), moves the
   container's stdio out of the way of QEMU and passt (they must not write into it), and
   logs to shim.log in the container's directory;
2. starts the VM (restored from the automatic snapshot of an empty root, then the bundle's
   root directory mounted over 9p and made the root), serves the control socket
   (detached/server.py: exec, files, start, signal, pause), reports "created" through the
   pipe `create` waits on;
3. once `create` has exited (it is then a child of the engine's subreaper), dies with that
   parent (PR_SET_PDEATHSIG): a SIGKILLed engine leaves no VM behind, as QEMU and passt die
   with us;
4. on `start`, runs config.json's process with the container's stdio, and on its end tears
   the VM down, records the exit code and exits with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

from ..detached import ready
from ..errors import Error
from ..spec import VMSpec, WorkloadSpec
from . import state as st

log = logging.getLogger("supermachine.oci.shim")

PR_SET_PDEATHSIG = 1
OOM_HINT = "org.supermachine.memory annotation or the engine's memory limit"
START_TIMEOUT = 30.0  # `start` waits this long for the workload to be started
REPARENT_WAIT = 30.0  # how long we wait for `create` to exit before giving up on PDEATHSIG


class Shim:
    def __init__(self, c: st.Container, ready_fd: int, stdio: tuple[int, int, int],
                 creator: int) -> None:
        self.c = c
        self._ready_fd: int | None = ready_fd
        self._stdio = stdio
        self._creator = creator
        self.record = c.read()
        self.vm: Any = None
        self._server: Any = None
        self._proc: Any = None
        self._start = threading.Event()
        self._started = threading.Event()
        self._start_error: str | None = None
        self._stop = False

    # -- main thread

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self._prepare()
        except Error as e:
            self._report({"error": str(e)})
            self._teardown()
            return 1
        if not self._report({"ok": True, "pid": os.getpid()}):
            log.warning("create went away before the container was ready; destroying it")
            self._teardown()
            return 1
        self._die_with_engine()
        while not self._start.wait(0.2):
            if self._stop or not self.vm.running:
                self._teardown(exit_code=128 + signal.SIGKILL)
                return 128 + signal.SIGKILL
        code = self._run_workload()
        self._teardown(exit_code=code)
        return code

    def _on_signal(self, signo: int, _frame: object) -> None:
        # SIGTERM from `delete --force` or the engine: end now. Only flags and kill_now,
        # which take no lock the interrupted main thread may hold.
        self._stop = True
        if self.vm is not None:
            self.vm.kill_now()

    def _prepare(self) -> None:
        from ..detached.protocol import PauseRequest, SignalRequest, StartRequest
        from ..detached.server import ControlServer
        from ..home import Home
        from ..runtime.vm import VM

        spec = self._network(VMSpec.from_json(self.record["vm"]))
        self.vm = VM(spec, home=Home.default(), on_notice=lambda m: log.info("%s", m))
        self.vm.start()
        log.info("VM started (%s) with QEMU pid %s",
                 f"restored from {self.vm.restored_from[:12]}" if self.vm.restored_from
                 else "booted", self.vm.pid)
        self._server = ControlServer(self.vm, self.c.path, {
            StartRequest: self._on_start, SignalRequest: self._on_kill,
            PauseRequest: self._on_pause})
        self._server.start()
        self.c.update(status=st.CREATED, pid=os.getpid(), qemu_pid=self.vm.pid)

    def _network(self, spec: VMSpec) -> VMSpec:
        """The container's network namespace: the engine's (a path), or a new one when the
        config asks for one without a path. Then the createRuntime and prestart hooks run,
        which may set it up (docker's do), and the VM joins the namespace if it has a route
        out by then; else the VM has no network, like runc's container in an empty
        namespace (`--network none`)."""
        from ..engine import tap
        from . import hooks
        from .config import Hook

        netns, host_netns = _new_network_namespace() if self.record.get("new_netns") else \
            (spec.netns, None)
        wanted = self.record.get("hooks") or {}
        try:
            if wanted.get("createRuntime") or wanted.get("prestart"):
                self.c.update(pid=os.getpid())  # the state the hooks read names this process
            for stage in ("createRuntime", "prestart"):
                if wanted.get(stage):
                    hooks.run_or_fail([Hook.from_json(h) for h in wanted[stage]], stage,
                                      self.c.state(), Path(self.record["bundle"]),
                                      host_netns)
        finally:
            if host_netns is not None:
                os.close(host_netns)
        if netns is None:
            return spec
        if tap.default_route(netns) is None:
            log.info("network namespace %s has no route out: no network", netns)
            return spec.replace(network="none", netns=None)
        return spec.replace(network="user", netns=netns)

    def _report(self, obj: dict[str, object]) -> bool:
        fd, self._ready_fd = self._ready_fd, None
        return fd is not None and ready.send(fd, obj)

    def _die_with_engine(self) -> None:
        """Once `create` (our parent) has exited, die with whoever adopted us."""
        deadline = time.monotonic() + REPARENT_WAIT
        while os.getppid() == self._creator and time.monotonic() < deadline:
            time.sleep(0.01)
        parent = os.getppid()
        if parent == self._creator or parent == 1:
            return  # no engine adopted us (run by hand): live on as a daemon would
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the prctl took effect
            self._stop = True

    def _run_workload(self) -> int:
        from .. import terminal

        workload = WorkloadSpec.from_json(self.record["workload"])
        stdin, stdout, stderr = self._stdio
        log.debug("stdio: %s", [_describe(fd) for fd in self._stdio])
        try:
            self._proc = self.vm.start_workload(
                workload, winsize=terminal.winsize(stdin) if workload.tty else None)
        except Error as e:
            self._start_error = str(e)
            self._started.set()
            _write(stderr, f"supermachine-runtime: {e}\n")
            return 127
        self.c.update(status=st.RUNNING)
        self._started.set()
        try:
            status = terminal.pump(self._proc, stdin_fd=stdin,
                                   tty_fd=stdin if workload.tty else None,
                                   stdout_fd=stdout, stderr_fd=stderr)
        except Error as e:
            log.info("the workload's connection ended: %s", e)
            return 128 + signal.SIGKILL
        if status.error:
            log.info("the workload: %s", status.error)
            _write(stderr, f"supermachine-runtime: {status.error}\n")
        if status.exit_code == 128 + signal.SIGKILL and self._guest_oom_kills():
            self._runtime_log(
                "warning", f"container {self.c.id}: the guest ran out of memory and its kernel "
                f"killed the workload ({self.vm.memory_mib} MiB; give the VM more with the "
                f"{OOM_HINT})")
        return status.exit_code

    def _guest_oom_kills(self) -> int:
        """How many processes the guest kernel's out-of-memory killer has killed."""
        try:
            vmstat = self.vm.read_file("/proc/vmstat", max_size=1 << 16).decode()
        except (Error, UnicodeDecodeError):
            return 0
        for line in vmstat.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def _runtime_log(self, level: str, msg: str) -> None:
        """To the shim's log, and to the engine's --log as `create` was given it (containerd
        reads it; runc reports there too)."""
        log.warning("%s", msg)
        path, fmt = self.record.get("log"), self.record.get("log_format", "text")
        if isinstance(path, str) and path:
            st.RuntimeLog(path, fmt if fmt in ("text", "json") else "text").write(level, msg)

    def _teardown(self, exit_code: int | None = None) -> None:
        if self.vm is not None:
            self.vm.close()
        if self._server is not None:
            self._server.close()
        if exit_code is not None:
            with contextlib.suppress(Error, OSError):
                self.c.update(status=st.STOPPED, exit_code=exit_code, finished=time.time())
        log.info("stopped%s", "" if exit_code is None else f" with exit code {exit_code}")

    # -- control socket handlers (server threads)

    def _on_start(self, _req: Any) -> None:
        if self._start.is_set():
            raise st.ContainerError(f"container {self.c.id} was started already")
        self._start.set()
        if not self._started.wait(START_TIMEOUT):
            raise st.ContainerError(f"container {self.c.id} did not start in time")
        if self._start_error:
            raise st.ContainerError(self._start_error)

    def _on_kill(self, req: Any) -> None:
        if self._proc is None:  # created, not started: the container just ends
            log.info("signal %d before start: the container ends", req.signo)
            self._stop = True
            return
        self._proc.signal(req.signo)

    def _on_pause(self, req: Any) -> None:
        if req.pause:
            self.vm.pause()
            self.c.update(status=st.PAUSED)
        else:
            self.vm.resume()
            self.c.update(status=st.RUNNING)


def _new_network_namespace() -> tuple[str | None, int | None]:
    """Move this process's main thread (the one that starts QEMU, and whose namespace
    /proc/PID/ns/net names) into a new network namespace: its path, and an fd of the one
    it left (hooks run there); (None, None) when that is not permitted (then no network)."""
    from ..engine import netns

    try:
        left = netns.new()
    except OSError as e:
        log.info("cannot make a network namespace (%s): no network", e.strerror)
        return None, None
    return f"/proc/{os.getpid()}/ns/net", left


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return e.strerror or "?"


def _write(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, text.encode())


def make_controlling_raw(fd: int) -> None:
    """Make the pty slave ``fd`` this process's controlling terminal (in a new session),
    raw: the guest's own pty does the line discipline (echo, Ctrl-C), not this one."""
    import tty

    os.setsid()
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    with contextlib.suppress(termios.error):
        tty.setraw(fd)


def _keep_stdio(log_path: Path, terminal: bool) -> tuple[int, int, int]:
    """The container's stdio moved to fds of their own (close-on-exec), and 0, 1, 2 pointed
    at /dev/null and the log for everything we start (QEMU, passt) and for Python."""
    if terminal:  # the pty slave becomes our controlling terminal: SIGWINCH follows resizes
        make_controlling_raw(0)
    kept = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (0, 1, 2))
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)
    return kept  # type: ignore[return-value]


def run(c: st.Container, ready_fd: int, creator: int) -> int:
    """The container process's life, in the child `create` forked (no new interpreter: a
    Python start and the imports are most of what `create` costs)."""
    lock = os.open(c.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ready.send(ready_fd, {"error": f"container {c.id} is in use"})
        return 1
    record = c.read()
    terminal = bool(record.get("workload", {}).get("tty"))
    stdio = _keep_stdio(c.shim_log, terminal)
    from ..detached.logfile import StderrCap

    cap = StderrCap(c.shim_log)  # bounded: QEMU's console echo could fill it otherwise
    logging.basicConfig(level=logging.DEBUG if record.get("debug") else logging.INFO,
                        format="%(asctime)s shim: %(message)s", force=True)
    shim = None
    try:
        shim = Shim(c, ready_fd, stdio, creator)
        return shim.run()
    except Exception as e:
        log.exception("the container process failed")
        report = {"error": f"internal error: {e}"}
        if shim is None:
            ready.send(ready_fd, report)
        else:
            shim._report(report)  # nothing when it reported already (the fd is closed)
        return 1
    finally:
        sys.stderr.flush()
        cap.close()
