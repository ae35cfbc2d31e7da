"""Issue 3: `supermachine pull` against `skopeo copy` from a local registry, and time to first run.

Setup (not timed): Debian's docker-registry on 127.0.0.1 (plain HTTP, filesystem storage),
two fixture images pushed to it with skopeo: busybox (one ~1 MB layer: a small image, where
process start and round trips dominate) and python (Debian bookworm minbase +
python3-minimal, one ~69 MB gzip layer: where bytes dominate).

What is measured, wall time of whole CLI processes, per image:

* ours: `supermachine pull -q --insecure-registry HOST REF` into an empty home (cold store:
  no blobs, no refs) each repetition.
* baseline: `skopeo copy --src-tls-verify=false docker://REF oci:DIR:latest` into an empty
  directory each repetition (skopeo verifies digests too; its blob-info cache holds no data).
* python floor (reported, no target): bench/pull_floor.py, the least a Python process can
  do for the same pull (socket, json and hashlib only; the same requests, digest checks
  and fsyncs; none of a real puller's bounds, auth, locks or resumption): what the
  interpreter itself costs, so the rest of the gap is ours.
* One untimed warm-up pull by each first (registry page cache, the tools' own binaries
  and Python modules in the page cache); then N reps, the order rotating.
* first run: in an empty store holding only the guest kernel and initramfs (linked; fetching
  the kernel is an install-time step and excluded), `supermachine run --insecure-registry HOST
  REF true`: pull + rootfs build + boot + baking the image's automatic snapshot + restoring
  it + `true` + teardown, in one command. Also as two commands (`pull`, then `run`) to show
  the split, and a third `run` that finds everything cached (snapshot restore). A fresh home
  each rep.

Both pullers talk to the same registry over loopback, so network speed is not what is
compared; the registry's disk reads are warm after the warm-ups.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import tables
from common import summary

# Issue 10: a small image's pull is fixed costs (process start, imports, round trips) and
# may take up to 1.2x skopeo's; a big one is bytes, and must not be slower than skopeo.
TARGET_RATIO = {"busybox": 1.2, "python": 1.0}


def timed_pull(who: str, argv: Callable[[Path], list[str]], min_bytes: int,
               stored_in: str = "", env: Callable[[Path], dict[str, str]] | None = None
               ) -> float:
    """One pull into a new empty directory (``argv(root)``), timed; it must store at least
    ``min_bytes`` under ``root/stored_in``. The directory goes afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"sm-bench-{who}-", dir=common.SCRATCH))
    try:
        t = common.run_timed(argv(root), env=env(root) if env else None)
        store = root / stored_in
        stored = common.dir_size(store) if store.exists() else 0
        if stored < min_bytes:
            raise RuntimeError(f"{who} stored only {stored} of {min_bytes} bytes")
        return t.seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ours_pull(host: str, ref: str, min_bytes: int) -> float:
    return timed_pull("supermachine", lambda root: [common.CLI, "pull", "-q",
                                                    "--insecure-registry", host, ref],
                      min_bytes, "blobs", lambda root: {"SUPERMACHINE_HOME": str(root)})


def skopeo_pull(ref: str, min_bytes: int) -> float:
    return timed_pull("skopeo", lambda root: [
        "skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
        f"docker://{ref}", f"oci:{root / 'layout'}:latest"], min_bytes)


def floor_pull(host: str, ref: str, min_bytes: int) -> float:
    """pull_floor.py: the least a Python process can do for the same pull (see there)."""
    repository, _, tag = ref.removeprefix(f"{host}/").rpartition(":")
    return timed_pull("floor", lambda root: [
        sys.executable, str(Path(__file__).parent / "pull_floor.py"), host, repository, tag,
        str(root)], min_bytes)


def first_run(host: str, ref: str) -> dict[str, float]:
    """One command (run pulls) and the same work as two commands (pull, then run)."""
    out: dict[str, float] = {}
    with common.fresh_home("firstrun") as home:
        env = common.home_env(home)
        out["run_cold"] = common.run_timed(
            [common.CLI, "run", "-q", "--insecure-registry", host, ref, "true"], env=env).seconds
    with common.fresh_home("firstrun2") as home:
        env = common.home_env(home)
        out["split_pull"] = common.run_timed(
            [common.CLI, "pull", "-q", "--insecure-registry", host, ref], env=env).seconds
        out["split_run_after_pull"] = common.run_timed(
            [common.CLI, "run", "-q", "--insecure-registry", host, ref, "true"],
            env=env).seconds
        out["split_run_cached"] = common.run_timed(
            [common.CLI, "run", "-q", "--insecure-registry", host, ref, "true"],
            env=env).seconds
    return out


def compare_pulls(host: str, ref: str, min_bytes: int, reps: int) -> dict[str, list[float]]:
    """Ours, skopeo and the python floor: one untimed warm-up each, then reps in which the
    order rotates, so each sees the same machine."""
    pullers = {"ours": lambda: ours_pull(host, ref, min_bytes),
               "skopeo": lambda: skopeo_pull(ref, min_bytes),
               "floor": lambda: floor_pull(host, ref, min_bytes)}
    for pull in pullers.values():
        pull()
    names = list(pullers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(pullers[name]())
    return samples


#: reps of each puller per image: a small pull is ~0.07 s and varies by ~20% from one
#: process to the next, so its median needs more of them than the big one's
REPS = {"busybox": 30, "python": 8}


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    reps = {name: args.reps or (2 if args.quick else n) for name, n in REPS.items()}
    run_reps = 1 if args.quick else 2
    info = common.machine_info()
    common.print_header("bench_pull", info, args.quick)

    from tests.e2e.registry.harness import Registry
    from tests.fixtures import images as fx

    layouts = {"busybox": fx.busybox(), "python": fx.python()}
    results: dict[str, Any] = {"machine": info, "reps": max(reps.values()),
                               "run_reps": run_reps, "images": {}}
    with tempfile.TemporaryDirectory(prefix="sm-bench-registry-", dir=common.SCRATCH) as tmp:
        registry = Registry(Path(tmp))
        registry.start()
        try:
            for name, layout in layouts.items():
                image_bytes = common.dir_size(layout / "blobs")
                ref = registry.push(layout, f"bench/{name}")
                # Both stores hold at least the layers (9/10: a safety margin for layouts
                # whose config and manifest blobs are a fair part of a tiny image).
                samples = compare_pulls(registry.host, ref, image_bytes * 9 // 10, reps[name])
                runs: dict[str, list[float]] = {}
                for _ in range(run_reps):
                    for k, v in first_run(registry.host, ref).items():
                        runs.setdefault(k, []).append(v)
                s_ours, s_skopeo = summary(samples["ours"]), summary(samples["skopeo"])
                ratio = s_ours["median"] / s_skopeo["median"]
                results["images"][name] = {
                    "image_blob_bytes": image_bytes, "reps": reps[name],
                    "ours": s_ours, "skopeo": s_skopeo,
                    "floor": summary(samples["floor"]),
                    "ratio_median": ratio, "target_ratio": TARGET_RATIO[name],
                    "samples": samples,
                    "first_run": {k: summary(v) for k, v in runs.items()},
                    "first_run_samples": runs}
        finally:
            registry.stop()

    common.print_tables(tables.bench_pull(results))
    common.write_results("bench_pull", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
