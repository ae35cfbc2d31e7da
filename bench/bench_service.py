"""The warm VM service (issue 14): `supermachine serve` and its clients against the
in-process paths, side by side in one run.

Setup (untimed): the busybox fixture's snapshot baked in the warm home, each CLI path run
once. The service runs as `supermachine serve` with the warm home and a private runtime
directory ($SUPERMACHINE_RUNTIME_DIR in a temp directory); the measured CLI processes get
the same two variables. Before every timed rep the benchmark waits, untimed, until every
pool is full again (ready == target, nothing starting), so each rep measures a pool hit and
no restore runs in the background while something is timed.

Measured:

1. CLI: `supermachine run IMAGE echo x` through the service (`serve --pool IMAGE=2`)
   against `supermachine run --no-service IMAGE echo x` (the in-process path: a restore),
   whole processes, interleaved rep by rep, the order rotating. Like every benchmark's
   processes they get stdin /dev/null, which `run` passes on to the workload as it does any
   stdin that is not a terminal; a third mode runs the service path with stdin a terminal
   (a pty), as a user at a shell has it, where there is nothing to pass on. Target: the
   service's p50 <= 100 ms.
2. API acquire -> first exec result: `c.create(image)` (a pooled VM) + the first
   `sb.exec(["true"])`, against the same with an in-process `Pool` of the same size
   (`pool.acquire()` + `vm.exec(["true"])`), interleaved; the close / release is untimed.
   Target: the service's p50 <= 20 ms.
3. Exec round trip: `sb.exec(["true"])` over HTTP on one sandbox against `vm.exec(["true"])`
   on a warm in-process VM, call by call, alternating. Target: ratio of p50s <= 1.5x.
4. Throughput: sandboxes created, exec'd (`true`) and destroyed per minute from 4 client
   threads over a fixed window, the service with a pool of 8 (max 8) against an in-process
   `Pool` of 8 (acquire, exec, release) over the same window; rounds alternate which goes
   first. A cycle counts when it ends inside the window.
5. The serve process: its VmRSS idle (a service started without pools, no sandboxes), with
   the pool of 2 and of 8 ready, after the throughput window, and at the end with no pools
   again; the VM processes' (QEMU + passt) PSS; start-up (Popen to service.json), pools
   ready, and SIGTERM to exit with a pool of 2 and one open sandbox. After every stop, no
   qemu-system or passt process the service started may be left, nor a VM directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import tables
from common import summary

TARGET_CLI_P50 = 0.100
TARGET_ACQUIRE_P50 = 0.020
TARGET_EXEC_RATIO = 1.5
CLI_POOL = 2
THROUGHPUT_POOL = 8
THREADS = 4
READY_TIMEOUT = 300.0
WARM_EXECS = 5
VM_PROGRAMS = ("qemu-system", "passt")
SERVICE, LOCAL = "service", "in-process"
CLI_SERVICE, CLI_SERVICE_TTY = "service", "service, stdin a terminal"


# ---------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[19])


def program(pid: int) -> str:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return ""
    return os.path.basename(argv0.decode(errors="replace"))


def vm_processes(root: int) -> dict[int, tuple[int, str]]:
    """The qemu-system and passt processes descended from ``root``: pid -> (start, name)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := proc_stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            name = program(child)
            if name.startswith(VM_PROGRAMS):
                out[child] = (starts[child], name)
    return out


