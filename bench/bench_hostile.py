"""A hostile guest against its neighbour (issue 11): how much slower a quiet VM answers
while another VM on the same host attacks it, and whether the host keeps its bounds.

In one run, on one warm home: a neighbour VM (busybox, 1 vCPU) answers `exec true` in a
loop for a fixed time, first with nothing else running (quiet), then while a hostile VM
(busybox, 2 vCPUs, root inside) runs each attack in turn, a quiet phase between attacks:

- fork bomb (`bomb() { bomb | bomb & }; bomb`), memory hog (a shell string doubling
  without end), filling its tmpfs, flooding its console (/dev/console: the host drains
  and keeps a bounded tail), flooding its stdout (the host reads it all, as `run` and
  `logs -f` do), spinning both vCPUs.

Reported per attack: the neighbour's exec latency p50 and p99 against the quiet phases
(target: p50 ratio <= 2), how many execs it completed, the host CPU time the hostile QEMU
used meanwhile (evidence that the attack ran), and its peak RSS against its guest RAM
(bounded by it plus QEMU's own overhead). All on this 2-core TCG
host: each vCPU is a host thread, so a spinning guest takes host cores, which only cgroup
CPU limits (not available on this machine's hybrid cgroups) would cap.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tables  # noqa: E402
from common import (  # noqa: E402 (path set up above)
    machine_info,
    parse_args,
    print_header,
    print_tables,
    summary,
    warm_home,
    write_results,
)
from tests.fixtures import images as fx  # noqa: E402

import supermachine as sm  # noqa: E402

TARGET_RATIO = 2.0
HOSTILE_MEMORY_MIB = 256
ATTACKS = {
    "fork bomb": [["sh", "-c", "bomb() { bomb | bomb & }; bomb"]],
    "memory hog": [["sh", "-c", "s=0123456789; while :; do s=$s$s; done"]],
    "fill its tmpfs": [["sh", "-c", "mkdir -p /t && mount -t tmpfs tmpfs /t && "
                                    "while :; do cat /dev/zero > /t/f; done"]],
    "console flood": [["sh", "-c", "while :; do cat /bin/busybox > /dev/console; done"]],
    "stdout flood": [["sh", "-c", "while :; do cat /bin/busybox; done"]],
    "spin 2 vCPUs": [["sh", "-c", "while :; do :; done"]] * 2,
}


def latencies(vm: sm.VM, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        assert vm.exec(["true"], timeout=60).exit_code == 0
        out.append(time.perf_counter() - t0)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def attack(image, home, neighbour: sm.VM, commands: list[list[str]], seconds: float
           ) -> dict:
    with sm.VM(image, home=home, memory=f"{HOSTILE_MEMORY_MIB}M", cpus=2,
               network="none") as hostile:
        procs = [hostile.spawn(c) for c in commands]
        drained = [0]
        stop = threading.Event()

        def drain() -> None:  # what `run` does with a workload's output
            for p in procs:
                while not stop.is_set():
                    try:
                        chunk = p.recv(timeout=0.5)
                    except sm.Error:
                        continue
                    if chunk is None:
                        break
                    drained[0] += len(chunk[1])

        reader = threading.Thread(target=drain, name="drain")
        reader.start()
        try:
            time.sleep(1.0)  # the attack under way
            cpu0 = cpu_seconds(hostile.pid)
            lat = latencies(neighbour, seconds)
            cpu = cpu_seconds(hostile.pid) - cpu0
            peak = rss(hostile.pid)
        finally:
            stop.set()
            reader.join()
    return {"latency": lat, "hostile_peak_rss": peak, "drained_bytes": drained[0],
            "hostile_cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    seconds = 3.0 if args.quick else 8.0
    info = machine_info()
    print_header("bench_hostile", info, args.quick)
    home = warm_home()
    image = fx.busybox()
    with sm.VM(image, home=home, memory=f"{HOSTILE_MEMORY_MIB}M", cpus=2,
               network="none") as warm:  # bakes the hostile VMs' snapshot, untimed
        warm.exec(["true"])
    quiet: list[float] = []
    per_attack = {}
    with sm.VM(image, home=home, memory="256M", network="none") as neighbour:
        latencies(neighbour, 1.0)  # warm: the exec path translated
        quiet += latencies(neighbour, seconds)
        for name, commands in ATTACKS.items():
            per_attack[name] = attack(image, home, neighbour, commands, seconds)
            quiet += latencies(neighbour, seconds / 2)
            print(f"{name}: done", flush=True)
    base = statistics.median(quiet)
    results = {
        "machine": info, "seconds": seconds, "target_ratio": TARGET_RATIO,
        "hostile_memory_mib": HOSTILE_MEMORY_MIB, "quiet": summary(quiet),
        "attacks": {name: {"latency": summary(r["latency"]),
                           "ratio_p50": statistics.median(r["latency"]) / base,
                           "hostile_peak_rss": r["hostile_peak_rss"],
                           "hostile_cpu_s": r["hostile_cpu_s"],
                           "drained_bytes": r["drained_bytes"]}
                    for name, r in per_attack.items()},
        "samples": {"quiet": quiet, **{k: v["latency"] for k, v in per_attack.items()}},
    }
    print_tables(tables.bench_hostile(results))
    write_results("bench_hostile", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
