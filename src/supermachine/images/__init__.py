"""Images: find an image (local layout/archive or registry), flatten it, build its rootfs.

Public surface: ``open_image`` resolves what the user typed into an ``Image`` (config and
verified layer locations), ``ensure_rootfs`` turns it into a cached squashfs file.
"""

from __future__ import annotations

from pathlib import Path

from ..home import Home
from .model import Image, ImageConfig, Layer

__all__ = ["Image", "ImageConfig", "Layer", "open_image", "ensure_rootfs"]


def open_image(ref: str, home: Home, *, platform: str | None = None) -> Image:
    """Resolve ``ref``: a local OCI layout / oci-archive / docker-archive, else a registry pull."""
    from .source import open_local, parse_source

    src = parse_source(ref)
    if src is not None:
        return open_local(src, platform=platform)
    from .pull import open_pulled  # written separately; imported lazily (network stack)

    return open_pulled(ref, home, platform=platform)


def ensure_rootfs(image: Image, home: Home) -> Path:
    """Path of the image's squashfs root filesystem, built once and cached by config digest."""
    from .rootfs import ensure_rootfs as _ensure

    return _ensure(image, home)
