"""Pools: VMs restored from one snapshot, kept ready in the background.

``acquire()`` hands out a ready VM at once when there is one; ``release()`` destroys it and
the pool restores a fresh one in its place: a VM is never handed out twice. A pool owns
every VM it made, handed out or not: closing it (or leaving ``with``) destroys them all.

Sizing: ``size`` VMs are kept ready. With ``max_size`` above it, each acquire that found
none ready (a miss) raises the target by one, up to ``max_size`` VMs alive (ready, handed
out and starting); after ``idle_timeout`` seconds without an acquire the target falls back
to ``size`` and the ready VMs above it are destroyed.

While other VMs are ready, a replacement's restore waits ``refill_delay`` seconds after a VM
was handed out: a restore is CPU-heavy (under TCG ~0.4 s of a core), and the VM just handed
out should run its first commands without it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import Error, UsageError, VMError
from .threads import ThreadGroup
from .vm import VM

log = logging.getLogger(__name__)

WARM_EXECS = 3
MAX_POOL = 1024


@dataclass(frozen=True)
class PoolStats:
    """A pool's counters at one moment (`Pool.stats`)."""

    size: int  # VMs kept ready when idle
    max_size: int  # VMs alive at most: ready + in use + starting
    target: int  # VMs it keeps ready now (size, raised by misses up to max_size)
    ready: int
    in_use: int
    starting: int
    hits: int  # acquires served by a ready VM
    misses: int  # acquires that had to wait for one
    acquire_ms_p50: float | None  # over the last ACQUIRE_WINDOW acquires
    acquire_ms_max: float | None
    error: str | None  # why the last start failed, while failing

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


ACQUIRE_WINDOW = 256


