"""Network socket directories of SIGKILLed processes are swept on the next start."""

from __future__ import annotations

import os
import subprocess

from supermachine.engine.qemu import NET_DIR_PREFIX, _sweep_net_dirs


def test_dead_owners_dirs_go_live_ones_stay(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{NET_DIR_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{NET_DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated-123"
    for d in (stale, live, other):
        d.mkdir()
        (d / "sock").write_text("")
    _sweep_net_dirs(str(tmp_path))
    assert not stale.exists()
    assert live.exists() and other.exists()
