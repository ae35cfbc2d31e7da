"""pull.run_jobs: a pull's downloads side by side on threads it owns and joins."""

from __future__ import annotations

import threading
import time

import pytest

from supermachine.errors import ImageError
from supermachine.images.pull import _Cancelled, run_jobs


def _pull_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sm-pull-")]


def test_every_job_runs_on_at_most_the_given_threads_and_all_are_joined():
    seen: set[str] = set()
    lock = threading.Lock()

    def job():
        time.sleep(0.02)
        with lock:
            seen.add(threading.current_thread().name)

    run_jobs([job] * 9, 3, threading.Event())
    assert threading.current_thread().name in seen  # the caller works too
    assert len(seen) <= 3
    assert _pull_threads() == []


def test_the_first_failure_cancels_the_rest_and_is_raised():
    cancel = threading.Event()
    started = []

    def fails():
        raise ImageError("blob is corrupt")

    def waits():
        started.append(1)
        for _ in range(200):
            if cancel.is_set():
                raise _Cancelled
            time.sleep(0.01)

    with pytest.raises(ImageError, match="corrupt"):
        run_jobs([waits, fails] + [waits] * 6, 2, cancel)
    assert cancel.is_set() and len(started) < 7  # the queued ones never started
    assert _pull_threads() == []


def test_an_interrupt_in_any_job_wins_over_errors():
    both_started = threading.Barrier(2, timeout=10)

    def interrupted():
        both_started.wait()
        time.sleep(0.05)  # the other job's error comes first
        raise KeyboardInterrupt

    def fails():
        both_started.wait()
        raise ImageError("x")

    with pytest.raises(KeyboardInterrupt):
        run_jobs([fails, interrupted], 2, threading.Event())
    assert _pull_threads() == []
