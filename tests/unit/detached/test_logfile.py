"""The detached VM's output log: bounded to twice its cap on disk, frames never split, the
newest output kept."""

from __future__ import annotations

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
    rotated = logfile.rotated(log)
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
    assert _payloads(logfile.rotated(log)) == b"x" * 100_000
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
