"""`kbuild.build`'s bookkeeping: one build when two race, nothing half-built after a kill,
a one-line error when a step fails.

A real kernel build takes 6-10 minutes here; it runs in install.sh (and so in CI on a fresh
cache) and its product is tested in tests/e2e. These tests give `build` a stand-in source
package instead: a real .deb (made with dpkg-deb) holding a tree whose Makefile does what
Kbuild's targets do to the files kbuild.py reads (.config, include/config/kernel.release,
vmlinux), counting its runs and sleeping where a build would compile."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from supermachine.errors import GuestError
from supermachine.guest import kbuild
from supermachine.home import Home

MAKEFILE = """\
# Stand-in for the kernel's Makefile (see the test module's docstring).
allnoconfig:
\tmkdir -p $(O)
\tcp $(KCONFIG_ALLCONFIG) $(O)/.config
\t[ ! -e $(FAIL) ] || { echo "error: $$(cat $(FAIL))" >&2; exit 2; }
vmlinux:
\techo run >> $(COUNTER)
\tsleep $(SLEEP)
\tmkdir -p $(O)/include/config
\techo 6.1.999 > $(O)/include/config/kernel.release
\tprintf '\\177ELF stand-in kernel' > $(O)/vmlinux
"""


def _source_deb(tmp: Path, counter: Path, sleep: float) -> Path:
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "Makefile").write_text(MAKEFILE.replace("$(COUNTER)", str(counter))
                                   .replace("$(SLEEP)", str(sleep))
                                   .replace("$(FAIL)", str(tmp / "fail-config")))
    pkg = tmp / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: linux-source-test\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: stand-in\n")
    (pkg / "usr/src").mkdir(parents=True)
    with tarfile.open(pkg / "usr/src/linux-source-6.1.tar.xz", "w:xz") as tf:
        tf.add(tree, arcname="linux-source-6.1")
    deb = tmp / "linux-source-test_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(pkg), str(deb)], check=True,
                   capture_output=True)
    return deb


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SUPERMACHINE_KERNELS", raising=False)
    counter = tmp_path / "runs"
    return Home(tmp_path / "home"), counter, tmp_path


def _build(root: str, deb: str) -> str:
    return str(kbuild.build(Home(Path(root)), source_deb=Path(deb), jobs=1).path)


def test_two_builds_racing_build_once(setup) -> None:
    home, counter, tmp = setup
    deb = _source_deb(tmp, counter, 1.0)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_build, [(str(home.root), str(deb))] * 2)
    assert paths[0] == paths[1]
    assert counter.read_text().count("run") == 1
    built = kbuild.built_kernel(home)
    assert built is not None and str(built.path) == paths[0]
    assert built.path.read_bytes().startswith(b"\x7fELF")
    assert built.record["source"]["sha256"] and built.record["timings"]["build_s"] >= 1
    assert not list(home.kernels.glob(".tmp-*")) and not list(home.kernels.glob("build-*.log"))
    # built: the next call does nothing
    assert _build(str(home.root), str(deb)) == paths[0]
    assert counter.read_text().count("run") == 1


def test_a_killed_build_leaves_nothing_half_built(setup) -> None:
    home, counter, tmp = setup
    deb = _source_deb(tmp, counter, 30)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_build, args=(str(home.root), str(deb)))
    proc.start()
    deadline = time.monotonic() + 60
    while not counter.exists():
        assert time.monotonic() < deadline, "the stand-in build never started"
        time.sleep(0.05)
    os.killpg(os.getpgid(proc.pid), 0)  # still there
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    subprocess.run(["pkill", "-f", "^sleep 30$"], check=False)  # the orphaned make's sleep
    assert kbuild.built_kernel(home) is None
    assert not list(home.kernels.glob("sm-*"))
    # the next build sweeps the staging left behind and builds
    (tmp / "again").mkdir()
    quick = _source_deb(tmp / "again", counter, 0)
    kbuild.build(home, source_deb=quick, jobs=1)
    assert not list(home.kernels.glob(".tmp-*"))
    assert kbuild.built_kernel(home) is not None


def test_a_failed_step_is_one_line_and_keeps_its_log(setup) -> None:
    home, counter, tmp = setup
    deb = _source_deb(tmp, counter, 0)
    (tmp / "fail-config").write_text("flex: not found")
    with pytest.raises(GuestError) as e:
        kbuild.build(home, source_deb=deb, jobs=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("configuring the kernel failed") and "flex: not found" in msg
    assert kbuild.built_kernel(home) is None and not list(home.kernels.glob("sm-*"))
    assert not list(home.kernels.glob(".tmp-*"))
    (log,) = home.kernels.glob("build-*.log")
    assert "flex: not found" in log.read_text()
