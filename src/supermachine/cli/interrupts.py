"""SIGINT, SIGTERM and SIGHUP as events for a process that owns a live VM.

Python's default turns SIGINT into a KeyboardInterrupt raised wherever the main thread
happens to be: inside a ``with lock:`` before its body, in a ``finally``, in the middle of a
protocol update. A VM's threads then wait forever for a lock the main thread never
releases, and Ctrl-C hangs (it did, once in a full test run). So while a VM is guarded
here, a signal never raises: the handler only records it and kills the VM's QEMU processes
(`kill_now`, no locks). Every wait on the VM then fails at its ordinary error path, the code
unwinds through its ``with`` blocks in order, and the process exits with 128+N.

Before any QEMU runs (pulling, building a root filesystem) nothing can deadlock on a VM, so
the signal unwinds at once as before. A third signal while a teardown is under way exits
the process at once: QEMU and passt die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import _signal  # not `signal`: that imports enum (4 ms), a window in which Ctrl-C is not ours
import os

SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
FORCE_AFTER = 3


class Interrupts:
    def __init__(self) -> None:
        #: the first signal received, if any (the process exits with 128 + it)
        self.received: int | None = None
        self._count = 0
        self._guarded = None  # anything with a signal-safe kill_now() -> bool (runtime.VM)

    def install(self) -> None:
        for sig in SIGNALS:
            _signal.signal(sig, self._handle)

    def guarding(self, target) -> _Guarding:
        """While inside, a signal kills ``target``'s machines instead of raising."""
        return _Guarding(self, target)

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + self.received

    def _handle(self, signum: int, _frame: object) -> None:
        self._count += 1
        if self.received is None:
            self.received = signum
        target = self._guarded
        if target is None:
            raise SystemExit(128 + signum)
        if self._count >= FORCE_AFTER:
            os._exit(128 + self.received)
        if self._count == 1 and not target.kill_now():
            raise SystemExit(128 + signum)  # no machine yet: nothing is held, unwind now
        # A later signal while the first one's teardown runs: let it finish.


class _Guarding:
    """``with INTERRUPTS.guarding(vm):`` (a class, not contextlib: every command imports
    this module first, and contextlib is 1 ms of `ps`)."""

    def __init__(self, interrupts: Interrupts, target) -> None:
        self._interrupts, self._target = interrupts, target

    def __enter__(self) -> None:
        self._interrupts._guarded = self._target

    def __exit__(self, *exc: object) -> None:
        self._interrupts._guarded = None


#: this process's handling (the CLI installs it in main())
INTERRUPTS = Interrupts()
