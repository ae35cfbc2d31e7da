"""Issue 10: the command line's fixed costs, against `python -c pass` with the same interpreter.

What is measured: wall time of whole processes, fork to reaped exit (common.run_timed), of

* `python -c pass`: the venv's interpreter starting and exiting (the baseline: every
  `supermachine` command pays it first);
* `supermachine --version`: the console script, its imports, one line printed;
* `supermachine ps`: an empty home (a fresh directory each rep, no VMs): the parser, the
  state code, an empty table;
* `supermachine --help`: the whole parser built and formatted.

One untimed warm-up of each first (page cache, __pycache__), then N reps in which the order
of the four rotates, so every command sees the same machine. Medians and p99, and each
median over the baseline's (targets: --version and ps <= 2.5x `python -c pass`).
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

TARGET_RATIO = 2.5
TARGETS = ("supermachine --version", "supermachine ps")


def commands() -> dict[str, Callable[[], float]]:
    def timed(argv: list[str], **env: str) -> float:
        return common.run_timed(argv, env=env or None).seconds

    def ps_empty_home() -> float:
        root = tempfile.mkdtemp(prefix="sm-bench-cli-", dir=common.SCRATCH)
        try:
            t = common.run_timed([common.CLI, "ps"], env={"SUPERMACHINE_HOME": root})
            if t.stdout.decode().split() != ["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS",
                                             "PORTS", "MOUNTS"]:
                raise RuntimeError(f"ps in an empty home printed {t.stdout!r}")
            return t.seconds
        finally:
            shutil.rmtree(root, ignore_errors=True)

    return {
        "python -c pass": lambda: timed([sys.executable, "-c", "pass"]),
        "supermachine --version": lambda: timed([common.CLI, "--version"]),
        "supermachine ps": ps_empty_home,
        "supermachine --help": lambda: timed([common.CLI, "--help"]),
    }


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (10 if args.quick else 40)
    info = common.machine_info()
    common.print_header("bench_cli", info, args.quick)

    cmds = commands()
    names = list(cmds)
    for run in cmds.values():  # untimed warm-up
        run()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(cmds[name]())

    s = {n: summary(v) for n, v in samples.items()}
    base = s["python -c pass"]["median"]
    results: dict[str, Any] = {
        "machine": info, "reps": reps, "baseline": "python -c pass", "commands": names,
        "summary": s, "ratio_median_vs_baseline": {n: s[n]["median"] / base for n in names},
        "target_ratio": TARGET_RATIO, "targets": list(TARGETS), "samples": samples,
        "cli": str(Path(common.CLI)), "python_executable": sys.executable}
    common.print_tables(tables.bench_cli(results))
    common.write_results("bench_cli", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