def vm_rss(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0  # gone meanwhile


def settled_rss(pid: int, samples: int = 5, gap: float = 0.2) -> int:
    """The median of a few VmRSS readings, a second after the caller's last request."""
    time.sleep(1.0)
    values = []
    for _ in range(samples):
        values.append(vm_rss(pid))
        time.sleep(gap)
    return sorted(values)[len(values) // 2]


def wait_until(ready: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- the service


@dataclass
class Service:
    """A running `supermachine serve`, its client, and what it started."""

    proc: subprocess.Popen
    directory: Path
    log: Path
    client: Any
    startup_s: float = 0.0
    stop_s: float | None = None
    returncode: int | None = None
    seen: dict[int, tuple[int, str]] = field(default_factory=dict)
    vm_processes_at_stop: int = 0
    leftovers: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def record(self) -> dict[int, tuple[int, str]]:
        """Its VM processes now (and remembered, for the check after it stops)."""
        now = vm_processes(self.pid)
        self.seen.update(now)
        return now

    def vm_pss(self) -> int:
        return sum(pss(pid) for pid in self.record())

    def pool(self, pool_id: str) -> dict[str, Any]:
        for p in self.client.pools():
            if p["id"] == pool_id:
                return p
        raise RuntimeError(f"the service has no pool {pool_id}")

    def full(self, pool_id: str) -> bool:
        p = self.pool(pool_id)
        if p.get("error"):
            raise RuntimeError(f"the service's pool cannot start VMs: {p['error']}")
        return p["ready"] >= p["target"] and p["starting"] == 0

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""


@contextlib.contextmanager
def serve(home: common.Home, scratch: Path, tag: str, pools: list[str]) -> Iterator[Service]:
    """`supermachine serve` in the foreground until the block ends; then SIGTERM, and a
    check that none of the VM processes it started outlives it."""
    directory = scratch / "run"
    log = scratch / f"serve-{tag}.log"
    env = common.child_env({**common.home_env(home),
                            "SUPERMACHINE_RUNTIME_DIR": str(directory)})
    argv = [common.CLI, "serve", *(a for p in pools for a in ("--pool", p))]
    import supermachine as sm

    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    svc = Service(proc, directory, log, sm.connect(f"unix://{directory}/api.sock"))
    try:
        deadline = t0 + READY_TIMEOUT
        while not (directory / "service.json").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {svc.tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"serve wrote no service.json: {svc.tail()}")
            time.sleep(0.002)
        svc.startup_s = time.perf_counter() - t0
        svc.client.health()
        yield svc
    finally:
        if proc.poll() is None:
            svc.vm_processes_at_stop = len(svc.record())
            t = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
                svc.stop_s = time.perf_counter() - t
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        svc.returncode = proc.returncode
        for pid, (start, name) in sorted(svc.seen.items()):
            st = proc_stat(pid)
            if st is not None and st[1] == start:  # the same process, still there
                svc.leftovers.append(f"{name} (pid {pid})")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # ours: the service we started made it


# ---------------------------------------------------------------------------- measurements


def alternate(rep: int, names: tuple[str, str]) -> tuple[str, str]:
    return names if rep % 2 == 0 else (names[1], names[0])


def run_on_terminal(argv: list[str], env: dict[str, str], tty: int) -> common.Timed:
    """`common.run_timed`, but with stdin a terminal (what a shell user's `run` has), not
    /dev/null: `run` then has no stdin to pass on."""
    full_env = common.child_env(env)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=full_env, capture_output=True, timeout=300, stdin=tty,
                          check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return common.Timed(elapsed, proc.returncode, proc.stdout, proc.stderr)


def cli_reps(svc: Service, pool_id: str, home: common.Home, image: str, reps: int
             ) -> dict[str, Any]:
    env = {**common.home_env(home), "SUPERMACHINE_RUNTIME_DIR": str(svc.directory)}
    through = [common.CLI, "run", image, "echo", "x"]
    local = [common.CLI, "run", "--no-service", image, "echo", "x"]
    master, slave = os.openpty()
    try:
        modes: dict[str, Callable[[], common.Timed]] = {
            CLI_SERVICE: lambda: common.run_timed(through, env=env),
            CLI_SERVICE_TTY: lambda: run_on_terminal(through, env, slave),
            LOCAL: lambda: common.run_timed(local, env=env)}
        names = list(modes)
        for name in names:  # untimed: warms the page cache and __pycache__
            wait_until(lambda: svc.full(pool_id), "the pool of 2 refilled")
            modes[name]()
        hits0 = svc.pool(pool_id)["hits"]
        samples: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(reps):
            for name in names[rep % 3:] + names[:rep % 3]:  # the order rotating
                wait_until(lambda: svc.full(pool_id), "the pool of 2 refilled")
                done = modes[name]()
                if done.stdout != b"x\n":
                    raise RuntimeError(f"{name}: stdout {done.stdout[:200]!r}")
                samples[name].append(done.seconds)
    finally:
        os.close(master)
        os.close(slave)
    hits = svc.pool(pool_id)["hits"] - hits0
    if hits != 2 * reps:  # every service rep a hit, and no --no-service rep went through it
        raise RuntimeError(f"the pool served {hits} of {2 * reps} CLI runs")
    s = {k: summary(v) for k, v in samples.items()}
    return {"reps": reps, "modes": names, "summary": s, "samples": samples, "pool_hits": hits,
            "ratio_over_in_process": {k: v["median"] / s[LOCAL]["median"]
                                      for k, v in s.items()}}


def api_reps(svc: Service, pool_id: str, home: common.Home, image: str, reps: int
             ) -> dict[str, Any]:
    import supermachine as sm

    keys = ("total", "acquire", "first_exec")
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys}
                                                  for n in (SERVICE, LOCAL)}
    with sm.Pool(image, size=CLI_POOL, home=home) as local:
        def all_full() -> bool:
            st = local.stats()
            return st.ready >= st.target and st.starting == 0 and svc.full(pool_id)

        misses0 = svc.pool(pool_id)["misses"]
        for rep in range(reps + 1):  # rep 0: untimed warm-up of both
            for name in alternate(rep, (SERVICE, LOCAL)):
                wait_until(all_full, "both pools full")
                if name == SERVICE:
                    t0 = time.perf_counter()
                    sb = svc.client.create(image)
                    t1 = time.perf_counter()
                    r = sb.exec(["true"])
                    t2 = time.perf_counter()
                    pooled = sb.info.get("pool") == pool_id
                    sb.close()
                else:
                    t0 = time.perf_counter()
                    vm = local.acquire()
                    t1 = time.perf_counter()
                    r = vm.exec(["true"])
                    t2 = time.perf_counter()
                    pooled = True
                    local.release(vm)
                if r.exit_code != 0 or not pooled:
                    raise RuntimeError(f"{name}: exit {r.exit_code}, pooled {pooled}")
                if rep:
                    for k, v in zip(keys, (t2 - t0, t1 - t0, t2 - t1), strict=True):
                        samples[name][k].append(v)
        misses = {SERVICE: svc.pool(pool_id)["misses"] - misses0, LOCAL: local.stats().misses}
    if misses[SERVICE] != 0 or misses[LOCAL] != 0:
        raise RuntimeError(f"pool misses while measuring acquires: {misses}")
    s = {n: {k: summary(v) for k, v in d.items()} for n, d in samples.items()}
    return {"reps": reps, "summary": s, "samples": samples,
            "ratio_service_over_in_process":
                s[SERVICE]["total"]["median"] / s[LOCAL]["total"]["median"]}


def exec_rtt(svc: Service, home: common.Home, image: str, calls: int) -> dict[str, Any]:
    import supermachine as sm

    samples: dict[str, list[float]] = {SERVICE: [], LOCAL: []}
    with svc.client.create(image) as sb, sm.VM(image, home=home) as vm:
        run = {SERVICE: sb.exec, LOCAL: vm.exec}
        for _ in range(WARM_EXECS):  # untimed: the guests' exec paths translated
            for f in run.values():
                f(["true"])
        for i in range(calls):
            for name in alternate(i, (SERVICE, LOCAL)):
                t = time.perf_counter()
                r = run[name](["true"])
                samples[name].append(time.perf_counter() - t)
                if r.exit_code != 0:
                    raise RuntimeError(f"{name}: exec true exited {r.exit_code}")
    s = {k: summary(v) for k, v in samples.items()}
    return {"calls": calls, "summary": s, "samples": samples,
            "ratio_service_over_in_process": s[SERVICE]["median"] / s[LOCAL]["median"]}


def hammer(cycle: Callable[[int], None], seconds: float) -> dict[str, Any]:
    """THREADS threads running ``cycle`` back to back for ``seconds``; the cycles that ended
    inside the window, with their durations."""
    durations: list[list[float]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    gate = threading.Barrier(THREADS + 1)
    deadline = 0.0

    def worker(i: int) -> None:
        gate.wait()
        try:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                cycle(i)
                end = time.perf_counter()
                if end <= deadline:
                    durations[i].append(end - t)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), name=f"client-{i}")
               for i in range(THREADS)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + seconds
    gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    flat = [d for per in durations for d in per]
    return {"cycles": len(flat), "per_minute": len(flat) / seconds * 60,
            "cycle_seconds": flat, "cycles_per_thread": [len(per) for per in durations]}


