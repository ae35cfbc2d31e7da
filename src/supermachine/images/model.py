"""The image data model: plain frozen records shared by every image source.

Kept free of I/O policy so the registry puller, the local readers and the rootfs builder can
all construct and consume the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .verify import VerifiedReader


@dataclass(frozen=True)
class ImageConfig:
    """The runtime defaults from an image config's ``config`` object, already validated."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    stop_signal: str = ""


@dataclass(frozen=True)
class Layer:
    """One layer blob, located as a byte range of a file on disk.

    ``path``/``offset`` let the same record point at a blob file in a layout or the home
    store (offset 0) or at a member inside an uncompressed tar archive, without copying.
    """

    digest: str
    media_type: str
    size: int
    path: Path = field(compare=False)
    offset: int = field(default=0, compare=False)

    def open(self) -> BinaryIO:
        """Raw blob bytes (compressed as stored), hashed while read.

        Reading to the end raises DigestMismatch if the bytes are not what ``digest`` names;
        call ``.drain()`` on the returned reader to force that check.
        """
        return VerifiedReader.open(self.path, self.offset, self.size, self.digest)


@dataclass(frozen=True)
class Image:
    source: str  # what the user typed
    name: str  # display name
    config_digest: str  # "sha256:<hex>" of the config bytes: the rootfs cache key
    manifest_digest: str | None
    config: ImageConfig
    layers: tuple[Layer, ...]
    os: str
    architecture: str

    @property
    def config_hex(self) -> str:
        return self.config_digest.partition(":")[2]
