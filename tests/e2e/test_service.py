"""`supermachine serve` end to end: a real service process, real VMs (TCG here), its HTTP
API over the unix socket and TCP, both Python clients, and the CLI going through it.

One service with a warm pool is shared by most tests; the lifecycle cases (SIGTERM,
SIGKILL and restart, TTL, another user) get their own.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import supermachine as sm
from supermachine.service import api
from supermachine.service.client import ServiceError
from tests.conftest import session_processes
from tests.e2e.conftest import CLI, run_cli

pytestmark = pytest.mark.e2e

#: pids of the services these tests started: their VMs are theirs, not leaks
SERVICES: set[int] = set()


@pytest.fixture(autouse=True)
def no_leaked_vms():
    """As conftest's, but a running service's own VMs (its pool refills) are not leaks."""
    def ours() -> set[int]:
        return {pid for pid in session_processes((b"qemu-system", b"passt"))
                if not _ancestors(pid) & SERVICES}

    before = ours()
    yield
    deadline = time.monotonic() + 10
    while (leaked := ours() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leaked, f"processes left running: {sorted(leaked)}"


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ancestors(pid: int) -> set[int]:
    out = set()
    while (pid := _parent(pid)) and pid > 1 and pid not in out:
        out.add(pid)
    return out


def _children(pid: int) -> list[int]:
    """The QEMU and passt processes under ``pid`` (QEMU sits in its jail's bwrap)."""
    return [p for p in session_processes((b"qemu-system", b"passt")) if pid in _ancestors(p)]


class Service:
    """A `supermachine serve` process with its own runtime directory."""

    def __init__(self, home: Path, runtime: Path, *args: str) -> None:
        self.runtime = runtime
        self.log = runtime.parent / f"{runtime.name}.log"
        self.env = {**os.environ, "SUPERMACHINE_HOME": str(home),
                    "SUPERMACHINE_RUNTIME_DIR": str(runtime)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*CLI, "serve", *args], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        SERVICES.add(self.proc.pid)
        deadline = time.monotonic() + 120
        while not self._started():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        self.client = sm.connect(f"unix://{runtime}/api.sock")

    def _started(self) -> bool:
        try:
            self.info = json.loads((self.runtime / "service.json").read_text())
        except (OSError, ValueError):
            return False
        return self.info["pid"] == self.proc.pid  # not a killed predecessor's file

    def wait_pool_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            pools = self.client.pools()
            if all(p["ready"] >= p["size"] for p in pools):
                return {p["id"]: p for p in pools}
            assert time.monotonic() < deadline, pools
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            SERVICES.discard(self.proc.pid)


@pytest.fixture(scope="module")
def service(home, busybox, tmp_path_factory):
    svc = Service(home, tmp_path_factory.mktemp("svc") / "rt", "--pool", f"{busybox}=2",
                  "--listen", "127.0.0.1:0", "--max-sandboxes", "24",
                  "--memory-budget", "10G")
    try:
        svc.wait_pool_ready()
        yield svc
    finally:
        assert svc.stop() == 0, svc.log.read_text()[-2000:]


def _raw(svc: Service, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None, tcp: bool = False) -> tuple[int, object]:
    if tcp:
        host, port = svc.info["tcp"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
    else:
        conn = http.client.HTTPConnection("localhost", timeout=60)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(svc.runtime / "api.sock"))
        conn.sock = sock
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def test_runtime_directory_is_private(service):
    assert (service.runtime.stat().st_mode & 0o777) == 0o700
    for name in ("api.sock", "run.sock", "service.json", "token"):
        assert (service.runtime / name).stat().st_mode & 0o077 == 0, name


def test_sandbox_over_http_and_the_sync_client(service, busybox, home):
    c = service.client
    assert c.health()["status"] == "ok"
    assert c.version()["api"] == "v1"
    hits = service.wait_pool_ready()
    (pool,) = hits.values()
    with c.create(str(busybox), name="svc-sync") as sb:
        assert sb.info["pool"] == pool["id"]  # the warm pool served it
        r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        r = sb.exec(["cat"], stdin=b"in\n", env={"X": "1"})
        assert r.stdout == b"in\n"
        assert sb.exec(["sh", "-c", "echo $X"], env={"X": "y z"}).stdout == b"y z\n"
        assert sb.exec(["nosuchcmd"]).exit_code == 127
        r = sb.exec(["wc", "-c"], stdin=b"x" * 600_000)  # a 0.8 MB body: many reads
        assert r.stdout.split() == [b"600000"]
        data = bytes(range(256)) * 4096  # 1 MiB, every byte value
        sb.write_file("/tmp/blob", data, mode=0o600)
        assert sb.read_file("/tmp/blob") == data
        assert sb.exec(["stat", "-c", "%a", "/tmp/blob"]).stdout == b"600\n"
        with pytest.raises(ServiceError) as e:
            sb.read_file("/nonexistent")
        assert e.value.status == 404
        with sb.spawn(["sh", "-c", "read x; echo got $x; echo e >&2; exit 4"],
                      stdin=True) as proc:
            proc.write(b"abc\n")
            proc.close_stdin()
            chunks = list(proc)
            assert proc.wait().exit_code == 4
        assert (1, b"got abc\n") in chunks and (2, b"e\n") in chunks
        port = sb.expose(80)
        assert port > 0 and any(p["host_port"] == port for p in sb.refresh()["ports"])
        # the sandbox is a detached VM: the CLI reaches it by name
        r = run_cli(home, "exec", "svc-sync", "echo", "via-cli")
        assert (r.returncode, r.stdout) == (0, b"via-cli\n"), r.stderr
        assert b"svc-sync" in run_cli(home, "ps").stdout
    assert "svc-sync" not in [s.name for s in c.sandboxes()]
    assert not (home / "vms" / "svc-sync").exists()
    assert service.client.pool(pool["id"])["hits"] == pool["hits"] + 1


def test_asyncio_client_and_in_process_vm(service, busybox):
    async def main():
        client = await sm.aio.connect(f"unix://{service.runtime}/api.sock")
        async with await client.create(str(busybox)) as sb:
            r = await sb.exec(["echo", "async"])
            assert r.stdout == b"async\n"
            proc = await sb.spawn(["sh", "-c", "echo a; echo b >&2"])
            got = [chunk async for chunk in proc]
            assert (await proc.wait()).exit_code == 0
            assert (1, b"a\n") in got and (2, b"b\n") in got
            await sb.write_file("/tmp/x", b"1")
            assert await sb.read_file("/tmp/x") == b"1"
        async with sm.aio.VM(busybox, network="none", memory="256M") as vm:
            results = await asyncio.gather(*(vm.exec(["echo", str(i)]) for i in range(4)))
            assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(4)]

    asyncio.run(main())


