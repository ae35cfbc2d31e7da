"""Images inside uncompressed tar archives: oci-archive and docker-archive (``docker save``).

Nothing is extracted: members are located by their byte offset in the archive and layers
are read (and verified) straight from there, so importing costs no copy.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from pathlib import Path

from ..errors import DigestMismatch, ImageError
from . import manifest as mf
from .layout import REF_NAME, check_platform, resolve_image, select_tagged
from .model import Image, Layer
from .tarsafe import open_file
from .verify import sha256_digest, verify_bytes

MAX_MEMBERS = 100_000
MAX_LINK_HOPS = 8
_HEX_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?")


class TarMembers:
    """Index of an archive's members by normalised name (regular files and links)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        with open_file(path) as tf:
            try:
                for i, m in enumerate(tf):
                    if i >= MAX_MEMBERS:
                        raise ImageError(f"{path} has over {MAX_MEMBERS} members; not an image")
                    self.members[_norm(m.name)] = m
            except (tarfile.TarError, EOFError) as e:
                raise ImageError(f"{path} is a corrupt or truncated tar archive ({e})") from e

    def __contains__(self, name: str) -> bool:
        return _norm(name) in self.members

    def member(self, name: str) -> tarfile.TarInfo:
        """The regular-file member called ``name``, following in-archive links."""
        key = _norm(name)
        for _ in range(MAX_LINK_HOPS):
            m = self.members.get(key)
            if m is None:
                raise ImageError(f"{self.path} lacks {name[:200]!r}; the archive is incomplete")
            if m.isreg():
                return m
            if m.issym():
                key = _norm(posixpath.join(posixpath.dirname(key), m.linkname))
            elif m.islnk():
                key = _norm(m.linkname)
            else:
                raise ImageError(f"{self.path} member {name[:200]!r} is not a file")
        raise ImageError(f"{self.path} member {name[:200]!r} is a link loop")

    def read(self, name: str, cap: int) -> bytes:
        m = self.member(name)
        if m.size > cap:
            raise ImageError(f"{self.path} member {name[:200]!r} is over {cap} bytes")
        try:
            with open(self.path, "rb") as f:
                f.seek(m.offset_data)
                data = f.read(m.size)
        except OSError as e:
            raise ImageError(f"cannot read {self.path}: {e.strerror}") from e
        if len(data) != m.size:
            raise ImageError(f"{self.path} is truncated; the archive is corrupt")
        return data


def _norm(name: str) -> str:
    n = posixpath.normpath("/" + name).lstrip("/")
    return n


class ArchiveBlobs:
    """The ``blobs/sha256/<hex>`` members of an oci-archive, as a BlobStore."""

    def __init__(self, members: TarMembers) -> None:
        self.members = members

    def locate(self, digest: str, size: int) -> tuple[Path, int]:
        m = self.members.member("blobs/sha256/" + digest.partition(":")[2])
        if m.size != size:
            raise ImageError(
                f"blob {digest} is {m.size} bytes, its descriptor says {size}; image corrupt"
            )
        return self.members.path, m.offset_data

    def read_blob(self, digest: str, size: int, cap: int, what: str) -> bytes:
        if size > cap:
            raise ImageError(f"{what} is {size} bytes, over the {cap}-byte limit")
        data = self.members.read("blobs/sha256/" + digest.partition(":")[2], cap)
        return verify_bytes(data, digest, size, what)


def sniff_archive(members: TarMembers) -> str:
    """"oci-archive" or "docker-archive", from the archive's content."""
    if "oci-layout" in members and "index.json" in members:
        return "oci-archive"
    if "manifest.json" in members:
        return "docker-archive"
    raise ImageError(f"{members.path} is a tar archive but not an OCI or Docker image archive")


