"""Issue 10: `supermachine run IMAGE true` on the restore path, this checkout's code against
an earlier commit's, in the same run ("no slower than before").

What is measured: wall time of whole `run busybox true` processes, fork to reaped exit, each
version from its own source tree (PYTHONPATH) and its own home, the venv's interpreter for
both. The earlier commit is checked out with `git worktree` into a temp directory and its
guest init built there (make), untimed. Each version runs twice untimed first (the first run
bakes its automatic snapshot), then N reps alternating which goes first. Medians, p99 and
the ratio of medians (target: this checkout / earlier <= 1.0).

`--against REV` picks the earlier code (default b568066, main before the typed spec and the
runtime/ restructuring of issue 10).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
import tables
from common import summary

DEFAULT_AGAINST = "b568066"
TARGET_RATIO = 1.0
CURRENT, EARLIER = "this checkout", "earlier commit"


def _worktree(rev: str, into: Path) -> str:
    subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", "-f",
                    str(into), rev], check=True, capture_output=True)
    subprocess.run(["make", "-s", "-C", str(into / "src/supermachine/guest/init")], check=True,
                   capture_output=True)
    return subprocess.run(["git", "-C", str(into), "rev-parse", "--short=12", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0], extra=lambda ap: ap.add_argument(
        "--against", default=DEFAULT_AGAINST, metavar="REV", help="the earlier code"))
    against = args.against
    reps = args.reps or (4 if args.quick else 20)
    info = common.machine_info()
    common.print_header("bench_previous", info, args.quick)

    from tests.fixtures import images as fx

    image = str(fx.busybox())
    scratch = Path(tempfile.mkdtemp(prefix="sm-bench-previous-", dir=common.SCRATCH))
    tree = scratch / "earlier"
    try:
        earlier_commit = _worktree(against, tree)
        sources = {CURRENT: common.REPO / "src", EARLIER: tree / "src"}
        homes = {name: scratch / f"home-{i}" for i, name in enumerate(sources)}

        def run(name: str) -> float:
            env = {"PYTHONPATH": str(sources[name]), "SUPERMACHINE_HOME": str(homes[name])}
            return common.run_timed([sys.executable, "-m", "supermachine", "run", image,
                                     "true"], env=env).seconds

        for name in sources:  # untimed: the first run bakes, the second restores
            run(name)
            run(name)
        samples: dict[str, list[float]] = {name: [] for name in sources}
        names = list(sources)
        for rep in range(reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                samples[name].append(run(name))
    finally:
        subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force",
                        str(tree)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    s = {n: summary(v) for n, v in samples.items()}
    results: dict[str, Any] = {
        "machine": info, "reps": reps, "image": "busybox", "against": against,
        "earlier_commit": earlier_commit, "summary": s,
        "ratio_current_over_earlier": s[CURRENT]["median"] / s[EARLIER]["median"],
        "target_ratio": TARGET_RATIO, "samples": samples}
    common.print_tables(tables.bench_previous(results))
    common.write_results("bench_previous", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
