"""Shared helpers for the benchmarks: homes, statistics, tables, JSON results, machine facts.

Every benchmark runs alone on the machine (2 cores; VMs under TCG slow each other down),
measures its baseline in the same run, alternating with the thing measured, and reports
ratios. Results go to ``bench/results/<name>-<UTC timestamp>.json`` and a copy at
``bench/results/<name>-latest.json``.

Homes: the *warm* home (``$SUPERMACHINE_BENCH_HOME``, default
/var/tmp/supermachine-bench-home) keeps guest assets and root filesystems between runs, for
cached measurements. Cold-store measurements use a *fresh* home under /var/tmp that only
holds the guest kernel (hard-linked from the warm home): fetching Debian's kernel with apt is
a one-time install step, not part of pulling or running an image, so it is excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so `python bench/x.py` can import tests.fixtures and src
    sys.path.insert(0, str(REPO))
if str(REPO / "src") not in sys.path:
    sys.path.insert(1, str(REPO / "src"))

from tables import SCHEMA, Table, fmt_s, render_text  # noqa: E402, F401 (fmt_s: for benches)

from supermachine.home import Home, default_root  # noqa: E402 (needs the path set up above)

RESULTS = REPO / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "supermachine")
WARM_HOME = Path(os.environ.get("SUPERMACHINE_BENCH_HOME", "/var/tmp/supermachine-bench-home"))
# The end-to-end suite's home; when it already holds the kernel we link it instead of asking
# apt again (the kernel is the same package either way).
TEST_HOME = Path(os.environ.get("SUPERMACHINE_TEST_HOME", "/var/tmp/supermachine-test-home"))
SCRATCH = Path("/var/tmp")
# The supermachine kernel install.sh built (minutes) is shared by every home a benchmark makes.
os.environ.setdefault("SUPERMACHINE_KERNELS", str(Home(default_root()).kernels))


# ---------------------------------------------------------------------------- arguments


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="override the repetition count")
    if extra is not None:
        extra(ap)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is simply the maximum."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float]) -> dict[str, float | int]:
    """What results files report of a sample: the median (p50) and the tail, never a best-of
    (a minimum flatters whichever side got lucky; raw samples sit beside it in the JSON)."""
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p99": percentile(samples, 99),
        "max": max(samples),
        "mean": statistics.fmean(samples),
    }


# ---------------------------------------------------------------------------- output


def print_tables(tables: Sequence[Table]) -> None:
    """The same tables bench/report.py puts in the README, as text."""
    print(render_text(tables), end="")


def write_results(name: str, data: dict[str, Any], *, quick: bool) -> Path:
    """JSON at results/<name>-<timestamp>.json, copied to results/<name>-latest.json.

    ``quick`` is recorded in the file: bench/report.py prefers full runs, and labels a
    smoke run's numbers as such when it has nothing else.
    """
    if "machine" not in data:
        raise ValueError("results without machine facts cannot be traced to a machine")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"{name}-{stamp}.json"
    machine = {**data["machine"], "loadavg_1m_at_end": round(load_average(), 2)}
    data = {**data, "machine": machine, "bench": name, "quick": quick, "schema": SCHEMA}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    path.write_text(text)
    latest = RESULTS / f"{name}-latest.json"
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, latest)
    print(f"\nresults: {path}")
    return path


# ---------------------------------------------------------------------------- machine facts


def load_average() -> float:
    return os.getloadavg()[0]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; every results file carries it."""
    from supermachine.engine.accel import choose
    from supermachine.engine.qemu import QemuEngine

    accel = choose(None)
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "accel": accel.name,
        "accel_hardware": accel.hardware,
        "accel_reason": accel.reason,
        "qemu": QemuEngine().version(),
        "python": sys.version.split()[0],
        "loadavg_1m_at_start": round(load_average(), 2),
        "code": code_version(),
        "python_bytecode_cache": "on for measured processes (PYTHONDONTWRITEBYTECODE dropped)",
    }


def code_version() -> str:
    """The commit measured, marked "+dirty" when src/ or bench/ had uncommitted changes to
    tracked files (the numbers then belong to a working tree, not to that commit)."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True,
                              text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "bench")
    return head + ("+dirty" if dirty else "")


def machine_accel() -> str:
    """The accelerator `--accel auto` picks here (what ours runs on, so the floor uses it)."""
    from supermachine.engine.accel import choose

    return choose(None).name


def print_header(name: str, info: dict[str, Any], quick: bool) -> None:
    kind = "hardware" if info["accel_hardware"] else "emulated"
    print(f"{name}: accelerator {info['accel']} ({kind}), {info['qemu']}, "
          f"{info['cores']} cores, {info['cpu']}")
    print(f"mode: {'quick' if quick else 'default'}; load average {info['loadavg_1m_at_start']}")
    if info["loadavg_1m_at_start"] > 1.0:
        print("warning: the machine is busy (load > 1); VM timings under TCG will be inflated")


# ---------------------------------------------------------------------------- homes


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree with hard links (same filesystem), falling back to copies."""
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


def _has_kernel(home: Path) -> bool:
    return any(home.glob("guest/kernel-*/kernel.json"))


def warm_home() -> Home:
    """The benchmarks' persistent home, with the guest kernel in it (linked or fetched)."""
    WARM_HOME.mkdir(parents=True, exist_ok=True)
    if not _has_kernel(WARM_HOME) and _has_kernel(TEST_HOME):
        link_tree(TEST_HOME / "guest", WARM_HOME / "guest")
    return Home(WARM_HOME)


@contextlib.contextmanager
def fresh_home(tag: str) -> Iterator[Home]:
    """An empty store (no blobs, refs or rootfs) holding only the guest kernel and initrd."""
    warm = warm_home()
    ensure_guest(warm)  # so the fresh home gets a built initramfs too
    root = Path(tempfile.mkdtemp(prefix=f"sm-bench-{tag}-", dir=SCRATCH))
    try:
        link_tree(warm.root / "guest", root / "guest")
        yield Home(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ensure_guest(home: Home) -> Any:
    from supermachine.guest.assets import ensure_guest_assets

    return ensure_guest_assets(home)


# ---------------------------------------------------------------------------- processes


@dataclass
class Timed:
    seconds: float
    returncode: int
    stdout: bytes
    stderr: bytes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for measured processes: ours plus ``extra``, with bytecode caching on.

    A session may set PYTHONDONTWRITEBYTECODE=1; then every CLI process compiles its modules
    from source (measured: 30-80 ms a run), which no installed copy does. Start-up figures
    would be inflated, so measured children may write and use __pycache__ (git-ignored).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **(extra or {})}


def run_timed(argv: Sequence[str], *, env: dict[str, str] | None = None,
              timeout: float = 300, check: bool = True) -> Timed:
    """Wall time of a child process from fork to reaped exit."""
    full_env = child_env(env)
    t0 = time.perf_counter()
    proc = subprocess.run(list(argv), env=full_env, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return Timed(elapsed, proc.returncode, proc.stdout, proc.stderr)


def home_env(home: Home) -> dict[str, str]:
    return {"SUPERMACHINE_HOME": str(home.root)}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
