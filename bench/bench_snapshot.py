"""Snapshots (issue 5): restore vs cold boot, CLI, pools, memory per VM and density.

Measured in one run, on one warm home (snapshot already baked: baking is the first boot's
one-time cost, reported separately), everything below interleaved rep by rep:

- restore -> first exec result (`VM(image).start()` + `exec(["true"])`), p50/p99, split into
  the two; the same with `network="none"`;
- the floor of a restore: bare QEMU restoring the very snapshot the `network="none"` VMs
  restore, with the engine's command line and QMP steps, Popen to the guest running, then
  SIGKILL (floors.py). Restores are compared with this floor, like with like;
- cold boot -> first exec result (`VM(image, snapshot=False)`); the cold / restore ratio is
  reported on its own (it is not a floor: a boot is the other path, not a lower bound);
- first use (bake): `VM(image).start()` in a fresh, empty home each rep (only the guest
  kernel and initramfs linked in): rootfs build, boot, snapshot bake, restore;
- the first exec after restoring a snapshot of a just-booted guest (no page-cache prefetch,
  as automatic snapshots were baked before), interleaved, to show what the prefetch buys;
- the same through the CLI (`supermachine run IMAGE echo x`), Python start-up included;
- pool `acquire()` -> exec result -> `release()` while the pool is warm;
- memory of idle restored VMs of the Debian+python image: RSS and PSS of each QEMU, the
  host process's share, how much of the guest RAM mapping is shared between clones;
- density: idle restored python VMs started one after another until one fails or the
  cap is reached; all must still answer a ping at the end.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tables  # noqa: E402
from common import (  # noqa: E402 (path set up above)
    CLI,
    fresh_home,
    machine_info,
    parse_args,
    print_header,
    print_tables,
    summary,
    warm_home,
    write_results,
)
from floors import RestoreFloor  # noqa: E402
from tests.fixtures import images as fx  # noqa: E402

import supermachine as sm  # noqa: E402
from supermachine.runtime import snapshot as snapshot_mod  # noqa: E402

MEMORY = "256M"
UNPREFETCHED = "bench-unprefetched"


def smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def mem_mapping(pid: int, path: Path) -> dict[str, int]:
    """smaps counters of QEMU's mapping of the snapshot memory file."""
    counters: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if len(first) >= 5 and "-" in first[0] and not line.endswith(" kB"):
            inside = line.endswith(str(path))
            continue
        if inside and line.endswith(" kB"):
            key, _, rest = line.partition(":")
            counters[key] = counters.get(key, 0) + int(rest.split()[0]) * 1024
    return counters


