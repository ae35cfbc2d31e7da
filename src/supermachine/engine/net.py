"""Guest networking, pure part: port specs, the guest's addresses, passt's command line.

Why passt and not QEMU's built-in `-netdev user` (libslirp): QEMU 7.2 maps the slirp gateway
(10.0.2.2) to the host's 127.0.0.1 and has no option to turn that off (libslirp's
``disable_host_loopback`` is not exposed), and ``restrict=on`` cuts all outbound traffic
including DNS. passt runs unprivileged as a separate process (a crash or bug there is not in
the VMM), and every socket call it makes can be checked by our LD_PRELOAD guard
(engine/netguard.c), which is what keeps the guest off host loopback and enforces
``--allow-host`` (passt's own ``--no-map-gw`` is not enough: hand-made packets to 127.0.0.1
still got through, and it broke replies to UDP clients on loopback). Its forwards are given
when it starts, which suits snapshots: every launch, boot or restore, starts its own passt
with this VM's forwards, so restored VMs publish ports without a boot and the snapshot holds
nothing about them; publishing on a running VM restarts passt. Numbers: bench/bench_net.py.

Everything here is pure (no sockets, no processes) so it is unit- and property-tested.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError

# The guest's view, the same on every VM (each VM has its own passt, so nothing collides).
GUEST_ADDR = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"  # with allow_host_loopback, connections to it reach the host's 127.0.0.1
DNS = "10.0.2.3"  # passt forwards queries sent here to the host's resolver
GUEST_MAC = "52:54:00:12:34:56"
# passt's own MTU (what its DHCP would hand out). With Linux's default 1500, bulk transfers
# host->guest ran at 3.6 MB/s; with 65520, 16-25 MB/s (TCG, bench/bench_net.py).
GUEST_MTU = 65520

MODES = ("user", "none")
PROTOS = ("tcp", "udp")
MAX_PORTS = 1024  # forwards per VM: passt handles ranges, but we list each one
MAX_SPEC = 128  # characters of one -p spec

_PORT_RE = re.compile(r"[0-9]{1,5}\Z")


@dataclass(frozen=True, order=True)
class PortForward:
    """Host ``host_ip:host_port`` forwarded to the guest's ``guest_port`` (0: pick one)."""

    guest_port: int
    host_port: int = 0
    proto: str = "tcp"
    host_ip: str = "127.0.0.1"  # published ports stay on this machine unless asked

    def __str__(self) -> str:
        ip = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{ip}:{self.host_port}->{self.guest_port}/{self.proto}"

    def to_json(self) -> dict[str, object]:
        return {"host_ip": self.host_ip, "host_port": self.host_port,
                "guest_port": self.guest_port, "proto": self.proto}


def _port(text: str, what: str, spec: str, allow_zero: bool) -> int:
    if not _PORT_RE.match(text):
        raise UsageError(f"invalid {what} {text!r} in port spec {spec!r}: expected "
                         "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp], e.g. 8080:80")
    value = int(text)
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise UsageError(f"invalid {what} {text} in port spec {spec!r}: use 1-65535")
    return value


def parse_port_spec(spec: str) -> PortForward:
    """``[HOSTIP:][HOSTPORT:]GUESTPORT[/tcp|udp]`` as docker's ``-p`` takes it.

    A missing, empty or 0 host port means "any free port" (0 here, chosen at launch).
    """
    if not isinstance(spec, str) or not spec or len(spec) > MAX_SPEC:
        raise UsageError(f"invalid port spec {str(spec)[:40]!r}: expected "
                         "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]")
    body, slash, proto = spec.partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in PROTOS:
        raise UsageError(f"invalid protocol {proto!r} in port spec {spec!r}: use tcp or udp")
    if body.startswith("["):
        raise UsageError(f"IPv6 host address in {spec!r} is not supported; use an IPv4 one")
    parts = body.split(":")
    if len(parts) > 3:
        raise UsageError(f"invalid port spec {spec!r}: expected "
                         "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp], e.g. 8080:80")
    guest = _port(parts[-1], "guest port", spec, False)
    host = parts[-2] if len(parts) >= 2 else ""
    host_port = _port(host, "host port", spec, True) if host else 0
    host_ip = _host_ip(parts[0], spec) if len(parts) == 3 else "127.0.0.1"
    return PortForward(guest_port=guest, host_port=host_port, proto=proto, host_ip=host_ip)


def _host_ip(text: str, spec: str) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"invalid host address {text!r} in port spec {spec!r}") from None
    if ip.version != 4:
        # passt would bind it, but the guest has no IPv6 address to forward to
        raise UsageError(f"IPv6 host address in {spec!r} is not supported; use an IPv4 one")
    return str(ip)


