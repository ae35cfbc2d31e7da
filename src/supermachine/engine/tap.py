"""A VM's NIC inside another network namespace: an OCI container's, made by its engine.

An engine (podman's netavark or CNI, containerd's CNI) gives each container a network
namespace with one interface (a veth into a bridge) that has the container's address, and
points the host's port mappings (``podman run -p``) at that address. Like Kata Containers,
we make a tap device in that namespace for QEMU and join the two with traffic-control
redirects, both ways (every frame in on the veth goes out of the tap and back): the guest
then takes the veth's address, MAC, MTU and default route, and is the container on that
network, port mappings included. The namespace's own stack sees nothing more.

Needs CAP_NET_ADMIN in the namespace (a rootful engine's runtime has it) and iproute2's
``tc`` and ``ip``. The tap goes away when QEMU closes its fd; the redirects go with the
namespace, and are replaced when the same namespace gets a new VM.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass

from ..errors import EngineError
from . import netns as netns_mod

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
TAP_NAME = "smtap0"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
COMMAND_TIMEOUT = 10.0


@dataclass(frozen=True)
class TapLink:
    fd: int  # the tap, for QEMU (-netdev tap,fd=)
    interface: str  # the namespace's interface it is joined to
    address: str  # ADDR/PREFIX
    gateway: str
    mtu: int
    mac: str

    @property
    def guest_setup(self) -> str:
        """What the guest agent sets eth0 to (HELLO's NET field)."""
        return f"{self.address},{self.gateway},{self.mtu},{self.mac}"


def open_link(netns: str) -> TapLink:
    """Make the tap in ``netns`` and join it to the interface of its default route."""
    for tool in ("ip", "tc", "nsenter"):
        if _tool(tool) is None:
            raise EngineError(f"joining a network namespace needs `{tool}` (iproute2, "
                              "util-linux)")
    iface, gateway = _default_route(netns)
    info = _interface(netns, iface)
    fd = _open_tap(netns)
    try:
        _run(netns, "ip", "link", "set", TAP_NAME, "mtu", str(info["mtu"]), "up")
        # One tc process for all of it (-force: go on past a missing old qdisc).
        script = "".join(
            f"qdisc del dev {a} ingress\nqdisc add dev {a} ingress\n"
            f"filter add dev {a} parent ffff: protocol all u32 match u8 0 0 "
            f"action mirred egress redirect dev {b}\n"
            for a, b in ((iface, TAP_NAME), (TAP_NAME, iface)))
        _run(netns, "tc", "-force", "-batch", "-", stdin=script, check_lines=True)
    except BaseException:
        os.close(fd)
        raise
    return TapLink(fd, iface, info["address"], gateway, info["mtu"], info["mac"])


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin")


def _run(netns: str, *argv: str, stdin: str | None = None, check_lines: bool = False) -> str:
    """``argv`` inside ``netns``; its output. ``check_lines``: ``stdin`` is a batch whose
    only allowed failures are its deletions ("del" lines: of what may not be there; tc
    -force reports each failed line as "Command failed -:N" and goes on)."""
    cmd = [_tool("nsenter") or "nsenter", f"--net={netns}", "--", _tool(argv[0]) or argv[0],
           *argv[1:]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                           input=stdin, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"network namespace {netns}: {' '.join(argv[:3])}: {e}") from None
    failed = p.returncode != 0
    if check_lines and stdin is not None:
        deletions = {str(n) for n, line in enumerate(stdin.splitlines(), 1)
                     if " del " in f" {line} "}
        failed = any(line.startswith("Command failed") and
                     line.rsplit(":", 1)[-1].strip() not in deletions
                     for line in p.stderr.splitlines())
    if failed:
        raise EngineError(f"network namespace {netns}: {' '.join(argv)}: "
                          f"{(p.stderr.strip() or p.stdout.strip())[:300]}")
    return p.stdout


def default_route(netns: str) -> tuple[str, str] | None:
    """The interface and gateway of ``netns``'s IPv4 default route; None when it has none
    (an engine's `--network none`: loopback only)."""
    if not os.path.exists(netns):
        raise EngineError(f"network namespace {netns}: No such file or directory")
    routes = _json(_run(netns, "ip", "-j", "-4", "route", "show", "default"), netns)
    for r in routes:
        if isinstance(r, dict) and isinstance(r.get("dev"), str) and \
                isinstance(r.get("gateway"), str):
            return r["dev"], str(ipaddress.IPv4Address(r["gateway"]))
    return None


def _default_route(netns: str) -> tuple[str, str]:
    route = default_route(netns)
    if route is None:
        raise EngineError(f"network namespace {netns} has no IPv4 default route to join")
    return route


def _interface(netns: str, iface: str) -> dict:
    """``iface``'s first IPv4 address (ADDR/PREFIX), MAC and MTU."""
    links = _json(_run(netns, "ip", "-j", "link", "show", "dev", iface), netns)
    link = links[0] if links and isinstance(links[0], dict) else {}
    mac, mtu = str(link.get("address", "")), link.get("mtu")
    if not _MAC.match(mac) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise EngineError(f"network namespace {netns}: {iface} is not an Ethernet link")
    for entry in _json(_run(netns, "ip", "-j", "-4", "addr", "show", "dev", iface), netns):
        for a in entry.get("addr_info") or [] if isinstance(entry, dict) else []:
            if isinstance(a, dict) and a.get("family") == "inet":
                try:
                    address = ipaddress.IPv4Interface(f"{a.get('local')}/{a.get('prefixlen')}")
                except ValueError:
                    continue
                return {"address": str(address), "mac": mac, "mtu": mtu}
    raise EngineError(f"network namespace {netns}: {iface} has no IPv4 address")


def _json(text: str, netns: str) -> list:
    try:
        obj = json.loads(text or "[]")
    except ValueError:
        raise EngineError(f"network namespace {netns}: unreadable `ip -j` output") from None
    return obj if isinstance(obj, list) else []


def _open_tap(netns: str) -> int:
    """The tap's fd, made from a thread that joined ``netns`` (setns is per thread, and the
    tap belongs to the namespace of whoever makes it); the thread then ends."""
    box: list[int | BaseException] = []

    def make() -> None:
        try:
            netns_mod.enter_path(netns)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF,
                            struct.pack("16sH22x", TAP_NAME.encode(), IFF_TAP | IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            box.append(fd)
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=make, name="tap-in-netns")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        e = box[0]
        raise EngineError(f"cannot make a tap device in {netns}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return box[0]
