"""The service's state, without HTTP: sandboxes, warm pools, limits, time-to-live.

A sandbox is a detached VM whose supervisor is this process (detached/hosted.py): it has
a VM directory under the home, held locked while it lives, and its own control socket, so
`supermachine ps`, `exec NAME`, `cp`, `logs`, `stop`, `rm` and `inspect` reach it the way
they reach any detached VM. The HTTP API (http.py) and the CLI's `run` socket are shells
around this class; it in turn is a shell around `VM`, `Pool` and the snapshot store.

Every VM comes from `_lease`: a ready VM of the pool whose spec equals the one asked for
(a hit), else a fresh restore. A VM is never handed out twice: when its sandbox ends it
is destroyed, and the pool restores a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..detached import state as detached
from ..detached.hosted import HostedVM
from ..detached.logfile import DEFAULT_MAX_BYTES
from ..detached.protocol import Kind, RunArgsRequest, RunRequest, encode_json
from ..detached.server import exit_frame, stream_process
from ..errors import Error, UsageError, VMError
from ..home import Home
from ..runtime.pool import Pool
from ..runtime.threads import ThreadGroup
from ..runtime.vm import VM
from ..spec import VMSpec, WorkloadSpec

log = logging.getLogger(__name__)

MAX_TTL = 86400 * 30
REAP_INTERVAL = 0.1
ACQUIRE_TIMEOUT = 300.0  # a pool that cannot start VMs fails the request after this


@dataclass(frozen=True)
class ForwardedRun:
    """What a `run` asks of the service, typed: the VM, its workload, and -d's options."""

    spec: VMSpec
    work: WorkloadSpec
    detach: bool = False
    name: str | None = None
    remove: bool = False
    log_max_bytes: int | None = None


class LimitError(Error):
    """A request the service's limits refuse (sandboxes, guest memory)."""


class NotFound(Error):
    """No sandbox or pool of that name."""


