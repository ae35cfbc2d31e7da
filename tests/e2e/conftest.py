"""End-to-end fixtures: real QEMU VMs (TCG here), real images built from Debian packages.

The guest kernel, initramfs and root filesystems are cached in one test home shared by the
whole session (and by later sessions on the same machine), so only the first run pays for
fetching the kernel and building squashfs images.
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

from tests.fixtures import images as fx

TEST_HOME = Path(os.environ.get("SUPERMACHINE_TEST_HOME", "/var/tmp/supermachine-test-home"))
CLI = [sys.executable, "-m", "supermachine"]


# Marks the processes this test session starts (inherited through the environment), so
# leak checks ignore VMs of anything else running on the machine.
SESSION_MARK = f"SUPERMACHINE_TEST_SESSION={os.getpid()}"
os.environ["SUPERMACHINE_TEST_SESSION"] = str(os.getpid())


def qemu_pids() -> set[int]:
    """QEMU processes started by this test session."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"qemu-system" not in cmd.split(b"\0", 1)[0]:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if SESSION_MARK.encode() in environ:
            pids.add(int(entry.name))
    return pids


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
def home() -> Path:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    return TEST_HOME


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
def nobody_home() -> Iterator[Path]:
    """A home for the unprivileged user (pytest's tmp_path lives under a root-only dir)."""
    path = Path(tempfile.mkdtemp(prefix="sm-nobody-"))
    path.chmod(0o755)
    os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path, ignore_errors=True)
