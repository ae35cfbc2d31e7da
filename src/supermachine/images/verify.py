"""Digest checks: every blob is hashed while read and rejected before its content is trusted."""

from __future__ import annotations

import hashlib
import io
import os
import re

from ..errors import DigestMismatch, ImageError

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

CHUNK = 1 << 20


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is a well-formed ``sha256:<64 lowercase hex>`` string."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        shown = repr(digest)[:80]
        raise ImageError(f"invalid digest {shown}; only sha256 digests are supported")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, digest: str, size: int | None, what: str) -> bytes:
    if size is not None and len(data) != size:
        raise DigestMismatch(
            f"{what} is {len(data)} bytes but its descriptor says {size}; the image is corrupt"
        )
    got = sha256_digest(data)
    if got != digest:
        raise DigestMismatch(f"{what} hashes to {got}, not {digest}; the image is corrupt")
    return data


class VerifiedReader(io.RawIOBase):
    """Read exactly ``size`` bytes at ``offset`` of a file, checking their sha256 at the end.

    Reading past the end returns EOF only after the digest matched; a short file raises.
    A reader that was not read to the end has verified nothing: callers use ``drain()``.
    """

    def __init__(self, f: io.BufferedReader, size: int, digest: str, what: str) -> None:
        super().__init__()
        self._f = f
        self._left = size
        self._digest = digest
        self._hash = hashlib.sha256()
        self._what = what
        self._verified = False

    @classmethod
    def open(cls, path: str | os.PathLike, offset: int, size: int, digest: str) -> VerifiedReader:
        try:
            f = open(path, "rb")  # noqa: SIM115 - owned by the reader, closed by close()
        except OSError as e:
            raise ImageError(f"cannot open blob {digest} at {path}: {e.strerror}") from e
        if offset:
            f.seek(offset)
        return cls(f, size, digest, f"blob {digest}")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self._left == 0:
            self._finish()
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        n = self._f.readinto(view)
        if not n:
            raise ImageError(
                f"{self._what} is truncated ({self._left} bytes missing); the image is corrupt"
            )
        self._hash.update(view[:n])
        self._left -= n
        if self._left == 0:
            self._finish()
        return n

    def _finish(self) -> None:
        if self._verified:
            return
        got = "sha256:" + self._hash.hexdigest()
        if got != self._digest:
            raise DigestMismatch(
                f"{self._what} hashes to {got}; the image is corrupt (re-pull or re-export it)"
            )
        self._verified = True

    def drain(self) -> None:
        """Read (and hash) whatever is left, raising if the blob does not match its digest."""
        buf = bytearray(CHUNK)
        while self.readinto(memoryview(buf)):
            pass
        self._finish()

    def close(self) -> None:
        self._f.close()
        super().close()
