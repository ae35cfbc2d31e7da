"""The monitor processes run confined (issue 11's jailer): QEMU in its jail (namespaces of its
own, only its VM's files visible: engine/jail.py) under its own seccomp filter with
no_new_privs, no core files, bounded open files and a minimal environment; passt in the
namespaces it makes itself, under its own seccomp filter. Checked from the host on booted,
restored and detached VMs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supermachine import VM
from supermachine.errors import EngineError
from tests.e2e.conftest import run_cli, vm_name

#: the test session's label, which the monitors keep (the suite's leak checks find them by it)
LABEL = "SUPERMACHINE_TEST_SESSION"


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


def _environ(pid: int) -> set[str]:
    names = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return {n.split(b"=", 1)[0].decode() for n in names if n}


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _assert_jailed(pid: int, home: Path) -> None:
    for kind in ("mnt", "pid", "ipc", "uts", "net"):
        assert _ns(pid, kind) != _ns(os.getpid(), kind), kind
    root = Path(f"/proc/{pid}/root")
    assert (root / "usr/bin").is_dir()  # its world: /usr and its VM's files
    # (the home's own directories exist there only as the way to this VM's files)
    for hidden in ("etc/shadow", "etc/passwd", "root/.bashrc", "var/log",
                   str(home / "images")[1:], str(Path(__file__))[1:]):
        assert not (root / hidden).exists(), hidden


def _assert_confined_qemu(pid: int) -> None:
    # a minimal environment: nothing of the caller's (tokens, proxies) but a PATH; the
    # share guard's LD_PRELOAD where a writable share is mounted; the jail's PWD (/)
    assert _environ(pid) <= {"PATH", "LD_PRELOAD", "PWD", LABEL}, _environ(pid)
    st = _status(pid)
    assert (st["Seccomp"], st["NoNewPrivs"]) == ("2", "1"), st
    limits = _limits(pid)
    assert limits["Max core file size"] == ("0", "0")
    soft, hard = limits["Max open files"]
    assert soft == hard and int(hard) <= 4096


def _assert_confined_passt(parent: int) -> None:
    (pid,) = _children(parent, "passt")
    assert _environ(pid) <= {"PATH", "LD_PRELOAD", "SM_NETGUARD", LABEL}, _environ(pid)
    # passt isolates itself: mount namespace of its own (its root an empty directory)
    assert _ns(pid, "mnt") != _ns(os.getpid(), "mnt")
    st = _status(pid)
    assert (st["Seccomp"], st["NoNewPrivs"]) == ("2", "1"), st


def test_booted_and_restored_vms_run_confined(home, busybox, monkeypatch):
    monkeypatch.setenv("SM_TEST_SECRET_TOKEN", "must not reach QEMU or passt")
    for snapshot in (False, True):
        with VM(busybox, home=home, snapshot=snapshot) as vm:
            assert (vm.restored_from is not None) == snapshot
            assert vm.exec(["true"]).exit_code == 0  # the filter lets the VM work
            _assert_confined_qemu(vm.pid)
            _assert_jailed(vm.pid, Path(home))
            _assert_confined_passt(os.getpid())


def test_detached_vm_runs_confined(home, busybox):
    name = vm_name("confined")
    r = run_cli(home, "run", "-d", "--name", name, str(busybox), "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        import json

        (info,) = json.loads(run_cli(home, "inspect", name).stdout)
        _assert_confined_qemu(info["qemu_pid"])
        _assert_jailed(info["qemu_pid"], Path(home))
        _assert_confined_passt(info["supervisor_pid"])
    finally:
        run_cli(home, "rm", "-f", name)


def test_qemu_cannot_open_host_files_outside_its_jail(home, busybox, tmp_path):
    # What a compromised QEMU could try: opening any host file, here over its own QMP (the
    # machine's control socket; reached through private attributes for that reason).
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's key\n")
    with VM(busybox, home=home, network="none") as vm:
        qmp = vm._machine._control()
        for path in (secret, Path("/etc/passwd")):
            with pytest.raises(EngineError, match="No such file or directory"):
                qmp.execute("blockdev-add", {"driver": "file", "node-name": "steal",
                                             "filename": str(path)})
        assert vm.exec(["true"]).exit_code == 0  # and the VM runs on


def test_the_jail_can_be_turned_off_and_a_bad_setting_is_one_line(home, busybox, monkeypatch):
    monkeypatch.setenv("SUPERMACHINE_JAIL", "off")
    with VM(busybox, home=home, network="none") as vm:
        assert _ns(vm.pid, "mnt") == _ns(os.getpid(), "mnt")
    monkeypatch.setenv("SUPERMACHINE_JAIL", "sometimes")
    r = run_cli(home, "run", "--network", "none", str(busybox), "true")
    errors = [ln for ln in r.stderr.decode().splitlines() if "TCG" not in ln]
    assert r.returncode != 0 and len(errors) == 1 and "SUPERMACHINE_JAIL" in errors[0], errors


def test_a_jail_that_cannot_start_is_one_line(home, busybox, tmp_path):
    # A stand-in for bubblewrap on a host that refuses it user namespaces (this machine
    # allows them, and turning them off would affect everything else running here).
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    r = run_cli(home, "run", "--network", "none", str(busybox), "true",
                env={"SUPERMACHINE_BWRAP": str(fake)})
    errors = [ln for ln in r.stderr.decode().splitlines() if "TCG" not in ln]
    assert r.returncode == 125 and len(errors) == 1, errors
    assert "cannot start QEMU in its jail: bwrap: No permissions" in errors[0], errors
    assert "SUPERMACHINE_JAIL=off" in errors[0]
