"""End-to-end networking: published ports, outbound policy, DNS, `--network none`.

Every packet in these tests stays on this machine: host servers listen on 127.0.0.0/8 or on
the host's own address (delivered locally), and every "refused" case is refused by the
host-side guard before passt sends anything.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from supermachine.errors import EngineError
from supermachine.runtime.vm import VM

from .conftest import run_cli, vm_name

TOKEN = b"hello-from-the-host-" + os.urandom(4).hex().encode()
DNS_NAME = "svc.sm-test.internal"
DNS_ANSWER = "10.9.8.7"


@contextlib.contextmanager
def http_server(host: str) -> Iterator[int]:
    """A host HTTP server answering TOKEN; yields its port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(TOKEN)))
            self.end_headers()
            self.wfile.write(TOKEN)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _dns_reply(query: bytes) -> bytes | None:
    """Answers A queries for DNS_NAME with DNS_ANSWER, NXDOMAIN for anything else."""
    if len(query) < 17:
        return None
    i, labels = 12, []
    while i < len(query) and query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode(errors="replace"))
        i += 1 + query[i]
    question = query[12:i + 5]
    qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
    found = ".".join(labels).lower() == DNS_NAME
    answer = b""
    if found and qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(DNS_ANSWER)
    flags = 0x8180 if found else 0x8183
    return query[:2] + struct.pack("!HHHHH", flags, 1, 1 if answer else 0, 0, 0) + question \
        + answer


@contextlib.contextmanager
def dns_server() -> Iterator[int]:
    """A DNS server on host loopback (UDP); yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                query, peer = sock.recvfrom(512)
            except TimeoutError:
                continue
            reply = _dns_reply(query)
            if reply:
                sock.sendto(reply, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        sock.close()


def host_address() -> str:
    """This machine's own non-loopback IPv4 address (traffic to it is delivered locally)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    raise AssertionError("this test needs a non-loopback IPv4 address on the host")


def fetch(port: int, path: str = "/", timeout: float = 20) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read()


def wait_fetch(port: int, path: str = "/", timeout: float = 30) -> bytes:
    """Fetch once the guest server is listening (it starts in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch(port, path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def guest_get(vm: VM, ip: str, port: int) -> str:
    """An HTTP GET from inside a busybox guest (nc); the response text, or nc's error."""
    r = vm.exec(["sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port}"],
                timeout=60)
    return (r.stdout + r.stderr).decode(errors="replace")


def start_httpd(vm: VM) -> None:
    r = vm.exec(["sh", "-c", "mkdir -p /www && echo guest-page > /www/index.html && "
                             "httpd -p 80 -h /www"], timeout=60)
    assert r.ok, r.stderr


# ---- published ports ----------------------------------------------------------------------

def test_cold_booted_vm_network_and_published_port(home, busybox):
    with VM(busybox, home=home, snapshot=False, ports=["0:80"]) as vm:
        (fwd,) = vm.ports
        assert fwd.host_ip == "127.0.0.1" and fwd.host_port > 0 and fwd.guest_port == 80
        r = vm.exec(["sh", "-c", "ip -4 addr show eth0; ip route; cat /etc/resolv.conf"],
                    timeout=60)
        out = r.stdout.decode()
        assert "inet 10.0.2.15/24" in out, out
        assert "default via 10.0.2.2 dev eth0" in out, out
        assert "nameserver 10.0.2.3" in out, out
        start_httpd(vm)
        assert wait_fetch(fwd.host_port, "/index.html") == b"guest-page\n"

        # A port published on the running VM; the first one keeps working.
        assert vm.exec(["httpd", "-p", "81", "-h", "/www"], timeout=60).ok
        port = vm.expose(81)
        assert port > 0 and [f.guest_port for f in vm.ports] == [80, 81]
        assert wait_fetch(port, "/index.html") == b"guest-page\n"
        assert wait_fetch(fwd.host_port, "/index.html") == b"guest-page\n"
        with pytest.raises(EngineError, match="already in use"):
            vm.expose(82, host_port=port)


