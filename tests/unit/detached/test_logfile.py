"""The detached VM's output log: bounded to twice its cap on disk, frames never split, the
newest output kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from supermachine.detached import logfile
from supermachine.detached.protocol import Decoder, Kind, encode_data
from supermachine.errors import UsageError


def _payloads(*paths) -> bytes:
    out = b""
    for path in paths:
        if path.exists():
            out += b"".join(f.payload for f in Decoder().feed(path.read_bytes()))
    return out


def test_rotates_at_the_cap_and_keeps_the_newest(tmp_path):
    log = tmp_path / "log"
    cap = logfile.MIN_MAX_BYTES
    w = logfile.LogWriter(log, cap)
    written = b""
    for i in range(200):
        data = f"{i:04d}".encode() * 250  # 1000 bytes a write
        w.write(encode_data(Kind.STDOUT, data))
        written += data
    w.close()
    rotated = Path(logfile.rotated(log))
    assert log.stat().st_size <= cap and rotated.stat().st_size <= cap
    kept = _payloads(rotated, log)  # every file decodes on its own: no frame was split
    assert written.endswith(kept) and len(kept) > cap // 2
    assert kept.endswith(b"0199" * 250)


def test_reopening_counts_what_is_there(tmp_path):
    log = tmp_path / "log"
    log.write_bytes(encode_data(Kind.STDOUT, b"x" * 100_000))
    w = logfile.LogWriter(log, logfile.MIN_MAX_BYTES)
    w.write(encode_data(Kind.STDOUT, b"y" * 100_000))  # would pass the cap: rotates first
    w.close()
    assert _payloads(Path(logfile.rotated(log))) == b"x" * 100_000
    assert _payloads(log) == b"y" * 100_000


@pytest.mark.parametrize(("text", "size"), [("10m", 10 << 20), ("512k", 512 << 10),
                                            ("1g", 1 << 30), ("200000", 200000),
                                            ("1.5m", int(1.5 * (1 << 20)))])
def test_parse_size(text, size):
    assert logfile.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "10q", "1k", "-5m", "9999t"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        logfile.parse_size(text)


def test_the_supervisor_stderr_is_capped_for_it_and_its_children(tmp_path):
    """A real process sets the cap up, then floods fd 2 itself and through a child (as the
    guest console echo and passt do): the file rotates and keeps the newest output."""
    import subprocess
    import sys

    log = tmp_path / "supervisor.log"
    script = f"""
import os, subprocess, sys
from pathlib import Path
from supermachine.detached.logfile import StderrCap
cap = StderrCap(Path({str(log)!r}), {logfile.MIN_MAX_BYTES})
for i in range(300):
    os.write(2, b"%04d" % i * 256 + b"\\n")  # about 300 KiB from this process
subprocess.run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\\\0' c >&2"], check=True)
print("the end", file=sys.stderr, flush=True)
cap.close()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # nothing reached the original stderr
    old = Path(logfile.rotated(log))
    assert log.stat().st_size <= logfile.MIN_MAX_BYTES
    assert old.stat().st_size <= logfile.MIN_MAX_BYTES
    assert log.read_bytes().endswith(b"ccthe end\n")  # the newest output, all of it
