"""Issue 4 (API half): exec round-trip latency and stdout throughput into a running VM.

What is measured, in this process, through the public API on one running busybox VM (warm
home; the boot itself is not timed):

* exec round trip: ``vm.exec(["true"])`` from call to returned result, p50/p99 over N calls
  (after a few unmeasured warm-up calls).
* stdout throughput: ``dd if=/dev/zero bs=1000000 count=BYTES/1e6`` through ``vm.spawn``,
  consuming the stream chunk by chunk (never holding it), MB/s = BYTES / (spawn to exit
  status). Not ``head -c``: busybox head copies in small blocks and under TCG it alone
  manages only ~7 MB/s inside the guest (writing to /dev/null), which would measure head.
* guest diagnostics (VM only), to read the ratios: the agent's PING round trip (the channel
  without any process), one exec split at the guest's STARTED report (sent once execve has
  succeeded), the guest's cost of running /bin/true from a shell (a loop of 20
  minus an empty loop, divided by 20; a lower bound on fork+exec, as busybox ash can run its
  own applets without exec), dd's rate to /dev/null inside the guest (the
  producer's own limit) and through a pipe to cat inside the guest (every byte a workload
  prints crosses a pipe to sm-init first).

Baseline, same run, same numbers: the real guest init (sm-init) as a host process speaking the
agent protocol over a socketpair to the same AgentClient (`--agent-fd`), running the host's
`true` and `dd`. The ratio is what the VM and its virtio-serial path cost on top of the
protocol and the Python client. Baseline and VM are interleaved call by call (and stream by
stream), alternating which goes first, so both see the same machine; the side not being
measured sits idle in a blocking read.

The CLI half is `cli_exec_half`: `supermachine exec NAME true` as whole CLI processes against
a detached VM (`supermachine run -d`), interleaved with `python -c pass` and `supermachine
--help` as the start-up floor every CLI call pays.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import tables
from common import summary

from supermachine.agent.protocol import Stream

PATH_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
WARMUP = 5


# ---------------------------------------------------------------------------- workloads


def exec_latencies(run_true: Callable[[], int], n: int) -> list[float]:
    for _ in range(WARMUP):
        run_true()
    return [timed_true(run_true) for _ in range(n)]


def timed_true(run_true: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    code = run_true()
    elapsed = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"`true` exited {code}")
    return elapsed


def stream_argv(nbytes: int) -> list[str]:
    if nbytes % 1_000_000:
        raise ValueError("stream sizes are whole megabytes")
    return ["dd", "if=/dev/zero", "bs=1000000", f"count={nbytes // 1_000_000}"]


def stream_throughput(spawn: Callable[[list[str]], Any], nbytes: int) -> tuple[float, int]:
    """(seconds, bytes received) for ``nbytes`` of dd output streamed to us."""
    t0 = time.perf_counter()
    got = 0
    with spawn(stream_argv(nbytes)) as proc:
        for stream, data in proc:
            if stream == Stream.STDOUT:
                got += len(data)
        status = proc.wait()
    elapsed = time.perf_counter() - t0
    if status.exit_code != 0 or got != nbytes:
        raise RuntimeError(f"dd exited {status.exit_code} after {got} of {nbytes} bytes")
    return elapsed, got


def guest_diagnostics(vm: Any, nbytes: int) -> dict[str, float]:
    """Where a VM exec's time goes: channel round trip vs guest process cost vs producer."""
    def timed_sh(script: str) -> float:
        t0 = time.perf_counter()
        res = vm.exec(["sh", "-c", script])
        if res.exit_code != 0:
            raise RuntimeError(f"sh -c {script!r} exited {res.exit_code}: {res.stderr[-200:]!r}")
        return time.perf_counter() - t0

    agent = vm._agent()  # internal: PING has no public API, and it isolates the channel
    pings = [agent.ping() for _ in range(50)]
    loop = "i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"
    empty = statistics.median(timed_sh(loop.format(n=0)) for _ in range(5))
    twenty = statistics.median(timed_sh(loop.format(n=20)) for _ in range(5))
    dd = " ".join(stream_argv(nbytes))
    devnull = timed_sh(f"{dd} of=/dev/null 2>/dev/null") - empty
    # Every byte a workload prints crosses a pipe to sm-init first: the guest's own pipe
    # throughput (kernel copies, emulated under TCG) bounds the stream.
    piped = timed_sh(f"{dd} 2>/dev/null | cat > /dev/null") - empty
    # Split of one exec at the guest's STARTED report (sent once execve has succeeded).
    to_started, to_exit = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        with vm.spawn(["true"]) as proc:
            while proc.pid is None and proc.exit_status is None:
                time.sleep(0.0002)
            t1 = time.perf_counter()
            proc.wait()
        to_started.append(t1 - t0)
        to_exit.append(time.perf_counter() - t1)
    # `true` goes through a PATH search (execve fails in /usr/local/sbin ... /sbin first).
    abs_true = exec_latencies(lambda: vm.exec(["/bin/true"]).exit_code, 50)
    return {"agent_ping_rtt_median": summary(pings)["median"],
            "exec_abs_true_median": summary(abs_true)["median"],
            "spawn_to_started_median": summary(to_started)["median"],
            "started_to_exit_median": summary(to_exit)["median"],
            "guest_fork_exec_true": (twenty - empty) / 20,
            "guest_dd_to_devnull_mb_s": nbytes / 1e6 / devnull,
            "guest_dd_pipe_cat_mb_s": nbytes / 1e6 / piped}


