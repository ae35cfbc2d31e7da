"""The test suite's own setup (tests/conftest.py), run in an inner pytest: each session gets a
fresh state home and removes it, abandoned ones are swept, downloads are shared, everything
under tests/e2e is marked e2e, and a test not so marked fails if it starts a VM or a
registry (so `-m "not e2e"` is VM-free)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

INNER = '''
import os
import subprocess
from pathlib import Path

import pytest

STAND_IN = ["bash", "-c", "exec -a qemu-system-stand-in sleep 0.5"]


def test_unmarked_test_starts_a_vm():
    subprocess.run(STAND_IN, check=True)


@pytest.mark.e2e
def test_e2e_test_starts_a_vm():
    subprocess.run(STAND_IN, check=True)


def test_state_home(state_home):
    assert state_home.is_dir() and [p.name for p in state_home.iterdir()] == [".session.lock"]
    Path(os.environ["REPORT"]).write_text(f"{state_home}\\n{os.environ['SUPERMACHINE_DOWNLOADS']}")
'''


def test_session_homes_downloads_and_the_vm_free_guard(tmp_path: Path) -> None:
    root = tmp_path / "test-home"
    dead = root / "session-dead"  # a session killed before it cleaned up: its lock is free
    dead.mkdir(parents=True)
    (dead / ".session.lock").touch()
    starting = root / "session-starting"  # one being created (no lock file yet)
    starting.mkdir()
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPERMACHINE_DOWNLOADS", "SUPERMACHINE_TEST_SESSION")}
    env.update(SUPERMACHINE_TEST_HOME=str(root), REPORT=str(tmp_path / "report"),
               PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "3 passed, 1 error" in out, out  # the guard fails it at its teardown
    assert "ERROR at teardown of test_unmarked_test_starts_a_vm" in out
    assert "a test not marked e2e started qemu-system-stand-in" in out
    home, downloads = (tmp_path / "report").read_text().splitlines()
    assert Path(home).parent == root and not Path(home).exists()  # removed at the end
    assert downloads == str(root / "downloads")
    assert (root / "downloads").stat().st_mode & 0o777 == 0o755
    assert not dead.exists() and starting.exists()


def test_not_e2e_selects_nothing_under_tests_e2e() -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--collect-only", "-m", "not e2e", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert any(i.startswith("tests/unit/") for i in ids)
    assert not [i for i in ids if not i.startswith("tests/unit/")]
    assert "deselected" in r.stdout  # the e2e tests were collected, and left out