def test_cli_run_goes_through_the_service(service, busybox, home):
    env = {"SUPERMACHINE_RUNTIME_DIR": str(service.runtime)}
    (before,) = service.wait_pool_ready().values()
    r = run_cli(home, "run", str(busybox), "sh", "-c", "echo out; echo err >&2; exit 3",
                env=env)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    (after,) = service.wait_pool_ready().values()
    assert after["hits"] == before["hits"] + 1
    r = run_cli(home, "run", str(busybox), "cat", input=b"piped\n", env=env)
    assert (r.returncode, r.stdout) == (0, b"piped\n"), r.stderr
    r = run_cli(home, "run", "--bogus", str(busybox), "true", env=env)
    assert r.returncode == 2 and b"--bogus" in r.stderr and b"Traceback" not in r.stderr
    r = run_cli(home, "run", "-t", str(busybox), "true", env=env)
    assert r.returncode == 2 and b"not a TTY" in r.stderr
    # relative paths are the caller's: -v ./dir is made in the CLI's directory
    work = service.runtime.parent / "cwd"
    work.mkdir()
    r = subprocess.run([*CLI, "run", "-v", "./share:/mnt", str(busybox), "sh", "-c",
                        "echo x > /mnt/f"], cwd=work, capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL,
                       env={**os.environ, "SUPERMACHINE_HOME": str(home), **env})
    assert r.returncode == 0, r.stderr
    assert (work / "share" / "f").read_text() == "x\n"
    # --no-service stays in this process: the pool serves nothing
    (before,) = service.wait_pool_ready().values()
    r = run_cli(home, "run", "--no-service", str(busybox), "echo", "local", env=env)
    assert (r.returncode, r.stdout) == (0, b"local\n")
    (after,) = service.client.pools()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_detached_run_through_the_service(service, busybox, home):
    env = {"SUPERMACHINE_RUNTIME_DIR": str(service.runtime)}
    r = run_cli(home, "run", "-d", "--name", "svc-det", str(busybox), "sh", "-c",
                "echo started; trap 'exit 0' TERM; while :; do sleep 0.2; done", env=env)
    assert (r.returncode, r.stdout) == (0, b"svc-det\n"), r.stderr
    try:
        assert "svc-det" in [s.name for s in service.client.sandboxes()]
        r = run_cli(home, "exec", "svc-det", "echo", "hi")
        assert r.stdout == b"hi\n"
        deadline = time.monotonic() + 30
        while b"started" not in run_cli(home, "logs", "svc-det").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = run_cli(home, "stop", "svc-det")
        assert r.returncode == 0, r.stderr
        (info,) = json.loads(run_cli(home, "inspect", "svc-det").stdout)
        assert (info["state"]["status"], info["exit_code"]) == ("exited", 0)
        assert service.proc.poll() is None  # stop never signals the service itself
    finally:
        run_cli(home, "rm", "-f", "svc-det")
    assert not (home / "vms" / "svc-det").exists()