def throughput_service(svc: Service, image: str, seconds: float) -> dict[str, Any]:
    import supermachine as sm

    pool_id = svc.client.create_pool(image, THROUGHPUT_POOL, max_size=THROUGHPUT_POOL)["id"]
    try:
        t = time.perf_counter()
        wait_until(lambda: svc.full(pool_id), "the pool of 8 full")
        fill = time.perf_counter() - t
        rss, vms = settled_rss(svc.pid), svc.vm_pss()
        before = svc.pool(pool_id)
        clients = [sm.connect(f"unix://{svc.directory}/api.sock") for _ in range(THREADS)]

        def cycle(i: int) -> None:
            with clients[i].create(image) as sb:
                r = sb.exec(["true"])
            if r.exit_code != 0:
                raise RuntimeError(f"exec true exited {r.exit_code}")

        out = hammer(cycle, seconds)
        svc.record()
        after = svc.pool(pool_id)
        wait_until(lambda: svc.full(pool_id), "the pool of 8 refilled")
        out.update(pool_fill_s=fill, serve_rss_pool_ready=rss, vm_pss_pool_ready=vms,
                   serve_rss_after_window=settled_rss(svc.pid),
                   hits=after["hits"] - before["hits"],
                   misses=after["misses"] - before["misses"],
                   leftover_sandboxes=len(svc.client.sandboxes()))
        return out
    finally:
        svc.client.delete_pool(pool_id)


