"""The image data model: plain frozen records shared by every image source.

Kept free of I/O policy so the registry puller, the local readers and the rootfs builder can
all construct and consume the same objects.
"""

from __future__ import annotations

import os

from ..record import Record
from .verify import VerifiedReader


class ImageConfig(Record):
    """The runtime defaults from an image config's ``config`` object, already validated."""

    __slots__ = ("entrypoint", "cmd", "env", "working_dir", "user", "exposed_ports", "labels",
                 "stop_signal")
    DEFAULTS = {"entrypoint": (), "cmd": (), "env": (), "working_dir": "", "user": "",
                "exposed_ports": (), "labels": (), "stop_signal": ""}

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    working_dir: str
    user: str
    exposed_ports: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    stop_signal: str


class Layer(Record):
    """One layer blob, located as a byte range of a file on disk.

    ``path``/``offset`` let the same record point at a blob file in a layout or the home
    store (offset 0) or at a member inside an uncompressed tar archive, without copying.
    """

    __slots__ = ("digest", "media_type", "size", "path", "offset")
    DEFAULTS = {"offset": 0}
    UNCOMPARED = ("path", "offset")

    digest: str
    media_type: str
    size: int
    path: str | os.PathLike
    offset: int

    def open(self) -> VerifiedReader:
        """Raw blob bytes (compressed as stored), hashed while read.

        Reading to the end raises DigestMismatch if the bytes are not what ``digest`` names;
        call ``.drain()`` on the returned reader to force that check.
        """
        return VerifiedReader.open(self.path, self.offset, self.size, self.digest)


class Image(Record):
    __slots__ = ("source", "name", "config_digest", "manifest_digest", "config", "layers", "os",
                 "architecture")

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
