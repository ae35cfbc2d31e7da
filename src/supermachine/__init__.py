"""supermachine: run any OCI/Docker image as an isolated microVM.

Public API only; everything else is an implementation detail.
"""

from __future__ import annotations

from .errors import (
    AgentError,
    Error,
    ExecTimeout,
    ImageError,
    RegistryError,
    SnapshotError,
    VMError,
)

__all__ = [
    "Error",
    "ImageError",
    "RegistryError",
    "AgentError",
    "VMError",
    "ExecTimeout",
    "SnapshotError",
    "VM",
    "ExecResult",
    "Pool",
    "VMSpec",
    "WorkloadSpec",
    "connect",
    "aio",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so `import supermachine` (and the CLI's start-up) stays cheap.
    if name in ("VM", "ExecResult"):
        from .runtime import vm

        return getattr(vm, name)
    if name in ("VMSpec", "WorkloadSpec"):
        from . import spec

        return getattr(spec, name)
    if name == "Pool":
        from .runtime.pool import Pool

        return Pool
    if name == "connect":  # a client of `supermachine serve`
        from .service.client import connect

        return connect
    if name == "aio":
        import importlib

        return importlib.import_module(".aio", __name__)
    raise AttributeError(name)
