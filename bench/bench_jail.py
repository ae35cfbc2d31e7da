"""The VMM's jail (issue 11): QEMU in its namespaces (engine/jail.py) against QEMU without
them, in one run, interleaved rep by rep (the order alternating):

- restore -> first exec result through the API (`VM(busybox).start()` + `exec(["true"])`);
- then cold `supermachine run --no-snapshot busybox true`, whole CLI processes, fork to
  reaped exit;
- the jail's own start: `bwrap` with the same namespaces running `/usr/bin/true`.

Target: the jail costs at most 10 ms or 5 %, whichever is larger, on both paths.
"""

from __future__ import annotations

import os
import subprocess
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
from supermachine.engine import jail  # noqa: E402

MODES = ("off", "required")  # unconfined, confined (an error rather than a quiet fallback)
MEMORY = "256M"
TARGET_MS, TARGET_RATIO = 10.0, 1.05


def restore_once(image: Path, home, mode: str) -> float:
    os.environ[jail.MODE_ENV] = mode
    t0 = time.perf_counter()
    with sm.VM(image, home=home, memory=MEMORY, network="none") as vm:
        assert vm.restored_from, "the VM booted instead of restoring"
        assert vm.exec(["true"]).exit_code == 0
        return time.perf_counter() - t0


def bare_jail() -> float:
    cmd = jail.command(["/usr/bin/true"], jail.Jail(), info_fd=2)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def within_target(confined: float, unconfined: float) -> bool:
    return confined - unconfined <= max(TARGET_MS / 1000, unconfined * (TARGET_RATIO - 1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    reps = args.reps or (5 if args.quick else 30)
    cold_reps = max(3, reps // 2)
    if jail.unavailable():
        raise SystemExit(f"the jail cannot run here: {jail.unavailable()}")
    info = machine_info()
    print_header("bench_jail", info, args.quick)
    home = warm_home()
    image = fx.busybox()
    for mode in MODES:  # untimed: the automatic snapshot, warm caches
        restore_once(image, home, mode)
    restore: dict[str, list[float]] = {m: [] for m in MODES}
    cold: dict[str, list[float]] = {m: [] for m in MODES}
    bare = [bare_jail() for _ in range(reps)]
    # one path at a time (a cold boot's minute of CPU load right before a restore
    # would blur the restore's few milliseconds), the modes interleaved within each
    for rep in range(reps):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            restore[mode].append(restore_once(image, home, mode))
    for rep in range(cold_reps):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            cold[mode].append(run_timed(
                [CLI, "run", "--no-snapshot", "--network", "none", str(image), "true"],
                env={**home_env(home), jail.MODE_ENV: mode}).seconds)
    os.environ.pop(jail.MODE_ENV, None)
    paths = {"restore_to_first_exec": restore, "cold_run_no_snapshot": cold}
    results = {
        "machine": info, "reps": reps, "cold_reps": cold_reps, "image": "busybox",
        "memory": MEMORY, "root": os.geteuid() == 0,
        "paths": {name: {m: summary(v) for m, v in by_mode.items()}
                  for name, by_mode in paths.items()},
        "bare_jail": summary(bare), "target_ms": TARGET_MS, "target_ratio": TARGET_RATIO,
        "within_target": {name: within_target(summary(by_mode["required"])["median"],
                                              summary(by_mode["off"])["median"])
                          for name, by_mode in paths.items()},
        "samples": {"paths": paths, "bare_jail": bare},
    }
    print_tables(tables.bench_jail(results))
    write_results("bench_jail", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
