"""Issue 3: `supermachine pull` against `skopeo copy` from a local registry, and time to first run.

Setup (not timed): Debian's docker-registry on 127.0.0.1 (plain HTTP, filesystem storage),
the python fixture image (Debian bookworm minbase + python3-minimal, one gzip layer) pushed to
it with skopeo.

What is measured, wall time of whole CLI processes, alternating ours and the baseline:

* ours: `supermachine pull -q --insecure-registry HOST REF` into an empty home (cold store:
  no blobs, no refs) each repetition.
* baseline: `skopeo copy --src-tls-verify=false docker://REF oci:DIR:latest` into an empty
  directory each repetition (skopeo verifies digests too; its blob-info cache holds no data).
* first run: in an empty store holding only the guest kernel and initramfs (linked; fetching
  the kernel is an install-time step and excluded), `supermachine run --insecure-registry HOST
  REF true`: pull + rootfs build + boot + baking the image's automatic snapshot + restoring
  it + `true` + teardown, in one command. Also as two commands (`pull`, then `run`) to show
  the split, and a third `run` that finds everything cached (snapshot restore).

Both pullers talk to the same registry over loopback, so network speed is not what is
compared; the registry's disk reads are warm after the push.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
from common import fmt_s, summary


def ours_pull(host: str, ref: str) -> float:
    root = Path(tempfile.mkdtemp(prefix="sm-bench-pull-", dir=common.SCRATCH))
    try:
        t = common.run_timed([common.CLI, "pull", "-q", "--insecure-registry", host, ref],
                             env={"SUPERMACHINE_HOME": str(root)})
        stored = common.dir_size(root / "blobs") if (root / "blobs").exists() else 0
        if stored < 1_000_000:
            raise RuntimeError(f"supermachine pull stored only {stored} bytes")
        return t.seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def skopeo_pull(ref: str) -> float:
    root = Path(tempfile.mkdtemp(prefix="sm-bench-skopeo-", dir=common.SCRATCH))
    try:
        t = common.run_timed(["skopeo", "--insecure-policy", "copy", "-q",
                              "--src-tls-verify=false", f"docker://{ref}",
                              f"oci:{root / 'layout'}:latest"])
        if common.dir_size(root) < 1_000_000:
            raise RuntimeError("skopeo copied less than 1 MB")
        return t.seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (2 if args.quick else 8)
    run_reps = 1 if args.quick else 2
    info = common.machine_info()
    common.print_header("bench_pull", info, args.quick)

    from tests.e2e.registry.harness import Registry
    from tests.fixtures import images as fx

    layout = fx.python()
    image_bytes = common.dir_size(layout / "blobs")
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "reps": reps,
                               "image": "python fixture", "image_blob_bytes": image_bytes}
    with tempfile.TemporaryDirectory(prefix="sm-bench-registry-", dir=common.SCRATCH) as tmp:
        registry = Registry(Path(tmp))
        registry.start()
        try:
            ref = registry.push(layout, "bench/python")
            ours_pull(registry.host, ref)  # warm the registry's page cache and our imports
            ours, skopeo = [], []
            for _ in range(reps):
                ours.append(ours_pull(registry.host, ref))
                skopeo.append(skopeo_pull(ref))
            runs: dict[str, list[float]] = {}
            for _ in range(run_reps):
                for k, v in first_run(registry.host, ref).items():
                    runs.setdefault(k, []).append(v)
        finally:
            registry.stop()

    s_ours, s_skopeo = summary(ours), summary(skopeo)
    ratio = s_ours["median"] / s_skopeo["median"]
    results.update({"ours": s_ours, "skopeo": s_skopeo, "ratio_median": ratio,
                    "target_ratio": 1.0, "samples": {"ours": ours, "skopeo": skopeo},
                    "first_run": {k: summary(v) for k, v in runs.items()},
                    "first_run_samples": runs})
    mb = image_bytes / 1e6
    common.print_table(
        f"pull of a {mb:.0f} MB image from a loopback registry, cold store ({reps} alternating "
        "reps)", ["puller", "p50", "p99", "MB/s (p50)", "ratio p50", "<=1.0x"],
        [["supermachine pull", fmt_s(s_ours["median"]), fmt_s(s_ours["p99"]),
          f"{mb / s_ours['median']:.0f}", f"{ratio:.2f}x", "yes" if ratio <= 1.0 else "NO"],
         ["skopeo copy -> oci:", fmt_s(s_skopeo["median"]), fmt_s(s_skopeo["p99"]),
          f"{mb / s_skopeo['median']:.0f}", "1.00x", ""]])
    labels = {"run_cold": "run REF true, empty store (pull+rootfs+boot+snapshot bake+restore)",
              "split_pull": "  split: supermachine pull",
              "split_run_after_pull": "  split: then run REF true (rootfs+boot+bake+restore)",
              "split_run_cached": "  then run REF true again (snapshot restore)"}
    common.print_table(f"time to first run of a freshly pulled image (accel {info['accel']}, "
                       f"{run_reps} reps)", ["step", "median", "max"],
                       [[labels[k], fmt_s(summary(v)["median"]), fmt_s(max(v))]
                        for k, v in runs.items()])
    common.write_results("bench_pull", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
