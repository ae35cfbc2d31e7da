"""The monitor processes run confined (the first layer of issue 11's jailer): QEMU under its
own seccomp filter with no_new_privs, no core files and bounded open files; passt under its
own seccomp filter. Checked from the host on booted, restored and detached VMs."""

from __future__ import annotations

import os
from pathlib import Path

from supermachine import VM
from tests.e2e.conftest import run_cli, vm_name


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        parts = line[26:].split()
        out[line[:26].strip()] = (parts[0], parts[1])
    return out


def _children(parent: int, name: str) -> list[int]:
    """Child processes of ``parent`` whose program is ``name``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == parent and comm.split(".")[0] == name:  # passt execs passt.avx2
                found.append(int(entry.name))
    return found


def _assert_confined_qemu(pid: int) -> None:
    st = _status(pid)
    assert (st["Seccomp"], st["NoNewPrivs"]) == ("2", "1"), st
    limits = _limits(pid)
    assert limits["Max core file size"] == ("0", "0")
    soft, hard = limits["Max open files"]
    assert soft == hard and int(hard) <= 4096


def _assert_confined_passt(parent: int) -> None:
    (pid,) = _children(parent, "passt")
    st = _status(pid)
    assert (st["Seccomp"], st["NoNewPrivs"]) == ("2", "1"), st


def test_booted_and_restored_vms_run_confined(home, busybox):
    for snapshot in (False, True):
        with VM(busybox, home=home, snapshot=snapshot) as vm:
            assert (vm.restored_from is not None) == snapshot
            assert vm.exec(["true"]).exit_code == 0  # the filter lets the VM work
            _assert_confined_qemu(vm.pid)
            _assert_confined_passt(os.getpid())


def test_detached_vm_runs_confined(home, busybox):
    name = vm_name("confined")
    r = run_cli(home, "run", "-d", "--name", name, str(busybox), "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        import json

        (info,) = json.loads(run_cli(home, "inspect", name).stdout)
        _assert_confined_qemu(info["qemu_pid"])
        _assert_confined_passt(info["supervisor_pid"])
    finally:
        run_cli(home, "rm", "-f", name)
