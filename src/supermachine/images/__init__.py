"""Images: find an image (local layout/archive or registry), flatten it, build its rootfs.

Public surface: ``open_image`` resolves what the user typed into an ``Image`` (config and
verified layer locations), ``ensure_rootfs`` turns it into a cached squashfs file.
"""

from __future__ import annotations

from ..home import Home
from .model import Image, ImageConfig, Layer

__all__ = ["Image", "ImageConfig", "Layer", "open_image", "ensure_rootfs", "empty_image"]


def open_image(ref: str, home: Home, *, pull: str = "never", platform: str | None = None,
               insecure_registries: tuple[str, ...] = (), ca_file: str | None = None,
               progress: object = None) -> Image:
    """Resolve ``ref``: a local OCI layout / oci-archive / docker-archive as it is, else a
    registry image by docker's ``--pull`` policy (``never``, the default here: the local
    store only, no network; ``missing``; ``always``). The one way images are opened."""
    from .source import open_local, parse_source

    src = parse_source(ref)
    if src is not None:
        return open_local(src, platform=platform)
    from .pull import ensure_image  # imported lazily (the network stack)

    return ensure_image(ref, home, pull, platform=platform,
                        insecure_registries=insecure_registries, ca_file=ca_file,
                        progress=progress)


def ensure_rootfs(image: Image, home: Home):
    """The pathlib.Path of the image's squashfs root filesystem, built once and cached by
    config digest. (pathlib is not imported here: see home.py.)"""
    from .rootfs import ensure_rootfs as _ensure

    return _ensure(image, home)


#: the config of `empty_image`: its digest keys the one root filesystem (and automatic
#: snapshot) that every VM with a host directory as its root starts from
_EMPTY_CONFIG = b'{"supermachine":"an empty image: the root is a host directory"}'


def empty_image(name: str) -> Image:
    """An image with no layers and no defaults, for a VM whose root filesystem is a host
    directory (an OCI bundle's): the machine boots on its empty root, then takes the
    directory as its root (runtime/volumes.py)."""
    import hashlib
    import os

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    return Image(source=name, name=name, manifest_digest=None, layers=(), os="linux",
                 config_digest="sha256:" + hashlib.sha256(_EMPTY_CONFIG).hexdigest(),
                 config=ImageConfig(), architecture=arch)
