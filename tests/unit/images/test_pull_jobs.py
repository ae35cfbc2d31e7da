"""pull.run_jobs: a pull's downloads side by side on threads it owns and waits for."""

from __future__ import annotations

import os
import threading
import time

import pytest

from supermachine.errors import ImageError
from supermachine.images.pull import Flag, _Cancelled, run_jobs


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def no_thread_left():
    """The process has as many threads after the test as before: run_jobs's helpers are
    plain _thread threads, which threading.enumerate does not list. A helper's last act
    is releasing the lock run_jobs waits for, so its OS thread may take a moment more."""
    before = _os_threads()
    yield
    deadline = time.monotonic() + 5
    while _os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _os_threads() == before


def test_every_job_runs_on_at_most_the_given_threads_and_all_are_joined(no_thread_left):
    seen: set[str] = set()
    lock = threading.Lock()

    def job():
        time.sleep(0.02)
        with lock:
            seen.add(threading.current_thread().name)

    caller = threading.current_thread().name
    run_jobs([job] * 9, 3, Flag())
    assert caller in seen  # the caller works too
    assert 1 < len(seen) <= 3  # helpers ran some


def test_the_first_failure_cancels_the_rest_and_is_raised(no_thread_left):
    cancel = Flag()
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


def test_an_interrupt_in_any_job_wins_over_errors(no_thread_left):
    both_started = threading.Barrier(2, timeout=10)

    def interrupted():
        both_started.wait()
        time.sleep(0.05)  # the other job's error comes first
        raise KeyboardInterrupt

    def fails():
        both_started.wait()
        raise ImageError("x")

    with pytest.raises(KeyboardInterrupt):
        run_jobs([fails, interrupted], 2, Flag())
