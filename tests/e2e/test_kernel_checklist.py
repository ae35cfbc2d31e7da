"""What images expect of Linux, checked inside a real VM on each guest kernel.

kernel_checklist.c (next to this file) is one static program that exercises each feature
end to end (procfs, devpts, /dev/shm, mqueue, loopback IPv4 and IPv6, unix sockets, epoll,
inotify, eventfd, signalfd, timerfd, futexes, seccomp filters, user+mount+pid namespaces,
cgroup v2, large files, mmap on every filesystem the VM uses, getrandom) and prints
``ok NAME`` or ``FAIL NAME: reason`` for each. Debian's cloud kernel is the reference; our
own minimal kernel must pass the same list.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import supermachine

SOURCE = Path(__file__).with_name("kernel_checklist.c")

#: every check the program runs, in its order: one missing from the output fails too
CHECKS = ("procfs", "sysfs", "devpts", "shm", "mqueue", "ipv4", "ipv6", "unix", "epoll",
          "inotify", "eventfd", "signalfd", "timerfd", "futex", "seccomp", "namespaces",
          "cgroup2", "largefile", "mmap-lower", "mmap-overlay", "getrandom")


@pytest.fixture(scope="module")
def checklist(tmp_path_factory) -> Path:
    """The checklist, built static with musl once for the module."""
    cc = shutil.which("musl-gcc")
    if cc is None:
        pytest.fail("musl-gcc is missing: install musl-tools (./install.sh does)")
    out = tmp_path_factory.mktemp("checklist") / "checklist"
    r = subprocess.run([cc, "-static", "-O2", "-Wall", "-o", str(out), str(SOURCE)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"building {SOURCE.name} failed:\n{r.stderr}"
    return out


@pytest.mark.parametrize("kernel", ["debian", "supermachine"])
def test_kernel_checklist(home, busybox, checklist, kernel):
    with supermachine.VM(busybox, home=home, kernel=kernel, network="none") as vm:
        vm.copy_in(checklist, "/checklist")
        r = vm.exec(["/checklist"], timeout=300)
    report = r.stdout.decode(errors="replace")
    lines = report.splitlines()
    passed = [line.removeprefix("ok ") for line in lines if line.startswith("ok ")]
    failed = [line for line in lines if not line.startswith("ok ")]
    assert (r.exit_code, failed) == (0, []), f"{kernel} kernel:\n{report}{r.stderr.decode()}"
    assert passed == list(CHECKS), f"{kernel} kernel ran other checks:\n{report}"


def test_mmap_on_volumes(home, busybox, checklist, tmp_path):
    """The filesystems volumes add (9p, both security models; supermachine kernel only:
    Debian's has no 9p): shared writable mappings work there too."""
    import os

    volume = "e2e-mmap-" + os.urandom(3).hex()
    try:
        with supermachine.VM(busybox, home=home, network="none",
                             volumes=[f"{tmp_path}:/mnt/bind", f"{volume}:/mnt/volume"]) as vm:
            vm.copy_in(checklist, "/checklist")
            r = vm.exec(["/checklist", "mmap-bind", "mmap-volume"], timeout=300)
    finally:
        from supermachine.home import Home
        from supermachine.runtime import volume_store

        volume_store.remove(Home(home), volume)
    assert (r.exit_code, r.stdout) == (0, b"ok mmap-bind\nok mmap-volume\n"), r


@pytest.mark.parametrize("how", ["poweroff", "reboot"])
@pytest.mark.parametrize("kernel", ["debian", "supermachine"])
def test_guest_power_off_and_reboot_end_the_vm(home, busybox, kernel, how):
    """The paths QEMU's microvm understands: ACPI power-off (the generic event device) and
    reboot (a triple fault, which -no-reboot turns into QEMU's exit)."""
    import time

    with supermachine.VM(busybox, home=home, kernel=kernel, network="none") as vm:
        vm.spawn([how, "-f"])
        deadline = time.monotonic() + 60
        while vm.running:
            assert time.monotonic() < deadline, f"{how} -f did not end the VM ({kernel})"
            time.sleep(0.05)
