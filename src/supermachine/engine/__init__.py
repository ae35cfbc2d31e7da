"""The engine: everything the layers above use to run a machine (`base.Engine`,
`base.Machine`, `base.MachineConfig`), and `default_engine`, the one place above this
folder that names an implementation (QEMU's microvm: qemu.py)."""

from __future__ import annotations

from .base import Engine


def default_engine() -> Engine:
    from .qemu import QemuEngine

    return QemuEngine()
