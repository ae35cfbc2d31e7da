"""End-to-end fixtures: real QEMU VMs (TCG here), real images built from Debian packages.

The session's state home (a fresh one per session, see tests/conftest.py) holds the guest
kernel, initramfs, root filesystems and detached VMs; the kernel's package is downloaded once
per machine into the shared downloads directory (not for the unprivileged user: see
``nobody_home``), and the test images are cached by tests/fixtures/images.py. Detached VMs
get names unique to the session (``vm_name``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SESSION, session_processes
from tests.fixtures import images as fx

CLI = [sys.executable, "-m", "supermachine"]


def qemu_pids() -> set[int]:
    """QEMU processes started by this test session."""
    return set(session_processes((b"qemu-system",)))


def vm_name(prefix: str) -> str:
    """A detached VM name no other test session uses."""
    return f"{prefix}-{SESSION}"


@pytest.fixture(autouse=True)
def no_leaked_vms() -> Iterator[None]:
    """Every end-to-end test must leave no QEMU process behind."""
    before = qemu_pids()
    yield
    deadline = time.monotonic() + 5
    while (leaked := qemu_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked, f"QEMU processes left running: {sorted(leaked)}"


@pytest.fixture(scope="session")
def home(state_home) -> Path:
    return state_home


@pytest.fixture(scope="session")
def busybox() -> Path:
    return fx.busybox()


@pytest.fixture(scope="session")
def python_image() -> Path:
    return fx.python()


def run_cli(home: Path, *args: str, input: bytes | None = None, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, "SUPERMACHINE_HOME": str(home), **(env or {})}
    return subprocess.run([*CLI, *args], input=input, capture_output=True, timeout=timeout,
                          env=full_env, stdin=None if input is not None else subprocess.DEVNULL)


@pytest.fixture
def cli(home):
    def call(*args: str, **kw) -> subprocess.CompletedProcess[bytes]:
        return run_cli(home, *args, **kw)
    return call


@pytest.fixture
def nobody_home(monkeypatch) -> Iterator[Path]:
    """A home for the unprivileged user (pytest's tmp_path lives under a root-only dir).

    Its runs fetch the kernel themselves, into this home, as an ordinary user would: the
    session's shared downloads directory is root's (SUPERMACHINE_DOWNLOADS is unset for
    the test, and runuser passes the environment on).
    """
    monkeypatch.delenv("SUPERMACHINE_DOWNLOADS")
    path = Path(tempfile.mkdtemp(prefix="sm-nobody-"))
    path.chmod(0o755)
    os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path, ignore_errors=True)
