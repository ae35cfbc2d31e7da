"""OCI image layouts (directories) and the resolution of an index/manifest into an ``Image``.

Blob access goes through ``BlobStore``: a directory of ``sha256/<hex>`` files (an OCI
layout's ``blobs/sha256`` or the home store ``home.blobs``, which share that layout) or the
members of an oci-archive (archive.py). ``resolve_image`` works on any of them, so the
registry puller can resolve images out of the home store with the same code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..errors import ImageError
from . import manifest as mf
from .model import Image, Layer
from .verify import verify_bytes

REF_NAME = "org.opencontainers.image.ref.name"
MAX_NESTING = 2  # index -> index -> manifest at most


class BlobStore(Protocol):
    def locate(self, digest: str, size: int) -> tuple[Path, int]:
        """(file, offset) of a blob of exactly ``size`` bytes; ImageError if absent/wrong size."""
        ...

    def read_blob(self, digest: str, size: int, cap: int, what: str) -> bytes:
        """A small blob's verified bytes."""
        ...


class DirBlobs:
    """Blobs as files ``<dir>/<hex>`` (``dir`` is a layout's ``blobs/sha256`` or home.blobs)."""

    def __init__(self, sha256_dir: Path) -> None:
        self.dir = sha256_dir

    def locate(self, digest: str, size: int) -> tuple[Path, int]:
        path = self.dir / digest.partition(":")[2]
        try:
            st = path.stat()
        except OSError as e:
            raise ImageError(f"blob {digest} is missing from {self.dir}: {e.strerror}") from e
        if st.st_size != size:
            raise ImageError(
                f"blob {digest} is {st.st_size} bytes, its descriptor says {size}; "
                "the image is corrupt"
            )
        return path, 0

    def read_blob(self, digest: str, size: int, cap: int, what: str) -> bytes:
        if size > cap:
            raise ImageError(f"{what} is {size} bytes, over the {cap}-byte limit")
        path, _ = self.locate(digest, size)
        try:
            with open(path, "rb") as f:
                data = f.read(cap + 1)
        except OSError as e:
            raise ImageError(f"cannot read {what} {digest}: {e.strerror}") from e
        return verify_bytes(data, digest, size, what)


def select_tagged(entries: list[mf.Descriptor], tag: str | None, where: str) -> mf.Descriptor:
    """The index.json entry for ``tag`` (matched against the ref.name annotation)."""
    if tag is not None:
        for d in entries:
            name = d.annotation(REF_NAME)
            if name is not None and (name == tag or name.endswith(":" + tag)):
                return d
    elif len(entries) == 1:
        return entries[0]
    else:
        for d in entries:
            name = d.annotation(REF_NAME) or ""
            if name == "latest" or name.endswith(":latest"):
                return d
    tags = sorted(n for d in entries if (n := d.annotation(REF_NAME)))
    shown = ", ".join(tags[:20]) or "no tags"
    if tag is None:
        raise ImageError(f"{where} holds several images ({shown}); name one as {where}:TAG")
    raise ImageError(f"{where} has no image tagged {tag!r} (it has: {shown})")


def resolve_image(
    blobs: BlobStore,
    desc: mf.Descriptor,
    *,
    source: str,
    name: str,
    platform: str | None,
    depth: int = 0,
) -> Image:
    """Follow ``desc`` (an index or a manifest) to a runnable ``Image`` with located layers."""
    if desc.media_type in mf.INDEX_TYPES:
        if depth >= MAX_NESTING:
            raise ImageError("image indexes are nested too deeply; the image is corrupt")
        data = blobs.read_blob(desc.digest, desc.size, mf.MAX_MANIFEST_BYTES, "image index")
        chosen = mf.select_platform(mf.parse_index(data, desc.media_type), platform)
        return resolve_image(
            blobs, chosen, source=source, name=name, platform=platform, depth=depth + 1
        )
    if desc.media_type not in mf.MANIFEST_TYPES:
        raise ImageError(f"unsupported manifest media type {desc.media_type[:80]!r}")
    data = blobs.read_blob(desc.digest, desc.size, mf.MAX_MANIFEST_BYTES, "image manifest")
    manifest = mf.parse_manifest(data, desc.media_type)
    return image_from_manifest(
        blobs, manifest, source=source, name=name, manifest_digest=desc.digest, platform=platform
    )


def image_from_manifest(
    blobs: BlobStore,
    manifest: mf.Manifest,
    *,
    source: str,
    name: str,
    manifest_digest: str | None,
    platform: str | None,
) -> Image:
    cfg = manifest.config
    config_bytes = blobs.read_blob(cfg.digest, cfg.size, mf.MAX_CONFIG_BYTES, "image config")
    config, os_, arch = mf.parse_config(config_bytes)
    diff_ids = mf.parse_diff_ids(config_bytes)
    if len(diff_ids) != len(manifest.layers):
        raise ImageError(
            f"image config lists {len(diff_ids)} layers but the manifest {len(manifest.layers)}; "
            "the image is corrupt"
        )
    check_platform(os_, arch, platform)
    layers = []
    for d in manifest.layers:
        path, offset = blobs.locate(d.digest, d.size)
        layers.append(Layer(d.digest, d.media_type, d.size, path, offset))
    return Image(
        source=source,
        name=name,
        config_digest=cfg.digest,
        manifest_digest=manifest_digest,
        config=config,
        layers=tuple(layers),
        os=os_,
        architecture=arch,
    )


def check_platform(os_: str, arch: str, platform: str | None) -> None:
    if platform is None:
        return
    want = mf.parse_platform(platform)
    if (want.os, want.architecture) != (os_, arch):
        raise ImageError(f"image is for {os_}/{arch}, not the requested {want}")


def open_layout(path: Path, tag: str | None, *, source: str, platform: str | None) -> Image:
    """An image from an OCI image layout directory."""
    if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
        raise ImageError(f"{path} is not an OCI image layout (no oci-layout/index.json)")
    _check_layout_marker(_read_small(path / "oci-layout"), str(path))
    entries = mf.parse_index(_read_small(path / "index.json"))
    desc = select_tagged(entries, tag, f"oci:{path}")
    name = f"{os.path.basename(os.path.abspath(path))}:{tag or desc.annotation(REF_NAME) or ''}"
    blobs = DirBlobs(path / "blobs" / "sha256")
    return resolve_image(blobs, desc, source=source, name=name.rstrip(":"), platform=platform)


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(mf.MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from e
    if len(data) > mf.MAX_MANIFEST_BYTES:
        raise ImageError(f"{path} is over {mf.MAX_MANIFEST_BYTES} bytes; not an image layout")
    return data


def _check_layout_marker(data: bytes, where: str) -> None:
    obj = mf.load_json(data, f"{where} oci-layout", 4096)
    version = obj.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{where} has unsupported imageLayoutVersion {str(version)[:20]!r}")