# ---------------------------------------------------------------------------- baseline


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        cur = todo.pop()
        found.append(cur)
        for task in Path(f"/proc/{cur}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


class HostGuest:
    """sm-init run on the host as the agent's guest end (it runs sessions in own groups)."""

    def __init__(self) -> None:
        from supermachine.agent.client import AgentClient
        from supermachine.guest.assets import init_binary

        host, guest = socket.socketpair()
        self.proc = subprocess.Popen([str(init_binary()), "--agent-fd", str(guest.fileno())],
                                     pass_fds=[guest.fileno()], stdin=subprocess.DEVNULL)
        guest.close()
        self.client = AgentClient(host)
        self.client.hello(10)

    def run_true(self) -> int:
        return self.client.exec(["true"], env=PATH_ENV, cwd="/").exit_code

    def spawn(self, argv: list[str]) -> Any:
        return self.client.spawn(argv, env=PATH_ENV, cwd="/")

    def close(self) -> None:
        self.client.close()
        for pid in _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------- CLI half


def cli_exec_half(image: Path, home: common.Home, reps: int) -> dict[str, Any]:
    """`supermachine exec NAME true` round trips (whole CLI processes) into a detached VM.

    Baselines in the same run, interleaved call by call: `python -c pass` (the venv's
    interpreter start) and `supermachine --help` (interpreter + CLI import), the floor any
    CLI command pays.
    """
    probe = common.run_timed([common.CLI, "exec", "--help"], check=False)
    if probe.returncode != 0:
        return {"status": "not available: the CLI has no `exec` command"}
    env = common.home_env(home)
    name = f"sm-bench-exec-{os.getpid()}"
    common.run_timed([common.CLI, "run", "-d", "--name", name, str(image), "sleep", "1000000"],
                     env=env)
    samples: dict[str, list[float]] = {"cli exec true": [], "python -c pass": [],
                                       "supermachine --help": []}
    try:
        for _ in range(WARMUP):
            common.run_timed([common.CLI, "exec", name, "true"], env=env)
        for _ in range(reps):
            samples["cli exec true"].append(
                common.run_timed([common.CLI, "exec", name, "true"], env=env).seconds)
            samples["python -c pass"].append(
                common.run_timed([sys.executable, "-c", "pass"]).seconds)
            samples["supermachine --help"].append(
                common.run_timed([common.CLI, "--help"]).seconds)
    finally:
        common.run_timed([common.CLI, "rm", "-f", name], env=env, check=False)
    return {"status": "measured", "reps": reps,
            **{k: summary(v) for k, v in samples.items()}, "samples": samples}


# ---------------------------------------------------------------------------- main


Side = tuple[Callable[[], int], Callable[[list[str]], Any]]  # (run `true`, spawn)


def measure_interleaved(sides: dict[str, Side], n: int, nbytes: int, streams: int
                        ) -> dict[str, dict[str, Any]]:
    """Every side's exec latencies and stream times, call by call in alternating order."""
    names = list(sides)
    for run_true, _ in sides.values():
        for _ in range(WARMUP):
            run_true()
    lat: dict[str, list[float]] = {k: [] for k in names}
    thr: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        for k in names if i % 2 == 0 else names[::-1]:
            lat[k].append(timed_true(sides[k][0]))
    for i in range(streams):
        for k in names if i % 2 == 0 else names[::-1]:
            thr[k].append(stream_throughput(sides[k][1], nbytes)[0])
    return {k: {"exec_true": summary(lat[k]), "exec_true_samples": lat[k],
                "stream_seconds": summary(thr[k]), "stream_seconds_samples": thr[k],
                "stream_mb_s_median": nbytes / 1e6 / summary(thr[k])["median"]}
            for k in names}


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    n = args.reps or (30 if args.quick else 300)
    nbytes = 10_000_000 if args.quick else 100_000_000
    streams = 2 if args.quick else 4
    cli_reps = 10 if args.quick else 50
    info = common.machine_info()
    common.print_header("bench_exec", info, args.quick)

    from tests.fixtures import images as fx

    import supermachine as sm

    image = fx.busybox()
    home = common.warm_home()

    host = HostGuest()
    try:
        t0 = time.perf_counter()
        with sm.VM(image, home=home) as vm:
            boot = time.perf_counter() - t0
            both = measure_interleaved({"vm": (lambda: vm.exec(["true"]).exit_code, vm.spawn),
                                        "host": (host.run_true, host.spawn)},
                                       n, nbytes, streams)
            diag = guest_diagnostics(vm, nbytes)
    finally:
        host.close()
    ours, base = both["vm"], both["host"]

    results: dict[str, Any] = {
        "machine": info, "quick": args.quick, "exec_calls": n, "stream_bytes": nbytes,
        "stream_reps": streams, "vm_boot_seconds_not_in_ratios": boot,
        "vm": ours, "host_baseline": base,
        "ratio_exec_p50": ours["exec_true"]["median"] / base["exec_true"]["median"],
        "ratio_stream_mb_s": ours["stream_mb_s_median"] / base["stream_mb_s_median"],
        "target_exec_p50_seconds": 0.010,
        "cli_half": cli_exec_half(image, home, cli_reps),
        "guest_diagnostics": diag,
    }
    common.print_tables(tables.bench_exec(results))
    common.write_results("bench_exec", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
