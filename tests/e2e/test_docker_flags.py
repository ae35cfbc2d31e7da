"""Docker flags a docker user types: --env-file, --rm (with -d: the record goes when the VM
exits), --init (accepted: the guest init is already a reaping, signal-forwarding PID 1)."""

from __future__ import annotations

import time

from tests.e2e.conftest import vm_name


def test_env_file_in_docker_format_and_e_wins(cli, busybox, tmp_path):
    env_file = tmp_path / "app.env"
    env_file.write_text("# a comment\n\nA=from file\nB='quoted stays quoted'\nC=1=2\n"
                        "FROM_HOST\nUNSET_HERE\n  D=leading spaces trimmed\n")
    r = cli("run", "--env-file", str(env_file), "-e", "A=from flag", str(busybox), "sh", "-c",
            'echo "$A|$B|$C|$FROM_HOST|${UNSET_HERE-unset}|$D"',
            env={"FROM_HOST": "host value"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"from flag|'quoted stays quoted'|1=2|host value|unset|" \
                       b"leading spaces trimmed\n"


def test_bad_env_files_are_one_line(cli, busybox, tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("GOOD=1\nBAD NAME=2\n")
    for path, words in ((bad, b"line 2: invalid variable name"),
                        (tmp_path / "missing.env", b"No such file")):
        r = cli("run", "--env-file", str(path), str(busybox), "true")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and words in lines[0], r.stderr


def test_init_is_accepted_and_zombies_are_reaped(cli, busybox):
    # An orphaned child of the workload exits; PID 1 (sm-init) must reap it.
    r = cli("run", "--init", str(busybox), "sh", "-c",
            "(sleep 0.2 &) ; sleep 1; ps -o stat,comm | grep -c '^Z' || true")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"0"


def test_rm_with_detach_removes_the_record_when_the_vm_exits(cli, busybox):
    name = vm_name("e2e-rm")
    r = cli("run", "--rm", "-d", "--name", name, str(busybox), "sh", "-c", "sleep 1; exit 3")
    assert r.returncode == 0, r.stderr
    assert name in cli("ps", "-a").stdout.decode()
    deadline = time.monotonic() + 60
    while name in cli("ps", "-a").stdout.decode():
        assert time.monotonic() < deadline, "the VM's record is still there"
        time.sleep(0.3)
    r = cli("inspect", name)
    assert r.returncode != 0 and b"no such VM" in r.stderr, r.stderr


def test_rm_attached_is_accepted(cli, busybox):
    r = cli("run", "--rm", str(busybox), "echo", "ok")
    assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr


def test_ulimit_as_docker_takes_it(cli, busybox):
    """--ulimit NAME=SOFT[:HARD] sets the workload's limits (the guest's defaults otherwise:
    1048576 open files, docker's default too), on run and on a bad value one line."""
    r = cli("run", "--rm", "--ulimit", "nofile=512:1000", "--ulimit", "core=0", str(busybox),
            "sh", "-c", "ulimit -n; ulimit -Hn; ulimit -c")
    assert (r.returncode, r.stdout) == (0, b"512\n1000\n0\n"), r.stderr
    r = cli("run", "--rm", str(busybox), "sh", "-c", "ulimit -n")
    assert (r.returncode, r.stdout) == (0, b"1048576\n")
    r = cli("run", "--rm", "--ulimit", "nofiles=1", str(busybox), "true")
    assert r.returncode == 2 and b"invalid --ulimit" in r.stderr and r.stderr.count(b"\n") == 1