def throughput_in_process(home: common.Home, image: str, seconds: float) -> dict[str, Any]:
    import supermachine as sm

    with sm.Pool(image, size=THROUGHPUT_POOL, max_size=THROUGHPUT_POOL, home=home) as pool:
        t = time.perf_counter()

        def full() -> bool:
            st = pool.stats()
            if st.error:
                raise RuntimeError(f"the in-process pool cannot start VMs: {st.error}")
            return st.ready >= st.target and st.starting == 0

        wait_until(full, "the in-process pool of 8 full")
        fill = time.perf_counter() - t
        before = pool.stats()

        def cycle(_: int) -> None:
            vm = pool.acquire()
            try:
                r = vm.exec(["true"])
            finally:
                pool.release(vm)
            if r.exit_code != 0:
                raise RuntimeError(f"exec true exited {r.exit_code}")

        out = hammer(cycle, seconds)
        after = pool.stats()
        out.update(pool_fill_s=fill, hits=after.hits - before.hits,
                   misses=after.misses - before.misses)
        return out


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    cli_n = args.reps or (5 if quick else 30)
    api_n = args.reps or (10 if quick else 30)
    exec_n = 50 if quick else 300
    window = 15.0 if quick else 60.0
    rounds = 1 if quick else 2
    info = common.machine_info()
    common.print_header("bench_service", info, quick)

    from tests.fixtures import images as fx

    import supermachine as sm

    image = str(fx.busybox())
    home = common.warm_home()
    common.ensure_guest(home)
    sm.VM(image, home=home).start().close()  # bakes the snapshot when missing (untimed)
    vms_before = set(os.listdir(home.vms)) if home.vms.is_dir() else set()
    scratch = Path(tempfile.mkdtemp(prefix="sm-bench-service-", dir=common.SCRATCH))
    results: dict[str, Any] = {
        "machine": info, "image": "busybox fixture", "memory": "run's default",
        "targets": {"cli_service_p50_s": TARGET_CLI_P50,
                    "api_acquire_to_first_exec_p50_s": TARGET_ACQUIRE_P50,
                    "exec_rtt_ratio_p50": TARGET_EXEC_RATIO},
        "pool_sizes": {"cli_and_api": CLI_POOL, "throughput": THROUGHPUT_POOL},
        "threads": THREADS, "window_s": window, "rounds": rounds}
    proc: dict[str, Any] = {}
    try:
        # the bare service: idle RSS, start-up and stop
        with serve(home, scratch, "idle", []) as bare:
            proc["idle_startup_s"] = bare.startup_s
            proc["serve_rss_idle"] = settled_rss(bare.pid)
        proc["idle_stop_s"] = bare.stop_s
        leftovers = list(bare.leftovers)
        codes = [bare.returncode]

        # the service with `--pool IMAGE=2`
        with serve(home, scratch, "pool", [f"{image}={CLI_POOL}"]) as svc:
            proc["pool_startup_s"] = svc.startup_s
            t = time.perf_counter()
            wait_until(lambda: bool(svc.client.pools()), "the --pool pool listed")
            pool_id = svc.client.pools()[0]["id"]
            wait_until(lambda: svc.full(pool_id), "the pool of 2 full")
            proc["pool2_ready_after_service_json_s"] = time.perf_counter() - t
            proc["serve_rss_pool2"] = settled_rss(svc.pid)
            proc["vm_pss_pool2"] = svc.vm_pss()

            print(f"cli: {cli_n} interleaved reps", flush=True)
            results["cli"] = cli_reps(svc, pool_id, home, image, cli_n)
            print(f"api: {api_n} interleaved reps", flush=True)
            results["api_acquire"] = api_reps(svc, pool_id, home, image, api_n)
            print(f"exec: {exec_n} calls each", flush=True)
            results["exec_rtt"] = exec_rtt(svc, home, image, exec_n)
            svc.client.delete_pool(pool_id)

            runs: dict[str, list[dict[str, Any]]] = {SERVICE: [], LOCAL: []}
            for r in range(rounds):
                for name in alternate(r, (SERVICE, LOCAL)):
                    print(f"throughput: {name}, {window:g} s window, round {r + 1}",
                          flush=True)
                    if name == SERVICE:
                        runs[name].append(throughput_service(svc, image, window))
                    else:
                        runs[name].append(throughput_in_process(home, image, window))
            tp: dict[str, Any] = {"runs": runs}
            for name, per in runs.items():
                cycles = [d for x in per for d in x["cycle_seconds"]]
                tp[name] = {"per_minute_median": statistics.median(x["per_minute"] for x in per),
                            "cycles": sum(x["cycles"] for x in per),
                            "cycle": summary(cycles) if cycles else None,
                            "hits": sum(x["hits"] for x in per),
                            "misses": sum(x["misses"] for x in per)}
            tp["ratio_service_over_in_process"] = (
                tp[SERVICE]["per_minute_median"] / tp[LOCAL]["per_minute_median"]
                if tp[LOCAL]["per_minute_median"] else None)
            results["throughput"] = tp
            svc_runs = runs[SERVICE]
            proc["serve_rss_pool8"] = max(x["serve_rss_pool_ready"] for x in svc_runs)
            proc["vm_pss_pool8"] = max(x["vm_pss_pool_ready"] for x in svc_runs)
            proc["serve_rss_after_throughput"] = max(x["serve_rss_after_window"]
                                                     for x in svc_runs)
            proc["pool8_fill_s"] = max(x["pool_fill_s"] for x in svc_runs)
            wait_until(lambda: not svc.client.sandboxes() and not svc.client.pools(),
                       "no sandboxes and no pools left", timeout=60)
            proc["serve_rss_end_no_pools"] = settled_rss(svc.pid)
            # Stopped with VMs to stop: a pool of 2 and a sandbox of it left open.
            last = svc.client.create_pool(image, CLI_POOL)["id"]
            wait_until(lambda: svc.full(last), "the last pool of 2 full")
            svc.client.create(image)
        proc["stop_s"] = svc.stop_s
        proc["vm_processes_at_stop"] = svc.vm_processes_at_stop
        leftovers += svc.leftovers
        codes.append(svc.returncode)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    left_vms = sorted(set(os.listdir(home.vms)) - vms_before) if home.vms.is_dir() else []
    proc.update(leftover_processes=leftovers, exit_codes=codes, leftover_vm_dirs=left_vms)
    results["service_process"] = proc
    common.print_tables(tables.bench_service(results))
    common.write_results("bench_service", results, quick=quick)
    if leftovers or left_vms or any(c != 0 for c in codes):
        print(f"error: the service left {leftovers or 'no processes'}, VM directories "
              f"{left_vms or 'none'}, exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
