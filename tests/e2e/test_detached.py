"""Detached VMs end to end: `run -d`, then exec/cp/logs/ps/inspect/stop/rm from other CLI
processes, real VMs under QEMU (TCG here). One VM is shared by most tests (boots are slow);
the lifecycle cases (workload exits, supervisor killed, rm -f, start failure) get their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import CLI, qemu_pids, run_cli, vm_name

pytestmark = pytest.mark.e2e

MAIN = ("echo started; echo to-stderr >&2; "
        "trap 'echo got TERM; exit 0' TERM; while :; do sleep 0.2; done")


def _ok(r: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def _inspect(home: Path, name: str) -> dict:
    (info,) = json.loads(_ok(run_cli(home, "inspect", name)).stdout)
    return info


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def shared(home, busybox):
    """A running detached VM, removed at the end of the module whatever happened."""
    name = vm_name("e2e-shared")
    r = run_cli(home, "run", "-d", "--name", name, str(busybox), "sh", "-c", MAIN)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{name}\n".encode()
    yield name
    run_cli(home, "rm", "-f", name)


def test_exec_exit_codes_and_streams(cli, shared):
    r = cli("exec", shared, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = cli("exec", shared, "sh", "-c", "kill -9 $$")
    assert r.returncode == 137


def test_exec_missing_binary_is_127_with_a_message(cli, shared):
    r = cli("exec", shared, "no-such-binary")
    assert r.returncode == 127
    assert b"no-such-binary" in r.stderr and b"Traceback" not in r.stderr


def test_hostname_is_the_name(cli, shared):
    assert _ok(cli("exec", shared, "hostname")).stdout == f"{shared}\n".encode()


def test_exec_env_workdir_user(cli, shared):
    r = _ok(cli("exec", "-e", "A=1", "-e", "FROM_HERE", "-w", "/tmp", "-u", "1000", shared,
                "sh", "-c", 'echo "$A $FROM_HERE $(pwd) $(id -u)"',
                env={"FROM_HERE": "copied"}))
    assert r.stdout == b"1 copied /tmp 1000\n"


def test_exec_stdin_and_binary_output(cli, shared):
    data = os.urandom(300_000)
    _ok(cli("exec", "-i", shared, "sh", "-c", "cat > /tmp/from-stdin", input=data))
    r = _ok(cli("exec", shared, "cat", "/tmp/from-stdin"))
    assert r.stdout == data


def test_cp_both_ways_is_binary_safe(cli, shared, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(700_000) + bytes(range(256)))
    src.chmod(0o751)
    _ok(cli("cp", str(src), f"{shared}:/tmp/"))  # into a directory: keeps the name
    r = _ok(cli("exec", shared, "sh", "-c", "md5sum /tmp/blob.bin; stat -c %a /tmp/blob.bin"))
    digest, _, mode = r.stdout.decode().split()
    assert digest == hashlib.md5(src.read_bytes()).hexdigest() and mode == "751"
    _ok(cli("cp", f"{shared}:/tmp/blob.bin", str(tmp_path / "back.bin")))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    out_dir = tmp_path / "dir"
    out_dir.mkdir()
    _ok(cli("cp", f"{shared}:/etc/passwd", str(out_dir)))  # into a host directory
    assert b"root:" in (out_dir / "passwd").read_bytes()
    assert _ok(cli("cp", f"{shared}:/etc/passwd", "-")).stdout == (out_dir / "passwd").read_bytes()


def test_cp_errors_are_one_line(cli, shared, tmp_path):
    r = cli("cp", f"{shared}:/no/such/file", str(tmp_path / "x"))
    assert r.returncode != 0 and b"/no/such/file" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "x").exists()
    r = cli("cp", f"{shared}:/etc", str(tmp_path / "etc"))
    assert r.returncode != 0 and b"directory" in r.stderr
    r = cli("cp", str(tmp_path), f"{shared}:/tmp/")
    assert r.returncode != 0 and b"directory" in r.stderr
    r = cli("cp", str(tmp_path / "missing"), f"{shared}:/tmp/")
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1


def test_concurrent_execs(cli, shared):
    # Each job marks that it started, then waits for all four marks: run one by one, the
    # first would wait for the others in vain and exit 99.
    def one(i: int) -> subprocess.CompletedProcess[bytes]:
        return cli("exec", shared, "sh", "-c",
                   f"mkdir -p /tmp/side; touch /tmp/side/{i}; n=0; "
                   "until [ $(ls /tmp/side | wc -l) -ge 4 ]; do "
                   "n=$((n+1)); [ $n -gt 1200 ] && exit 99; sleep 0.1; done; "
                   f"echo job{i}; exit {i}")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert [(r.returncode, r.stdout) for r in results] == \
        [(i, f"job{i}\n".encode()) for i in range(4)]


def test_a_client_going_away_kills_its_exec_not_the_vm(home, cli, shared):
    env = {**os.environ, "SUPERMACHINE_HOME": str(home)}
    client = subprocess.Popen([*CLI, "exec", shared, "sh", "-c",
                               "echo $$ > /tmp/victim; echo ready; exec sleep 1000"],
                              stdout=subprocess.PIPE, env=env)
    try:
        assert client.stdout.readline() == b"ready\n"
        assert cli("exec", shared, "sh", "-c", "kill -0 $(cat /tmp/victim)").returncode == 0
    finally:
        client.kill()
        client.wait()
    _wait_for(lambda: cli("exec", shared, "sh", "-c", "kill -0 $(cat /tmp/victim)")
              .returncode != 0, 15, "the exec'd process to be killed")
    assert _ok(cli("exec", shared, "echo", "still-up")).stdout == b"still-up\n"


def test_found_by_name_from_another_directory_and_ps_inspect(home, shared, tmp_path):
    env = {**os.environ, "SUPERMACHINE_HOME": str(home)}
    r = subprocess.run([*CLI, "ps"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert r.returncode == 0
    header, *rows = r.stdout.decode().splitlines()
    assert header.split() == ["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS",
                              "MOUNTS"]
    (row,) = [line for line in rows if line.startswith(shared + " ")]
    assert " Up " in row and "sh -c" in row
    info = _inspect(home, shared)
    assert info["name"] == shared and info["state"]["status"] == "running"
    assert info["command"] == ["sh", "-c", MAIN]
    assert info["qemu_pid"] in qemu_pids()
    by_id = json.loads(_ok(run_cli(home, "inspect", info["id"][:12])).stdout)
    assert by_id[0]["name"] == shared


def test_logs_keep_the_streams_apart(cli, shared):
    r = _ok(cli("logs", shared))
    assert r.stdout.startswith(b"started\n") and r.stderr == b"to-stderr\n"


def test_name_conflicts_and_bad_names(cli, shared, busybox):
    r = cli("run", "-d", "--name", shared, str(busybox), "true")
    assert r.returncode != 0 and b"already in use" in r.stderr
    r = cli("run", "-d", "--name", "bad/name", str(busybox), "true")
    assert r.returncode == 2 and b"invalid VM name" in r.stderr
    r = cli("rm", shared)
    assert r.returncode != 0 and b"running" in r.stderr


def test_stop_sends_the_stop_signal_and_logs_follow_ends(home, shared):
    follow = subprocess.Popen([*CLI, "logs", "-f", shared], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**os.environ, "SUPERMACHINE_HOME": str(home)})
    try:
        pid = _inspect(home, shared)["qemu_pid"]
        r = _ok(run_cli(home, "stop", "-t", "20", shared))
        assert r.stdout == f"{shared}\n".encode()
        out, err = follow.communicate(timeout=20)  # -f ends because the VM ended
    finally:
        follow.kill()
        follow.wait()
    assert out.startswith(b"started\n") and out.endswith(b"got TERM\n")
    assert err == b"to-stderr\n"
    assert pid not in qemu_pids()
    info = _inspect(home, shared)
    assert info["state"]["status"] == "exited" and info["exit_code"] == 0
    r = _ok(run_cli(home, "ps", "-a"))
    assert any(line.startswith(shared + " ") and "Exited (0)" in line
               for line in r.stdout.decode().splitlines())
    assert shared not in _ok(run_cli(home, "ps")).stdout.decode()
    r = run_cli(home, "exec", shared, "true")
    assert r.returncode != 0 and b"not running" in r.stderr
    assert _ok(run_cli(home, "logs", shared)).stdout.endswith(b"got TERM\n")  # logs remain
    _ok(run_cli(home, "rm", shared))
    assert run_cli(home, "inspect", shared).returncode != 0


def test_workload_exit_stops_the_vm(cli, home, busybox):
    name = vm_name("e2e-exiter")
    _ok(cli("run", "-d", "--name", name, str(busybox), "sh", "-c", "echo bye; sleep 1; exit 7"))
    _wait_for(lambda: _inspect(home, name)["state"]["status"] == "exited", what="the exit")
    info = _inspect(home, name)
    assert info["exit_code"] == 7 and info["qemu_pid"] is None
    assert "Exited (7)" in _ok(cli("ps", "-a")).stdout.decode()
    assert _ok(cli("logs", name)).stdout == b"bye\n"
    _ok(cli("rm", name))
    assert name not in _ok(cli("ps", "-a")).stdout.decode()


def test_killed_supervisor_leaves_no_vm_and_is_removable(cli, home, busybox):
    name = vm_name("e2e-killed")
    _ok(cli("run", "-d", "--name", name, str(busybox), "sleep", "1000"))
    info = _inspect(home, name)
    assert info["qemu_pid"] in qemu_pids()
    os.kill(info["supervisor_pid"], signal.SIGKILL)
    _wait_for(lambda: info["qemu_pid"] not in qemu_pids(), 10, "QEMU to die with it")
    _wait_for(lambda: _inspect(home, name)["state"]["status"] == "dead", 10, "the dead state")
    row = [ln for ln in _ok(cli("ps", "-a")).stdout.decode().splitlines()
           if ln.startswith(name + " ")]
    assert row and "Dead" in row[0]
    r = cli("exec", name, "true")
    assert r.returncode != 0 and b"not running" in r.stderr
    _ok(cli("rm", name))  # no -f needed: it is not running


def test_sigterm_to_the_supervisor_stops_the_workload_gracefully(cli, home, busybox):
    name = vm_name("e2e-sigterm")
    _ok(cli("run", "-d", "--name", name, str(busybox), "sh", "-c",
            "trap 'echo cleaning up; exit 5' TERM; while :; do sleep 0.2; done"))
    info = _inspect(home, name)
    os.kill(info["supervisor_pid"], signal.SIGTERM)
    _wait_for(lambda: _inspect(home, name)["state"]["status"] == "exited", 20, "the exit")
    assert _inspect(home, name)["exit_code"] == 5
    assert info["qemu_pid"] not in qemu_pids()
    assert _ok(cli("logs", name)).stdout == b"cleaning up\n"
    _ok(cli("rm", name))


def test_rm_force_stops_a_running_vm(cli, home, busybox):
    name = vm_name("e2e-forced")
    # The workload ignores SIGTERM: rm -f must still end it (how soon is bench/'s business).
    _ok(cli("run", "-d", "--name", name, str(busybox), "sh", "-c",
            "trap '' TERM; while :; do sleep 1; done"))
    pid = _inspect(home, name)["qemu_pid"]
    assert pid in qemu_pids()
    _ok(cli("rm", "-f", name))
    assert pid not in qemu_pids()
    assert cli("inspect", name).returncode != 0


def test_start_failure_is_reported_and_frees_the_name(cli, home, busybox):
    name = vm_name("e2e-nobin")
    r = cli("run", "-d", "--name", name, str(busybox), "no-such-binary")
    assert r.returncode == 127
    assert b"no-such-binary" in r.stderr and len(r.stderr.splitlines()) <= 2
    assert not (home / "vms" / name).exists()


def test_boot_error_is_one_line_and_frees_the_name(cli, home, tmp_path):
    name = vm_name("e2e-badimg")
    r = cli("run", "-d", "--name", name, str(tmp_path / "no-such-layout"))
    assert r.returncode == 125
    assert b"no-such-layout" in r.stderr and b"Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert not (home / "vms" / name).exists()


def test_vm_dying_mid_exec_is_a_clear_error_not_a_hang(cli, home, busybox):
    name = vm_name("e2e-dying")
    _ok(cli("run", "-d", "--name", name, str(busybox), "sleep", "1000"))
    env = {**os.environ, "SUPERMACHINE_HOME": str(home)}
    client = subprocess.Popen([*CLI, "exec", name, "sh", "-c", "echo ready; sleep 1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert client.stdout.readline() == b"ready\n"
        os.kill(_inspect(home, name)["qemu_pid"], signal.SIGKILL)
        _, err = client.communicate(timeout=20)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 125 and err.startswith(b"supermachine: the VM ")
    assert len(err.splitlines()) == 1
    _wait_for(lambda: _inspect(home, name)["state"]["status"] == "exited", 10, "the exit")
    assert _inspect(home, name)["error"]
    _ok(cli("rm", name))
