"""detached.py (names, records, flock liveness, removal) and the stop-signal parser,
with real files and real processes holding the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supermachine.detached import state as detached
from supermachine.detached.hosted import parse_stop_signal
from supermachine.errors import UsageError, VMError
from supermachine.home import Home


@pytest.fixture
def home(tmp_path) -> Home:
    return Home(tmp_path / "home")


def _record(d: detached.VMDir, **kw) -> detached.VMRecord:
    r = detached.VMRecord(name=d.name, id=detached.new_id(), image="img", command=["sh"],
                          created=time.time(), **kw)
    d.write(r)
    return r


def _hold_lock(d: detached.VMDir) -> subprocess.Popen[bytes]:
    """A real process holding the VM's lock, as a supervisor does."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(d.lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"locked\n"
    return proc


@pytest.mark.parametrize("name", ["a", "web-1", "x.y_z", "A" * 128])
def test_valid_names(name):
    assert detached.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "_a", ".", "..", "a/b", "a b", "A" * 129, "é"])
def test_invalid_names(name):
    with pytest.raises(UsageError):
        detached.validate_name(name)


def test_names_are_unique_and_generated(home):
    d = detached.create(home.vms, "web")
    assert os.path.isdir(d.path) and (os.stat(d.path).st_mode & 0o777) == 0o700
    with pytest.raises(VMError, match="already in use"):
        detached.create(home.vms, "web")
    generated = {detached.create(home.vms, None).name for _ in range(5)}
    assert len(generated) == 5 and all(detached.NAME_RE.match(n) for n in generated)


def test_liveness_follows_the_lock_holder(home):
    d = detached.create(home.vms, "vm")
    _record(d, status=detached.RUNNING)
    assert d.state_now().status == detached.DEAD  # running on paper, nobody holds the lock
    holder = _hold_lock(d)
    try:
        state = d.state_now()
        assert state.alive and state.running and state.status == detached.RUNNING
        with pytest.raises(VMError, match="running"):
            detached.remove(d)
    finally:
        holder.kill()
        holder.wait()
    assert d.state_now().status == detached.DEAD  # SIGKILLed holder: seen as dead
    detached.remove(d)
    assert not os.path.exists(d.path)
    with pytest.raises(VMError, match="no such VM"):
        detached.find(home.vms, "vm")


def test_find_by_name_or_id_prefix_and_listing(home):
    a = detached.create(home.vms, "a")
    ra = _record(a, status=detached.EXITED, exit_code=7, finished=time.time())
    b = detached.create(home.vms, "b")
    _record(b)
    detached.create(home.vms, "half-created")  # no state.json yet: not listed
    assert detached.find(home.vms, "a").name == "a"
    assert detached.find(home.vms, ra.id[:12]).name == "a"
    assert [s.record.name for s in detached.list_states(home.vms)] == ["b", "a"]
    with pytest.raises(VMError, match="no such VM"):
        detached.find(home.vms, "nope")


def test_corrupt_state_is_an_error_not_a_crash(home):
    d = detached.create(home.vms, "bad")
    Path(d.state).write_bytes(b"{not json")
    with pytest.raises(VMError, match="corrupt"):
        d.read()
    assert detached.list_states(home.vms) == []
    detached.remove(d)


def test_status_text():
    now = 1_000_000.0
    rec = detached.VMRecord(name="n", id="0", image="i", command=[], created=now - 400,
                            status=detached.RUNNING, started=now - 180)
    assert detached.status_text(detached.VMState(rec, True), now) == "Up 3 minutes"
    ex = detached.VMRecord(name="n", id="0", image="i", command=[], created=now - 400,
                           status=detached.EXITED, exit_code=7, finished=now - 120)
    assert detached.status_text(detached.VMState(ex, False), now) == \
        "Exited (7) 2 minutes ago"
    assert detached.status_text(detached.VMState(rec, False), now).startswith("Dead")


@pytest.mark.parametrize(("seconds", "text"), [
    (0.2, "Less than a second"), (1, "1 second"), (45, "45 seconds"), (70, "About a minute"),
    (600, "10 minutes"), (3700, "About an hour"), (7200 * 3, "6 hours"), (86400 * 3, "3 days"),
])
def test_human_duration(seconds, text):
    assert detached.human_duration(seconds) == text


@pytest.mark.parametrize(("text", "signo"), [
    ("", signal.SIGTERM), ("SIGQUIT", signal.SIGQUIT), ("int", signal.SIGINT), ("9", 9),
    ("SIGBOGUS", signal.SIGTERM), ("99", signal.SIGTERM),
])
def test_stop_signal(text, signo):
    assert parse_stop_signal(text) == signo


def test_record_round_trips_and_stays_immutable(home):
    d = detached.create(home.vms, "rec")
    r = _record(d, ports=["127.0.0.1:8080->80/tcp"])
    assert d.read() == r
    assert r.status == detached.STARTING and r.options == {} and r.exit_code is None
    changed = d.update(status=detached.RUNNING, qemu_pid=42)
    assert (changed.status, changed.qemu_pid, changed.name) == (detached.RUNNING, 42, "rec")
    assert d.read() == changed and changed != r
    with pytest.raises(AttributeError):
        r.status = detached.EXITED  # type: ignore[misc]
    other = detached.VMRecord(name="x", id="0", image="i", command=[], created=0.0)
    assert other.ports == [] and other.ports is not detached.VMRecord(
        name="y", id="1", image="i", command=[], created=0.0).ports  # fresh defaults


def test_record_refuses_unknown_or_missing_fields():
    with pytest.raises(TypeError):
        detached.VMRecord(name="x", id="0", image="i", command=[])  # no created
    with pytest.raises(TypeError):
        detached.VMRecord(name="x", id="0", image="i", command=[], created=0.0, bogus=1)


def test_unknown_fields_in_state_json_are_ignored(home):
    d = detached.create(home.vms, "newer")
    r = _record(d)
    Path(d.state).write_bytes(r.to_json()[:-1] + b', "from_a_newer_version": 1}')
    assert d.read() == r
