"""How an automatic snapshot is made: boot the image's machine with its RAM in a file, warm
the guest's page cache with the image's default command, save the device state.

Every automatic snapshot's key holds `bake_version()`, a digest of this procedure's code
(`BAKE_SOURCES`: this module, the pre-read and the ELF reader it uses, and the snapshot
writer that punches holes and publishes). Changing any of them makes the next VM bake a new
snapshot, and `supermachine prune` removes the old ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..agent.client import AgentClient, GuestFileError
from ..codeversion import code_version

log = logging.getLogger(__name__)

BAKE_SOURCES = ("runtime/bake.py", "runtime/prefetch.py", "images/elf.py",
                "runtime/snapshot.py")
PREFETCH_SECONDS = 10.0  # bound on warming a snapshot's page cache (~0.5 s for python)


def bake_version() -> str:
    return code_version(*BAKE_SOURCES)


def bake_auto(launch: Callable[..., tuple[Any, AgentClient]], config: Any, workload: Any,
              memory_mib: int, mem: Path, state: Path) -> None:
    """Boot ``config`` with its RAM in ``mem`` (shared, so the saved state leaves RAM out),
    pre-read ``workload`` (the image's default command, resolved; None: nothing to read),
    and save the device state to ``state``.

    ``launch(config, personal=False)`` starts the machine without the asking VM's hostname
    and machine id: the snapshot is shared by every VM of this configuration. ``config``
    publishes no ports (the VM asking for the bake may hold them).
    """
    config = dataclasses.replace(config, memory_file=mem, memory_shared=True)
    machine, client = launch(config, personal=False)
    try:
        if workload is not None:
            prefetch_default_command(client, workload, memory_mib)
        machine.save_state(state)
    finally:
        client.close()
        machine.kill()


def prefetch_default_command(client: AgentClient, work: Any, memory_mib: int) -> None:
    """Cache the image's default program and its libraries in the guest before a bake,
    so restored VMs start it without reading the squashfs (see prefetch.py)."""
    from . import prefetch

    path_env = next((e[5:] for e in work.env if e.startswith("PATH=")), "")
    deadline = time.monotonic() + PREFETCH_SECONDS

    def read(path: str, max_size: int) -> bytes | None:
        if time.monotonic() > deadline:
            return None
        try:
            return client.read_file(path, max_size=max_size)
        except GuestFileError:
            return None

    t0 = time.monotonic()
    # An eighth of guest RAM at most: the cache must leave the workload room.
    budget = min(prefetch.MAX_BYTES, (memory_mib << 20) // 8)
    fetched = prefetch.prefetch_command(read, work.argv, path_env=path_env,
                                        cwd=work.cwd, max_bytes=budget)
    log.debug("prefetched %s in %.0f ms", fetched, (time.monotonic() - t0) * 1000)
