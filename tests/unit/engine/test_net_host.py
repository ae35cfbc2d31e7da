"""Host-side networking with real sockets and processes: port claims and the egress guard.

The guard is tested by preloading it into a real Python process and calling connect() and
sendto() there: only loopback datagrams are sent, and UDP connect() sends nothing at all,
so "allowed" can be checked for non-loopback addresses without any traffic.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supermachine.engine import netguard
from supermachine.engine.net import Network, PortForward
from supermachine.engine.qemu import claim_host_ports
from supermachine.errors import EngineError

# ---- host ports ---------------------------------------------------------------------------


def test_claim_picks_free_ports_and_keeps_fixed_ones():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    got = claim_host_ports((PortForward(80), PortForward(81, free), PortForward(53, 0, "udp")))
    assert got[0].host_port > 0 and got[0].guest_port == 80
    assert got[1].host_port == free
    assert got[2].host_port > 0 and got[2].proto == "udp"


def test_claim_refuses_a_port_in_use():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(EngineError, match=f"host port 127.0.0.1:{port}/tcp is already in use"):
            claim_host_ports((PortForward(80, port),))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(EngineError, match="already in use"):
            claim_host_ports((PortForward(53, port, "udp"),))


def test_claim_reports_an_address_not_on_this_host():
    with pytest.raises(EngineError, match="cannot publish on 203.0.113.9"):
        claim_host_ports((PortForward(80, 0, "tcp", "203.0.113.9"),))


# ---- the guard ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> Path:
    return netguard.ensure_netguard(tmp_path_factory.mktemp("guard"))


PROBE = r"""
import socket, sys
def attempt(kind, ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        if kind == "connect":
            s.connect((ip, port))
        else:
            s.sendto(b"x", (ip, port))
        return "ok"
    except PermissionError:
        return "denied"
    finally:
        s.close()
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # never judged
u.close()
for arg in sys.argv[1:]:
    kind, ip, port = arg.split(",")
    print(attempt(kind, ip, int(port)))
"""


def probe(guard: Path, policy: str | None, *attempts: str) -> list[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "LD_PRELOAD": str(guard)}
    if policy is not None:
        env["SM_NETGUARD"] = policy
    r = subprocess.run([sys.executable, "-c", PROBE, *attempts], env=env, capture_output=True,
                       text=True, timeout=30, check=True)
    return r.stdout.split()


def test_guard_denies_loopback_unless_allowed(guard):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        port = rx.getsockname()[1]
        hits = [f"sendto,127.0.0.1,{port}", f"connect,127.0.0.5,{port}", f"sendto,0.0.0.0,{port}"]
        assert probe(guard, "loopback=0;dns=;allow=*", *hits) == ["denied"] * 3
        rx.settimeout(0.2)
        with pytest.raises(TimeoutError):
            rx.recv(10)  # nothing got through
        rx.settimeout(5)
        assert probe(guard, "loopback=1;dns=;allow=*", f"sendto,127.0.0.1,{port}") == ["ok"]
        assert rx.recv(10) == b"x"


def test_guard_allow_list_deny_and_dns(guard):
    policy = "loopback=0;dns=127.0.0.53;deny=10.0.2.2/32;allow=198.51.100.0/24,192.0.2.7/32"
    assert probe(guard, policy,
                 "connect,198.51.100.200,443",  # in an allowed network
                 "connect,192.0.2.7,80",
                 "connect,192.0.2.8,80",  # not allowed
                 "connect,203.0.113.1,443",
                 "connect,10.0.2.2,80",  # denied outright
                 "connect,127.0.0.53,53",  # the resolver, on its port only
                 "connect,127.0.0.53,54") == \
        ["ok", "ok", "denied", "denied", "denied", "ok", "denied"]
    # allow=* with a deny entry: everything but the denied network.
    assert probe(guard, "loopback=0;dns=;deny=10.0.2.2/32;allow=*",
                 "connect,203.0.113.1,443", "connect,10.0.2.2,443") == ["ok", "denied"]


REPLY_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
data, peer = s.recvfrom(100)  # a client on loopback talks first...
s.sendto(b"reply", peer)  # ...so it may be answered
try:
    s.sendto(b"x", ("127.0.0.1", int(sys.argv[1])))  # but not anyone else on loopback
    print("other ok")
except PermissionError:
    print("other denied")
"""


def test_guard_lets_replies_reach_a_peer_that_sent_first(guard):
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "LD_PRELOAD": str(guard),
           "SM_NETGUARD": "loopback=0;dns=;allow=*"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bystander:
        client.bind(("127.0.0.1", 0))
        bystander.bind(("127.0.0.1", 0))
        client.settimeout(10)
        proc = subprocess.Popen([sys.executable, "-c", REPLY_PROBE,
                                 str(bystander.getsockname()[1])], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            client.sendto(b"hello", ("127.0.0.1", port))
            assert client.recv(100) == b"reply"
            assert proc.stdout.readline().strip() == "other denied"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


@pytest.mark.parametrize("policy", [None, "", "loopback=2;allow=*", "allow=*;bogus=1",
                                    "allow=10.0.0.0/40", "loopback=1;allow=not-an-ip"])
def test_guard_fails_closed_on_a_bad_policy(guard, policy):
    assert probe(guard, policy, "connect,203.0.113.1,443", "connect,127.0.0.1,80") == \
        ["denied", "denied"]


def test_policy_strings():
    default = netguard.policy(Network(), nameservers=["10.255.255.53"])
    assert default == "loopback=0;dns=10.255.255.53;deny=10.0.2.2/32;allow=*"
    allowed = netguard.policy(Network(allow_host_loopback=True,
                                      allow_hosts=("192.0.2.0/24", "localhost")),
                              nameservers=[])
    assert allowed == "loopback=1;dns=;allow=127.0.0.1/32,192.0.2.0/24"


def test_policy_name_that_does_not_resolve():
    with pytest.raises(EngineError, match="cannot resolve it here"):
        netguard.policy(Network(allow_hosts=("no-such-host.invalid",)), nameservers=[])


def test_host_nameservers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver ::1\nsearch x\n"
                    "nameserver bogus\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n"
                    "nameserver 9.9.9.9\n")
    assert netguard.host_nameservers(str(conf)) == ["127.0.0.53", "1.1.1.1", "8.8.8.8"]
    assert netguard.host_nameservers(str(tmp_path / "missing")) == []
