"""Issue 6: published-port networking: HTTP requests/s and latency, bulk TCP both ways.

One small Python server (SERVER below: a tiny HTTP responder, a byte sink and a byte source)
runs three ways at once, all started before anything is measured; the measurements then go
round by round, each round measuring every server in turn (the order rotating each round),
so all three see the same machine. A server not being measured sits idle in accept/recv:

* host: as a process on this machine, reached on 127.0.0.1 (the baseline);
* passt: in a VM (python image, warm home, restored from its snapshot) behind published
  ports, with the network supermachine ships (passt + the host-side guard);
* slirp (unless --no-slirp): the same VM with QEMU's built-in ``-netdev user`` and
  ``hostfwd`` instead, for the backend comparison (the bench swaps the netdev on QEMU's
  command line; supermachine itself never uses slirp: see engine/net.py).

Measured by a Python load client in this process (bounded by count and time), every round:

* HTTP keep-alive: C connections, each sending small GET requests back to back; requests/s
  (median over rounds) and per-request latency p50/p99 (over all requests of all rounds).
* HTTP new connection per request (what a client without keep-alive does): requests/s, p99.
* bulk TCP host->guest (the client streams BYTES into the sink) and guest->host (the source
  streams BYTES out), MB/s over the published port, one transfer each way per round; the
  median over rounds is reported.
* start cost and memory (once): passt's process RSS, QEMU's RSS, VM start wall time.

Ratios are VM / host baseline (throughput), medians, same run, same client.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import tables
from common import summary

GUEST_PORTS = (8000, 8001, 8002)  # http, sink, source

SERVER = r'''
import socket, struct, sys, threading
BODY = b"x" * 64
def http(conn):
    with conn:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            _, _, buf = buf.partition(b"\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + BODY)
def sink(conn):
    with conn:
        total = 0
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        conn.sendall(struct.pack("!Q", total))
def source(conn):
    with conn:
        want = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))[0]
        block = b"\0" * (1 << 20)
        while want > 0:
            n = conn.send(block[:min(want, len(block))])
            want -= n
def serve(s, handler):
    while True:
        threading.Thread(target=handler, args=(s.accept()[0],), daemon=True).start()
listeners = []
for port in sys.argv[2:5]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(port)))
    s.listen(256)
    listeners.append(s)
for s, handler in zip(listeners[1:], (sink, source)):
    threading.Thread(target=serve, args=(s, handler), daemon=True).start()
print("ready", flush=True)
serve(listeners[0], http)
'''

SET_MTU = ("import fcntl, socket, struct; fcntl.ioctl(socket.socket(), 0x8922, "  # SIOCSIFMTU
           "struct.pack('16si12x', b'eth0', {mtu}))")

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE_LEN = len(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n") + 64


# ---------------------------------------------------------------------------- load client


def _recv_exact(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("server closed the connection")
        got += len(chunk)


def http_keepalive(port: int, conns: int, total: int, max_s: float) -> dict[str, Any]:
    """``conns`` connections share ``total`` requests (or stop at ``max_s``)."""
    lat: list[list[float]] = [[] for _ in range(conns)]
    deadline = time.perf_counter() + max_s
    per = max(1, total // conns)

    def worker(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(per):
                t0 = time.perf_counter()
                s.sendall(REQUEST)
                _recv_exact(s, RESPONSE_LEN)
                lat[i].append(time.perf_counter() - t0)
                if t0 > deadline:
                    break

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [x for row in lat for x in row]
    return {"requests": len(flat), "seconds": elapsed, "rps": len(flat) / elapsed,
            "latency_samples": flat}


def http_new_connections(port: int, conns: int, total: int, max_s: float) -> dict[str, Any]:
    lat: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_s
    per = max(1, total // conns)

    def worker() -> None:
        for _ in range(per):
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(REQUEST)
                _recv_exact(s, RESPONSE_LEN)
            with lock:
                lat.append(time.perf_counter() - t0)
            if t0 > deadline:
                break

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"requests": len(lat), "seconds": elapsed, "rps": len(lat) / elapsed,
            "latency_samples": lat}


def bulk_in(port: int, nbytes: int) -> float:
    """host -> server: MB/s from first byte sent to the server's count received."""
    block = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= s.send(block[:min(left, len(block))])
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            chunk = s.recv(8 - len(got))
            if not chunk:
                raise ConnectionError("sink closed early")
            got += chunk
        elapsed = time.perf_counter() - t0
    if struct.unpack("!Q", got)[0] != nbytes:
        raise RuntimeError("the sink counted a different number of bytes")
    return nbytes / elapsed / 1e6


def bulk_out(port: int, nbytes: int) -> float:
    """server -> host: MB/s from the request to the last byte received."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        t0 = time.perf_counter()
        s.sendall(struct.pack("!Q", nbytes))
        got = 0
        while got < nbytes:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("source closed early")
            got += len(chunk)
        return nbytes / (time.perf_counter() - t0) / 1e6


def measure_round(ports: tuple[int, int, int], p: dict[str, Any], rounds: int
                  ) -> dict[str, Any]:
    """One round against one server: 1/rounds of the requests, one bulk transfer each way."""
    http_port, sink_port, source_port = ports
    return {
        "keepalive": http_keepalive(http_port, p["conns"], p["requests"] // rounds,
                                    p["max_s"] / rounds),
        "new_conn": http_new_connections(http_port, p["conns"], p["requests"] // 4 // rounds,
                                         p["max_s"] / rounds),
        "bulk_in_mb_s": bulk_in(sink_port, p["bytes"]),
        "bulk_out_mb_s": bulk_out(source_port, p["bytes"]),
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server into medians (rates) and pooled latency percentiles."""
    def http(key: str) -> dict[str, Any]:
        rs = [r[key] for r in rounds]
        return {"requests": sum(r["requests"] for r in rs),
                "rps": statistics.median(r["rps"] for r in rs),
                "rps_per_round": [r["rps"] for r in rs],
                "latency": summary([x for r in rs for x in r["latency_samples"]])}

    return {"keepalive": http("keepalive"), "new_conn": http("new_conn"),
            "bulk_in_mb_s": [r["bulk_in_mb_s"] for r in rounds],
            "bulk_out_mb_s": [r["bulk_out_mb_s"] for r in rounds],
            "bulk_in_mb_s_median": statistics.median(r["bulk_in_mb_s"] for r in rounds),
            "bulk_out_mb_s_median": statistics.median(r["bulk_out_mb_s"] for r in rounds)}


