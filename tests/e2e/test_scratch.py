"""``FROM scratch`` images (one static binary, no /etc, /tmp or /dev, no Env, no User) run
the way docker runs them, on every path: `run`, `exec` into a detached VM, and the API.

The oracle is podman with runc on the same image (docker's behaviour for these cases:
uid 0 without /etc/passwd, docker's default PATH, HOME=/), compared output and exit code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from supermachine import VM, Pool
from tests.e2e.conftest import run_cli
from tests.fixtures import images as fx

pytestmark = pytest.mark.e2e

PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--rm", "--network", "none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

# (extra run options, command); None: the image's own Entrypoint + Cmd.
CASES = [
    ((), None),
    ((), ["/busybox", "sh", "-c", "echo $PATH"]),
    ((), ["/busybox", "id"]),
    ((), ["/busybox", "sh", "-c", "echo $HOME"]),
    (("-u", "1234"), ["/busybox", "sh", "-c", "id; echo $HOME"]),
    (("-u", "1234:5678"), ["/busybox", "sh", "-c", "id; echo $HOME"]),
    (("-u", "someone"), ["/busybox", "id"]),
]


@pytest.fixture(scope="module")
def scratch() -> Path:
    return fx.scratch()


@pytest.fixture(scope="module")
def podman_image(scratch: Path) -> str:
    """The scratch image in podman's store, under a name unique to this fixture's content."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail("podman and runc are the oracle here: run ./install.sh")
    name = f"localhost/supermachine-test-{scratch.name}:latest"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", f"oci:{scratch}:latest",
                    f"containers-storage:{name}"], check=True, capture_output=True)
    return name


def _podman(image: str, opts: tuple[str, ...], cmd: list[str] | None):
    return subprocess.run([*PODMAN_RUN, *opts, image, *(cmd or [])], capture_output=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("opts", "cmd"), CASES, ids=lambda c: " ".join(c or ("default",)))
def test_run_matches_podman(cli, scratch, podman_image, opts, cmd):
    ours = cli("run", *opts, str(scratch), *(cmd or []))
    theirs = _podman(podman_image, opts, cmd)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), \
        (ours.stderr, theirs.stderr)
    if ours.returncode:
        # One clear line naming the user, as docker gives.
        assert b"someone" in ours.stderr and b"passwd" in ours.stderr
        assert len(ours.stderr.strip().splitlines()[-1]) < 200


def test_exec_into_detached_scratch_vm(home, scratch, podman_image):
    name = f"scratch-{os.getpid()}"
    r = run_cli(home, "run", "-d", "--name", name, str(scratch),
                "/busybox", "sh", "-c", "while :; do /busybox sleep 1; done")
    assert r.returncode == 0, r.stderr
    try:
        for opts, cmd in CASES[1:]:
            ours = run_cli(home, "exec", *opts, name, *cmd)
            theirs = _podman(podman_image, opts, cmd)
            assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), \
                (opts, cmd, ours.stderr)
    finally:
        run_cli(home, "rm", "-f", name)


def test_api_runs_scratch_as_root_with_docker_defaults(home, scratch):
    with VM(scratch, home=home, network="none") as vm:
        r = vm.exec(["/busybox", "sh", "-c", "id; echo $HOME; echo $PATH"])
        assert (r.exit_code, r.stdout) == (
            0, b"uid=0 gid=0\n/\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")
        assert vm.exec(["/busybox", "id"], user="1234:5678").stdout == \
            b"uid=1234 gid=5678 groups=5678\n"
        r = vm.exec(["/busybox", "id"], user="someone")
        assert r.exit_code == 126 and r.error == "user: someone: no such user in /etc/passwd"
        # The guest init made what it needs in the VM's own writable layer, not the image.
        r = vm.exec(["/busybox", "ls", "-d", "/dev/null", "/dev/pts", "/proc/self",
                     "/sys/kernel"])
        assert r.exit_code == 0, r.stderr


def test_cold_boot_and_pool_run_scratch(cli, home, scratch):
    r = cli("run", "--no-snapshot", "--network", "none", str(scratch))
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
    with Pool(scratch, size=1, home=home, network="none") as pool:
        vm = pool.acquire(timeout=120)
        try:
            assert vm.exec(["/busybox", "id"]).stdout == b"uid=0 gid=0\n"
        finally:
            pool.release(vm)
