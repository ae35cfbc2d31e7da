"""The pulled-image store: ref records, listing, removal and garbage collection.

Blobs live in ``home.blobs`` (one content-addressed directory shared by every image); a
pulled reference is a JSON record in ``home.refs`` naming its manifest per platform::

    {"version": 1, "reference": "docker.io/library/alpine:3.20",
     "platforms": {"linux/amd64": {"manifest_digest": ..., "config_digest": ..., ...}}}

Concurrency: pulls hold ``store.lock`` shared for their whole duration; ``prune`` holds it
exclusively, so it never deletes a blob a pull in progress has fetched but not yet recorded.
Record updates are read-modify-write under a per-reference lock and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator

from ..errors import ImageError
from ..home import Home, atomic_write_bytes, file_lock
from ..record import Record
from .manifest import parse_manifest, parse_platform, sniff_media_type
from .reference import Reference, parse_reference

RECORD_MAX = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST_PREFIX = re.compile(r"(?:sha256:)?[0-9a-f]{12,64}")


class RefEntry(Record):
    """One platform's image under a reference."""

    __slots__ = ("platform", "manifest_digest", "media_type", "index_digest", "config_digest",
                 "size", "pulled", "created")

    platform: str
    manifest_digest: str
    media_type: str
    index_digest: str | None
    config_digest: str
    size: int  # manifest + config + compressed layers, as downloaded
    pulled: str  # ISO 8601 UTC
    created: str  # the image config's "created", or ""


class ImageInfo(Record):
    """A row of `supermachine images`."""

    __slots__ = ("reference", "name", "platform", "manifest_digest", "config_digest", "size",
                 "created", "pulled")

    reference: str  # canonical: docker.io/library/alpine:3.20
    name: str  # familiar: alpine:3.20
    platform: str
    manifest_digest: str
    config_digest: str
    size: int
    created: str
    pulled: str


class PruneResult(Record):
    __slots__ = ("blobs_removed", "bytes_freed")

    blobs_removed: int
    bytes_freed: int


# Paths here are strings (os.path), not pathlib's: a pull imports this module, and pathlib
# is ~6 ms of a small one (see home.py).


def lock_dir(home: Home) -> str:
    return home.dir("locks")


@contextlib.contextmanager
def pull_guard(home: Home) -> Iterator[None]:
    """Held (shared) by every pull, so garbage collection waits for pulls to finish."""
    with file_lock(os.path.join(lock_dir(home), "store.lock"), shared=True):
        yield


def _record_path(home: Home, ref: Reference) -> str:
    key = hashlib.sha256(str(ref).encode()).hexdigest()
    return os.path.join(home.dir("refs"), f"{key}.json")


def _ref_lock(home: Home, path: str) -> str:
    stem = os.path.basename(path).removesuffix(".json")
    return os.path.join(lock_dir(home), f"ref-{stem}.lock")


def _load_record(path: str) -> dict | None:
    """A ref record, or None if absent or unreadable (a corrupt record is not an image)."""
    try:
        with open(path, "rb") as f:
            data = f.read(RECORD_MAX + 1)
    except (FileNotFoundError, IsADirectoryError):
        return None
    if len(data) > RECORD_MAX:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("version") != 1:
        return None
    if not isinstance(record.get("reference"), str) or not isinstance(
        record.get("platforms"), dict
    ):
        return None
    return record


def _entries(record: dict) -> list[RefEntry]:
    out = []
    for plat, e in record["platforms"].items():
        try:
            entry = RefEntry(platform=plat, **{k: e[k] for k in _ENTRY_FIELDS})
        except (KeyError, TypeError):
            continue
        ok = all(isinstance(getattr(entry, f), str) for f in ("manifest_digest", "config_digest"))
        if ok and _HEX64.fullmatch(entry.manifest_digest.partition(":")[2]):
            out.append(entry)
    return out


_ENTRY_FIELDS = (
    "manifest_digest",
    "media_type",
    "index_digest",
    "config_digest",
    "size",
    "pulled",
    "created",
)


def _records(home: Home) -> Iterator[tuple[str, dict]]:
    refs = home.dir("refs")
    for name in sorted(n for n in os.listdir(refs) if n.endswith(".json") and n[0] != "."):
        path = os.path.join(refs, name)
        record = _load_record(path)
        if record is not None:
            yield path, record


def record_pull(home: Home, ref: Reference, entry: RefEntry) -> None:
    """Add or replace ``entry`` (keyed by platform) in the record of ``ref``."""
    path = _record_path(home, ref)
    with file_lock(_ref_lock(home, path)):
        record = _load_record(path) or {"version": 1, "reference": str(ref), "platforms": {}}
        fields = entry.as_dict()
        plat = fields.pop("platform")
        record["platforms"][plat] = fields
        data = json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            from ..home import disk_full_message

            raise ImageError(disk_full_message(e, path)) from e


def _pick(entries: list[RefEntry], platform: str | None) -> RefEntry | None:
    want = parse_platform(platform)
    for e in entries:
        try:
            have = parse_platform(e.platform)
        except ImageError:
            continue
        if have.matches(want) or (platform is None and want.matches(have)):
            return e
    if platform is None and len(entries) == 1:
        return entries[0]
    return None