def timed_restore_exec(image: Path | str, home, snapshot: bool, network: str = "user"
                       ) -> tuple[float, float, float]:
    """(start + first exec, start, first exec) seconds for one VM."""
    t0 = time.perf_counter()
    vm = sm.VM(image, home=home, memory=MEMORY, snapshot=snapshot, network=network)
    vm.start()
    t1 = time.perf_counter()
    try:
        r = vm.exec(["true"])
        t2 = time.perf_counter()
        assert r.exit_code == 0, r
    finally:
        vm.close()
    return t2 - t0, t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    reps = args.reps or (5 if quick else 30)
    cold_reps = 2 if quick else 5
    first_use_reps = 1 if quick else 3
    info = machine_info()
    print_header("bench_snapshot", info, quick)
    home = warm_home()
    busybox, python = fx.busybox(), fx.python()
    results: dict = {"machine": info, "memory": MEMORY}

    # Bakes the warm home's snapshots when missing (untimed: first use is measured below, in
    # fresh homes), and finds the snapshot the floor restores.
    sm.VM(busybox, home=home, memory=MEMORY).start().close()
    floor = RestoreFloor.from_vm(busybox, home, memory=MEMORY)
    floor.restore()  # warm-up, like the VMs above

    # Baseline for the bake's page-cache prefetch: a snapshot of a just-booted guest, taken
    # the way named snapshots are, with nothing pre-read.
    with contextlib.suppress(sm.Error):
        snapshot_mod.remove_named(home, UNPREFETCHED)  # left by an interrupted run
    with sm.VM(busybox, home=home, memory=MEMORY, snapshot=False) as fresh:
        fresh.snapshot(UNPREFETCHED)

    restore, restore_start, restore_exec, cold, unprefetched = [], [], [], [], []
    nonet, nonet_start, floor_running, floor_exit, first_use = [], [], [], [], []
    for i in range(reps):
        total, start, first = timed_restore_exec(busybox, home, snapshot=True)
        restore.append(total)
        restore_start.append(start)
        restore_exec.append(first)
        # interleave the baselines with the measured thing
        total, start, _ = timed_restore_exec(busybox, home, snapshot=True, network="none")
        nonet.append(total)
        nonet_start.append(start)
        running, gone = floor.restore()
        floor_running.append(running)
        floor_exit.append(gone)
        unprefetched.append(timed_restore_exec(f"snapshot:{UNPREFETCHED}", home, True)[2])
        if i < cold_reps:
            cold.append(timed_restore_exec(busybox, home, snapshot=False)[0])
        if i < first_use_reps:
            with fresh_home("bake") as fresh:  # no rootfs, no snapshot: only the kernel
                t = time.perf_counter()
                sm.VM(busybox, home=fresh, memory=MEMORY).start().close()
                first_use.append(time.perf_counter() - t)
    snapshot_mod.remove_named(home, UNPREFETCHED)
    ratio = statistics.median(cold) / statistics.median(restore)
    floor_p50 = statistics.median(floor_exit)
    results["api"] = {"restore_to_first_exec": summary(restore),
                      "restore_only": summary(restore_start),
                      "first_exec_after_restore": summary(restore_exec),
                      "restore_to_first_exec_no_network": summary(nonet),
                      "restore_only_no_network": summary(nonet_start),
                      "restore_floor": summary(floor_exit),
                      "restore_floor_to_running": summary(floor_running),
                      "ratio_restore_only_no_network_over_floor":
                          statistics.median(nonet_start) / floor_p50,
                      "ratio_restore_only_over_floor": statistics.median(restore_start)
                      / floor_p50,
                      "first_exec_after_restore_unprefetched": summary(unprefetched),
                      "cold_boot_to_first_exec": summary(cold), "ratio_cold_over_restore": ratio}
    results["first_use"] = summary(first_use)
    results["first_use_samples"] = first_use

    cli_runs = []
    env = {**os.environ, "SUPERMACHINE_HOME": str(home.root)}
    for _ in range(3 if quick else 10):
        t = time.perf_counter()
        out = subprocess.run([CLI, "run", "--memory", MEMORY, str(busybox), "echo", "x"],
                             capture_output=True, env=env, stdin=subprocess.DEVNULL)
        cli_runs.append(time.perf_counter() - t)
        assert out.stdout == b"x\n", out.stderr
    results["cli_run_echo"] = summary(cli_runs)

    acquire = []
    with sm.Pool(busybox, size=2, home=home, memory=MEMORY) as pool:
        for _ in range(10 if quick else 30):
            deadline = time.monotonic() + 120
            while pool.ready < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            t = time.perf_counter()
            vm = pool.acquire()
            r = vm.exec(["true"])
            acquire.append(time.perf_counter() - t)
            assert r.exit_code == 0
            pool.release(vm)
    results["pool_acquire_to_exec"] = summary(acquire)

    # memory of idle restored python VMs
    sm.VM(python, home=home, memory=MEMORY).start().close()  # bake
    sample = 3 if quick else 10
    vms = []
    gc.collect()
    host_before = smaps_rollup(os.getpid())["Rss"]
    try:
        for _ in range(sample):
            vms.append(sm.VM(python, home=home, memory=MEMORY).start())
        for vm in vms:
            assert vm.exec(["python3", "-c", "pass"]).exit_code == 0
        time.sleep(1)
        host_after = smaps_rollup(os.getpid())["Rss"]
        per_vm = []
        for vm in vms:
            pid = vm._machine.pid
            roll = smaps_rollup(pid)
            ram = mem_mapping(pid, Path(vm._machine.config.memory_file))
            # Clean pages of the file mapping are the page cache, shared by every clone that
            # maps them; dirty private pages are this clone's copy-on-write copies.
            resident = ram.get("Rss", 0)
            copied = ram.get("Private_Dirty", 0)
            per_vm.append({"qemu_rss": roll["Rss"], "qemu_pss": roll["Pss"],
                           "guest_ram_resident": resident,
                           "guest_ram_shared_fraction": 1 - copied / max(1, resident)})
    finally:
        for vm in vms:
            vm.close()
    host_per_vm = (host_after - host_before) / sample

    def med(key: str) -> float:
        return statistics.median(v[key] for v in per_vm)

    results["idle_python_vm"] = {
        "sample": sample, "qemu_rss_median": med("qemu_rss"), "qemu_pss_median": med("qemu_pss"),
        "guest_ram_resident_median": med("guest_ram_resident"),
        "guest_ram_shared_fraction_median": med("guest_ram_shared_fraction"),
        "host_process_rss_per_vm": host_per_vm}

    cap = 12 if quick else 120
    density = []
    failure = None
    t = time.perf_counter()
    try:
        while len(density) < cap:
            try:
                density.append(sm.VM(python, home=home, memory=MEMORY).start())
            except sm.Error as e:
                failure = str(e)
                break
        alive = 0
        for vm in density:
            try:
                vm._agent().ping(timeout=30)
                alive += 1
            except sm.Error:
                pass
        avail = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    finally:
        for vm in density:
            vm.close()
    results["density"] = {"started": len(density), "cap": cap, "alive_at_end": alive,
                          "first_failure": failure, "seconds_to_start_all":
                          time.perf_counter() - t, "mem_available_with_all_running": avail}

    print_tables(tables.bench_snapshot(results))
    write_results("bench_snapshot", results, quick=quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
