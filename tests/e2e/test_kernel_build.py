"""The supermachine kernel: VMs boot it by default once built, a failed build is one line
and VMs then boot Debian's kernel, saying so. (install.sh builds the kernel; CI runs it on a
fresh cache, so the build itself is exercised there, and this suite uses what it built.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import supermachine
from supermachine.guest import kbuild
from supermachine.home import Home
from tests.e2e.conftest import CLI

BUILD_TOOLS = ("flex", "bison")


def test_vms_boot_the_supermachine_kernel_by_default(home: Path, busybox: Path) -> None:
    built = kbuild.built_kernel(Home(home))
    assert built is not None, (
        "the supermachine kernel is not built: run ./install.sh (or `supermachine kernel "
        "build`) before the tests")
    with supermachine.VM(busybox, home=home, network="none") as vm:
        assert vm.recipe.config.kernel == built.path
        version = vm.read_file("/proc/version").decode()
        # no module support at all (/proc/modules exists only with CONFIG_MODULES)
        modules = vm.exec(["cat", "/proc/modules"])
    assert "supermachine@supermachine" in version, version
    assert modules.exit_code != 0 and b"No such file" in modules.stdout + modules.stderr
    # ... and so the initramfs carries only the init
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=vm.recipe.config.initrd.read_bytes(),
                     capture_output=True, check=True).stdout.decode().split()
    assert "init" in listing and not [p for p in listing if p.startswith("sm/ko")], listing


def _path_without(tools: tuple[str, ...], into: Path) -> str:
    """A PATH directory with every command of this one but ``tools``."""
    into.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = os.path.join(d, name)
            if name in tools or (into / name).exists() or not os.access(target, os.X_OK):
                continue
            (into / name).symlink_to(target)
    return str(into)


def test_failed_build_is_one_line_and_vms_fall_back_to_debian(tmp_path: Path, busybox: Path,
                                                              home: Path) -> None:
    kernels = tmp_path / "kernels"
    env = {**os.environ, "SUPERMACHINE_KERNELS": str(kernels),
           "PATH": _path_without(BUILD_TOOLS, tmp_path / "bin")}
    r = subprocess.run([*CLI, "--home", str(home), "kernel", "build"], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "configuring the kernel failed" in lines[0] and "flex" in lines[0], lines[0]
    assert not [p.name for p in kernels.iterdir() if p.name.startswith(("sm-", ".tmp-"))]
    assert list(kernels.glob("build-*.log")), "the failed build's log is kept"

    run = subprocess.run([*CLI, "--home", str(home), "run", "--network", "none", str(busybox),
                          "cat", "/proc/version"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "cloud-amd64" in run.stdout
    assert "supermachine kernel is not built" in run.stderr
    insist = subprocess.run([*CLI, "--home", str(home), "run", "--kernel", "supermachine",
                             str(busybox), "true"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert insist.returncode != 0 and len(insist.stderr.strip().splitlines()) == 1, insist.stderr
    assert "`supermachine kernel build`" in insist.stderr