def find_entry(home: Home, ref: Reference, platform: str | None) -> RefEntry | None:
    """The stored image for ``ref`` and ``platform`` (default: the host's), if pulled."""
    record = _load_record(_record_path(home, ref))
    if record is not None:
        entry = _pick(_entries(record), platform)
        if entry is not None:
            return entry
    if ref.digest:
        # A digest names content: any record that resolved to it will do.
        for _, rec in _records(home):
            for e in _entries(rec):
                if ref.digest in (e.manifest_digest, e.index_digest):
                    if e.manifest_digest == ref.digest or _pick([e], platform):
                        return e
    return None


def config_created(config: bytes) -> str:
    try:
        created = json.loads(config).get("created", "")
    except (ValueError, AttributeError):
        return ""
    return created[:64] if isinstance(created, str) else ""


def list_images(home: Home) -> list[ImageInfo]:
    out = []
    for _, record in _records(home):
        try:
            name = parse_reference(record["reference"]).familiar
        except ImageError:
            continue
        for e in _entries(record):
            out.append(
                ImageInfo(
                    reference=record["reference"],
                    name=name,
                    platform=e.platform,
                    manifest_digest=e.manifest_digest,
                    config_digest=e.config_digest,
                    size=e.size if isinstance(e.size, int) else 0,
                    created=e.created if isinstance(e.created, str) else "",
                    pulled=e.pulled if isinstance(e.pulled, str) else "",
                )
            )
    out.sort(key=lambda i: (i.name, i.platform))
    return out


def _remove_rootfs(home: Home, config_digests: set[str]) -> None:
    for digest in config_digests:
        hexpart = digest.partition(":")[2]
        if not _HEX64.fullmatch(hexpart):
            continue
        rootfs = home.dir("rootfs")
        for name in os.listdir(rootfs):
            if name.startswith(hexpart):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(rootfs, name))


def remove_image(home: Home, ref_or_digest: str) -> list[str]:
    """Forget an image by reference or (prefix of) digest; returns the references removed.

    Blobs stay until ``prune``; the rootfs cache of configs no longer used goes now.
    """
    targets: list[str] = []
    text = ref_or_digest.strip()
    if _DIGEST_PREFIX.fullmatch(text):
        prefix = text if text.startswith("sha256:") else f"sha256:{text}"
        for path, rec in _records(home):
            for e in _entries(rec):
                digests = (e.manifest_digest, e.index_digest or "", e.config_digest)
                if any(d.startswith(prefix) for d in digests):
                    targets.append(path)
                    break
    else:
        path = _record_path(home, parse_reference(text))
        if _load_record(path) is not None:
            targets.append(path)
    if not targets:
        raise ImageError(f"no such image {text!r}; see `supermachine images`")
    removed, configs = [], set()
    for path in targets:
        with file_lock(_ref_lock(home, path)):
            record = _load_record(path)
            if record is None:
                continue
            configs |= {e.config_digest for e in _entries(record)}
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(record["reference"])
    still_used = {e.config_digest for _, rec in _records(home) for e in _entries(rec)}
    _remove_rootfs(home, configs - still_used)
    return removed


def _referenced(home: Home) -> set[str]:
    """Hex digests of every blob some ref record needs."""
    keep: set[str] = set()
    for _, record in _records(home):
        for e in _entries(record):
            for d in (e.manifest_digest, e.index_digest, e.config_digest):
                if isinstance(d, str):
                    keep.add(d.partition(":")[2])
            try:
                with open(home.blob_file(e.manifest_digest), "rb") as f:
                    data = f.read(4 << 20)
                manifest = parse_manifest(data, sniff_media_type(data, e.media_type))
            except (OSError, ImageError):
                continue  # a broken image: its layers are garbage anyway
            keep.update(d.digest.partition(":")[2] for d in manifest.layers)
    return keep


def prune(home: Home) -> PruneResult:
    """Delete blobs no pulled image uses, stale partial downloads, and their rootfs cache.

    Waits for pulls in progress (they hold the store lock shared) and blocks new ones.
    """
    removed = freed = 0
    with file_lock(os.path.join(lock_dir(home), "store.lock")):
        keep = _referenced(home)
        dropped_configs: set[str] = set()
        blobs = home.dir("blobs", "sha256")
        for name in os.listdir(blobs):
            stale = name.startswith((".partial-", ".tmp-"))
            if not stale and (not _HEX64.fullmatch(name) or name in keep):
                continue
            path = os.path.join(blobs, name)
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError):
                continue
            removed += 1
            freed += size
            if not stale:
                dropped_configs.add(f"sha256:{name}")
        _remove_rootfs(home, dropped_configs)
        from .rootfs import prune_stale_builds  # here: pulls never need rootfs's imports

        prune_stale_builds(home)
        # No pull runs now, so no one holds or waits on a blob lock.
        locks = lock_dir(home)
        for name in os.listdir(locks):
            if name.startswith("blob-") and name.endswith(".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(locks, name))
    return PruneResult(removed, freed)


__all__ = [
    "ImageInfo",
    "PruneResult",
    "RefEntry",
    "find_entry",
    "list_images",
    "prune",
    "record_pull",
    "remove_image",
]
