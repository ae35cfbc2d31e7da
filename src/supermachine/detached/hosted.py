"""One detached VM as its host process keeps it: the running `VM`, its record, its main
workload's log, and its control socket.

A host is either a detached VM's own supervisor process (supervisor.py: one `HostedVM`) or
the service (service/: many). Both hold the VM directory's lock for as long as the VM
lives, so `ps`, `exec NAME`, `cp`, `logs`, `stop`, `rm` and `inspect` work the same on
either kind: a service's sandbox *is* a detached VM whose supervisor is the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import Error, VMError
from ..runtime.threads import ThreadGroup
from ..spec import WorkloadSpec
from . import state as detached
from .logfile import DEFAULT_MAX_BYTES, LogWriter
from .protocol import Kind, SnapshotRequest, StopRequest, encode_data
from .server import ControlServer
from .state import VMDir

log = logging.getLogger(__name__)

STOP_KILL_GRACE = 5.0  # after SIGKILL, how long to wait for the workload before tearing down
START_PATIENCE = 30.0  # how long the main workload gets to be running (or fail) at start


class HostedVM:
    """Hosts the started ``vm`` in ``d`` until `done` is set, then `close()` tears it down.

    With a ``workload`` that workload is the VM's main process (`run -d`): its output goes
    to the log, and its end ends the VM. Without one (a service's sandbox) the VM runs until
    it is stopped."""

    def __init__(self, d: VMDir, vm: Any, workload: WorkloadSpec | None, *,
                 log_max_bytes: int = DEFAULT_MAX_BYTES, host_pid: int | None = None) -> None:
        self.d = d
        self.vm = vm
        self._workload = workload
        self._log_max_bytes = log_max_bytes
        self._host_pid = host_pid or os.getpid()
        self._main: Any = None
        self._workload_done = threading.Event()
        #: set when the VM is to be torn down (its workload ended, or `stop`)
        self.done = threading.Event()
        self.exit: tuple[int, str | None] = (255, None)
        self._stop_signal = signal.SIGTERM
        self._server: ControlServer | None = None
        self._threads = ThreadGroup("hosted")

    def start(self, record: detached.VMRecord | None = None) -> None:
        """Start the main workload (if any) and the control socket; record "running" (in
        ``record``'s fields, else the directory's record). Raises with a one-line error
        when the workload cannot start."""
        argv: list[str] = []
        if self._workload is not None:
            self._stop_signal = parse_stop_signal(self.vm.image.config.stop_signal)
            argv = list(self.vm.workload(self._workload).argv)
            self._main = self.vm.start_workload(self._workload)
            # Report a program that cannot start as the run's error, as `docker run -d` does.
            deadline = time.monotonic() + START_PATIENCE
            while self._main.pid is None and self._main.exit_status is None and \
                    time.monotonic() < deadline:
                time.sleep(0.005)
            status = self._main.exit_status
            if status is not None and status.error:
                err = VMError(f"cannot start {argv[0]}: {status.error}")
                err.exit_code = status.exit_code
                raise err
        self._server = ControlServer(self.vm, Path(self.d.path),
                                     {StopRequest: lambda req: self.stop(req.timeout),
                                      SnapshotRequest: lambda req: self.vm.snapshot(req.name)})
        self._server.start()
        running = dict(status=detached.RUNNING, command=argv, started=time.time(),
                       supervisor_pid=self._host_pid, qemu_pid=self.vm.pid,
                       memory_mib=self.vm.memory_mib, cpus=self.vm.cpus,
                       ports=[str(p) for p in self.vm.ports])
        if record is None:
            self.d.update(**running)
        else:
            self.d.write(record.replace(**running))
        if self._main is not None:
            self._threads.start(self._log_workload, name="workload-log")

    def serve_conn(self, conn: Any, first: Any) -> None:
        """Serve one more control connection (the service's WebSocket bridge), whose first
        frame is ``first``, as the control socket serves its own; returns when it ends."""
        if self._server is None:
            raise VMError("the VM is not started")
        self._server.serve_conn(conn, first)

    def stop(self, timeout: float) -> None:
        """The main workload gets its stop signal, then SIGKILL after ``timeout``; a VM
        without one is simply done."""
        if self._main is not None:
            with contextlib.suppress(Error):
                self._main.signal(self._stop_signal)
            if not self._workload_done.wait(timeout):
                with contextlib.suppress(Error):
                    self._main.kill()
                self._workload_done.wait(STOP_KILL_GRACE)
        else:
            self.exit = (0, None)
        self.done.set()

    def close(self, record: bool = True) -> None:
        """Destroy the VM, end the socket and threads, and record how it ended."""
        self.vm.close()  # fails every agent waiter: exec handlers end promptly
        if self._server is not None:
            self._server.close()
        self._threads.join(timeout=2.0)
        if not record:
            return
        if self._main is not None and not self._workload_done.is_set():
            self.exit = (128 + signal.SIGKILL, "the VM was stopped")
        code, error = self.exit
        with contextlib.suppress(Error, OSError):
            self.d.update(status=detached.EXITED, exit_code=code, error=error,
                          finished=time.time(), qemu_pid=None)

    def _log_workload(self) -> None:
        code, error = 255, None
        try:
            f: LogWriter | None = LogWriter(self.d.log, self._log_max_bytes)
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
        self.exit = (code, error)
        self._workload_done.set()
        self.done.set()


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
