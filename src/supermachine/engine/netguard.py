"""The host-side egress guard for passt (netguard.c): building it and writing its policy.

passt has no filtering of its own, and its ``--no-map-gw`` does not stop a guest that
hand-crafts packets to 127.0.0.1, so every networked VM's passt runs with this LD_PRELOAD
library, which refuses the socket calls that would reach a forbidden destination. It is
compiled once per source version into the home's guest cache (a C compiler is needed the
first time, like the guest init at install time).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from ..errors import EngineError
from .net import GATEWAY, Network, parse_allow_host
from .preload import ensure_guard

MAX_RESOLVED = 64  # addresses taken from one --allow-host name
MAX_NAMESERVERS = 3  # what glibc itself uses from resolv.conf


def ensure_netguard(cache: Path) -> Path:
    """The compiled guard, built into ``cache`` on first use (keyed by its source)."""
    return ensure_guard("netguard", cache, "; or run with --network none")


def host_nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """IPv4 resolvers passt forwards the guest's DNS queries to (it reads the same file)."""
    out = []
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return out
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if ip.version == 4 and len(out) < MAX_NAMESERVERS:
                out.append(str(ip))
    return out


def resolve_allow(items: tuple[str, ...]) -> list[str]:
    """``--allow-host`` entries as IPv4 networks; names are resolved here, once, at launch."""
    nets: list[str] = []
    for item in items:
        parsed = parse_allow_host(item)
        if not isinstance(parsed, str):
            nets.append(str(parsed))
            continue
        try:
            infos = socket.getaddrinfo(parsed, None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise EngineError(f"--allow-host {item}: cannot resolve it here ({e.strerror}); "
                              "give its address or network instead") from None
        for info in infos[:MAX_RESOLVED]:
            nets.append(f"{info[4][0]}/32")
    return sorted(set(nets))


def policy(network: Network, nameservers: list[str] | None = None) -> str:
    """The SM_NETGUARD value for ``network`` (format in netguard.c)."""
    dns = host_nameservers() if nameservers is None else nameservers
    allow = "*" if not network.allow_hosts else ",".join(resolve_allow(network.allow_hosts))
    if not allow:
        allow = "255.255.255.255/32"  # nothing resolvable: allow no real destination
    # Without loopback access the gateway (which passt maps to the host) leads nowhere, not
    # even to a machine of that address on the host's network.
    deny = "" if network.allow_host_loopback else f"deny={GATEWAY}/32;"
    return (f"loopback={int(network.allow_host_loopback)};dns={','.join(dns)};{deny}"
            f"allow={allow}")