def test_restored_vm_publishes_ports_and_is_kept_off_host_loopback(home, python_image):
    # The first VM of a configuration bakes its snapshot, then restores from it too.
    with http_server("127.0.0.1") as host_port, \
            VM(python_image, home=home, ports=["8000", "0:7/udp"]) as vm:
        assert vm.restored_from is not None
        port, udp_port = (f.host_port for f in vm.ports)
        assert vm.exec(["mkdir", "/tmp/srv"], timeout=60).ok
        vm.write_file("/tmp/srv/index.html", b"restored-page")
        vm.write_file("/tmp/server.py", GUEST_SERVER.encode())
        server = vm.spawn(["python3", "/tmp/server.py", "8000", "/tmp/srv/index.html"])
        assert wait_fetch(port, "/index.html") == b"restored-page"

        # 50 concurrent connections through the one published port all complete.
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda _: fetch(port, "/index.html", 60), range(50)))
        assert results == [b"restored-page"] * 50

        # A published UDP port (an echo server in the guest).
        vm.write_file("/tmp/echo.py", UDP_ECHO.encode())
        echo = vm.spawn(["python3", "/tmp/echo.py"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(0.5)
            for _ in range(60):  # datagrams sent before the server binds are lost
                u.sendto(b"ping", ("127.0.0.1", udp_port))
                with contextlib.suppress(TimeoutError):
                    assert u.recv(100) == b"echo:ping"
                    break
            else:
                raise AssertionError("no UDP echo through the published port")
        echo.kill()

        # The gateway stands for the host only with allow_host_loopback: refused here.
        vm.write_file("/tmp/get.py", GUEST_GET.encode())
        r = vm.exec(["python3", "/tmp/get.py", "10.0.2.2", str(host_port)], timeout=60)
        assert TOKEN not in r.stdout and b"refused" in r.stdout, r.stdout

        # A root guest hand-crafting packets to 127.0.0.1 does not reach host loopback.
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(3)
            vm.write_file("/syn.py", SYN_SCRIPT.encode())
            r = vm.exec(["python3", "/syn.py", "127.0.0.1", str(listener.getsockname()[1])],
                        timeout=60)
            assert r.exit_code == 0 and b"sent" in r.stdout, r.stderr
            with pytest.raises(TimeoutError):
                listener.accept()
        server.kill()


# A small threaded HTTP server for the python image (python3-minimal has no http.server),
# with a listen backlog that takes 50 connections at once.
GUEST_SERVER = r'''
import socket, sys, threading
body = open(sys.argv[2], "rb").read()
def serve(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(128)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
'''

UDP_ECHO = r'''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
'''

# Connects from the guest; prints what came back, or "refused" and why.
GUEST_GET = r'''
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print(c.recv(4096))
except OSError as e:
    print("refused", e)
'''


# Resolves a name with one UDP query to SERVER:PORT; prints the A records.
GUEST_DNS = r'''
import socket, struct, sys
server, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
q += struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(q, (server, port))
reply = s.recv(512)
assert reply[:2] == q[:2]
count = struct.unpack("!H", reply[6:8])[0]
i = len(q)
for _ in range(count):
    i += 2
    rtype, _, _, rdlen = struct.unpack("!HHIH", reply[i:i + 10])
    i += 10
    if rtype == 1:
        print(socket.inet_ntoa(reply[i:i + rdlen]))
    i += rdlen
'''


# Sends one raw TCP SYN out of eth0 to the gateway's MAC: what a hostile guest could do.
SYN_SCRIPT = r'''
import socket, struct, sys
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
dst, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"x", ("10.0.2.2", 9))  # resolves the gateway's MAC (the guard drops the datagram)
mac = None
for _ in range(100):
    for line in open("/proc/net/arp").read().splitlines()[1:]:
        f = line.split()
        if f[0] == "10.0.2.2" and f[3] != "00:00:00:00:00:00":
            mac = bytes.fromhex(f[3].replace(":", ""))
    if mac:
        break
    __import__("time").sleep(0.05)
own = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
src = "10.0.2.15"
tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for _ in range(3):
    s.send(mac + own + b"\x08\x00" + ip + tcp)
print("sent")
'''


# ---- outbound policy and DNS --------------------------------------------------------------

def test_host_loopback_allowed_allow_list_and_dns(home, python_image):
    hip = host_address()
    with http_server("127.0.0.1") as lo_port, http_server(hip) as hip_port, \
            dns_server() as dns_port, \
            VM(python_image, home=home, allow_host_loopback=True,
               allow_hosts=[f"{hip}/32"]) as vm:
        vm.write_file("/tmp/get.py", GUEST_GET.encode())
        vm.write_file("/tmp/dns.py", GUEST_DNS.encode())
        for ip, port in (("10.0.2.2", lo_port), (hip, hip_port)):
            r = vm.exec(["python3", "/tmp/get.py", ip, str(port)], timeout=60)
            assert TOKEN in r.stdout, (ip, r.stdout, r.stderr)
        # A DNS query over UDP through the user-mode stack, answered on host loopback.
        r = vm.exec(["python3", "/tmp/dns.py", "10.0.2.2", str(dns_port), DNS_NAME],
                    timeout=60)
        assert r.stdout.decode().split() == [DNS_ANSWER], (r.stdout, r.stderr)


def test_allow_list_refuses_other_destinations(home, busybox):
    hip = host_address()
    with http_server(hip) as hip_port, \
            VM(busybox, home=home, allow_hosts=["203.0.113.0/24"]) as vm:
        out = guest_get(vm, hip, hip_port)
        assert TOKEN.decode() not in out
        assert "refused" in out or "reset" in out or "timed out" in out, out


# ---- CLI ----------------------------------------------------------------------------------

def test_network_none_has_no_interface_or_route(home, busybox):
    r = run_cli(home, "run", "--network", "none", str(busybox), "sh", "-c",
                "ls /sys/class/net; echo routes; tail -n +2 /proc/net/route")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["lo", "routes"]


def test_host_port_in_use_is_a_clear_error_before_boot(home, busybox, tmp_path, monkeypatch):
    # "Before boot": QEMU is never run. A probe stands in for it (SUPERMACHINE_QEMU) and
    # leaves a file behind if anything runs it; a real QEMU would boot and prove nothing.
    probe, ran = tmp_path / "qemu-probe", tmp_path / "qemu-ran"
    probe.write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\nexit 1\n")
    probe.chmod(0o755)
    monkeypatch.setenv("SUPERMACHINE_QEMU", str(probe))
    # unjailed: in its jail the probe could not leave its file where the test looks
    monkeypatch.setenv("SUPERMACHINE_JAIL", "off")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_cli(home, "run", "-p", f"{port}:80", str(busybox), "true")
        assert r.returncode == 125
        err = r.stderr.decode()
        assert f"host port 127.0.0.1:{port}/tcp is already in use" in err, err
        with pytest.raises(EngineError, match="already in use"):
            VM(busybox, home=home, ports={port: 80}).start()
    assert not ran.exists(), ran.read_text()


def test_detached_vm_publish_all_ports_in_ps_and_inspect(home, busybox):
    import json

    from tests.fixtures import images as fx

    image = fx.variant(busybox, "bb-exposes-80", exposed_ports={"80/tcp": {}})
    name = vm_name("net")
    r = run_cli(home, "run", "-d", "--name", name, "-P", str(image),
                "sh", "-c", "mkdir -p /www && echo detached-page > /www/index.html && "
                            "exec httpd -f -p 80 -h /www")
    assert r.returncode == 0, r.stderr
    try:
        info = json.loads(run_cli(home, "inspect", name).stdout)[0]
        (published,) = info["ports"]
        assert published.startswith("127.0.0.1:") and published.endswith("->80/tcp")
        port = int(published.split(":")[1].split("-")[0])
        assert wait_fetch(port, "/index.html") == b"detached-page\n"
        ps = run_cli(home, "ps").stdout.decode()
        assert published in ps
    finally:
        run_cli(home, "rm", "-f", name)