def parse_ports(ports: Mapping[int | str, int] | Iterable[str | int | PortForward] | None
                ) -> tuple[PortForward, ...]:
    """The API's ``ports=``: ``{8080: 80}`` (host: guest), specs, guest ports or forwards."""
    if ports is None:
        return ()
    out: list[PortForward] = []
    if isinstance(ports, Mapping):
        for host, guest in ports.items():
            spec = str(host) if isinstance(host, str) and not host.isdigit() else None
            if spec is not None:  # {"127.0.0.1:8080": 80} or {"8080/udp": 53}
                base = parse_port_spec(f"{spec.split('/')[0]}:{int(guest)}"
                                       + (f"/{spec.split('/')[1]}" if "/" in spec else ""))
            else:
                base = parse_port_spec(f"{int(host)}:{int(guest)}")
            out.append(base)
    else:
        for item in ports:
            if isinstance(item, PortForward):
                out.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                out.append(parse_port_spec(str(item)))
            elif isinstance(item, str):
                out.append(parse_port_spec(item))
            else:
                raise UsageError(f"invalid port {item!r}: give 'HOST:GUEST' strings or ints")
    return check_forwards(out)


def check_forwards(forwards: Sequence[PortForward]) -> tuple[PortForward, ...]:
    if len(forwards) > MAX_PORTS:
        raise UsageError(f"too many published ports ({len(forwards)}); at most {MAX_PORTS}")
    seen: set[tuple[str, int, str]] = set()
    for f in forwards:
        if f.host_port == 0:
            continue
        key = (f.host_ip, f.host_port, f.proto)
        clash = key in seen or ("0.0.0.0", f.host_port, f.proto) in seen or (
            f.host_ip == "0.0.0.0" and any(k[1:] == key[1:] for k in seen))
        if clash:
            raise UsageError(f"host port {f.host_port}/{f.proto} is published twice")
        seen.add(key)
    return tuple(forwards)


def parse_exposed(exposed: Iterable[str]) -> tuple[PortForward, ...]:
    """The image's ExposedPorts (``"80/tcp"``) as forwards to ephemeral host ports (-P)."""
    out = []
    for item in exposed:
        port, _, proto = str(item).partition("/")
        if not port.isdigit():
            raise UsageError(f"image exposes an invalid port {item!r}; publish ports with -p")
        out.append(parse_port_spec(f"{port}/{proto or 'tcp'}"))
    return tuple(out)


def parse_allow_host(item: str) -> ipaddress.IPv4Network | str:
    """An ``--allow-host`` entry: a CIDR / address, or a DNS name (lower-cased)."""
    text = item.strip()
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    else:
        if net.version != 4:
            raise UsageError(f"--allow-host {item!r}: IPv6 is not supported (the guest has no "
                             "IPv6 route)")
        return net
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(
            re.fullmatch(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", lb) for lb in labels):
        raise UsageError(f"--allow-host {item!r} is neither a CIDR nor a host name")
    return name


@dataclass(frozen=True)
class Network:
    """How a VM is networked; ``ports`` are resolved (no 0 host ports) by the time it runs."""

    mode: str = "user"
    ports: tuple[PortForward, ...] = ()
    allow_host_loopback: bool = False
    allow_hosts: tuple[str, ...] = field(default=())
    #: a network namespace (its path) passt runs in: the VM's traffic leaves through it
    netns: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown network mode {self.mode!r}: use 'user' or 'none'")
        if self.mode == "none" and (self.ports or self.allow_hosts or self.allow_host_loopback):
            raise UsageError("network 'none' has no interface: it cannot publish ports or "
                             "allow hosts")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def guest_cmdline(net: Network) -> tuple[str, ...]:
    """Kernel command line words telling sm-init how to set up eth0 (none: no interface)."""
    if not net.enabled:
        return ()
    return (f"sm.net={GUEST_ADDR}/{GUEST_PREFIX},{GATEWAY},{DNS},{GUEST_MTU}",)


def passt_command(net: Network, *, passt: str, fd: int) -> list[str]:
    """passt serving one VM over the connected socket ``fd``; it quits when QEMU goes.

    ``net.ports`` must be resolved (no host port 0): passt cannot report what it picked.
    """
    cmd = [passt, "--foreground", "--quiet", "--one-off", "--fd", str(fd), "--ipv4-only",
           "--address", GUEST_ADDR, "--netmask", str(GUEST_PREFIX), "--gateway", GATEWAY,
           # Queries to DNS go to the host's resolvers (from its /etc/resolv.conf). passt
           # in Debian 12 stops forwarding when also given --dns, so there is no override.
           "--dns-forward", DNS,
           # The guest is configured by sm-init from the kernel command line; no DHCP/NDP
           # chatter, and nothing in the guest can ask passt for more.
           "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra"]
    tcp = [f for f in net.ports if f.proto == "tcp"]
    udp = [f for f in net.ports if f.proto == "udp"]
    for flag, group in (("--tcp-ports", tcp), ("--udp-ports", udp)):
        for f in group:
            if f.host_port == 0:
                raise ValueError("resolve ephemeral host ports before starting passt")
            cmd += [flag, f"{f.host_ip}/{f.host_port}:{f.guest_port}"]
    return cmd
