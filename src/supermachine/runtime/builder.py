"""The build recipe: from a `VMSpec` to everything a machine is made of, before it runs.

`prepare` resolves the spec once: a named snapshot's saved machine shape, the image (local
or pulled), its root filesystem, the guest kernel and initramfs, the accelerator, the
network (published host ports claimed, the egress guard built), the engine's
`MachineConfig`, and the `SnapshotKey` that says which snapshots fit this machine. Booting
and restoring then differ only in where the machine's state comes from (`Recipe.restore`),
the way Firecracker keeps its builder apart from the running VMM. Nothing here runs a
machine; `vm.py` does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import default_engine, jail, net
from ..engine.base import Engine, MachineConfig
from ..errors import SnapshotError, UsageError
from ..home import Home
from ..spec import VMSpec
from . import snapshot as snapshot_mod
from . import volumes
from .snapshot import Snapshot, SnapshotKey
from .volumes import VolumePlan

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snapshot:"


@dataclass(frozen=True)
class Recipe:
    spec: VMSpec  # as asked, with a named snapshot's machine shape applied
    image: Any  # images.Image
    accel: Any  # engine.accel.Accel
    engine: Engine
    config: MachineConfig  # how to boot it
    key: SnapshotKey  # which snapshots it can restore
    named: Snapshot | None  # the named snapshot it must start from, if any
    image_source: str  # the image reference (for a named snapshot: the one it was made of)
    volumes: VolumePlan  # shares and the guest's mount steps

    @property
    def ports(self) -> tuple[net.PortForward, ...]:
        """Published ports, host side claimed."""
        return self.config.network.ports if self.config.network is not None else ()

    def restore(self, snap: Snapshot) -> MachineConfig:
        """The same machine, its RAM mapped from ``snap`` (copy-on-write) and its device
        state loaded from it."""
        return dataclasses.replace(self.config, memory_file=snap.mem, memory_shared=False,
                                   incoming_state=snap.state)

    def unpublished(self) -> MachineConfig:
        """The same machine without published ports or shared directories, for helper
        machines (bakes, snapshot copies) that must not take the ports of the VM they work
        for, nor see its files."""
        network = self.config.network
        if network is not None:
            network = dataclasses.replace(network, ports=(), netns=None)
        return dataclasses.replace(self.config, network=network, shares=self.volumes.blank,
                                   disks=volumes.empty_disks())


def _jail(notice: Callable[[str], None]) -> bool:
    """Whether QEMU runs in its jail (engine/jail.py); where it cannot, one notice says why
    (or, with SUPERMACHINE_JAIL=required, an error)."""
    mode = jail.mode()
    if mode == "off":
        return False
    why = jail.unavailable()
    if why is None:
        return True
    if mode == "required":
        raise UsageError(f"QEMU cannot run in its jail: {why}")
    notice(f"QEMU runs without its jail (namespaces): {why}")
    return False


def prepare(spec: VMSpec, home: Home, *, verbose: bool = False,
            notice: Callable[[str], None] = log.info,
            progress: Any = None) -> Recipe:
    """Resolve ``spec`` into a `Recipe` (may pull an image and build its root filesystem)."""
    from ..engine.accel import choose
    from ..engine.preload import ensure_guard
    from ..guest.assets import ensure_guest_assets
    from ..images import empty_image, ensure_rootfs, open_image

    t0 = time.monotonic()
    vols = volumes.plan(spec, home)  # first: a bad mount fails before anything is pulled
    named = None
    source = spec.image
    if source.startswith(SNAPSHOT_PREFIX):
        named = snapshot_mod.open_named(home, source[len(SNAPSHOT_PREFIX):])
        source = named.meta["image_source"]
        saved_net = named.inputs.get("network")
        changes: dict[str, Any] = {"memory_mib": named.inputs["memory_mib"],
                                   "cpus": named.inputs["cpus"]}
        if isinstance(saved_net, list) and saved_net and saved_net[0] in net.MODES:
            changes["network"] = saved_net[0]  # the NIC is part of the saved machine
        spec = spec.replace(**changes)
    if spec.root_dir is not None:
        image = empty_image(spec.image)
    else:
        image = open_image(source, home, pull=spec.pull, platform=spec.platform,
                           insecure_registries=spec.insecure_registries, ca_file=spec.ca_file,
                           progress=progress)
    rootfs = ensure_rootfs(image, home)
    assets = ensure_guest_assets(home, kernel=spec.kernel_choice, initrd=_path(spec.initrd))
    if assets.note:
        notice(assets.note)
    accel = choose(None if spec.accel == "auto" else spec.accel)
    if not accel.hardware:
        notice(accel.reason)
    engine = default_engine()
    jailed = _jail(notice)
    network, guard = _network(spec, image, engine, home)
    if vols.uses_host_storage and assets.kind == "debian":
        raise UsageError("volumes need the supermachine kernel (Debian's cloud kernel has no "
                         "9p or ext4 built in); build it with `supermachine kernel build`")
    config = MachineConfig(
        kernel=assets.kernel, initrd=assets.initrd, cmdline=assets.cmdline, rootfs=rootfs,
        memory_mib=spec.memory_mib, cpus=spec.cpus, accel=accel.name, verbose=verbose,
        network=network, shares=vols.shares, disks=vols.disks, jail=jailed,
        fsguard=ensure_guard("fsguard", home.guest), **guard)
    key = SnapshotKey(
        guest=assets.fingerprint, image=image.config_digest,
        rootfs=SnapshotKey.rootfs_identity(rootfs), memory_mib=spec.memory_mib,
        cpus=spec.cpus, accel=accel.name, engine=engine.identity(),
        # The NIC is a device of the saved machine; forwards and allow-lists are not (each
        # launch starts its own passt), so restored VMs can publish any ports.
        network=(spec.network, *net.guest_cmdline(network)))
    if named is not None and (changed := named.mismatch(key.inputs())):
        raise SnapshotError(
            f"snapshot {named.name} no longer matches this machine (changed: "
            f"{', '.join(changed)}); make it again from a running VM")
    log.debug("recipe in %.0f ms", (time.monotonic() - t0) * 1000)
    return Recipe(spec, image, accel, engine, config, key, named, source, vols)


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _network(spec: VMSpec, image: Any, engine: Engine, home: Home
             ) -> tuple[net.Network, dict[str, object]]:
    """The network with its host ports checked free or picked, and the egress guard built
    and its policy resolved, all before anything boots."""
    from ..engine import netguard

    network = spec.network_config
    if not network.enabled:
        return network, {}
    forwards = network.ports
    if spec.publish_all:
        forwards += net.parse_exposed(image.config.exposed_ports)
    network = dataclasses.replace(network, ports=engine.claim_host_ports(tuple(forwards)))
    return network, {"netguard": netguard.ensure_netguard(home.guest),
                     "netguard_policy": netguard.policy(network)}