class Pool:
    """Keep ``size`` VMs of ``image`` (an image reference or ``snapshot:NAME``) ready.

    Extra keyword arguments go to `VM` (memory, cpus, home, ...). With ``warm`` each VM runs
    one command before it is counted as ready, so the first command of whoever acquires it
    does not pay for the guest's cold paths (under TCG: translating the exec path once).
    """

    def __init__(self, image: Any, size: int = 2, *, max_size: int | None = None,
                 idle_timeout: float | None = None, warm: bool = True,
                 refill_delay: float = 0.2, **vm_options: Any) -> None:
        self._image = image if not isinstance(image, os.PathLike) else os.fspath(image)
        self._warm = warm
        self._vm_options = vm_options
        self._ready: deque[VM] = deque()
        self._leased: set[VM] = set()
        self._starting = 0
        self._closed = False
        self._error: Error | None = None
        self._cond = threading.Condition()
        self._threads = ThreadGroup("pool")
        self._started = False
        self._hits = self._misses = 0
        self._acquire_ms: deque[float] = deque(maxlen=ACQUIRE_WINDOW)
        self._last_acquire = time.monotonic()
        self._last_handout = float("-inf")
        self.refill_delay = refill_delay
        self.size = self.max_size = self._extra = 0
        self.idle_timeout: float | None = None
        self.resize(size, max_size, idle_timeout)

    def resize(self, size: int, max_size: int | None = None,
               idle_timeout: float | None = None) -> None:
        """Change the sizing (see the module's docstring); surplus ready VMs go at once."""
        max_size = size if max_size is None else max_size
        for what, n in (("pool size", size), ("pool max size", max_size)):
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_POOL:
                raise UsageError(f"{what} {n!r} out of range: 0 to {MAX_POOL}")
        if max_size < max(size, 1):
            raise UsageError(f"pool max size {max_size} is below its size {size} (or 0)")
        if idle_timeout is not None and (isinstance(idle_timeout, bool) or not isinstance(
                idle_timeout, int | float) or not 0 < idle_timeout <= 86400 * 7):
            raise UsageError("pool idle timeout must be from 0 to 7 days, in seconds")
        with self._cond:
            self.size, self.max_size, self.idle_timeout = size, max_size, idle_timeout
            self._extra = min(self._extra, max_size - size)
            surplus = self._trim()
            self._cond.notify_all()
        for vm in surplus:
            vm.close()

    def _trim(self) -> list[VM]:
        """Ready VMs beyond the target, taken out (to close outside the lock)."""
        out = []
        while len(self._ready) > self.size + self._extra:
            out.append(self._ready.pop())
        return out

    @property
    def spec(self) -> Any:
        """What each VM is made from: the image (or `VMSpec`) given."""
        return self._image

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Pool:
        with self._cond:
            if self._started:
                return self
            self._started = True
        self._threads.start(self._refill, name="refill")
        return self

    def _make(self) -> VM:
        vm = VM(self._image, **self._vm_options)
        vm.start()
        try:
            if self._warm:
                # Under TCG a new QEMU translates the guest's exec path afresh: the first
                # exec costs ~300 ms, the second ~20 ms, from the third on ~10 ms. A missing
                # `true` still warms fork/exec.
                for _ in range(WARM_EXECS):
                    vm.exec(["true"], timeout=60)
        except BaseException:
            vm.close()
            raise
        return vm

    def _wanted(self) -> bool:
        """Whether to start one more VM now (under the lock)."""
        alive = len(self._ready) + len(self._leased) + self._starting
        return len(self._ready) + self._starting < self.size + self._extra and \
            alive < self.max_size

    def _refill(self) -> None:
        failures = 0
        while True:
            surplus: list[VM] = []
            with self._cond:
                while not self._closed and not surplus:
                    if self._wanted():
                        hold = self._hold()
                        if hold <= 0:
                            break
                        self._cond.wait(hold)
                        continue
                    self._cond.wait(self._idle_wait())
                    surplus = self._idle_check()
                if not surplus:
                    if self._closed:
                        return
                    self._starting += 1
            if surplus:  # idle: the VMs above ``size`` go (closed outside the lock)
                for vm in surplus:
                    vm.close()
                continue
            try:
                vm = self._make()
                failures = 0
            except Error as e:
                failures += 1
                log.warning("pool: could not start a VM: %s", e)
                with self._cond:
                    self._starting -= 1
                    self._error = e
                    self._cond.notify_all()
                time.sleep(min(5.0, 0.1 * 2 ** failures))  # don't spin on a broken image
                continue
            with self._cond:
                self._starting -= 1
                if self._closed:
                    vm.close()
                    return
                self._error = None
                self._ready.append(vm)
                self._cond.notify_all()

    def _hold(self) -> float:
        """How much longer a restore waits (see refill_delay; under the lock)."""
        if not self._ready:
            return 0.0
        return self._last_handout + self.refill_delay - time.monotonic()

    def _idle_wait(self) -> float | None:
        if self.idle_timeout is None or not self._extra:
            return None
        return max(0.05, self._last_acquire + self.idle_timeout - time.monotonic())

    def _idle_check(self) -> list[VM]:
        """After idle_timeout without an acquire: back to ``size`` (under the lock)."""
        if self.idle_timeout is None or not self._extra or \
                time.monotonic() - self._last_acquire < self.idle_timeout:
            return []
        self._extra = 0
        return self._trim()

    def acquire(self, timeout: float | None = None) -> VM:
        """A ready VM (waiting for one if none is); release() it when done."""
        self.start()
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        with self._cond:
            self._last_acquire = t0
            hit = bool(self._ready)
            if hit:
                self._hits += 1
            else:
                self._misses += 1
                if self.size + self._extra < self.max_size:
                    self._extra += 1  # demand: keep one more ready from now on
                self._cond.notify_all()
            while not self._ready:
                if self._closed:
                    raise VMError("the pool is closed")
                if self._error is not None and not self._starting:
                    raise VMError(f"the pool cannot start VMs: {self._error}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise VMError(f"no VM became ready within {timeout:g}s")
                self._cond.wait(remaining)
            vm = self._ready.popleft()
            self._leased.add(vm)
            self._last_handout = time.monotonic()
            self._acquire_ms.append((time.monotonic() - t0) * 1000)
            self._cond.notify_all()
            return vm

    def release(self, vm: VM) -> None:
        """Destroy a VM handed out by acquire(); the pool restores a fresh one in its place."""
        with self._cond:
            if vm not in self._leased:
                raise VMError("that VM does not belong to this pool (or was released)")
            self._leased.discard(vm)
            self._cond.notify_all()
        vm.close()

    @property
    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    def stats(self) -> PoolStats:
        with self._cond:
            times = sorted(self._acquire_ms)
            return PoolStats(
                size=self.size, max_size=self.max_size, target=self.size + self._extra,
                ready=len(self._ready), in_use=len(self._leased), starting=self._starting,
                hits=self._hits, misses=self._misses,
                acquire_ms_p50=round(times[len(times) // 2], 3) if times else None,
                acquire_ms_max=round(times[-1], 3) if times else None,
                error=str(self._error) if self._error is not None else None)

    def close(self) -> None:
        """Destroy every VM of the pool, handed out or not, and stop refilling."""
        with self._cond:
            self._closed = True
            vms = list(self._ready) + list(self._leased)
            self._ready.clear()
            self._leased.clear()
            self._cond.notify_all()
        for vm in vms:
            vm.close()
        self._threads.join(timeout=120)  # a VM it is starting now is closed when it is up
