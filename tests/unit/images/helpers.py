"""Build layer blobs and images on disk for the image tests (real files, real tars)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import zstandard

from supermachine.images.model import Image, ImageConfig, Layer


def make_layer(tmp: Path, raw: bytes, compression: str = "gzip") -> Layer:
    """Store ``raw`` (an uncompressed tar) as a blob file, compressed as asked."""
    if compression == "gzip":
        blob = gzip.compress(raw, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(raw)
    else:
        blob = raw
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / digest[7:]
    path.write_bytes(blob)
    return Layer(digest, "application/vnd.oci.image.layer.v1.tar", len(blob), path)


def make_image(layers: list[Layer], key: str = "1") -> Image:
    digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return Image("test", "test", digest, None, ImageConfig(), tuple(layers), "linux", "amd64")