def open_oci_archive(
    members: TarMembers, tag: str | None, *, source: str, platform: str | None
) -> Image:
    if "oci-layout" not in members:
        raise ImageError(f"{members.path} is not an oci-archive (no oci-layout member)")
    entries = mf.parse_index(members.read("index.json", mf.MAX_MANIFEST_BYTES))
    desc = select_tagged(entries, tag, f"oci-archive:{members.path}")
    ref = tag or desc.annotation(REF_NAME) or ""
    name = f"{os.path.basename(members.path)}:{ref}".rstrip(":")
    blobs = ArchiveBlobs(members)
    return resolve_image(blobs, desc, source=source, name=name, platform=platform)


def open_docker_archive(
    members: TarMembers, ref: str | None, *, source: str, platform: str | None
) -> Image:
    data = members.read("manifest.json", mf.MAX_MANIFEST_BYTES)
    entries = _parse_docker_manifest(data, members.path)
    entry = _select_docker_entry(entries, ref, members.path)
    config_name: str = entry["Config"]
    config_bytes = members.read(config_name, mf.MAX_CONFIG_BYTES)
    config_digest = sha256_digest(config_bytes)
    named = _HEX_NAME.fullmatch(_norm(config_name))
    if named and named.group(1) != config_digest.partition(":")[2]:
        raise DigestMismatch(f"{config_name} hashes to {config_digest}; the archive is corrupt")
    config, os_, arch = mf.parse_config(config_bytes)
    check_platform(os_, arch, platform)
    diff_ids = mf.parse_diff_ids(config_bytes)
    layer_names: list[str] = entry["Layers"]
    if len(diff_ids) != len(layer_names):
        raise ImageError(f"{members.path}: config and manifest.json disagree on the layer count")
    layers = []
    for lname, diff_id in zip(layer_names, diff_ids, strict=True):
        m = members.member(lname)
        # docker save writes uncompressed layers (digest == diff_id); Docker 25+ names them
        # blobs/sha256/<digest>, which is the digest of the bytes as stored.
        named = _HEX_NAME.fullmatch(_norm(lname))
        digest = f"sha256:{named.group(1)}" if named and "blobs/" in lname else diff_id
        layers.append(Layer(digest, mf.DOCKER_LAYER_TAR, m.size, members.path, m.offset_data))
    tags = entry.get("RepoTags") or []
    return Image(
        source=source,
        name=ref or (tags[0] if tags else os.path.basename(members.path)),
        config_digest=config_digest,
        manifest_digest=None,
        config=config,
        layers=tuple(layers),
        os=os_,
        architecture=arch,
    )


def _parse_docker_manifest(data: bytes, path: Path) -> list[dict]:
    # manifest.json is a top-level JSON array; reuse the hardened object parser via a wrapper.
    wrapped = mf.load_json(b'{"m":' + data + b"}", f"{path} manifest.json", mf.MAX_MANIFEST_BYTES)
    entries = wrapped["m"]
    if not isinstance(entries, list) or not entries or len(entries) > mf.MAX_INDEX_ENTRIES:
        raise ImageError(f"{path} manifest.json is not a list of images; the archive is corrupt")
    for e in entries:
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("Config"), str)
            and isinstance(e.get("Layers"), list)
            and len(e["Layers"]) <= mf.MAX_LAYERS
            and all(isinstance(x, str) for x in e["Layers"])
            and (e.get("RepoTags") is None or isinstance(e.get("RepoTags"), list))
            and all(isinstance(t, str) for t in e.get("RepoTags") or [])
        )
        if not ok:
            raise ImageError(f"{path} manifest.json has a malformed entry; the archive is corrupt")
    return entries


def _select_docker_entry(entries: list[dict], ref: str | None, path: Path) -> dict:
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        raise ImageError(f"{path} holds several images; name one as docker-archive:PATH:REPO:TAG")
    want = {ref, f"{ref}:latest", f"docker.io/{ref}", f"docker.io/library/{ref}"}
    for e in entries:
        for t in e.get("RepoTags") or []:
            if t in want or t.removeprefix("docker.io/library/") in want:
                return e
    raise ImageError(f"{path} has no image tagged {ref!r}")
