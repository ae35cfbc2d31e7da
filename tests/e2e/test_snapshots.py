"""Snapshots and pools end to end: real VMs baked and restored (TCG here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import supermachine as sm
from supermachine.errors import SnapshotError
from tests.e2e.conftest import qemu_pids, vm_name

pytestmark = pytest.mark.e2e


def auto_snapshots(home: Path) -> set[str]:
    root = home / "snapshots" / "auto"
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} \
        if root.exists() else set()


@pytest.fixture(scope="module")
def snap_home(tmp_path_factory) -> Path:
    # Its own home: these tests corrupt and count snapshots. The kernel and rootfs come
    # from the shared test home's files through the same paths (no refetch).
    return tmp_path_factory.mktemp("snaphome")


def vm(image, home, **kw) -> sm.VM:
    return sm.VM(image, home=home, memory=kw.pop("memory", "256M"), **kw)


def test_first_boot_bakes_then_every_vm_restores(busybox, snap_home):
    with vm(busybox, snap_home) as first:
        assert first.restored_from is not None  # baked by this very boot, then restored
        assert first.exec(["echo", "ok"]).stdout == b"ok\n"
    baked = auto_snapshots(snap_home)
    assert len(baked) == 1
    with vm(busybox, snap_home) as again:
        assert again.restored_from == next(iter(baked))
        assert again.exec(["true"]).exit_code == 0
    assert auto_snapshots(snap_home) == baked


def sectors_read(v: sm.VM) -> int:
    """Sectors the guest has read from its root disk (/sys/block/vda/stat, field 3)."""
    return int(v.read_file("/sys/block/vda/stat").split()[2])


def test_bake_caches_the_default_command(busybox, snap_home):
    # The image's Cmd is `sh` (busybox): a restored VM runs it, and `true`, without
    # reading the root disk, because the bake left busybox in the guest's page cache.
    with vm(busybox, snap_home) as v:
        before = sectors_read(v)
        assert v.exec(["sh", "-c", "true"]).exit_code == 0
        assert v.exec(["true"]).exit_code == 0
        assert sectors_read(v) == before
        # The measure can see reads: with the cache dropped, the same command reads.
        v.exec(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
        dropped = sectors_read(v)
        assert v.exec(["true"]).exit_code == 0
        assert sectors_read(v) > dropped


def test_clones_are_distinct_machines(busybox, snap_home):
    script = ("head -c 16 /dev/urandom | od -An -tx1; date +%s; hostname; "
              "cat /etc/machine-id; stat -c %a /etc/machine-id")
    a = vm(busybox, snap_home, hostname="clone-a", machine_id=True).start()
    b = vm(busybox, snap_home, hostname="clone-b", machine_id=True).start()
    try:
        ra, rb = a.exec(["sh", "-c", script]), b.exec(["sh", "-c", script])
        now = time.time()
        (rand_a, t_a, host_a, id_a, mode_a), (rand_b, t_b, host_b, id_b, mode_b) = (
            r.stdout.decode().splitlines() for r in (ra, rb))
        assert rand_a != rand_b
        assert abs(int(t_a) - now) < 30 and abs(int(t_b) - now) < 30
        assert (host_a, host_b) == ("clone-a", "clone-b")
        assert id_a != id_b and all(len(i) == 32 and int(i, 16) >= 0 for i in (id_a, id_b))
        assert mode_a == mode_b == "444"
        # writes are private to each clone
        a.write_file("/tmp/mine", b"only in a")
        assert a.read_file("/tmp/mine") == b"only in a"
        assert b.exec(["cat", "/tmp/mine"]).exit_code != 0
    finally:
        a.close()
        b.close()


def test_a_bake_keeps_none_of_the_baking_vms_identity(busybox, snap_home):
    # The first VM of this configuration (384M) bakes the shared snapshot: its hostname
    # and machine id must not reach VMs that ask for neither.
    chosen = "0123456789abcdef0123456789abcdef"
    with vm(busybox, snap_home, memory="384M", hostname="baker", machine_id=chosen) as first:
        assert first.exec(["sh", "-c", "hostname; cat /etc/machine-id"]).stdout == \
            f"baker\n{chosen}\n".encode()
    with vm(busybox, snap_home, memory="384M") as plain:
        assert plain.restored_from is not None
        r = plain.exec(["sh", "-c", "hostname; cat /etc/machine-id"])
        assert r.stdout == b"localhost\n" and r.exit_code != 0  # busybox has no machine-id


def test_changed_inputs_are_not_reused(busybox, snap_home):
    before = auto_snapshots(snap_home)
    with vm(busybox, snap_home, memory="320M") as other:
        assert other.exec(["true"]).exit_code == 0
    with vm(busybox, snap_home, memory="256M"):
        pass
    after = auto_snapshots(snap_home)
    assert len(after - before) == 1  # 320M baked its own; 256M reused the existing one


def test_no_snapshot_boots_cold(busybox, snap_home):
    with vm(busybox, snap_home, snapshot=False) as cold:
        assert cold.restored_from is None
        assert cold.exec(["echo", "cold"]).stdout == b"cold\n"


def test_corrupt_snapshot_is_refused_and_rebaked(busybox, snap_home):
    with vm(busybox, snap_home):
        pass
    (name,) = [n for n in auto_snapshots(snap_home)
               if (snap_home / "snapshots/auto" / n / "meta.json").read_text().find(
                   '"memory_mib": 256') >= 0]
    mem = snap_home / "snapshots" / "auto" / name / "mem"
    with open(mem, "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(4096))
    notices: list[str] = []
    with vm(busybox, snap_home, on_notice=notices.append) as fresh:
        assert fresh.exec(["echo", "fine"]).stdout == b"fine\n"
    assert any("corrupt" in n for n in notices), notices


def test_named_snapshot_of_a_warmed_vm(busybox, snap_home):
    with vm(busybox, snap_home) as warm:
        warm.write_file("/tmp/warmed", b"state from before the snapshot")
        warm.snapshot("warmed-up")
        assert warm.exec(["true"]).exit_code == 0  # the source keeps running
    with sm.VM("snapshot:warmed-up", home=snap_home) as copy:
        assert copy.restored_from == "warmed-up"
        assert copy.read_file("/tmp/warmed") == b"state from before the snapshot"
    # a corrupt named snapshot is an error, not a silent cold boot
    state = snap_home / "snapshots" / "named" / "warmed-up" / "state"
    state.write_bytes(state.read_bytes()[:-8])
    with pytest.raises(SnapshotError, match="corrupt"):
        sm.VM("snapshot:warmed-up", home=snap_home).start()


def test_pool_of_three_serves_ten_acquires(busybox, snap_home):
    with sm.Pool(busybox, size=3, home=snap_home, memory="256M") as pool:
        for i in range(10):
            machine = pool.acquire(timeout=120)
            # a fresh VM each time: nothing an earlier user wrote is there
            r = machine.exec(["sh", "-c", f"ls /tmp/used 2>/dev/null; echo {i} > /tmp/used; "
                                          "cat /tmp/used"])
            assert r.stdout == f"{i}\n".encode()
            pool.release(machine)


POOL_CHILD = """
import sys, supermachine as sm
pool = sm.Pool(sys.argv[1], size=2, home=sys.argv[2], memory="256M").start()
vm = pool.acquire(timeout=120)
print("ready", flush=True)
import time; time.sleep(600)
"""


def test_killed_host_process_leaves_no_vm(busybox, snap_home):
    before = qemu_pids()
    proc = subprocess.Popen([sys.executable, "-c", POOL_CHILD, str(busybox), str(snap_home)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"ready\n"
        vms = qemu_pids() - before
        assert vms
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while qemu_pids() & vms and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_pids() & vms


def test_cli_snapshot_of_a_detached_vm(cli, busybox):
    name = vm_name("snapsrc")
    r = cli("run", "-d", "--name", name, str(busybox), "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        assert cli("exec", name, "sh", "-c", "echo warmed > /tmp/w").returncode == 0
        r = cli("snapshot", name, f"{name}-snap")
        assert r.returncode == 0, r.stderr
        listing = cli("snapshots").stdout.decode()
        assert f"{name}-snap" in listing and "256M" not in listing.split(f"{name}-snap")[0]
        r = cli("run", f"snapshot:{name}-snap", "cat", "/tmp/w")
        assert (r.returncode, r.stdout) == (0, b"warmed\n"), r.stderr
        assert cli("snapshots", "rm", f"{name}-snap").returncode == 0
        r = cli("run", f"snapshot:{name}-snap", "true")
        assert r.returncode != 0 and b"no snapshot named" in r.stderr
    finally:
        cli("rm", "-f", name)


def test_cli_hostname_and_machine_id(cli, busybox):
    show = ["sh", "-c", "hostname; cat /etc/machine-id"]
    r = cli("run", "--hostname", "web-1", "--machine-id", "random", str(busybox), *show)
    host, mid = r.stdout.decode().split()
    assert (r.returncode, host, len(mid)) == (0, "web-1", 32), r.stderr
    again = cli("run", "--machine-id", "random", str(busybox), *show).stdout.decode().split()
    assert again[0] == "localhost" and again[1] != mid
    name = vm_name("ident")
    r = cli("run", "-d", "--name", name, "--machine-id", "ABCDEF01-2345-6789-abcd-ef0123456789",
            str(busybox), "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        r = cli("exec", name, *show)
        assert r.stdout == f"{name}\nabcdef0123456789abcdef0123456789\n".encode(), r.stderr
    finally:
        cli("rm", "-f", name)
    r = cli("run", "--machine-id", "nope", str(busybox), "true")
    assert r.returncode != 0 and r.stderr.count(b"\n") == 1 and b"machine id" in r.stderr
    r = cli("run", "-d", "--hostname", "h" * 65, str(busybox), "true")
    assert r.returncode != 0 and b"hostname" in r.stderr and b"Traceback" not in r.stderr


def test_cli_no_snapshot_flag_boots_cold(cli, busybox, home):
    before = auto_snapshots(home)
    r = cli("--debug", "run", "--no-snapshot", "--memory", "200M", str(busybox), "echo", "cold")
    assert (r.returncode, r.stdout) == (0, b"cold\n"), r.stderr
    assert b"booted in" in r.stderr
    assert auto_snapshots(home) == before  # nothing baked for the 200M configuration


def test_named_snapshot_of_a_cold_booted_vm(busybox, snap_home):
    with vm(busybox, snap_home, snapshot=False, network="none") as cold:
        cold.write_file("/tmp/cold", b"from a cold boot")
        cold.snapshot("from-cold")
    with sm.VM("snapshot:from-cold", home=snap_home) as copy:
        assert copy.read_file("/tmp/cold") == b"from a cold boot"


def test_snapshot_that_fails_to_load_falls_back_and_is_rebaked(busybox, snap_home):
    import json

    from supermachine.runtime.snapshot import sha256_file

    with vm(busybox, snap_home, memory="288M"):
        pass  # bakes the 288M snapshot
    (name,) = [n for n in auto_snapshots(snap_home)
               if '"memory_mib": 288' in (snap_home / "snapshots/auto" / n / "meta.json")
               .read_text()]
    d = snap_home / "snapshots" / "auto" / name
    # A state file QEMU cannot load, with a checksum that matches: only the restore fails.
    (d / "state").write_bytes(b"QEVM\0\0\0\3" + os.urandom(4096))
    meta = json.loads((d / "meta.json").read_text())
    meta["state_sha256"] = sha256_file(d / "state")
    (d / "meta.json").write_text(json.dumps(meta))
    notices: list[str] = []
    with vm(busybox, snap_home, memory="288M", on_notice=notices.append) as fallback:
        assert fallback.restored_from is None
        assert fallback.exec(["echo", "booted"]).stdout == b"booted\n"
    assert any("restoring the snapshot failed" in n for n in notices), notices
    assert not d.exists()
    with vm(busybox, snap_home, memory="288M") as again:
        assert again.restored_from == name  # baked afresh under the same fingerprint
