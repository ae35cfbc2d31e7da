"""The VMM's jail command line (bubblewrap; nothing started) and the reading of its info fd
(real pipes, hostile contents)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.engine import jail
from supermachine.engine.base import Disk, MachineConfig, Share
from supermachine.engine.qemu import jail_of
from supermachine.errors import EngineError


def pairs(cmd: list[str], flag: str) -> list[tuple[str, str]]:
    return [(cmd[i + 1], cmd[i + 2]) for i, a in enumerate(cmd) if a == flag]


def test_the_jail_shows_the_system_and_this_vm_only(tmp_path):
    j = jail.Jail(readable=(Path("/k/vmlinux"),), writable=(Path("/s/mem"),),
                  devices=(Path("/dev/kvm"),))
    cmd = jail.command(["/usr/bin/qemu-system-x86_64", "-M", "microvm"], j, info_fd=9,
                       env={"LD_PRELOAD": "/g/fsguard.so"})
    assert cmd[-3:] == ["/usr/bin/qemu-system-x86_64", "-M", "microvm"]
    assert cmd[-4] == "--"  # nothing after it is bwrap's
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
                 "--die-with-parent", "--as-pid-1", "--new-session"):
        assert flag in cmd
    assert ("--unshare-user" in cmd) == (os.geteuid() != 0)
    assert cmd[cmd.index("--cap-drop") + 1] == "ALL"
    added = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--cap-add"}
    assert added == (set(jail.ROOT_CAPS) if os.geteuid() == 0 else set())
    assert ("/usr", "/usr") in pairs(cmd, "--ro-bind")
    assert ("/k/vmlinux", "/k/vmlinux") in pairs(cmd, "--ro-bind")
    assert pairs(cmd, "--bind") == [("/s/mem", "/s/mem")]
    assert pairs(cmd, "--dev-bind") == [("/dev/kvm", "/dev/kvm")]
    assert pairs(cmd, "--setenv") == [("LD_PRELOAD", "/g/fsguard.so")]
    assert cmd[cmd.index("--info-fd") + 1] == "9"
    # nothing of the host but /usr (and ld.so's cache): no /etc, no home, no /var
    bound = {src for flag in ("--ro-bind", "--bind") for src, _ in pairs(cmd, flag)}
    assert bound <= {"/usr", "/etc/ld.so.cache", "/k/vmlinux", "/s/mem"}


def test_a_monitor_outside_usr_is_bound_too():
    cmd = jail.command(["/opt/q/qemu"], jail.Jail(), info_fd=3)
    assert ("/opt/q/qemu", "/opt/q/qemu") in pairs(cmd, "--ro-bind")


def test_a_monitor_reached_through_a_link_runs_by_its_real_path(tmp_path):
    (tmp_path / "qemu").symlink_to("/usr/bin/true")
    cmd = jail.command([str(tmp_path / "qemu"), "-x"], jail.Jail(), info_fd=3)
    assert cmd[-2:] == ["/usr/bin/true", "-x"]  # under /usr: nothing more to bind
    assert str(tmp_path) not in " ".join(cmd)


def test_relative_paths_are_refused():
    with pytest.raises(EngineError, match="absolute"):
        jail.command(["/usr/bin/q"], jail.Jail(readable=(Path("rel/x"),)), info_fd=3)


def test_what_a_machine_needs(tmp_path):
    mem = tmp_path / "snap" / "mem"
    config = MachineConfig(
        kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd"), cmdline=(),
        rootfs=Path("/r/root.sqfs"), memory_file=mem,
        shares=(Share("sm0", Path("/home/u/src"), False), Share("sm1", Path("/e"), True)),
        disks=(Disk("sm-disk0", Path("/v/a.ext4"), False), Disk("sm-disk1", Path("/v/b.ext4")),
               Disk("sm-disk2")),
        fsguard=Path("/g/fsguard.so"))
    j = jail_of(config)
    assert set(j.readable) == {Path("/k/vmlinux"), Path("/k/initrd"), Path("/r/root.sqfs"),
                               Path("/e"), Path("/g/fsguard.so"), Path("/v/b.ext4")}
    # a bake's memory file does not exist yet: its private directory is bound instead
    assert set(j.writable) == {Path("/home/u/src"), Path("/v/a.ext4"), mem.parent}
    assert j.devices == ()
    mem.parent.mkdir()
    mem.touch()
    assert mem in jail_of(config).writable  # a restore: the file alone
    assert jail_of(MachineConfig(kernel=Path("/k"), initrd=Path("/i"), cmdline=(),
                                 rootfs=Path("/r"), accel="kvm")).devices == (Path("/dev/kvm"),)


def _feed(data: bytes) -> int | None:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return jail.read_child_pid(r)


def test_the_child_pid_is_read_from_the_info_fd():
    assert _feed(b'{\n    "child-pid": 4242,\n    "mnt-namespace": 1\n}\n') == 4242
    assert _feed(b"") is None  # bwrap failed before starting it


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000))
def test_hostile_info_is_a_pid_or_none(data):
    pid = _feed(data[:60000])
    assert pid is None or (isinstance(pid, int) and pid > 0)


@pytest.mark.parametrize("value, ok", [("", True), ("auto", True), ("off", True),
                                       ("required", True), ("sometimes", False)])
def test_modes(monkeypatch, value, ok):
    monkeypatch.setenv(jail.MODE_ENV, value)
    if ok:
        assert jail.mode() == (value or "auto")
    else:
        with pytest.raises(EngineError, match="SUPERMACHINE_JAIL"):
            jail.mode()


def test_a_jail_that_never_says_is_given_up_on():
    r, w = os.pipe()
    try:
        assert jail.read_child_pid(r, timeout=0.2) is None
    finally:
        os.close(w)


def test_what_keeps_the_jail_away_is_named(monkeypatch):
    monkeypatch.setenv("SUPERMACHINE_BWRAP", "")
    monkeypatch.setattr(jail.shutil, "which", lambda name: None)
    jail.unavailable.cache_clear()
    try:
        assert "bubblewrap (bwrap) is not installed" in jail.unavailable()
    finally:
        jail.unavailable.cache_clear()
