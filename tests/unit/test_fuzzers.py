"""The fuzzers run (fuzz/): a short run of each, so neither rots between the long runs whose
figures fuzz/README.md reports. A finding fails the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_host_parsers_fuzz_without_findings(tmp_path):
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, str(ROOT / "fuzz/host.py"), "--cases", "3000",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    targets = json.loads(out.read_text())["targets"]
    assert set(targets) == {"agent", "control", "manifest", "layer", "oci", "service"}
    assert all(t["cases"] == 3000 and t["findings"] == 0 for t in targets.values())


def test_guest_parser_fuzzes_under_sanitizers(tmp_path):
    out = tmp_path / "guest.json"
    r = subprocess.run([str(ROOT / "fuzz/guest.sh"), "3", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    res = json.loads(out.read_text())
    assert res["findings"] == 0 and res["runs"] > 10_000 and res["edges_covered"] > 30, res
