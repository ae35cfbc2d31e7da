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
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import Error, VMError
from ..home import Home
from ..spec import VMSpec, WorkloadSpec
from . import ready
from . import state as detached
from .hosted import HostedVM
from .logfile import DEFAULT_MAX_BYTES, StderrCap
from .state import VMDir, VMRecord

log = logging.getLogger("supermachine.detached.supervisor")

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
    d = detached.create(home.vms, name)
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
    report = ready.receive(ready_r)
    if report is None:
        report = {"error": "the VM's supervisor died while starting; run again with --debug"}
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


def _rmtree_quiet(d: VMDir) -> None:
    import shutil

    shutil.rmtree(d.path, ignore_errors=True)


# ---- supervisor side ----------------------------------------------------------------------

class Supervisor:
    """The process of one detached VM: boots it, hosts it (hosted.py) until its workload
    ends, `stop` or a signal, then tears it down."""

    def __init__(self, d: VMDir, ready_fd: int) -> None:
        self.d = d
        self._ready_fd: int | None = ready_fd
        self._record = d.read()
        self._opts = self._record.options
        self.vm: Any = None
        self.hosted: HostedVM | None = None
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
        hosted = self.hosted
        assert hosted is not None
        while not self._signalled and not hosted.done.wait(0.2):
            pass
        if self._signalled and not hosted.done.is_set():
            hosted.stop(SIGNAL_STOP_GRACE)  # like `stop`: the workload may clean up
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
        self.vm = VM(spec, home=Path(self.d.path).parent.parent, verbose=bool(o.get("verbose")),
                     on_notice=lambda m: log.info("%s", m))
        self.vm.start()
        cap = o.get("log_max_bytes")
        self.hosted = HostedVM(self.d, self.vm, workload,
                               log_max_bytes=cap if isinstance(cap, int) else DEFAULT_MAX_BYTES)
        self.hosted.start()

    def _report(self, obj: dict[str, object]) -> bool:
        """Tell the launcher how the start went; False if it is no longer listening."""
        fd, self._ready_fd = self._ready_fd, None
        return fd is not None and ready.send(fd, obj)

    def _teardown(self, record: bool = True) -> None:
        if self.hosted is not None:
            self.hosted.close(record)
        elif self.vm is not None:
            self.vm.close()


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
    supervisor = None
    try:
        supervisor = Supervisor(d, ready_fd)
        return supervisor.run()
    except Exception as e:  # still report something, so `run -d` never waits in vain
        log.exception("supervisor failed")
        report = {"error": f"internal error: {e}"}
        if supervisor is None:
            ready.send(ready_fd, report)
        else:
            supervisor._report(report)  # nothing when it reported already (the fd is closed)
        return 1
    finally:
        sys.stderr.flush()
        stderr.close()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # daemon threads may still be blocked in I/O; do not wait for them
