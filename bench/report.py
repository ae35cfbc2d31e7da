"""Regenerate the benchmark tables in bench/README.md from the results files.

    .venv/bin/python bench/report.py            # rewrite the README's generated sections
    .venv/bin/python bench/report.py --check    # exit 1 if they are out of date

The README marks each generated section with a pair of comments:

    <!-- bench:bench_run -->
    ... (replaced) ...
    <!-- /bench:bench_run -->

Into each goes the newest results file of that benchmark (bench/results/<name>-<UTC
timestamp>.json, layout version `tables.SCHEMA`): a full run when there is one, else the
newest quick smoke run, labelled as such. Every section names its file and the machine facts
in it (date, accelerator, QEMU, CPU, load, code), so each number traces to one run. The
tables are the same ones the benchmark printed (tables.py). Nothing else in the README
changes, and the output depends only on the files: running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tables

HERE = Path(__file__).resolve().parent
FILE_RE = re.compile(r"^(bench_[a-z_]+)-(\d{8}T\d{6}Z)\.json$")
SECTION_RE = re.compile(r"(<!-- bench:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)"
                        r"(<!-- /bench:(?P=name) -->)", re.DOTALL)


@dataclass(frozen=True)
class Chosen:
    path: Path
    results: dict[str, Any]


def load(path: Path) -> dict[str, Any] | None:
    """A results file in the current layout, else None (old layouts cannot be rendered)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != tables.SCHEMA or \
            "machine" not in data:
        return None
    return data


def choose(results_dir: Path, bench: str) -> Chosen | None:
    """The newest full run of ``bench``, else its newest quick run, else None."""
    candidates = []
    for path in results_dir.glob(f"{bench}-*.json") if results_dir.is_dir() else []:
        m = FILE_RE.match(path.name)
        if m and m.group(1) == bench:
            candidates.append((m.group(2), path))
    best: Chosen | None = None
    for _stamp, path in sorted(candidates, reverse=True):  # newest first
        data = load(path)
        if data is None:
            continue
        if not data.get("quick"):
            return Chosen(path, data)
        if best is None:
            best = Chosen(path, data)
    return best


def section(bench: str, chosen: Chosen | None, repo: Path) -> str:
    if chosen is None:
        return (f"*No results file of {bench} in this layout (schema {tables.SCHEMA}) yet: "
                f"run `.venv/bin/python bench/{bench}.py`, then `bench/report.py`.*\n")
    try:
        name = chosen.path.resolve().relative_to(repo).as_posix()
    except ValueError:
        name = chosen.path.name
    head = f"From `{name}` ({tables.machine_line(chosen.results)})."
    if chosen.results.get("quick"):
        head += " **Quick smoke run: few reps, not for quoting.**"
    return head + "\n\n" + tables.render_markdown(tables.TABLES[bench](chosen.results))


def regenerate(readme: str, results_dir: Path, repo: Path) -> str:
    """``readme`` with every generated section filled from ``results_dir``."""
    def fill(m: re.Match[str]) -> str:
        bench = m.group("name")
        if bench not in tables.TABLES:
            raise ValueError(f"README section for unknown benchmark {bench!r}")
        body = section(bench, choose(results_dir, bench), repo)
        return m.group(1) + body + m.group(4)

    return SECTION_RE.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 when the README is out of date")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    new = regenerate(old, args.results, HERE.parent)
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date: run bench/report.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
    present = {m.group("name") for m in SECTION_RE.finditer(old)}
    missing = sorted(set(tables.TABLES) - present)
    for bench in missing:
        print(f"note: {args.readme.name} has no <!-- bench:{bench} --> section",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
