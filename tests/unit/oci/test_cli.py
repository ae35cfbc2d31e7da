"""supermachine-runtime's calls that need no VM: bad bundles, unknown containers, the
container state machine on disk, and what runc's callers parse (--version, features,
state, --log). The calls that run VMs are in tests/e2e/test_oci_runtime.py."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supermachine.oci import cli
from supermachine.oci import state as st

RUNTIME = [sys.executable, "-m", "supermachine.oci.cli"]


def runtime(root: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--log", str(log), "--log-format", "json"] if log else []
    return subprocess.run([*RUNTIME, "--root", str(root), *extra, *args], capture_output=True,
                          text=True, timeout=60)


def test_version_and_features() -> None:
    p = subprocess.run([*RUNTIME, "--version"], capture_output=True, text=True, check=True)
    assert p.stdout.startswith("supermachine-runtime version ") and "spec: 1.0" in p.stdout
    p = subprocess.run([*RUNTIME, "features"], capture_output=True, text=True, check=True)
    features = json.loads(p.stdout)
    assert features["ociVersionMax"] == st.OCI_VERSION and "network" in \
        features["linux"]["namespaces"]


@pytest.mark.parametrize("config, message", [
    (b"{", "not valid JSON"),
    (b"[]" * 10, "not valid JSON"),
    (json.dumps({"ociVersion": "1.0.2", "root": {"path": "../../.."},
                 "process": {"args": ["true"]}}).encode(), "outside the bundle"),
    (json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}).encode(), "no process"),
    (b" " * (8 << 20), "larger than"),
])
def test_a_hostile_bundle_is_an_error_in_the_log_and_leaves_nothing(
        tmp_path: Path, config: bytes, message: str) -> None:
    bundle, root, log = tmp_path / "bundle", tmp_path / "state", tmp_path / "log.json"
    bundle.mkdir()
    (bundle / "config.json").write_bytes(config)
    (bundle / "rootfs").mkdir()
    p = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"),
                "c1", log=log)
    assert p.returncode == 1
    assert message in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and message in entry["msg"]
    assert not (tmp_path / "pid").exists()
    assert not (root / "c1").exists()


def test_a_missing_bundle(tmp_path: Path) -> None:
    p = runtime(tmp_path, "create", "--bundle", str(tmp_path / "none"), "c1")
    assert p.returncode == 1 and "cannot read config.json" in p.stderr


def test_unknown_containers(tmp_path: Path) -> None:
    for args in (["state", "x"], ["start", "x"], ["kill", "x", "9"], ["pause", "x"],
                 ["exec", "x", "true"], ["delete", "x"], ["ps", "x"]):
        p = runtime(tmp_path, *args)
        assert p.returncode == 1 and "does not exist" in p.stderr, args
    assert runtime(tmp_path, "delete", "--force", "x").returncode == 0  # as runc does
    p = runtime(tmp_path, "state", "../etc")
    assert p.returncode == 1 and "invalid container id" in p.stderr


def fake_container(root: Path, cid: str, status: str, *, alive: bool) -> tuple[st.Container,
                                                                               int | None]:
    """A container directory as the container process leaves it; ``alive``: a process of
    ours holds its lock, as the container process does."""
    c = st.container(root, cid)
    st.create_dir(c)
    c.write({"id": cid, "bundle": "/b", "rootfs": "/b/rootfs", "status": status, "pid": 4242,
             "created": st.rfc3339(0), "annotations": {"a": "b"}, "exit_code": 3})
    fd = None
    if alive:
        fd = os.open(c.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return c, fd


def test_state_follows_the_lock(tmp_path: Path) -> None:
    c, fd = fake_container(tmp_path, "c1", st.RUNNING, alive=True)
    try:
        s = json.loads(runtime(tmp_path, "state", "c1").stdout)
        assert (s["status"], s["pid"], s["bundle"], s["annotations"]) == \
            ("running", 4242, "/b", {"a": "b"})
        p = runtime(tmp_path, "delete", "c1")  # running: only with --force
        assert p.returncode == 1 and "use --force" in p.stderr
        listed = json.loads(runtime(tmp_path, "list", "--format", "json").stdout)
        assert [x["id"] for x in listed] == ["c1"]
    finally:
        assert fd is not None
        os.close(fd)
    # The lock is free: stopped, whatever the record said, with the exit code it recorded.
    s = json.loads(runtime(tmp_path, "state", "c1").stdout)
    assert (s["status"], s["pid"], s["exitCode"]) == ("stopped", 0, 3)
    p = runtime(tmp_path, "kill", "c1", "KILL")
    assert p.returncode == 1 and "not running" in p.stderr
    p = runtime(tmp_path, "start", "c1")
    assert p.returncode == 1 and "in state stopped" in p.stderr
    assert runtime(tmp_path, "delete", "c1").returncode == 0
    assert not c.path.exists()


def test_update_records_resources_and_says_they_are_not_applied(tmp_path: Path) -> None:
    c, fd = fake_container(tmp_path, "c1", st.RUNNING, alive=True)
    try:
        log = tmp_path / "log.json"
        p = subprocess.run([*RUNTIME, "--root", str(tmp_path), "--log", str(log),
                            "--log-format", "json", "update", "--resources", "-", "c1"],
                           input=b'{"memory": {"limit": 1073741824}}', capture_output=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        assert c.read()["resources"] == {"memory": {"limit": 1073741824}}
        assert "not applied" in json.loads(log.read_text())["msg"]
        p = subprocess.run([*RUNTIME, "--root", str(tmp_path), "update", "--resources", "-",
                            "c1"], input=b"[1]", capture_output=True, timeout=60)
        assert p.returncode == 1 and b"not a JSON object" in p.stderr
    finally:
        assert fd is not None
        os.close(fd)


def test_create_refuses_an_existing_container(tmp_path: Path) -> None:
    fake_container(tmp_path, "c1", st.STOPPED, alive=False)
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "rootfs").mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["true"]}}))
    p = runtime(tmp_path, "create", "--bundle", str(bundle), "c1")
    assert p.returncode == 1 and "already exists" in p.stderr
    assert st.container(tmp_path, "c1").exists()  # the existing one is untouched


def test_container_ids() -> None:
    assert st.check_id("a" * 64) == "a" * 64
    for bad in ("", "../x", "a/b", "-x", "x" * 1025, "a b"):
        with pytest.raises(st.ContainerError):
            st.check_id(bad)


def test_signals() -> None:
    assert cli.parse_signal("KILL") == cli.parse_signal("SIGKILL") == signal.SIGKILL
    assert cli.parse_signal("15") == 15 and cli.parse_signal("sigusr1") == signal.SIGUSR1
    for bad in ("NOPE", "0", "65", "-1"):
        with pytest.raises(Exception, match="signal"):
            cli.parse_signal(bad)


def test_unknown_command(tmp_path: Path) -> None:
    p = runtime(tmp_path, "checkpoint", "x")
    assert p.returncode == 2 and "unknown command" in p.stderr
