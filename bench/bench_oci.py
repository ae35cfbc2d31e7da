"""The OCI runtime under an engine: `podman run --rm --runtime supermachine-runtime IMAGE true`
beside podman with runc and beside `supermachine run IMAGE true` (issue 15).

Setup (untimed): the busybox fixture copied into a private podman store (bench_peers'
`podman_store`), and a wrapper script that runs supermachine-runtime with the benchmarks'
warm home (engines hand a runtime almost no environment). Each command runs once, untimed,
first (the runtime's empty-root snapshot and the image's own snapshot are baked then).

Measured: whole-process wall time (fork to reaped exit), interleaved rep by rep with the
order rotating:

* supermachine run: `supermachine run IMAGE true` (restore path, default network);
* podman + supermachine-runtime: `podman run --rm --runtime WRAPPER IMAGE true` with
  podman's default network (CNI bridge: the VM's NIC joins the container's namespace);
* podman + runc: the same with runc.

Target: the engine path at most 1.3x `supermachine run` (p50). What the engine path adds:
podman and conmon themselves (runc's whole run is their floor), four runtime processes
(create, start, delete, and the container process), and the bundle's root over 9p.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import common
import tables
from bench_peers import TAG, ULIMITS, podman_store, versions
from common import summary

TARGET = 1.3
OURS = "supermachine run"
ENGINE = "podman + supermachine-runtime"
RUNC = "podman + runc"


def wrapper(home: common.Home, directory: Path) -> Path:
    import os

    from tests.fixtures.oci import runtime_wrapper

    env = common.home_env(home)
    for name in ("SUPERMACHINE_KERNELS", "SUPERMACHINE_DOWNLOADS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return runtime_wrapper(directory, env)


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (3 if args.quick else 20)
    info = common.machine_info()
    common.print_header("bench_oci", info, args.quick)

    from tests.fixtures import images as fx

    image = fx.busybox()
    home = common.warm_home()
    common.ensure_guest(home)
    scratch = Path(tempfile.mkdtemp(prefix="sm-bench-oci-", dir=common.SCRATCH))
    runtime = wrapper(home, scratch)
    with podman_store(image) as opts:
        def podman(rt: str) -> list[str]:
            return ["podman", *opts, "run", "--rm", "--runtime", rt, *ULIMITS, TAG, "true"]

        commands = {OURS: ([common.CLI, "run", str(image), "true"], common.home_env(home)),
                    ENGINE: (podman(str(runtime)), None), RUNC: (podman("runc"), None)}
        for argv, env in commands.values():  # untimed: bakes, warms podman's store
            common.run_timed(argv, env=env)
        samples: dict[str, list[float]] = {k: [] for k in commands}
        names = list(commands)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                argv, env = commands[name]
                samples[name].append(common.run_timed(argv, env=env).seconds)
    leftovers = sorted(p.name for p in (scratch / "state").glob("*"))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    if leftovers:
        raise RuntimeError(f"containers left in the runtime's state: {leftovers}")
    s = {k: summary(v) for k, v in samples.items()}
    results = {
        "machine": info, "reps": reps, "image": "busybox fixture", "baseline": OURS,
        "target_ratio": TARGET, "versions": versions(), "summary": s, "samples": samples,
        "ratio_median_vs_baseline": {k: v["median"] / s[OURS]["median"] for k, v in s.items()},
    }
    common.print_tables(tables.bench_oci(results))
    common.write_results("bench_oci", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
