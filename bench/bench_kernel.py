"""Guest kernels (issue 13): the supermachine kernel against Debian's cloud kernel.

Measured in one run, both kernels interleaved rep by rep (the order alternating):

- cold `supermachine run --no-snapshot --kernel K busybox true`, whole CLI processes, fork
  to reaped exit (target: supermachine / debian <= 0.45);
- restore -> first exec result through the API (`VM(busybox, kernel=K).start()` then
  `exec(["true"])`), split into the two, each kernel restoring its own automatic snapshot;
- translation blocks QEMU's TCG made for that first exec (HMP `info jit` before and after);
  under TCG every new QEMU translates the guest's exec path afresh;
- memory: PSS of an idle restored VM's QEMU, and guest RAM touched by boot + bake (the
  allocated size of each kernel's snapshot memory file);
- the install-time build: wall time, disk used at peak and the kernel's size, from the build's
  own record (kbuild.py writes it; the build itself is install.sh's job, not redone here).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tables  # noqa: E402
from common import (  # noqa: E402 (path set up above)
    CLI,
    home_env,
    machine_info,
    parse_args,
    print_header,
    print_tables,
    run_timed,
    summary,
    warm_home,
    write_results,
)
from tests.fixtures import images as fx  # noqa: E402

import supermachine as sm  # noqa: E402
from supermachine.guest import kbuild  # noqa: E402

KERNELS = ("debian", "supermachine")
TARGET_COLD_RATIO = 0.45
MEMORY = "256M"


def tb_count(vm: sm.VM) -> int:
    """QEMU's count of translated blocks so far (HMP `info jit`)."""
    text = vm._machine._control().execute("human-monitor-command",
                                          {"command-line": "info jit"})
    m = re.search(r"TB count\s+(\d+)", text)
    if not m:
        raise RuntimeError(f"no TB count in `info jit` output: {text[:200]!r}")
    return int(m.group(1))


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss in smaps_rollup")


def restore_once(image: Path, home, kernel: str) -> dict[str, float]:
    t0 = time.perf_counter()
    vm = sm.VM(image, home=home, memory=MEMORY, kernel=kernel, network="none")
    vm.start()
    t1 = time.perf_counter()
    try:
        assert vm.restored_from, "the VM booted instead of restoring"
        before = tb_count(vm)
        t2 = time.perf_counter()
        r = vm.exec(["true"])
        t3 = time.perf_counter()
        assert r.exit_code == 0, r
        blocks = tb_count(vm) - before
        time.sleep(0.5)  # idle: the first exec's work settled
        idle_pss = pss(vm.pid)
        touched = snapshot_allocated(vm.pid)
    finally:
        vm.close()
    return {"total": t3 - t0 - (t2 - t1), "restore": t1 - t0, "first_exec": t3 - t2,
            "blocks": blocks, "pss": idle_pss, "snapshot_allocated": touched}


def snapshot_allocated(pid: int) -> int:
    """Allocated bytes of the snapshot memory file a restored QEMU maps: the guest RAM its
    boot and bake touched (untouched pages are holes)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for arg in cmdline:
        m = re.search(rb"mem-path=([^,]+)", arg)
        if m:
            return Path(m.group(1).decode()).stat().st_blocks * 512
    raise RuntimeError("the VM maps no snapshot memory file")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    reps = args.reps or (3 if args.quick else 10)
    info = machine_info()
    print_header("bench_kernel", info, args.quick)
    home = warm_home()
    built = kbuild.built_kernel(home)
    if built is None:
        raise SystemExit("the supermachine kernel is not built: run `supermachine kernel "
                         "build` (install.sh does) first")
    image = fx.busybox()
    env = home_env(home)
    for kernel in KERNELS:  # untimed: bakes each kernel's automatic snapshot
        with sm.VM(image, home=home, memory=MEMORY, kernel=kernel, network="none") as vm:
            vm.exec(["true"])
        run_timed([CLI, "run", "--no-snapshot", "--kernel", kernel, str(image), "true"], env=env)

    cold: dict[str, list[float]] = {k: [] for k in KERNELS}
    restore: dict[str, list[dict[str, float]]] = {k: [] for k in KERNELS}
    for rep in range(reps):
        for kernel in (KERNELS if rep % 2 == 0 else KERNELS[::-1]):
            cold[kernel].append(run_timed(
                [CLI, "run", "--no-snapshot", "--kernel", kernel, str(image), "true"],
                env=env).seconds)
            restore[kernel].append(restore_once(image, home, kernel))

    per_kernel = {}
    for kernel in KERNELS:
        samples = restore[kernel]
        per_kernel[kernel] = {
            "cold_run_no_snapshot": summary(cold[kernel]),
            "restore_to_first_exec": summary([s["total"] for s in samples]),
            "restore_only": summary([s["restore"] for s in samples]),
            "first_exec": summary([s["first_exec"] for s in samples]),
            "first_exec_blocks": summary([s["blocks"] for s in samples]),
            "idle_restored_pss": summary([s["pss"] for s in samples]),
            "snapshot_memory_allocated": samples[-1]["snapshot_allocated"],
            "samples": {"cold": cold[kernel], "restore": samples},
        }
    ratio = (per_kernel["supermachine"]["cold_run_no_snapshot"]["median"]
             / per_kernel["debian"]["cold_run_no_snapshot"]["median"])
    rec = built.record
    results = {
        "machine": info, "reps": reps, "image": "busybox", "memory": MEMORY,
        "kernels": per_kernel, "ratio_cold_supermachine_over_debian": ratio,
        "target_cold_ratio": TARGET_COLD_RATIO,
        "build": {"version": built.version, "wall_s": rec.get("wall_s"),
                  "timings": rec.get("timings"), "jobs": rec.get("jobs"),
                  "disk_peak_bytes": rec.get("disk_peak_bytes"),
                  "vmlinux_bytes": rec.get("vmlinux_bytes"),
                  "toolchain": rec.get("toolchain")},
    }
    print_tables(tables.bench_kernel(results))
    write_results("bench_kernel", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
