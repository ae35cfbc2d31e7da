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