# ---------------------------------------------------------------------------- servers


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def free_ports(n: int) -> tuple[int, ...]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def host_server() -> Iterator[tuple[tuple[int, int, int], dict[str, Any]]]:
    """The server as a host process on 127.0.0.1: (its ports, facts about it)."""
    ports = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "127.0.0.1", *map(str, ports)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield ports, {}  # type: ignore[misc]
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def slirp_netdev(hostfwd_ports: tuple[int, ...]):
    """Swap passt's stream netdev for QEMU's slirp with hostfwd (comparison only)."""
    from supermachine.engine import qemu

    original = qemu.build_command

    def patched(*args: Any, **kw: Any) -> list[str]:
        cmd = original(*args, **kw)
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}"
                      for h, g in zip(hostfwd_ports, GUEST_PORTS, strict=True))
        i = cmd.index("-netdev")
        cmd[i + 1] = "user,id=net0,ipv6=off,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3" + fwd
        return cmd

    wait = qemu.QemuMachine._wait_net_connected
    qemu.build_command = patched
    qemu.QemuMachine._wait_net_connected = staticmethod(lambda qmp, timeout: None)
    try:
        yield
    finally:
        qemu.build_command = original
        qemu.QemuMachine._wait_net_connected = wait


@contextlib.contextmanager
def vm_server(image: Path, home: Any, backend: str
              ) -> Iterator[tuple[tuple[int, int, int], dict[str, Any]]]:
    """The server in a VM behind published ports: (host ports, facts about the VM)."""
    import supermachine as sm

    if backend == "slirp":
        ports: tuple[int, ...] = free_ports(3)
        ctx: Any = slirp_netdev(ports)
        vm_ports: list[str] = []
    else:
        ctx = contextlib.nullcontext()
        vm_ports = [f"0:{g}" for g in GUEST_PORTS]
    with contextlib.ExitStack() as stack:
        with ctx:  # the netdev swap matters only while QEMU is launched
            t0 = time.perf_counter()
            vm = stack.enter_context(sm.VM(image, home=home, ports=vm_ports))
            start = time.perf_counter() - t0
        if backend != "slirp":
            ports = tuple(f.host_port for f in vm.ports)
        else:
            # slirp's MTU is 1500 (QEMU 7.2 has no option for it); the guest's is passt's.
            r = vm.exec(["python3", "-c", SET_MTU.format(mtu=1500)])
            assert r.ok, r.stderr
        vm.write_file("/tmp/server.py", SERVER.encode())
        server = stack.enter_context(vm.spawn(["python3", "/tmp/server.py", "0.0.0.0",
                                               *map(str, GUEST_PORTS)]))
        for _stream, data in server:
            if b"ready" in data:
                break
        machine = vm._machine  # for RSS figures only
        passt = getattr(machine, "_passt", None)
        yield ports, {  # type: ignore[misc]
            "vm_start_seconds": start, "restored": vm.restored_from is not None,
            "qemu_rss_kib": rss_kib(machine.pid),
            "passt_rss_kib": rss_kib(passt.pid) if backend == "passt" and passt else None}
        server.kill()


# ---------------------------------------------------------------------------- report


def main() -> int:
    def extra(ap: Any) -> None:
        ap.add_argument("--no-slirp", action="store_true", help="skip the slirp comparison")

    args = common.parse_args(__doc__.splitlines()[0], extra=extra)
    p = {"conns": 8, "requests": 400 if args.quick else 4000, "max_s": 10 if args.quick else 30,
         "bytes": 20_000_000 if args.quick else 200_000_000, "rounds": 2 if args.quick else 4}
    if args.reps:
        p["requests"] = args.reps
    info = common.machine_info()
    common.print_header("bench_net", info, args.quick)

    from tests.fixtures import images as fx

    import supermachine as sm

    image = fx.python()
    home = common.warm_home()
    # Untimed: bakes the image's snapshot if the home lacks it, so "VM start" is a restore.
    sm.VM(image, home=home).start().close()
    servers: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
    rounds: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers["host"] = stack.enter_context(host_server())
        servers["passt"] = stack.enter_context(vm_server(image, home, "passt"))
        if not args.no_slirp:
            servers["slirp"] = stack.enter_context(vm_server(image, home, "slirp"))
        names = list(servers)
        for name in names:  # warm-up: connections, server threads, caches
            http_keepalive(servers[name][0][0], 2, 20, 10)
        for i in range(p["rounds"]):
            for name in names[i % len(names):] + names[:i % len(names)]:
                rounds.setdefault(name, []).append(measure_round(servers[name][0], p,
                                                                 p["rounds"]))
    runs = {name: {**combine(rounds[name]), **servers[name][1]} for name in names}
    results = {"machine": info, "params": p, "runs": runs}
    common.print_tables(tables.bench_net(results))
    common.write_results("bench_net", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
