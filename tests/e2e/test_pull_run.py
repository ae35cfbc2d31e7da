"""A pulled image runs like the same image from its OCI layout; pulls work unprivileged."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.registry.harness import Registry

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def busybox_registry(busybox, tmp_path_factory) -> Iterator[tuple[Registry, str]]:
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg, reg.push(busybox, "tools/busybox", "1.0")
    finally:
        reg.stop()


def test_pulled_image_runs_like_the_layout(cli, busybox, busybox_registry):
    _, ref = busybox_registry
    script = "cat /etc/hostname; id -un; echo $PATH"
    from_layout = cli("run", str(busybox), "sh", "-c", script)
    from_registry = cli("run", "-q", ref, "sh", "-c", script)  # implicit pull (missing)
    assert from_layout.returncode == from_registry.returncode == 0, from_registry.stderr
    assert from_registry.stdout == from_layout.stdout
    listed = cli("images").stdout.decode()
    assert "tools/busybox" in listed and "1.0" in listed
    never = cli("run", "--pull", "never", "-q", f"{ref.rsplit(':', 1)[0]}:missing", "true")
    assert never.returncode != 0 and b"not present locally" in never.stderr




def test_unprivileged_user_pulls_and_runs(busybox_registry, nobody_home):
    _, ref = busybox_registry
    env = ["env", f"SUPERMACHINE_HOME={nobody_home}", f"HOME={nobody_home}"]
    base = ["runuser", "-u", "nobody", "--", *env, sys.executable, "-m", "supermachine"]
    pull = subprocess.run([*base, "pull", "-q", ref], capture_output=True, timeout=300,
                          cwd="/", stdin=subprocess.DEVNULL)
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.startswith(b"sha256:")
    run = subprocess.run([*base, "run", "--pull", "never", ref, "cat", "/etc/hostname"],
                         capture_output=True, timeout=300, cwd="/", stdin=subprocess.DEVNULL)
    assert (run.returncode, run.stdout) == (0, b"busybox\n"), run.stderr
    owners = {p.stat().st_uid for p in nobody_home.rglob("*")}
    assert owners == {65534}  # everything it wrote belongs to the user
