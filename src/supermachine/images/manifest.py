"""Pure parsing and validation of OCI / Docker image indexes, manifests and configs.

Bytes in, frozen records out; no I/O. Everything here is hostile input: sizes are capped
before parsing, JSON objects with duplicate keys are refused (two parsers could disagree on
which value wins), and every field is type-checked before use.
"""

from __future__ import annotations

import json
import os

from ..errors import ImageError
from ..record import Record
from .model import ImageConfig
from .verify import check_digest

# Media types -----------------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset(
    {
        OCI_LAYER_TAR,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_ND_TAR,
        OCI_LAYER_ND_GZIP,
        OCI_LAYER_ND_ZSTD,
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER_TAR,
    }
)
#: what a registry client should put in its Accept header
ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

# Caps ------------------------------------------------------------------------------------

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 4 << 20
MAX_LAYER_BYTES = 64 << 30
MAX_LAYERS = 1024
MAX_INDEX_ENTRIES = 4096
MAX_ARGS = 4096  # entries in Entrypoint/Cmd/Env/ExposedPorts/Labels
MAX_STRING = 128 << 10  # one string of the config
MAX_JSON_DEPTH = 64


class Platform(Record):
    __slots__ = ("os", "architecture", "variant")
    DEFAULTS = {"variant": ""}

    os: str
    architecture: str
    variant: str

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s

    def matches(self, want: Platform) -> bool:
        if (self.os, self.architecture) != (want.os, want.architecture):
            return False
        if not want.variant:
            return True
        return _norm_variant(self) == _norm_variant(want)


def _norm_variant(p: Platform) -> str:
    # arm64 images usually omit the variant; "v8" is implied.
    if p.architecture == "arm64" and not p.variant:
        return "v8"
    return p.variant


class Descriptor(Record):
    __slots__ = ("media_type", "digest", "size", "platform", "annotations")
    DEFAULTS = {"platform": None, "annotations": ()}

    media_type: str
    digest: str
    size: int
    platform: Platform | None
    annotations: tuple[tuple[str, str], ...]

    def annotation(self, key: str) -> str | None:
        for k, v in self.annotations:
            if k == key:
                return v
        return None


class Manifest(Record):
    __slots__ = ("media_type", "config", "layers")

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


# Platforms -------------------------------------------------------------------------------

_MACHINE_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "i686": ("386", ""),
    "i386": ("386", ""),
    "riscv64": ("riscv64", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
}


def host_platform() -> Platform:
    machine = os.uname().machine  # what platform.machine() reads, without its import cost
    arch, variant = _MACHINE_ARCH.get(machine.lower(), (machine, ""))
    return Platform("linux", arch, variant)


