"""Helper threads that belong to one owner and end with it, the way a Trio nursery owns its
tasks: the owner starts them through its `ThreadGroup`, and closing the owner stops and
joins every one of them. A thread that blocks on I/O takes a `Stop` (a pipe it can select
on) so it can be woken; one that waits on a process or a socket ends when its owner closes
them first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 10.0


class Stop:
    """A one-way signal a thread can select on (``fileno``) or poll (``is_set``)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._set = False

    def fileno(self) -> int:
        return self._r

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            os.write(self._w, b"x")

    def close(self) -> None:
        for fd in (self._r, self._w):
            os.close(fd)


class ThreadGroup:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._threads: list[threading.Thread] = []
        self._stops: list[Stop] = []
        self._lock = threading.Lock()

    def start(self, target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
        # daemon: a bug that wedges one must still never keep the process alive
        thread = threading.Thread(target=target, args=args, name=f"{self.owner}-{name}",
                                  daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return thread

    def stop_event(self) -> Stop:
        """A `Stop` that `join` sets before it waits."""
        stop = Stop()
        with self._lock:
            self._stops.append(stop)
        return stop

    def running(self) -> list[str]:
        with self._lock:
            return [t.name for t in self._threads if t.is_alive()]

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Stop and join every thread (never the calling one); log any that outlive
        ``timeout``, which only a bug can cause."""
        with self._lock:
            threads, stops = list(self._threads), list(self._stops)
            self._threads, self._stops = [], []
        for stop in stops:
            stop.set()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive() and t is not me]
        if stuck:  # their pipes stay open: a stuck thread may still select on them
            log.warning("threads still running after %.0f s: %s", timeout, ", ".join(stuck))
            return
        for stop in stops:
            stop.close()

    def __enter__(self) -> ThreadGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()
