"""Pools: N VMs restored from one snapshot, kept ready in the background.

``acquire()`` hands out a ready VM at once when there is one; ``release()`` destroys it and
the pool restores a fresh one in its place. A pool owns every VM it made, handed out or
not: closing it (or leaving ``with``) destroys them all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from ..errors import Error, UsageError, VMError
from .threads import ThreadGroup
from .vm import VM

log = logging.getLogger(__name__)

WARM_EXECS = 3


class Pool:
    """Keep ``size`` VMs of ``image`` (an image reference or ``snapshot:NAME``) ready.

    Extra keyword arguments go to `VM` (memory, cpus, home, ...). With ``warm`` each VM runs
    one command before it is counted as ready, so the first command of whoever acquires it
    does not pay for the guest's cold paths (under TCG: translating the exec path once).
    """

    def __init__(self, image: str | os.PathLike[str], size: int = 2, *, warm: bool = True,
                 **vm_options: Any) -> None:
        if not 1 <= size <= 1024:
            raise UsageError(f"pool size {size} out of range: 1 to 1024")
        self._image = os.fspath(image)
        self.size = size
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

    def _refill(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._closed and \
                        len(self._ready) + len(self._leased) + self._starting >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
                self._starting += 1
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

    def acquire(self, timeout: float | None = None) -> VM:
        """A ready VM (waiting for one if none is); release() it when done."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
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