def parse_platform(text: str | None) -> Platform:
    """Parse ``os/arch[/variant]`` (e.g. ``linux/arm64/v8``); None means the host's."""
    if text is None:
        return host_platform()
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(p and p.isascii() and p.isprintable() for p in parts):
        raise ImageError(f"invalid platform {text!r}; use OS/ARCH[/VARIANT], e.g. linux/amd64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def select_platform(descriptors: list[Descriptor], platform: str | None) -> Descriptor:
    """Pick the manifest for ``platform`` (default: the host's) from an index's entries."""
    want = parse_platform(platform)
    matches = [d for d in descriptors if d.platform is not None and d.platform.matches(want)]
    if not matches and platform is None:
        # An index with a single platform-less manifest (typical of local OCI layouts).
        bare = [d for d in descriptors if d.platform is None and d.media_type in MANIFEST_TYPES]
        if len(bare) == 1:
            return bare[0]
    if not matches:
        have = sorted({str(d.platform) for d in descriptors if d.platform is not None})
        listing = ", ".join(have) if have else "none listed"
        raise ImageError(
            f"image has no variant for platform {want} (available: {listing}); "
            "pick one with --platform"
        )
    # Prefer an exact variant match (e.g. arm/v7 over arm/v6 when asked for nothing).
    exact = [d for d in matches if d.platform is not None and d.platform.variant == want.variant]
    return (exact or matches)[0]


# JSON helpers ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ImageError(f"duplicate JSON key {k[:64]!r}; the image metadata is ambiguous")
        out[k] = v
    return out


def _depth_ok(data: bytes) -> bool:
    # json.loads recurses per nesting level; bound it before parsing instead of catching
    # RecursionError (which can leave the interpreter in a fragile state).
    depth = 0
    in_str = esc = False
    for b in data:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def load_json(data: bytes, what: str, cap: int) -> dict[str, object]:
    if len(data) > cap:
        raise ImageError(f"{what} is {len(data)} bytes, over the {cap}-byte limit")
    if not _depth_ok(data):
        raise ImageError(f"{what} is nested too deeply; the image is corrupt or hostile")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{what} is not valid JSON ({str(e)[:80]}); the image is corrupt") from e
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object; the image is corrupt")
    return obj


def _str(obj: dict[str, object], key: str, what: str, *, required: bool = False) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise ImageError(f"{what} has no {key!r}; the image is corrupt")
        return ""
    if not isinstance(v, str) or len(v) > MAX_STRING or "\x00" in v:
        raise ImageError(f"{what} field {key!r} is not a valid string; the image is corrupt")
    return v


def _int(obj: dict[str, object], key: str, what: str, cap: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > cap:
        raise ImageError(f"{what} field {key!r} must be an integer 0..{cap}; the image is corrupt")
    return v


def _str_list(v: object, key: str, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > MAX_ARGS:
        raise ImageError(f"{what} field {key!r} must be a list of strings; the image is corrupt")
    for s in v:
        if not isinstance(s, str) or len(s) > MAX_STRING or "\x00" in s:
            raise ImageError(f"{what} field {key!r} holds a non-string; the image is corrupt")
    return tuple(v)


def _str_map(v: object, key: str, what: str) -> dict[str, object]:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_ARGS:
        raise ImageError(f"{what} field {key!r} must be an object; the image is corrupt")
    for k in v:
        if len(k) > MAX_STRING or "\x00" in k:
            raise ImageError(f"{what} field {key!r} has an invalid key; the image is corrupt")
    return v


# Descriptors, indexes, manifests ---------------------------------------------------------


def parse_descriptor(obj: object, what: str, max_size: int) -> Descriptor:
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object; the image is corrupt")
    media_type = _str(obj, "mediaType", what, required=True)
    digest = check_digest(obj.get("digest"))
    size = _int(obj, "size", what, max_size)
    plat = None
    p = obj.get("platform")
    if p is not None:
        if not isinstance(p, dict):
            raise ImageError(f"{what} platform is not an object; the image is corrupt")
        plat = Platform(
            _str(p, "os", what, required=True),
            _str(p, "architecture", what, required=True),
            _str(p, "variant", what),
        )
    ann = _str_map(obj.get("annotations"), "annotations", what)
    for v in ann.values():
        if not isinstance(v, str) or len(v) > MAX_STRING:
            raise ImageError(f"{what} has a non-string annotation; the image is corrupt")
    return Descriptor(media_type, digest, size, plat, tuple(sorted(ann.items())))


def _check_schema(obj: dict[str, object], what: str) -> None:
    if obj.get("schemaVersion") != 2:
        raise ImageError(f"{what} has unsupported schemaVersion {obj.get('schemaVersion')!r}")


def parse_index(data: bytes, media_type: str | None = None) -> list[Descriptor]:
    """Entries of an OCI image index or Docker manifest list (or an OCI layout's index.json)."""
    what = "image index"
    obj = load_json(data, what, MAX_MANIFEST_BYTES)
    _check_schema(obj, what)
    declared = obj.get("mediaType")
    if declared is not None and declared not in INDEX_TYPES:
        raise ImageError(f"{what} declares media type {str(declared)[:80]!r}, not an index")
    if media_type is not None and declared is not None and declared != media_type:
        raise ImageError(f"{what} media type {declared!r} disagrees with {media_type!r}")
    entries = obj.get("manifests")
    if not isinstance(entries, list) or len(entries) > MAX_INDEX_ENTRIES:
        raise ImageError(f"{what} has no valid 'manifests' list; the image is corrupt")
    return [
        parse_descriptor(e, f"{what} entry {i}", MAX_MANIFEST_BYTES) for i, e in enumerate(entries)
    ]


def sniff_media_type(data: bytes, declared: str | None) -> str:
    """The media type of a manifest-or-index document, from the transport or the content."""
    if declared in INDEX_TYPES or declared in MANIFEST_TYPES:
        return declared  # type: ignore[return-value]
    obj = load_json(data, "manifest", MAX_MANIFEST_BYTES)
    mt = obj.get("mediaType")
    if isinstance(mt, str) and (mt in INDEX_TYPES or mt in MANIFEST_TYPES):
        return mt
    if "manifests" in obj:
        return OCI_INDEX
    if "layers" in obj:
        return OCI_MANIFEST
    raise ImageError("document is neither an image manifest nor an index; the image is corrupt")


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest:
    """An OCI image manifest or a Docker schema2 manifest."""
    what = "image manifest"
    obj = load_json(data, what, MAX_MANIFEST_BYTES)
    _check_schema(obj, what)
    declared = obj.get("mediaType")
    if declared is not None and declared not in MANIFEST_TYPES:
        raise ImageError(f"{what} declares media type {str(declared)[:80]!r}, not a manifest")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise ImageError(f"unsupported manifest media type {media_type[:80]!r}")
    if media_type is not None and declared is not None and declared != media_type:
        raise ImageError(f"{what} media type {declared!r} disagrees with {media_type!r}")
    mt = declared or media_type or OCI_MANIFEST
    config = parse_descriptor(obj.get("config"), f"{what} config", MAX_CONFIG_BYTES)
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(
            f"not a container image (config media type {config.media_type[:80]!r}); "
            "only OCI and Docker images can run"
        )
    layers = obj.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise ImageError(f"{what} has no valid 'layers' list (max {MAX_LAYERS}); image corrupt")
    parsed = []
    for i, layer in enumerate(layers):
        d = parse_descriptor(layer, f"{what} layer {i}", MAX_LAYER_BYTES)
        if d.media_type == DOCKER_FOREIGN_LAYER:
            raise ImageError("image uses foreign (Windows) layers, which cannot run here")
        if d.media_type not in LAYER_TYPES:
            raise ImageError(f"unsupported layer media type {d.media_type[:80]!r}")
        parsed.append(d)
    return Manifest(mt, config, tuple(parsed))


# Image config ----------------------------------------------------------------------------


def parse_config(data: bytes) -> tuple[ImageConfig, str, str]:
    """The validated runtime config, OS and architecture of an image config blob."""
    what = "image config"
    obj = load_json(data, what, MAX_CONFIG_BYTES)
    os_ = _str(obj, "os", what, required=True)
    arch = _str(obj, "architecture", what, required=True)
    c = obj.get("config")
    if c is None:
        c = {}
    if not isinstance(c, dict):
        raise ImageError(f"{what} 'config' is not an object; the image is corrupt")
    env = _str_list(c.get("Env"), "Env", what)
    for e in env:
        if "=" not in e or e.startswith("="):
            raise ImageError(f"{what} Env entry {e[:64]!r} is not NAME=VALUE; image corrupt")
    labels = _str_map(c.get("Labels"), "Labels", what)
    for v in labels.values():
        if not isinstance(v, str) or len(v) > MAX_STRING:
            raise ImageError(f"{what} has a non-string label; the image is corrupt")
    ports = _str_map(c.get("ExposedPorts"), "ExposedPorts", what)
    cfg = ImageConfig(
        entrypoint=_str_list(c.get("Entrypoint"), "Entrypoint", what),
        cmd=_str_list(c.get("Cmd"), "Cmd", what),
        env=env,
        working_dir=_str(c, "WorkingDir", what),
        user=_str(c, "User", what),
        exposed_ports=tuple(sorted(ports)),
        labels=tuple(sorted(labels.items())),
        stop_signal=_str(c, "StopSignal", what),
    )
    return cfg, os_, arch


def parse_diff_ids(data: bytes) -> tuple[str, ...]:
    """The uncompressed layer digests (``rootfs.diff_ids``) of an image config."""
    obj = load_json(data, "image config", MAX_CONFIG_BYTES)
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict):
        raise ImageError("image config has no 'rootfs'; the image is corrupt")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list) or len(ids) > MAX_LAYERS:
        raise ImageError("image config has no valid 'rootfs.diff_ids'; the image is corrupt")
    return tuple(check_digest(d) for d in ids)
