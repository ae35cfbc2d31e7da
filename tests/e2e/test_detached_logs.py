"""A detached VM whose workload floods its output: its log stays within its cap on disk
(rotated once, the newest output kept), `logs` shows the newest output, and the VM ends
normally."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.e2e.conftest import CLI, run_cli, vm_name


def test_a_flooding_workload_fills_no_disk(home, busybox):
    name = vm_name("flood")
    # 6 MB of numbered lines against a 256 KiB cap, then a last line to look for.
    flood = "seq 1 800000; echo last-line"
    r = run_cli(home, "run", "-d", "--name", name, "--log-max-size", "256k",
                str(busybox), "sh", "-c", flood)
    assert r.returncode == 0, r.stderr
    follower = subprocess.Popen([*CLI, "logs", "-f", name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                env={**os.environ, "SUPERMACHINE_HOME": str(home)})
    try:
        deadline = time.monotonic() + 300  # a bound on a hang, not a speed target
        while True:
            (info,) = json.loads(run_cli(home, "inspect", name).stdout)
            if info["state"]["status"] == "exited":
                break
            assert time.monotonic() < deadline, info["state"]
            time.sleep(0.5)
        assert info["state"]["exit_code"] == 0
        vm_dir = home / "vms" / name
        sizes = [p.stat().st_size for p in (vm_dir / "log", vm_dir / "log.1")]
        assert all(size <= 256 << 10 for size in sizes), sizes
        out = run_cli(home, "logs", name).stdout
        assert out.endswith(b"799999\n800000\nlast-line\n")
        assert len(out) <= 512 << 10  # the newest output only: the rest was rotated away
        first = int(out.split(b"\n", 2)[1])  # a whole line after the cut
        assert first > 700000
        # `logs -f` followed the log across its rotations to the end.
        followed, err = follower.communicate(timeout=120)
        assert follower.returncode == 0, err
        assert followed.endswith(b"800000\nlast-line\n")
    finally:
        follower.kill()
        follower.wait()
        run_cli(home, "rm", "-f", name)


def test_log_size_is_for_detached_vms_and_checked(cli, busybox):
    r = cli("run", "--log-max-size", "1m", str(busybox), "true")
    assert r.returncode == 2 and b"add -d" in r.stderr
    r = cli("run", "-d", "--log-max-size", "1x", str(busybox), "true")
    assert r.returncode == 2 and b"invalid log size" in r.stderr
