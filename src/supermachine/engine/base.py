"""The engine interface: what the VM layer needs from a virtual machine monitor.

Nothing above engine/ knows which monitor runs a VM. Booting and restoring are one path:
a `MachineConfig` says where the machine's state comes from (a kernel boot, or a saved
device state plus a memory file), and `Engine.launch` starts it.
"""

from __future__ import annotations

import abc
import socket
from dataclasses import dataclass
from pathlib import Path

from . import net
from .net import Network


@dataclass(frozen=True)
class Share:
    """A host directory the guest can mount over 9p by ``tag`` (its virtio-9p device)."""

    tag: str
    path: Path
    readonly: bool = True
    #: QEMU's 9p security model: "none" (a user's directory: files are the host user's, with
    #: the guest's modes) or "mapped-xattr" (a named volume: the guest's owners, modes and
    #: special files live in user.virtfs.* xattrs of plain 0600/0700 host files)
    model: str = "none"


@dataclass(frozen=True)
class Disk:
    """A raw disk image the guest sees as a virtio-blk device with serial ``serial`` (a
    size-capped named volume: an ext4 image). ``path`` None: an empty slot (a zero-sized
    null device), so that every machine has the same devices."""

    serial: str
    path: Path | None = None
    readonly: bool = True


@dataclass(frozen=True)
class MachineConfig:
    kernel: Path
    initrd: Path
    cmdline: tuple[str, ...]
    rootfs: Path  # read-only disk image (the image's squashfs), the guest's /dev/vda
    memory_mib: int = 512
    cpus: int = 1
    accel: str = "tcg"
    # Snapshots: guest RAM lives in this file. Shared mapping while baking (so the file holds
    # RAM when we save); private copy-on-write mapping when restoring (clones share pages).
    memory_file: Path | None = None
    memory_shared: bool = False
    # Restore: load device state from this file instead of booting the kernel.
    incoming_state: Path | None = None
    # The incoming state is a full stream with RAM in it (a VM whose RAM was not in a shared
    # file), rather than device state alone.
    incoming_full: bool = False
    verbose: bool = False
    # Guest network (engine/net.py): None or mode "none" means no interface at all. The NIC
    # is part of the machine (and so of snapshots); its forwards are not (see net.py).
    network: Network | None = None
    # Networked machines: passt runs with this LD_PRELOAD guard and SM_NETGUARD policy
    # (engine/netguard.py); a networked machine without them is refused (fail closed).
    netguard: Path | None = None
    netguard_policy: str = ""
    # Host directories shared into the guest (volumes). Every machine has the same number of
    # share devices, so a snapshot baked without volumes restores into a machine with them:
    # unused slots export an empty read-only directory. Only the devices are part of the
    # machine; which directories they export is not (each launch names its own).
    shares: tuple[Share, ...] = ()
    # Disk images (size-capped named volumes), slots like the shares: every machine has the
    # same number; a restored guest re-probes a slot before mounting it (its size changed).
    disks: tuple[Disk, ...] = ()
    # Run the monitor in its jail (engine/jail.py): namespaces of its own, only this
    # machine's files visible.
    jail: bool = False
    # A machine with shares runs QEMU with this LD_PRELOAD guard (engine/fsguard.c); one
    # without it is refused (fail closed).
    fsguard: Path | None = None


class Machine(abc.ABC):
    """A running virtual machine; owns its monitor process and every fd it was given."""

    #: host end of the agent channel (the guest's `sm.agent` port)
    agent: socket.socket
    #: "ADDR/PREFIX,GW,MTU,MAC" the guest gives eth0 at HELLO (a NIC joined to another
    #: network namespace, engine/tap.py), or None: the boot's own set-up stands
    guest_network: str | None = None

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the monitor to exit; its exit status, or None on timeout."""

    @abc.abstractmethod
    def poll(self) -> int | None:
        """Exit status if the monitor has exited, else None."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the machine now and release everything it holds. Idempotent."""

    @abc.abstractmethod
    def kill_now(self) -> bool:
        """Kill the monitor process and return at once, taking no lock and releasing
        nothing: safe inside a signal handler. Whoever waits on the machine then sees it
        exit and unwinds, calling `kill`. True if it was still running."""

    @abc.abstractmethod
    def console_tail(self) -> str:
        """The last lines the guest console and the monitor printed (for error messages)."""

    @abc.abstractmethod
    def pause(self) -> None: ...

    @abc.abstractmethod
    def resume(self) -> None: ...

    @abc.abstractmethod
    def save_state(self, path: Path) -> None:
        """Save device state (not RAM, which lives in the shared memory file) to ``path``.

        The machine must have been launched with a shared memory file; it is stopped when
        this returns, with its RAM in that file consistent with the saved state.
        """

    @abc.abstractmethod
    def save_full(self, path: Path) -> None:
        """Save device state and all of RAM to ``path``; the machine then runs on."""

    @abc.abstractmethod
    def wait_incoming(self, timeout: float) -> None:
        """Wait until a machine launched with ``incoming_state`` has loaded it."""

    @abc.abstractmethod
    def set_forwards(self, forwards: tuple[net.PortForward, ...]) -> None:
        """Publish exactly ``forwards`` (host ports resolved, see `Engine.claim_host_ports`)
        from now on; connections open through the VM's network may be cut."""


class Engine(abc.ABC):
    name: str

    @abc.abstractmethod
    def launch(self, config: MachineConfig) -> Machine: ...

    @abc.abstractmethod
    def version(self) -> str:
        """The monitor's version, for people."""

    @abc.abstractmethod
    def identity(self) -> str:
        """Identifies the monitor build and machine layout; part of snapshot fingerprints."""

    @abc.abstractmethod
    def claim_host_ports(self, forwards: tuple[net.PortForward, ...]
                         ) -> tuple[net.PortForward, ...]:
        """``forwards`` with every host port checked free and host port 0 replaced by a
        free one, before a machine publishes them."""
