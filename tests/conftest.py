"""Session-wide setup for every test: state homes, the `e2e` marker, and the VM-free guard.

State. Each session gets a fresh state home, a new directory under ``$SUPERMACHINE_TEST_HOME``
(default /var/tmp/supermachine-test-home) removed when the session ends, so two runs on one
machine never see each other's detached VMs, snapshots or caches, and nothing built by older
code is reused. Only downloaded inputs (the guest kernel's package) are shared, through
``$SUPERMACHINE_TEST_HOME/downloads``, exported as ``SUPERMACHINE_DOWNLOADS`` to every process
the session starts. Both are world-readable for the tests that run as an unprivileged user.

Markers. Every test under tests/e2e is marked ``e2e`` (it boots a VM or starts a registry);
``pytest -m "not e2e"`` runs the rest, and the guard below fails any unmarked test during
which a QEMU or a registry process of this session appears.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

TEST_ROOT = Path(os.environ.get("SUPERMACHINE_TEST_HOME", "/var/tmp/supermachine-test-home"))
E2E_DIR = Path(__file__).resolve().parent / "e2e"

# Marks the processes this session starts (inherited through the environment), so leak
# checks and the guard ignore VMs and registries of anything else running on the machine.
SESSION = secrets.token_hex(4)
os.environ["SUPERMACHINE_TEST_SESSION"] = SESSION
SESSION_MARK = f"SUPERMACHINE_TEST_SESSION={SESSION}".encode()

_SESSION_PREFIX = "session-"
_LOCK_NAME = ".session.lock"


# -- state homes --------------------------------------------------------------------------------


def _sweep_abandoned_sessions() -> None:
    """Remove session homes whose session died without cleaning up (SIGKILL, power loss):
    their lock is free. A home without a lock file is one being created; it is left alone."""
    for entry in TEST_ROOT.glob(f"{_SESSION_PREFIX}*"):
        try:
            fd = os.open(entry / _LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live session holds it
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)


class _SessionHome:
    """This session's state home, created on first use and removed at the session's end."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._lock_fd: int | None = None

    def get(self) -> Path:
        if self.path is None:
            TEST_ROOT.mkdir(parents=True, exist_ok=True)
            TEST_ROOT.chmod(0o755)
            _sweep_abandoned_sessions()
            path = Path(tempfile.mkdtemp(prefix=_SESSION_PREFIX, dir=TEST_ROOT))
            self._lock_fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            path.chmod(0o755)
            self.path = path
        return self.path

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_session_home = _SessionHome()


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("SUPERMACHINE_DOWNLOADS"):
        downloads = TEST_ROOT / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        for d in (TEST_ROOT, downloads):
            with contextlib.suppress(OSError):  # not ours to change: leave it as it is
                d.chmod(0o755)
        os.environ["SUPERMACHINE_DOWNLOADS"] = str(downloads)
    if not os.environ.get("SUPERMACHINE_KERNELS"):
        os.environ["SUPERMACHINE_KERNELS"] = str(_share_built_kernel(TEST_ROOT / "kernels"))
    config.pluginmanager.register(_VmFreeGuard(), "vm-free-guard")


def _share_built_kernel(shared: Path) -> Path:
    """A kernels directory every session (and the unprivileged user) can read, holding the
    supermachine kernel install.sh built in the user's own home (copied once per build; the
    user's home may be private). Without one, VMs boot Debian's kernel and say so."""
    from supermachine.guest import kbuild
    from supermachine.home import Home

    shared.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        shared.chmod(0o755)
    built = kbuild.built_kernel(Home.default())
    if built is None:
        return shared
    target = shared / built.path.parent.name
    with kbuild.file_lock(shared / ".build.lock"):
        if not (target / "kernel.json").is_file():
            stage = Path(tempfile.mkdtemp(dir=shared, prefix=".tmp-copy-"))
            for name in ("vmlinux", "config", "kernel.json"):
                shutil.copyfile(built.path.parent / name, stage / name)
                (stage / name).chmod(0o644)
            stage.chmod(0o755)
            os.replace(stage, target)
        kbuild.atomic_write_bytes(shared / f"sm-{kbuild.config_digest()}.json",
                                  (target / "kernel.json").read_bytes())
    return shared


def pytest_unconfigure(config: pytest.Config) -> None:
    _session_home.remove()


@pytest.fixture(scope="session")
def state_home() -> Path:
    """This session's state home (a fresh directory; see the module docstring)."""
    return _session_home.get()


# -- markers ------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


# -- the VM-free guard --------------------------------------------------------------------------

WATCHED = (b"qemu-system", b"docker-registry")


def session_processes(kinds: tuple[bytes, ...] = WATCHED) -> dict[int, str]:
    """Processes of this session (by SESSION_MARK) whose program name contains one of
    ``kinds``: pid -> program."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                program = os.path.basename(f.read(4096).split(b"\0", 1)[0])
            if not any(kind in program for kind in kinds):
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if SESSION_MARK not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found[int(entry.name)] = program.decode("utf-8", "replace")
    return found


class _VmFreeGuard:
    """Fails a test not marked e2e if a QEMU or registry process of this session appears
    from its setup to its teardown: ``-m "not e2e"`` must be VM-free. A sampler thread looks
    every 0.1 s (a VM lives for seconds even under a fast accelerator), and once more after
    the test's fixtures are torn down.
    """

    INTERVAL = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: set[int] = set()
        self._current: str | None = None
        self._started: list[str] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _scan(self) -> None:
        procs = session_processes()
        with self._lock:
            if self._current is not None:
                self._started += [f"{procs[pid]} (pid {pid})" for pid in procs.keys() - self._known]
            self._known = set(procs)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.INTERVAL)
            if self._current is not None:
                self._scan()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if item.get_closest_marker("e2e") is not None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vm-free-guard",
                                            daemon=True)
            self._thread.start()
        self._scan()  # what runs already (a session registry an e2e test started) is known
        with self._lock:
            self._current, self._started = item.nodeid, []
        self._wake.set()

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        if self._current != item.nodeid:
            return
        self._scan()
        with self._lock:
            self._current, started = None, self._started
        self._wake.clear()
        if started:
            pytest.fail(f"a test not marked e2e started {', '.join(started)}: mark it "
                        "@pytest.mark.e2e or keep it VM-free", pytrace=False)
