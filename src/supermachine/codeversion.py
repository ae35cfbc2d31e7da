"""Versions of the code that builds cached artifacts, derived from that code itself.

Every cache (root filesystems, the assembled kernel directory, initramfs images, automatic
snapshots) is keyed by its inputs *and* by a digest of the source files that turn those
inputs into the artifact. An upgrade that changes a builder therefore rebuilds exactly the
artifacts that builder makes, and an artifact made by older code is never used again. A
hand-bumped version number was tried first and was forgotten twice; a digest cannot be.

Digests are over the files' bytes, so an edited comment rebuilds too: that costs one build
and is always safe. Only the files are read (no import), so this stays cheap on the CLI's
start-up path: a few small reads, once per process.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

#: The package's source tree; tests point this at a copy to model a code change.
SOURCE_ROOT = Path(__file__).resolve().parent
DIGEST_CHARS = 12


@functools.cache
def _file_digest(root: Path, relpath: str) -> bytes:
    try:
        data = (root / relpath).read_bytes()
    except OSError:
        # Installed without sources (byte code only): key by the name alone, so the cache
        # still works; such an install changes its code only by changing its version.
        from importlib.metadata import PackageNotFoundError, version

        try:
            data = f"missing {relpath} in {version('supermachine')}".encode()
        except PackageNotFoundError:
            data = f"missing {relpath}".encode()
    return hashlib.sha256(data).digest()


def code_version(*relpaths: str) -> str:
    """A short digest of the named source files (paths relative to the package).

    The names are part of the digest, so moving code between files changes it too.
    """
    if not relpaths:
        raise ValueError("code_version needs at least one source file")
    h = hashlib.sha256()
    for rel in relpaths:
        h.update(rel.encode() + b"\0")
        h.update(_file_digest(SOURCE_ROOT, rel))
    return h.hexdigest()[:DIGEST_CHARS]


def clear_cache() -> None:
    """Forget the digests read so far (for tests that change a source file)."""
    _file_digest.cache_clear()
