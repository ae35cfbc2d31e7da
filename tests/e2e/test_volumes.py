"""Volumes end to end: host directories and files, tmpfs, read-only roots; on restored VMs
(the default path), enforced outside the guest, and safe against a hostile guest root."""

from __future__ import annotations

import json
import os
import stat
import subprocess
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
    host_suid = share / "host-suid"  # a setuid file the host put there: a write clears it
    host_suid.write_bytes(b"#!/bin/sh\n")
    host_suid.chmod(0o4755)
    script = f"""
        cd /work
        echo 'echo pwned' >> host-suid
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
    for name in ("suid", "sgid", "sdir", "host-suid"):
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
    (["--tmpfs", "/x:size=infk"], b"invalid size"),
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


# -- named volumes ---------------------------------------------------------------------------


def test_named_volume_persists_across_vms_with_copy_up(home, cli, busybox):
    name = "e2e-vol-" + os.urandom(3).hex()
    try:
        # first use: created, filled with what the image has at /etc (ownership kept)
        r = cli("run", "-v", f"{name}:/etc", str(busybox), "sh", "-c",
                "ls /etc/passwd && stat -c '%u:%g %a' /etc/passwd && "
                "echo one > /etc/state && "
                "mkdir /etc/app && chown 1234:1234 /etc/app && chmod 4750 /etc/app")
        assert r.returncode == 0, r.stderr
        # second VM sees it, with the guest's owners and modes (not the host's)
        r = cli("run", "-v", f"{name}:/data", str(busybox), "sh", "-c",
                "cat /data/state && stat -c '%u:%g %a' /data/app && echo two >> /data/state")
        assert r.returncode == 0 and r.stdout == b"one\n1234:1234 4750\n", (r.stdout, r.stderr)
        # third, read-only, through the API
        with supermachine.VM(busybox, home=home, network="none",
                             volumes=[f"{name}:/v:ro"]) as vm:
            assert _sh(vm, "cat /v/state").stdout == b"one\ntwo\n"
            assert _sh(vm, "echo x > /v/state").exit_code != 0
        listed = cli("volume", "ls").stdout.decode()
        assert name in listed
        (info,) = json.loads(cli("volume", "inspect", name).stdout)
        assert info["Populated"] is True and info["InUse"] is False
        # on the host, nothing in it is special: regular files and dirs, the user's
        for p in Path(info["Mountpoint"]).rglob("*"):
            st = p.lstat()
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), p
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), p
    finally:
        cli("volume", "rm", name)
    assert name not in cli("volume", "ls").stdout.decode()


def test_a_sized_volume_caps_writes_persists_and_holds_read_only(home, cli, busybox):
    name, other = ("e2e-cap-" + os.urandom(3).hex() for _ in range(2))
    try:
        assert cli("volume", "create", "--size", "32m", name).returncode == 0
        assert cli("volume", "create", "--size", "16m", other).returncode == 0
        (info,) = json.loads(cli("volume", "inspect", name).stdout)
        assert (info["Driver"], info["Size"]) == ("ext4-image", 32 << 20)
        row = [ln for ln in cli("volume", "ls").stdout.decode().splitlines()
               if ln.startswith(name)]
        assert row and "33.6 MB" in row[0], row
        disk = Path(info["Mountpoint"])
        with supermachine.VM(busybox, home=home, network="none",
                             volumes=[f"{name}:/etc", f"{other}:/other"]) as vm:
            assert vm.restored_from, "a disk volume must not force a cold boot"
            # copy-up from the image, ownership and modes kept
            r = _sh(vm, "stat -c '%u:%g %a' /etc/passwd && echo keep > /etc/state && "
                        "echo safe > /other/f && df -k /other | tail -1")
            assert r.exit_code == 0 and r.stdout.startswith(b"0:0 644\n"), r
            other_free = r.stdout.split()[-3]
            # filling it is the guest's ENOSPC, not the host's disk
            fill = _sh(vm, "dd if=/dev/zero of=/etc/fill bs=1M count=64")
            assert fill.exit_code != 0 and b"No space left on device" in fill.stderr, fill
            # a root guest writing past the disk's end through a device node of its own
            raw = _sh(vm, "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = sm-disk0 ] "
                          "&& mknod /tmp/raw b $(tr : ' ' < $d/dev); done; "
                          "dd if=/dev/zero of=/tmp/raw bs=1M seek=40 count=1")
            assert raw.exit_code != 0 and b"/tmp/raw" in raw.stderr, raw
            r = _sh(vm, "cat /other/f && df -k /other | tail -1")
            assert r.stdout.split()[0] == b"safe" and r.stdout.split()[-3] == other_free
        st = disk.stat()
        assert st.st_size == 32 << 20 and st.st_blocks * 512 <= 32 << 20
        # the next VM sees what the first wrote (it synced as it was closed), not copied again
        with supermachine.VM(busybox, home=home, network="none",
                             volumes=[f"{name}:/data"]) as vm:
            assert _sh(vm, "cat /data/state; rm /data/fill").stdout == b"keep\n"
            assert _sh(vm, "echo more >> /data/state").exit_code == 0
        # read-only: the drive is read-only in QEMU, so a root remount does not help
        with supermachine.VM(busybox, home=home, network="none",
                             volumes=[f"{name}:/ro:ro"]) as vm:
            r = _sh(vm, "mount -o remount,rw /ro; echo x > /ro/state; cat /ro/state")
            assert r.stdout == b"keep\nmore\n", r
        with supermachine.VM(busybox, home=home, network="none",
                             volumes=[f"{name}:/v"]) as vm, \
                pytest.raises(Error, match="cannot be saved as a snapshot"):
            vm.snapshot("with-a-disk")
    finally:
        cli("volume", "rm", name, other)
    assert not disk.exists()


def test_one_writer_at_a_time(home, cli, busybox):
    name = "e2e-lock-" + os.urandom(3).hex()
    try:
        with supermachine.VM(busybox, home=home, network="none", hostname="holder",
                             volumes=[f"{name}:/v"]) as vm:
            assert _sh(vm, "echo x > /v/f").exit_code == 0
            second = cli("run", "-v", f"{name}:/v", str(busybox), "true")
            assert second.returncode != 0 and b"in use by VM holder" in second.stderr, \
                second.stderr
            reader = cli("run", "-v", f"{name}:/v:ro", str(busybox), "true")
            assert reader.returncode != 0 and b"in use" in reader.stderr
            rm = cli("volume", "rm", name)
            assert rm.returncode != 0 and b"in use" in rm.stderr
            assert name in cli("volume", "ls").stdout.decode()  # nothing changed
        # readers share it
        with supermachine.VM(busybox, home=home, network="none", volumes=[f"{name}:/v:ro"]), \
                supermachine.VM(busybox, home=home, network="none",
                                volumes=[f"{name}:/v:ro"]) as b:
            assert _sh(b, "cat /v/f").stdout == b"x\n"
    finally:
        cli("volume", "rm", name)


def test_volume_commands_validate(cli):
    for args, words in ((["volume", "create", "bad name"], b"invalid volume name"),
                        (["volume", "rm", "no-such-volume"], b"no such volume"),
                        (["volume", "inspect", "no-such-volume"], b"no such volume"),
                        (["volume", "create", "--size", "1m", "small"], b"invalid volume size"),
                        (["volume", "create", "--size", "lots", "odd"], b"invalid size")):
        r = cli(*args)
        assert r.returncode != 0 and len(r.stderr.splitlines()) == 1 and words in r.stderr, \
            (args, r.stderr)
    name = "e2e-create-" + os.urandom(3).hex()
    assert cli("volume", "create", name).stdout.decode().strip() == name
    again = cli("volume", "create", name)
    assert again.returncode != 0 and b"already exists" in again.stderr
    r = cli("volume", "prune")
    assert r.returncode != 0 and name.encode() in r.stdout and b"prune -f" in r.stderr
    assert name.encode() in cli("volume", "prune", "-f").stdout
    assert name not in cli("volume", "ls").stdout.decode()


def test_detached_vms_show_their_mounts(home, cli, busybox, share):
    from tests.e2e.conftest import vm_name

    name = vm_name("e2e-mounts")
    r = cli("run", "-d", "--name", name, "-v", f"{share}:/work:ro", "--tmpfs", "/t",
            str(busybox), "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        row = [ln for ln in cli("ps").stdout.decode().splitlines() if ln.startswith(name)]
        assert row and f"{share}:/work:ro" in row[0] and "tmpfs:/t" in row[0], row
        (info,) = json.loads(cli("inspect", name).stdout)
        assert {(m["type"], m["target"]) for m in info["mounts"]} == \
            {("bind", "/work"), ("tmpfs", "/t")}
        assert cli("exec", name, "cat", "/work/from-host.txt").stdout == \
            b"hello from the host\n"
    finally:
        cli("rm", "-f", name)


def test_an_unprivileged_user_mounts_directories_and_volumes(busybox, nobody_home):
    import sys

    work = nobody_home / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    as_nobody = ["runuser", "-u", "nobody", "--", "env", f"SUPERMACHINE_HOME={nobody_home}",
                 f"HOME={nobody_home}", "PATH=/usr/bin:/bin", sys.executable, "-m",
                 "supermachine"]
    # (mke2fs is in /sbin, off an ordinary user's PATH)
    made = subprocess.run([*as_nobody, "volume", "create", "--size", "16m", "nobody-cap"],
                          capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    r = subprocess.run(
        [*as_nobody, "run", "--network", "none", "-v", f"{work}:/work", "-v", "nobody-vol:/v",
         "-v", "nobody-cap:/c", "--tmpfs", "/t", str(busybox),
         "sh", "-c", "echo hi > /work/f && echo v > /v/f && cat /v/f && echo c > /c/f && "
                     "cat /c/f && id -u"],
        capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"v\nc\n0\n"
    st = (work / "f").stat()
    assert (st.st_uid, (work / "f").read_text()) == (65534, "hi\n")  # the user's, not root's


def test_a_mount_failing_in_the_guest_is_one_line_and_keeps_the_snapshot(home, busybox, share):
    with supermachine.VM(busybox, home=home, network="none") as plain:
        snap = plain.restored_from
    r = run_cli(home, "run", "--network", "none", "-v", f"{share}:/dev/null", str(busybox),
                "true")
    errors = [ln for ln in r.stderr.decode().splitlines() if "TCG" not in ln]
    assert r.returncode != 0 and len(errors) == 1, r.stderr
    assert "cannot mount in the VM" in errors[0] and "/dev/null" in errors[0], errors
    assert "booting instead" not in r.stderr.decode()
    with supermachine.VM(busybox, home=home, network="none") as again:
        assert again.restored_from == snap  # not discarded


def test_qemu_has_no_fsetid_or_mknod_capability(home, busybox, share):
    """Run by root, QEMU would keep setuid bits on files it writes and could make device
    nodes: both capabilities are gone from its bounding set (and from what it holds)."""
    with supermachine.VM(busybox, home=home, network="none",
                         volumes=[f"{share}:/work"]) as vm:
        status = Path(f"/proc/{vm.pid}/status").read_text()
    caps = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()
            if line.startswith("Cap")}
    for bit in (4, 9, 27, 31):  # FSETID, LINUX_IMMUTABLE, MKNOD, SETFCAP
        assert not caps["CapBnd"] & (1 << bit) and not caps["CapEff"] & (1 << bit), (bit, caps)
