"""Port specs, allow-list entries, the guest's network options and passt's command line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supermachine.engine import net
from supermachine.engine.base import MachineConfig
from supermachine.engine.net import Network, PortForward, parse_port_spec
from supermachine.engine.qemu import build_command
from supermachine.errors import UsageError

# ---- port specs ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec, want", [
    ("80", PortForward(80)),
    ("8080:80", PortForward(80, 8080)),
    ("0:80", PortForward(80, 0)),
    (":80", PortForward(80, 0)),
    ("127.0.0.1::80", PortForward(80, 0)),
    ("0.0.0.0:8080:80/udp", PortForward(80, 8080, "udp", "0.0.0.0")),
    ("192.168.1.5:53:5353/UDP", PortForward(5353, 53, "udp", "192.168.1.5")),
    ("8080:80/tcp", PortForward(80, 8080)),
    ("65535:1", PortForward(1, 65535)),
])
def test_port_spec_examples(spec, want):
    assert parse_port_spec(spec) == want


@pytest.mark.parametrize("spec, message", [
    ("", "invalid port spec"),
    ("0", "guest port 0"),
    ("80:0", "guest port 0"),
    ("70000:80", "use 1-65535"),
    ("8080:99999", "use 1-65535"),
    ("a:80", "invalid host port"),
    ("80/sctp", "invalid protocol"),
    ("80/", "invalid protocol"),
    ("1:2:3:4", "invalid port spec"),
    ("1.2.3:80:80", "invalid host address"),
    ("localhost:80:80", "invalid host address"),
    ("[::1]:80:80", "IPv6"),
    ("::1:80:80", "invalid port spec"),
    ("+80", "invalid guest port"),
    (" 80", "invalid guest port"),
    ("8" * 200, "invalid port spec"),
])
def test_port_spec_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_port_spec(spec)


ips = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))


@given(ip=st.none() | ips, host=st.none() | st.integers(0, 65535),
       guest=st.integers(1, 65535), proto=st.none() | st.sampled_from(["tcp", "udp", "TCP"]))
def test_port_spec_round_trip(ip, host, guest, proto):
    spec = str(guest)
    if host is not None or ip is not None:
        spec = f"{'' if host is None else host}:{spec}"
    if ip is not None:
        spec = f"{ip}:{spec}"
    if proto:
        spec += f"/{proto}"
    f = parse_port_spec(spec)
    assert f == PortForward(guest, host or 0, (proto or "tcp").lower(), ip or "127.0.0.1")
    # What ps shows parses back to the same forward.
    shown = str(f)
    addr, _, rest = shown.rpartition(":")
    hport, _, gport_proto = rest.partition("->")
    assert parse_port_spec(f"{addr}:{hport}:{gport_proto}") == f


@given(st.text(max_size=60))
def test_port_spec_never_fails_unexpectedly(text):
    try:
        f = parse_port_spec(text)
    except UsageError:
        return
    assert 1 <= f.guest_port <= 65535 and 0 <= f.host_port <= 65535
    assert f.proto in ("tcp", "udp")
    ipaddress.IPv4Address(f.host_ip)


def test_parse_ports_forms():
    assert net.parse_ports({8080: 80}) == (PortForward(80, 8080),)
    assert net.parse_ports({"0.0.0.0:8080": 80, "53/udp": 5353}) == (
        PortForward(80, 8080, host_ip="0.0.0.0"), PortForward(5353, 53, "udp"))
    assert net.parse_ports(["8080:80", 9000, PortForward(22)]) == (
        PortForward(80, 8080), PortForward(9000), PortForward(22))
    assert net.parse_ports(None) == ()
    with pytest.raises(UsageError, match="invalid port"):
        net.parse_ports([1.5])
    with pytest.raises(UsageError, match="invalid port"):
        net.parse_ports([True])


def test_duplicate_and_too_many_ports_are_refused():
    with pytest.raises(UsageError, match="published twice"):
        net.parse_ports(["8080:80", "8080:81"])
    with pytest.raises(UsageError, match="published twice"):
        net.parse_ports(["0.0.0.0:8080:80", "127.0.0.1:8080:81"])
    with pytest.raises(UsageError, match="published twice"):
        net.parse_ports(["127.0.0.1:8080:80", "0.0.0.0:8080:81"])
    assert len(net.parse_ports(["127.0.0.1:8080:80", "127.0.0.2:8080:81"])) == 2
    # Same port, other protocol or ephemeral: fine.
    assert len(net.parse_ports(["8080:80", "8080:80/udp", "80", "80"])) == 4
    with pytest.raises(UsageError, match="too many"):
        net.parse_ports([str(p) for p in range(1, net.MAX_PORTS + 2)])


def test_exposed_ports_become_ephemeral_forwards():
    assert net.parse_exposed(["80/tcp", "53/udp", "8080"]) == (
        PortForward(80), PortForward(53, proto="udp"), PortForward(8080))
    with pytest.raises(UsageError, match="exposes an invalid port"):
        net.parse_exposed(["http/tcp"])
    with pytest.raises(UsageError):
        net.parse_exposed(["99999/tcp"])


# ---- allow-list and network --------------------------------------------------------------

def test_allow_host_entries():
    assert net.parse_allow_host("10.1.0.0/16") == ipaddress.ip_network("10.1.0.0/16")
    assert net.parse_allow_host("10.1.2.3/16") == ipaddress.ip_network("10.1.0.0/16")
    assert net.parse_allow_host("1.2.3.4") == ipaddress.ip_network("1.2.3.4/32")
    assert net.parse_allow_host("PyPI.org.") == "pypi.org"
    for bad in ("", "bad host", "-x.com", "a..b", "x" * 300, "10.0.0.0/33"):
        with pytest.raises(UsageError, match="neither a CIDR nor a host name"):
            net.parse_allow_host(bad)
    with pytest.raises(UsageError, match="IPv6"):
        net.parse_allow_host("2001:db8::/32")


def test_network_validation():
    with pytest.raises(UsageError, match="unknown network mode"):
        Network("bridge")
    with pytest.raises(UsageError, match="no interface"):
        Network("none", ports=(PortForward(80),))
    with pytest.raises(UsageError, match="no interface"):
        Network("none", allow_host_loopback=True)
    assert not Network("none").enabled and Network().enabled


def test_guest_cmdline():
    assert net.guest_cmdline(Network("none")) == ()
    assert net.guest_cmdline(Network()) == ("sm.net=10.0.2.15/24,10.0.2.2,10.0.2.3,65520",)


# ---- passt and QEMU command lines ---------------------------------------------------------

def values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_passt_command_defaults():
    cmd = net.passt_command(Network(), passt="/usr/bin/passt", fd=9)
    assert cmd[0] == "/usr/bin/passt"
    assert values(cmd, "--fd") == ["9"]
    assert "--one-off" in cmd and "--foreground" in cmd and "--ipv4-only" in cmd
    # The gateway stays mapped to the host: the guard decides whether loopback is reachable
    # (and lets UDP replies reach clients on loopback).
    assert "--no-map-gw" not in cmd
    assert values(cmd, "--address") == ["10.0.2.15"]
    assert values(cmd, "--gateway") == ["10.0.2.2"]
    assert values(cmd, "--dns-forward") == ["10.0.2.3"]
    assert "--tcp-ports" not in cmd and "--udp-ports" not in cmd


def test_passt_command_ports_and_loopback():
    network = Network(ports=(PortForward(80, 8080), PortForward(53, 5353, "udp", "0.0.0.0")),
                      allow_host_loopback=True)
    cmd = net.passt_command(network, passt="passt", fd=3)
    assert "--no-map-gw" not in cmd
    assert values(cmd, "--tcp-ports") == ["127.0.0.1/8080:80"]
    assert values(cmd, "--udp-ports") == ["0.0.0.0/5353:53"]
    with pytest.raises(ValueError, match="resolve ephemeral"):
        net.passt_command(Network(ports=(PortForward(80),)), passt="passt", fd=3)


def config(**kw) -> MachineConfig:
    base = dict(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"),
                cmdline=("console=ttyS0",), rootfs=Path("/c/root.sqfs"))
    base.update(kw)
    return MachineConfig(**base)


def test_qemu_command_with_network():
    cmd = build_command(config(network=Network()), qemu="qemu", agent_fd=5, qmp_fd=6,
                        console_fd=7, net_fd=11)
    assert values(cmd, "-netdev") == ["stream,id=net0,server=on,addr.type=fd,addr.str=11"]
    assert f"virtio-net-device,netdev=net0,mac={net.GUEST_MAC}" in values(cmd, "-device")
    assert values(cmd, "-append") == [
        "console=ttyS0 sm.net=10.0.2.15/24,10.0.2.2,10.0.2.3,65520"]
    with pytest.raises(ValueError, match="passt socket"):
        build_command(config(network=Network()), qemu="qemu", agent_fd=5, qmp_fd=6,
                      console_fd=7)


@pytest.mark.parametrize("network", [None, Network("none")])
def test_qemu_command_without_network_has_no_nic(network):
    cmd = build_command(config(network=network), qemu="qemu", agent_fd=5, qmp_fd=6,
                        console_fd=7, net_fd=11)
    assert "-netdev" not in cmd
    assert not any("virtio-net" in d for d in values(cmd, "-device"))
    assert values(cmd, "-append") == ["console=ttyS0"]