def test_twenty_concurrent_clients(service, busybox):
    def one(i: int) -> bytes:
        with service.client.create(str(busybox), memory="256M", network="none") as sb:
            return sb.exec(["echo", str(i)]).stdout

    fds_before = len(os.listdir(f"/proc/{service.proc.pid}/fd"))
    with ThreadPoolExecutor(20) as pool:
        outs = list(pool.map(one, range(20)))
    assert outs == [f"{i}\n".encode() for i in range(20)]
    assert service.client.sandboxes() == []
    service.wait_pool_ready()
    assert len(_children(service.proc.pid)) == 2 * 2  # the pool's QEMUs and passts only
    assert len(os.listdir(f"/proc/{service.proc.pid}/fd")) <= fds_before + 4


def test_client_killed_mid_exec(service, busybox):
    sb = service.client.create(str(busybox), memory="256M", network="none")
    try:
        script = ("import sys, supermachine as sm\n"
                  f"c = sm.connect('unix://{service.runtime}/api.sock')\n"
                  f"p = c.sandbox({sb.name!r}).spawn(['sh', '-c', 'echo up; exec sleep 1000'])\n"
                  "print(next(iter(p)), flush=True)\n"
                  "import time; time.sleep(1000)\n")
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert b"up" in child.stdout.readline()
        child.kill()
        child.wait()
        deadline = time.monotonic() + 15
        while b"sleep 1000" in sb.exec(["ps", "-o", "args"]).stdout:
            assert time.monotonic() < deadline, "the exec outlived its client"
            time.sleep(0.2)
        assert sb.exec(["echo", "alive"]).stdout == b"alive\n"
    finally:
        sb.close()


