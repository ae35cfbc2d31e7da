"""Tell local image sources from registry references, and open the local ones.

Local sources:
  * ``oci:DIR[:TAG]``, ``oci-archive:PATH[:TAG]``, ``docker-archive:PATH[:REPO:TAG]``
    (skopeo's transport syntax);
  * a plain path to an OCI layout directory or an image tarball, whose format is sniffed
    from its content. A plain word is treated as a path only when it looks like one
    (starts with ``/``, ``.`` or ``~``) or names an existing file or directory and
    contains a ``/`` or ends in ``.tar``: ``alpine`` or ``alpine:3.20`` stays a registry
    reference even if a directory of that name happens to exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from .archive import TarMembers, open_docker_archive, open_oci_archive, sniff_archive
from .layout import open_layout
from .model import Image

TRANSPORTS = ("oci", "oci-archive", "docker-archive")
_TAR_MAGIC_OFFSET = 257


@dataclass(frozen=True)
class LocalSource:
    kind: str  # "oci" | "oci-archive" | "docker-archive" | "auto" (sniff the content)
    path: Path
    tag: str | None  # TAG for oci/oci-archive, REPO:TAG for docker-archive
    text: str  # what the user typed


def parse_source(ref: str, cwd: str | None = None) -> LocalSource | None:
    """A LocalSource for local references, None for registry references. Relative paths
    are looked up (and kept) relative to ``cwd`` when given, else to this process's."""
    def here(path: str) -> str:
        return os.path.join(cwd, os.path.expanduser(path)) if cwd else path

    transport, sep, rest = ref.partition(":")
    if sep and transport in TRANSPORTS:
        if not rest:
            raise ImageError(f"{ref!r} names no path; use {transport}:PATH")
        path, tag = _split_existing(rest, here)
        return LocalSource(transport, Path(here(path)).expanduser(), tag, ref)
    if ref.startswith(("/", ".", "~")):
        return LocalSource("auto", Path(here(ref)).expanduser(), None, ref)
    if ("/" in ref or ref.endswith(".tar")) and os.path.exists(here(ref)):
        return LocalSource("auto", Path(here(ref)), None, ref)
    return None


def _split_existing(rest: str, here=lambda p: p) -> tuple[str, str | None]:
    """Split ``PATH[:TAG]`` where PATH itself may contain colons: the longest existing path
    wins; with none existing, the first colon separates."""
    cuts = [i for i, c in enumerate(rest) if c == ":"]
    for i in reversed([len(rest), *cuts]):
        if os.path.exists(os.path.expanduser(here(rest[:i]))):
            return rest[:i], (rest[i + 1 :] or None)
    if cuts:
        return rest[: cuts[0]], rest[cuts[0] + 1 :] or None
    return rest, None


def open_local(src: LocalSource, *, platform: str | None = None) -> Image:
    path = src.path
    if not path.exists():
        raise ImageError(f"{path} does not exist; give a path to an OCI layout or image archive")
    kind = src.kind
    if kind == "auto":
        kind = "oci" if path.is_dir() else "archive"
    if kind == "oci":
        if not path.is_dir():
            raise ImageError(f"{path} is not a directory; use oci-archive: for a tarball")
        return open_layout(path, src.tag, source=src.text, platform=platform)
    members = _archive(path)
    if kind == "archive":
        kind = sniff_archive(members)
    if kind == "oci-archive":
        return open_oci_archive(members, src.tag, source=src.text, platform=platform)
    return open_docker_archive(members, src.tag, source=src.text, platform=platform)


def _archive(path: Path) -> TarMembers:
    try:
        with open(path, "rb") as f:
            head = f.read(_TAR_MAGIC_OFFSET + 8)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from e
    if head.startswith(b"\x1f\x8b") or head.startswith(b"\x28\xb5\x2f\xfd"):
        raise ImageError(f"{path} is compressed; decompress it first (e.g. gunzip / zstd -d)")
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] != b"ustar":
        raise ImageError(f"{path} is not a tar archive, OCI layout or image archive")
    return TarMembers(path)
