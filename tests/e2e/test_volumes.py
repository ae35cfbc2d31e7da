"""Volumes end to end: host directories and files, tmpfs, read-only roots; on restored VMs
(the default path), enforced outside the guest, and safe against a hostile guest root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import supermachine
from supermachine.errors import Error
from tests.e2e.conftest import run_cli


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "from-host.txt").write_text("hello from the host\n")
    return d


def _sh(vm, script: str):
    return vm.exec(["sh", "-c", script])


def test_bind_mount_both_ways_on_a_restored_vm(home, busybox, share):
    with supermachine.VM(busybox, home=home, network="none",
                         volumes=[f"{share}:/work"]) as vm:
        assert vm.restored_from, "volumes must not force a cold boot"
        r = _sh(vm, "cat /work/from-host.txt; echo written in the guest > /work/new.txt; "
                    "mkdir -p /work/sub/dir; chmod 0640 /work/new.txt; echo ok")
        assert r.exit_code == 0 and r.stdout == b"hello from the host\nok\n", r
        (share / "later.txt").write_text("seen at once\n")  # no caching: like a bind mount
        assert _sh(vm, "cat /work/later.txt").stdout == b"seen at once\n"
    new = share / "new.txt"
    assert new.read_text() == "written in the guest\n"
    st = new.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o640)  # ours, guest's mode
    assert (share / "sub/dir").is_dir()


def test_vms_with_different_mounts_share_one_snapshot(home, busybox, share, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("other\n")
    with supermachine.VM(busybox, home=home, network="none") as plain:
        snap = plain.restored_from
    with supermachine.VM(busybox, home=home, network="none",
                         volumes={str(share): "/a", str(other): "/b"},
                         tmpfs=["/t"]) as vm:
        assert vm.restored_from == snap
        assert _sh(vm, "cat /a/from-host.txt /b/x").stdout == b"hello from the host\nother\n"


def test_single_file_mount_shows_only_that_file(home, busybox, tmp_path):
    (tmp_path / "secret-neighbour").write_text("must not be visible\n")
    conf = tmp_path / "app.conf"
    conf.write_text("key=value\n")
    with supermachine.VM(busybox, home=home, network="none",
                         volumes=[f"{conf}:/etc/app.conf"]) as vm:
        assert _sh(vm, "cat /etc/app.conf").stdout == b"key=value\n"
        assert _sh(vm, "echo key=new > /etc/app.conf").exit_code == 0
        # the share behind it holds that file alone
        shares = _sh(vm, "ls -A /run/supermachine/files/*/")
    assert conf.read_text() == "key=new\n"  # the same file, not a copy
    assert shares.stdout == b"app.conf\n", shares


def test_read_only_holds_against_a_root_remount(home, busybox, share):
    with supermachine.VM(busybox, home=home, network="none",
                         volumes=[f"{share}:/ro:ro"]) as vm:
        assert _sh(vm, "echo x > /ro/f").exit_code != 0
        r = _sh(vm, "mount -o remount,rw /ro && echo remounted; echo x > /ro/f; "
                    "echo y >> /ro/from-host.txt; rm -f /ro/from-host.txt; ls /ro")
        assert b"from-host.txt" in r.stdout
    assert sorted(p.name for p in share.iterdir()) == ["from-host.txt"]
    assert (share / "from-host.txt").read_text() == "hello from the host\n"


def test_tmpfs_and_read_only_root(home, busybox):
    with supermachine.VM(busybox, home=home, network="none", read_only=True,
                         tmpfs=["/scratch:size=4m"]) as vm:
        assert _sh(vm, "echo x > /etc/x").exit_code != 0  # root read-only
        r = _sh(vm, "echo x > /scratch/x && cat /scratch/x; df -k /scratch | tail -1")
        assert r.exit_code == 0 and r.stdout.startswith(b"x\n"), r
        assert b" 4096 " in r.stdout  # the size asked for
        assert _sh(vm, "dd if=/dev/zero of=/scratch/big bs=1M count=8").exit_code != 0


def test_hostile_guest_root_cannot_reach_outside_the_share(home, busybox, share, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched\n")
    script = f"""
        cd /work
        cp /bin/busybox suid && chmod 4755 suid; chmod u+s suid
        cp /bin/busybox sgid && chmod 2755 sgid
        mkdir sdir && chmod 2775 sdir
        mknod blk b 8 0; mknod chr c 1 3; mkfifo fifo
        ln -s {outside} abs-link; echo pwned > abs-link
        ln -s ../../outside.txt rel-link; echo pwned > rel-link 2>/dev/null
        echo pwned > ../outside.txt 2>/dev/null
        chown 1234:1234 from-host.txt || exit 9  # ignored, as security_model=none says
        setfattr -n security.capability -v 0x01 suid 2>/dev/null
        setfattr -n trusted.x -v 1 suid 2>/dev/null
        true
    """
    with supermachine.VM(busybox, home=home, network="none",
                         volumes=[f"{share}:/work"]) as vm:
        assert _sh(vm, script).exit_code == 0
    assert outside.read_text() == "untouched\n"
    for name in ("suid", "sgid", "sdir"):
        mode = (share / name).stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(mode))
    for name in ("blk", "chr", "fifo"):
        assert not (share / name).exists() or stat.S_ISREG((share / name).lstat().st_mode), name
    assert (share / "from-host.txt").stat().st_uid == os.getuid()  # chown: a no-op
    # the links exist on the host as links (the guest resolved them in its own namespace)
    assert os.readlink(share / "abs-link") == str(outside)
    xattrs = os.listxattr(share / "suid", follow_symlinks=False)
    assert not [x for x in xattrs if x.startswith(("security.", "trusted."))], xattrs


def test_named_snapshot_of_a_vm_with_host_directories_is_refused(home, busybox, share):
    with supermachine.VM(busybox, home=home, network="none",
                         volumes=[f"{share}:/work"]) as vm:
        with pytest.raises(Error, match="cannot be saved as a snapshot"):
            vm.snapshot("with-volumes")
        assert _sh(vm, "true").exit_code == 0  # and the VM runs on


@pytest.mark.parametrize("args, words", [
    (["-v", "/no/such/dir:/x", "--mount", "type=bind,source=/no/such/src,target=/y"],
     b"bind source path does not exist: /no/such/src"),
    (["-v", "relative-name/x:/y"], b"invalid volume name"),
    (["-v", "/tmp:relative"], b"must be an absolute path"),
    (["-v", "/tmp:/x", "--tmpfs", "/x"], b"duplicate mount target"),
    (["--mount", "type=nfs,target=/x"], b"unknown mount type"),
    (["--tmpfs", "/x:size=lots"], b"invalid size"),
    (["-v", "/tmp:/"], b"cannot replace the root directory"),
])
def test_bad_mounts_are_one_line_and_change_nothing(home, busybox, args, words):
    r = run_cli(home, "run", *args, str(busybox), "true")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and words in lines[0], r.stderr
    assert not os.path.exists("/no/such/src")


def test_a_socket_is_not_a_bind_source(home, busybox, tmp_path):
    import socket

    path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        r = run_cli(home, "run", "-v", f"{path}:/x", str(busybox), "true")
    finally:
        s.close()
    assert r.returncode != 0 and b"not a directory or a regular file" in r.stderr, r.stderr


def test_v_creates_a_missing_host_directory(home, busybox, tmp_path):
    made = tmp_path / "made" / "by-v"
    r = run_cli(home, "run", "-v", f"{made}:/m", str(busybox), "sh", "-c",
                "echo hi > /m/f")
    assert r.returncode == 0, r.stderr
    assert (made / "f").read_text() == "hi\n"
