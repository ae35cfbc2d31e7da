"""Pull progress displays, and the ref-record store's handling of damaged records."""

from __future__ import annotations

import io

import pytest

from supermachine.errors import ImageError
from supermachine.home import Home
from supermachine.images import store as st
from supermachine.images.progress import (
    LineProgress,
    NullProgress,
    TerminalProgress,
    human_size,
    make_progress,
)
from supermachine.images.reference import parse_reference

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(p, clock):
    p.layer_add(A, 2_000_000)
    p.layer_add(B, 500)
    p.layer_done(B, 500, "Already exists")
    p.layer_start(A, 2_000_000, 0)
    for _ in range(4):
        clock.t += 0.25
        p.layer_advance(A, 250_000)
    clock.t += 0.001  # within the throttle window: no redraw
    p.layer_advance(A, 1_000_000)
    p.layer_done(A, 2_000_000, "Pull complete")
    p.close()


def test_line_progress_one_line_per_layer():
    out, clock = io.StringIO(), Clock()
    _drive(LineProgress(out, clock), clock)
    lines = out.getvalue().splitlines()
    assert lines[0] == "bbbbbbbbbbbb: Already exists  (500 B)"
    assert lines[1] == "aaaaaaaaaaaa: Pull complete  (2.0 MB)"
    assert lines[2].startswith("Total: 2.0 MB / 2.0 MB  ") and lines[2].endswith("/s")
    assert len(lines) == 3 and "\x1b" not in out.getvalue()


def test_terminal_progress_redraws_in_place_and_throttles():
    out, clock = Tty(), Clock()
    p = make_progress(out)
    assert isinstance(p, TerminalProgress)
    p._clock = clock
    _drive(p, clock)
    text = out.getvalue()
    assert "\x1b[3A" in text  # cursor moved up over the 2 layer lines + total
    # Rate: 1 MB in 1 s while downloading.
    assert "aaaaaaaaaaaa: Downloading  1.0 MB / 2.0 MB  1.0 MB/s" in text
    # 2 adds, 2 dones, 1 start, 4 spaced advances and close draw; the advance inside the
    # throttle window does not.
    assert text.count("Total:") == 10
    assert text.rstrip("\n").splitlines()[-1].endswith("Total: 2.0 MB / 2.0 MB  2.0 MB/s")


def test_quiet_and_non_tty_choice():
    assert type(make_progress(io.StringIO(), quiet=True)) is NullProgress
    assert isinstance(make_progress(io.StringIO()), LineProgress)
    assert human_size(999) == "999 B" and human_size(1500) == "1.5 kB"
    assert human_size(3e9) == "3.0 GB"


def _entry(digest: str) -> st.RefEntry:
    return st.RefEntry(
        platform="linux/amd64",
        manifest_digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        index_digest=None,
        config_digest=B,
        size=10,
        pulled="2026-01-01T00:00:00+00:00",
        created="",
    )


def test_records_round_trip_and_damaged_records_are_ignored(tmp_path):
    home = Home(tmp_path)
    ref = parse_reference("r.io/a/b:1")
    st.record_pull(home, ref, _entry(A))
    assert st.find_entry(home, ref, None) == _entry(A)
    assert st.find_entry(home, ref, "linux/arm64") is None
    # By digest: any record that resolved to it.
    assert st.find_entry(home, parse_reference(f"r.io/a/b@{A}"), None) == _entry(A)
    (home.refs / "junk.json").write_text("{not json")
    (home.refs / ("x" * 64 + ".json")).write_text('{"version": 9}')
    (home.refs / "big.json").write_bytes(b" " * (st.RECORD_MAX + 1))
    assert [i.name for i in st.list_images(home)] == ["r.io/a/b:1"]
    with pytest.raises(ImageError, match="no such image"):
        st.remove_image(home, "sha256:" + "c" * 12)
    with pytest.raises(ImageError, match="invalid image reference"):
        st.remove_image(home, "Bad Ref")
    # A rootfs built for the config goes with the last reference to it.
    (home.rootfs / f"{B[7:]}.sqfs").write_bytes(b"fs")
    assert st.remove_image(home, "aaaaaaaaaaaa") == ["r.io/a/b:1"]
    assert list(home.rootfs.iterdir()) == []
