"""The QEMU command line for boots and restores (no QEMU started), and the launch child setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supermachine.engine import qemu
from supermachine.engine.base import MachineConfig
from supermachine.engine.qemu import build_command


def config(**kw) -> MachineConfig:
    base = dict(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"),
                cmdline=("console=ttyS0", "quiet"), rootfs=Path("/c/root.sqfs"))
    base.update(kw)
    return MachineConfig(**base)


def opt_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_boot_command_uses_microvm_tcg_and_fd_channels():
    cmd = build_command(config(memory_mib=256, cpus=2), qemu="qemu", agent_fd=5, qmp_fd=6,
                        console_fd=7)
    assert cmd[0] == "qemu"
    assert opt_values(cmd, "-M")[0].startswith("microvm,")
    assert opt_values(cmd, "-accel") == ["tcg"]
    assert opt_values(cmd, "-m") == ["256M"]
    assert opt_values(cmd, "-smp") == ["2"]
    assert opt_values(cmd, "-append") == ["console=ttyS0 quiet"]
    chardevs = opt_values(cmd, "-chardev")
    assert "socket,id=agent,fd=5" in chardevs
    assert "socket,id=qmp,fd=6" in chardevs
    assert "socket,id=con,fd=7" in chardevs
    assert "virtserialport,chardev=agent,name=sm.agent" in opt_values(cmd, "-device")
    drive = opt_values(cmd, "-drive")[0]
    assert "file=/c/root.sqfs" in drive and "readonly=on" in drive
    assert "-incoming" not in cmd
    # RAM is always the named backend "mem" (anonymous here), so any VM's state loads into a
    # file-backed copy
    assert "memory-backend=mem" in opt_values(cmd, "-M")[0]
    assert opt_values(cmd, "-object") == ["memory-backend-ram,id=mem,size=256M"]


def test_kvm_uses_host_cpu():
    cmd = build_command(config(accel="kvm"), qemu="q", agent_fd=3, qmp_fd=4, console_fd=5)
    assert opt_values(cmd, "-accel") == ["kvm"]
    assert opt_values(cmd, "-cpu") == ["host"]


def test_bake_maps_memory_file_shared():
    cmd = build_command(config(memory_file=Path("/s/mem"), memory_shared=True, memory_mib=128),
                        qemu="q", agent_fd=3, qmp_fd=4, console_fd=5)
    assert "memory-backend=mem" in opt_values(cmd, "-M")[0]
    obj = opt_values(cmd, "-object")[0]
    assert obj.startswith("memory-backend-file,id=mem,size=128M,")
    assert "mem-path=/s/mem" in obj and obj.endswith("share=on")


def test_restore_maps_memory_private_and_loads_state_from_fd():
    cmd = build_command(config(memory_file=Path("/s/mem"), incoming_state=Path("/s/state")),
                        qemu="q", agent_fd=3, qmp_fd=4, console_fd=5, state_fd=9)
    assert opt_values(cmd, "-object")[0].endswith("share=off")
    # the state is loaded over QMP once x-ignore-shared is on (QEMU 7.2 has no -global for it)
    assert opt_values(cmd, "-incoming") == ["defer"]


def test_restore_without_state_fd_is_a_programming_error():
    with pytest.raises(ValueError):
        build_command(config(incoming_state=Path("/s/state")), qemu="q", agent_fd=3,
                      qmp_fd=4, console_fd=5)


def _fork_child_setup(parent: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            qemu._child_setup(parent)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_child_setup_gives_up_when_the_launcher_died_before_prctl():
    # The child's parent is not the launcher it was forked for (it died between fork and
    # PR_SET_PDEATHSIG): no death signal would ever come, so the child must not run QEMU.
    assert _fork_child_setup(os.getpid()) == 0
    assert _fork_child_setup(os.getpid() + 1_000_000) == 1


def test_disk_slots_keep_their_devices_whatever_they_hold():
    from supermachine.engine.base import Disk

    empty = build_command(config(disks=(Disk("sm-disk0"), Disk("sm-disk1"))), qemu="q",
                          agent_fd=3, qmp_fd=4, console_fd=5)
    used = build_command(config(disks=(Disk("sm-disk0", Path("/v/a,b/disk.ext4"), False),
                                       Disk("sm-disk1", Path("/v/c/disk.ext4"), True))),
                         qemu="q", agent_fd=3, qmp_fd=4, console_fd=5)
    # the same devices (a snapshot baked with empty slots restores with images in them)
    assert opt_values(empty, "-device") == opt_values(used, "-device")
    assert "virtio-blk-device,drive=disk1,serial=sm-disk1" in opt_values(used, "-device")
    e0, e1 = opt_values(empty, "-drive")[1:]
    # empty slots are writable zero-sized null devices: a read-only one would lack a
    # feature (writes) the restored writable disk's guest would then have to give up
    assert "driver=null-co,size=0" in e0 and "readonly=off" in e0
    u0, u1 = opt_values(used, "-drive")[1:]
    assert "file=/v/a,,b/disk.ext4" in u0 and "readonly=off" in u0  # commas doubled
    assert "file=/v/c/disk.ext4" in u1 and "readonly=on" in u1