def test_bad_requests_change_nothing(service, busybox):
    before = service.client.sandboxes()
    status, body = _raw(service, "POST", "/v1/sandboxes", b"{not json")
    assert status == 400 and "JSON" in api.error_message(body)
    status, body = _raw(service, "POST", "/v1/sandboxes", b'{"image": "/no/such/image"}')
    assert 400 <= status < 500 and api.error_message(body)
    status, body = _raw(service, "POST", "/v1/sandboxes",
                        json.dumps({"image": str(busybox), "bogus": 1}).encode())
    assert status == 400 and "bogus" in api.error_message(body)
    status, body = _raw(service, "POST", "/v1/sandboxes", b" " * (api.MAX_BODY + 10))
    assert status == 413
    status, body = _raw(service, "POST", "/v1/sandboxes",
                        json.dumps({"image": str(busybox), "memory": "9500M"}).encode())
    assert status == 409 and "memory" in api.error_message(body)
    status, body = _raw(service, "GET", "/v1/sandboxes/nope")
    assert status == 404
    status, body = _raw(service, "GET", "/v1/nowhere")
    assert status == 404 and api.error_message(body)
    # TCP: the bearer token, compared in constant time
    assert _raw(service, "GET", "/v1/health", tcp=True)[0] == 401
    assert _raw(service, "GET", "/v1/health", tcp=True,
                headers={"Authorization": "Bearer wrong"})[0] == 401
    token = (service.runtime / "token").read_text().strip()
    status, body = _raw(service, "GET", "/v1/health", tcp=True,
                        headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body["status"] == "ok"
    assert sm.connect(f"http://{service.info['tcp']}", token=token).health()["status"] == "ok"
    assert service.client.sandboxes() == before


def test_openapi_document_validates_and_matches_the_routes(service):
    from openapi_spec_validator import validate

    from supermachine.service.http import make_app

    status, doc = _raw(service, "GET", "/v1/openapi.json")
    assert status == 200
    validate(doc)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = make_app(None, "")  # the router the service builds, without a service
    routed = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD"}
    assert documented == routed


def test_pools_over_the_api(service, busybox):
    c = service.client
    pool = c.create_pool(str(busybox), 1, max_size=2, idle_timeout=30, memory="256M",
                         network="none")
    try:
        with pytest.raises(ServiceError) as e:
            c.create_pool(str(busybox), 1, memory="256M", network="none")
        assert e.value.status == 400  # one pool per VM spec
        deadline = time.monotonic() + 120
        while c.pool(pool["id"])["ready"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        t0 = time.monotonic()
        with c.create(str(busybox), memory="256M", network="none") as sb:
            assert sb.info["pool"] == pool["id"]
            assert sb.exec(["true"]).exit_code == 0
        assert time.monotonic() - t0 < 30
        stats = c.resize_pool(pool["id"], 0, max_size=1)
        assert (stats["size"], stats["max_size"]) == (0, 1)
        assert stats["hits"] == 1
    finally:
        c.delete_pool(pool["id"])
    assert pool["id"] not in [p["id"] for p in c.pools()]


def test_sandbox_with_a_main_process(service, busybox, home):
    sb = service.client.create(str(busybox), memory="256M", network="none", name="svc-main",
                               cmd=["sh", "-c", "echo main $GREETING; sleep 2; exit 3"],
                               env={"GREETING": "hi"})
    deadline = time.monotonic() + 30
    while b"main hi" not in run_cli(home, "logs", "svc-main").stdout:
        assert time.monotonic() < deadline, "no output of the main process in its log"
        time.sleep(0.1)
    assert sb.exec(["echo", "beside"]).stdout == b"beside\n"
    while "svc-main" in [s.name for s in service.client.sandboxes()] or \
            (home / "vms" / "svc-main").exists():
        assert time.monotonic() < deadline + 30, "the sandbox outlived its main process"
        time.sleep(0.1)


def test_ttl_destroys_the_sandbox(service, busybox, home):
    sb = service.client.create(str(busybox), memory="256M", network="none", ttl=1.5)
    assert sb.info["expires"] is not None
    deadline = time.monotonic() + 30
    while sb.name in [s.name for s in service.client.sandboxes()] or \
            (home / "vms" / sb.name).exists():
        assert time.monotonic() < deadline, "the TTL did not end the sandbox"
        time.sleep(0.1)


def test_sigterm_drains_and_sigkill_leaves_nothing(home, busybox, tmp_path):
    # SIGTERM: every VM is stopped, the sockets and service.json go, exit status 0
    svc = Service(home, tmp_path / "rt1", "--max-sandboxes", "4")
    sb = svc.client.create(str(busybox), memory="256M", network="none", name="svc-term")
    assert sb.exec(["true"]).exit_code == 0
    assert _children(svc.proc.pid)
    pid = svc.proc.pid
    assert svc.stop(signal.SIGTERM) == 0
    assert not _children(pid)
    assert sorted(os.listdir(svc.runtime)) == ["lock"]
    assert not (home / "vms" / "svc-term").exists()
    # SIGKILL: QEMU dies with it; a restarted service clears the dead sandbox's record
    svc = Service(home, tmp_path / "rt2", "--max-sandboxes", "4")
    sb = svc.client.create(str(busybox), memory="256M", name="svc-kill")  # QEMU and passt
    vms = _children(svc.proc.pid)
    assert len(vms) == 2, vms
    svc.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in vms):
        assert time.monotonic() < deadline, "QEMU outlived its SIGKILLed service"
        time.sleep(0.05)
    assert b"svc-kill" in run_cli(home, "ps", "-a").stdout  # dead, until a service looks
    svc = Service(home, tmp_path / "rt2")
    try:
        assert b"svc-kill" not in run_cli(home, "ps", "-a").stdout
    finally:
        assert svc.stop() == 0


def test_another_user_cannot_reach_the_service(service):
    script = ("import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "try:\n"
              f"    s.connect({str(service.runtime / 'api.sock')!r})\n"
              "except PermissionError:\n"
              "    sys.exit(13)\n")
    r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", script],
                       capture_output=True, timeout=30)
    assert r.returncode == 13, r.stderr


def test_ctrl_c_and_a_terminal_through_the_service(service, busybox, home):
    from tests.e2e.test_interactive import Terminal

    env = {**os.environ, "SUPERMACHINE_HOME": str(home),
           "SUPERMACHINE_RUNTIME_DIR": str(service.runtime)}
    (before,) = service.wait_pool_ready().values()
    proc = subprocess.Popen([*CLI, "run", str(busybox), "sh", "-c", "echo up; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while service.client.pool(before["id"])["in_use"]:  # its VM was destroyed
        assert time.monotonic() < deadline, "the interrupted run's VM lives on"
        time.sleep(0.1)
    # -it: a shell on a terminal, through the service (raw mode, size, Ctrl-C, exit status)
    os.environ["SUPERMACHINE_RUNTIME_DIR"] = str(service.runtime)
    try:
        term = Terminal(home, "run", "-it", str(busybox), "sh")
    finally:
        del os.environ["SUPERMACHINE_RUNTIME_DIR"]
    try:
        term.expect(b"# ")
        term.type(b"stty size\r")
        term.expect(b"24 80")
        term.type(b"sleep 30; echo not-interrupted\r")
        time.sleep(1.0)
        term.type(b"\x03")
        before_prompt = term.expect(b"# ")
        assert b"\nnot-interrupted" not in before_prompt  # (its command line is echoed)
        term.type(b"exit 5\r")
        assert term.wait() == 5
    finally:
        term.close()
    assert service.client.pool(before["id"])["hits"] >= before["hits"] + 2