def _default_budget_mib() -> int:
    """Half of this machine's memory: guests beyond that are refused, not swapped."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (2 << 20)
    except (ValueError, OSError):
        return 4096


@dataclass(frozen=True)
class Limits:
    max_sandboxes: int = 64
    memory_budget_mib: int = field(default_factory=_default_budget_mib)
    max_pools: int = 16


@dataclass
class PoolEntry:
    id: str
    spec: VMSpec
    pool: Pool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.spec.image, "spec": self.spec.to_json(),
                "idle_timeout": self.pool.idle_timeout, **self.pool.stats().to_json()}


@dataclass
class Sandbox:
    name: str
    spec: VMSpec
    hosted: HostedVM
    lock_fd: int
    created: float
    pool: PoolEntry | None
    expires: float | None
    remove: bool  # the record goes when it ends (API sandboxes, run --rm -d)

    @property
    def vm(self) -> VM:
        return self.hosted.vm

    def to_json(self) -> dict[str, Any]:
        vm = self.vm
        return {"name": self.name, "image": self.spec.image, "created": self.created,
                "expires": self.expires, "pool": self.pool.id if self.pool else None,
                "memory_mib": self.spec.memory_mib, "cpus": self.spec.cpus,
                "running": vm.running, "restored_from": vm.restored_from,
                "ports": [p.to_json() for p in vm.ports]}


class Service:
    """Owns every sandbox and pool; thread-safe. `close()` destroys them all."""

    def __init__(self, home: Home, limits: Limits | None = None, *,
                 parse_run: Any = None) -> None:
        """``parse_run``: turns a `RunArgsRequest` into a `ForwardedRun` (the CLI's own
        parsing, cli/run.py); without it the service takes only typed `RunRequest`s."""
        self.home = home
        self._parse_run = parse_run
        self._notices: set[str] = set()
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._sandboxes: dict[str, Sandbox] = {}
        self._pools: dict[str, PoolEntry] = {}
        self._reserved_mib = 0  # VMs being made, and attached runs
        self._reserved_count = 0
        self._closed = threading.Event()
        self._threads = ThreadGroup("service")
        self.started = time.time()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> Service:
        self._remove_orphans()
        self._threads.start(self._reap_loop, name="reaper")
        return self

    def close(self, grace: float = 10.0) -> None:
        """Stop every sandbox (main workloads get ``grace`` seconds) and every pool."""
        self._closed.set()
        with self._lock:
            sandboxes = list(self._sandboxes.values())
            pools = list(self._pools.values())
            self._pools.clear()
        stopping = ThreadGroup("service-stop")  # side by side: each may take its grace
        for sb in sandboxes:
            stopping.start(_stop_quietly, sb.hosted, grace, name=sb.name)
        stopping.join(timeout=grace + 10)
        self._threads.join()
        for sb in sandboxes:
            self._finish(sb, remove=True)
        for entry in pools:
            entry.pool.close()

    def _remove_orphans(self) -> None:
        """Records of sandboxes a killed service left behind (their QEMU died with it)."""
        for s in detached.list_states(self.home.vms):
            if not s.alive and s.record.options.get("service") is True:
                with contextlib.suppress(Error):
                    detached.remove(detached.VMDir(self.home.vms / s.record.name))

    def notice(self, message: str) -> None:
        """A VM's notice, logged once: every restore says which accelerator it got."""
        if message not in self._notices and len(self._notices) < 1024:
            self._notices.add(message)
            log.info("%s", message)

    # ---- pools ----------------------------------------------------------------------------

    def create_pool(self, spec: VMSpec, size: int, max_size: int | None = None,
                    idle_timeout: float | None = None) -> PoolEntry:
        with self._lock:
            if len(self._pools) >= self.limits.max_pools:
                raise LimitError(f"the service has {len(self._pools)} pools, its limit")
            if any(e.spec == spec for e in self._pools.values()):
                raise UsageError(f"a pool of that VM spec exists already ({spec.image})")
            self._check_memory(spec.memory_mib * size)
            import secrets

            entry = PoolEntry(f"pool-{secrets.token_hex(4)}", spec,
                              Pool(spec, size, max_size=max_size, idle_timeout=idle_timeout,
                                   home=self.home, on_notice=self.notice))
            self._pools[entry.id] = entry
        entry.pool.start()
        return entry

    def pool(self, pool_id: str) -> PoolEntry:
        with self._lock:
            entry = self._pools.get(pool_id)
        if entry is None:
            raise NotFound(f"no such pool: {pool_id[:80]}")
        return entry

    def pools(self) -> list[PoolEntry]:
        with self._lock:
            return list(self._pools.values())

    def resize_pool(self, pool_id: str, size: int, max_size: int | None,
                    idle_timeout: float | None) -> PoolEntry:
        entry = self.pool(pool_id)
        with self._lock:
            grow = size - entry.pool.size
            if grow > 0:
                self._check_memory(entry.spec.memory_mib * grow)
        entry.pool.resize(size, max_size, idle_timeout)
        return entry

    def delete_pool(self, pool_id: str) -> None:
        with self._lock:
            entry = self._pools.pop(pool_id, None)
        if entry is None:
            raise NotFound(f"no such pool: {pool_id[:80]}")
        entry.pool.close()  # its VMs in sandboxes go too: they are the pool's

    # ---- sandboxes ----------------------------------------------------------------------

    def _committed_mib(self) -> int:
        """Guest memory of every sandbox, every pool's target and what is being made."""
        pools = sum(e.spec.memory_mib * e.pool.stats().target for e in self._pools.values())
        return sum(s.spec.memory_mib for s in self._sandboxes.values()) + pools + \
            self._reserved_mib

    def _check_memory(self, mib: int) -> None:
        committed = self._committed_mib()
        if committed + mib > self.limits.memory_budget_mib:
            raise LimitError(
                f"not enough guest memory left: {mib} MiB asked, {committed} of "
                f"{self.limits.memory_budget_mib} MiB committed (serve --memory-budget)")

    @contextlib.contextmanager
    def _reservation(self, spec: VMSpec) -> Iterator[PoolEntry | None]:
        """Admit one more VM of ``spec`` under the limits, for the duration of the block;
        yields the pool that serves that spec, if any."""
        with self._lock:
            if self._closed.is_set():
                raise VMError("the service is shutting down")
            pool = next((e for e in self._pools.values() if e.spec == spec), None)
            count = len(self._sandboxes) + self._reserved_count
            if count >= self.limits.max_sandboxes:
                raise LimitError(f"the service runs {count} sandboxes, its limit "
                                 "(serve --max-sandboxes)")
            # A pool's ready VM is counted in its target already; a new one is not.
            self._check_memory(0 if pool and pool.pool.ready else spec.memory_mib)
            self._reserved_mib += spec.memory_mib
            self._reserved_count += 1
        try:
            yield pool
        finally:
            with self._lock:
                self._reserved_mib -= spec.memory_mib
                self._reserved_count -= 1

    def _start_vm(self, spec: VMSpec, pool: PoolEntry | None) -> VM:
        if pool is not None:
            return pool.pool.acquire(timeout=ACQUIRE_TIMEOUT)
        vm = VM(spec, home=self.home, on_notice=self.notice)
        vm.start()
        return vm

    def _end_vm(self, vm: VM, pool: PoolEntry | None) -> None:
        vm.close()
        if pool is not None:
            with contextlib.suppress(VMError):  # a deleted pool closed it already
                pool.pool.release(vm)

    def create(self, spec: VMSpec, *, name: str | None = None, ttl: float | None = None,
               workload: WorkloadSpec | None = None, remove: bool = True,
               log_max_bytes: int = DEFAULT_MAX_BYTES) -> Sandbox:
        """A new sandbox (a hosted detached VM); with ``workload``, that is its main
        process and the sandbox ends with it."""
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                                or not 0 < ttl <= MAX_TTL):
            raise UsageError(f"ttl must be from 0 to {MAX_TTL} seconds")
        if name is not None:
            detached.validate_name(name)
        with self._reservation(spec) as pool:
            d = detached.create(self.home.vms, name)
            lock_fd = -1
            vm = None
            try:
                lock_fd = os.open(d.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                options = {"service": True, "vm": spec.to_json(), "remove": remove,
                           "workload": workload.to_json() if workload else None}
                record = detached.VMRecord(name=d.name, id=detached.new_id(),
                                           image=spec.image, command=[], created=time.time(),
                                           supervisor_pid=os.getpid(), options=options)
                vm = self._start_vm(spec, pool)
                hosted = HostedVM(d, vm, workload, log_max_bytes=log_max_bytes)
                hosted.start(record)  # the first record: `ps` skips the directory till then
            except BaseException:
                if vm is not None:
                    self._end_vm(vm, pool)
                if lock_fd >= 0:
                    os.close(lock_fd)
                import shutil

                shutil.rmtree(d.path, ignore_errors=True)
                raise
            sb = Sandbox(d.name, spec, hosted, lock_fd, time.time(), pool,
                         None if ttl is None else time.time() + ttl, remove)
            with self._lock:
                self._sandboxes[sb.name] = sb
        return sb

    def get(self, name: str) -> Sandbox:
        with self._lock:
            sb = self._sandboxes.get(name)
        if sb is None:
            raise NotFound(f"no such sandbox: {name[:80]}")
        return sb

    def sandboxes(self) -> list[Sandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    def delete(self, name: str, grace: float = 0.0) -> None:
        sb = self.get(name)
        sb.hosted.stop(grace)
        self._finish(sb, remove=True)

    def _finish(self, sb: Sandbox, remove: bool) -> None:
        """Tear a sandbox down once: destroy its VM, record how it ended, let go of it."""
        with self._lock:
            if self._sandboxes.get(sb.name) is not sb:
                return  # another thread finishes it
            del self._sandboxes[sb.name]
        try:
            sb.hosted.close()
        finally:
            if sb.pool is not None:
                with contextlib.suppress(VMError):
                    sb.pool.pool.release(sb.vm)
            os.close(sb.lock_fd)
            if remove or sb.remove:
                with contextlib.suppress(Error):
                    detached.remove(detached.VMDir(self.home.vms / sb.name))

    def _reap_loop(self) -> None:
        while not self._closed.wait(REAP_INTERVAL):
            now = time.time()
            for sb in self.sandboxes():
                if sb.expires is not None and now >= sb.expires:
                    log.info("sandbox %s reached its time to live", sb.name)
                    with contextlib.suppress(Error):
                        self.delete(sb.name)
                elif sb.hosted.done.is_set() or not sb.vm.running:
                    self._finish(sb, remove=False)

    # ---- the CLI's `run` ----------------------------------------------------------------

    def handle_run(self, conn: Any, req: RunRequest | RunArgsRequest,
                   threads: ThreadGroup) -> None:
        """A `run` from the CLI's run socket (detached/protocol.py): typed specs, or a
        command line to parse as the CLI would (then answered STARTED first)."""
        try:
            if isinstance(req, RunArgsRequest):
                if self._parse_run is None:
                    raise UsageError("this service does not parse command lines")
                run = self._parse_run(req)
            else:
                run = ForwardedRun(VMSpec.from_json(req.vm), WorkloadSpec.from_json(
                    req.workload), req.detach, req.name, req.remove, req.log_max_bytes)
        except Error as e:
            conn.send(exit_frame(e.exit_code, str(e)))
            return
        if isinstance(req, RunArgsRequest):
            conn.send(encode_json(Kind.STARTED, {"tty": run.work.tty, "stdin": run.work.stdin,
                                                 "detach": run.detach}))
        if run.detach:
            sb = self.create(run.spec, name=run.name, workload=run.work, remove=run.remove,
                             log_max_bytes=run.log_max_bytes or DEFAULT_MAX_BYTES)
            conn.send(encode_json(Kind.EXIT, {"code": 0, "name": sb.name}))
            return
        with self._reservation(run.spec) as pool:
            vm = self._start_vm(run.spec, pool)
            try:
                proc = vm.start_workload(run.work, winsize=req.winsize)
                stream_process(conn, proc, threads)
            finally:
                # Destroyed off the client's path: its answer is sent already.
                self._end_vm(vm, pool)


def _stop_quietly(hosted: HostedVM, grace: float) -> None:
    with contextlib.suppress(Error):
        hosted.stop(grace)
