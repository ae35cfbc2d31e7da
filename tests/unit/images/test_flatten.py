"""Layer flattening: OCI whiteout rules, hardlinks, metadata, and hostile layers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from supermachine.errors import DigestMismatch, ImageError
from supermachine.images.flatten import flatten
from supermachine.images.model import Layer
from tests.fixtures.images import layer_tar, multilayer_layers, tar_entry

from .helpers import make_layer

D, F, S, H = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def run(tmp_path: Path, *layers: list, compression: str = "gzip") -> dict[str, tuple]:
    """Flatten hand-made layers; return {path: (TarInfo, data)} of the output tar."""
    blobs = [make_layer(tmp_path / "blobs", layer_tar(e), compression) for e in layers]
    return read_tar(flatten_bytes(blobs))


def flatten_bytes(layers: list[Layer]) -> bytes:
    out = io.BytesIO()
    flatten(layers, out)
    return out.getvalue()


def read_tar(data: bytes) -> dict[str, tuple]:
    result = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            assert m.name not in result, f"duplicate {m.name}"
            result[m.name] = (m, f.read() if f else None)
    return result


def test_multilayer_rules(tmp_path: Path) -> None:
    blobs = [make_layer(tmp_path, raw) for raw in multilayer_layers()]
    out = read_tar(flatten_bytes(blobs))
    # whiteouts: file and directory (with its contents) gone, and no .wh. entries leak
    assert "etc/removed" not in out
    assert not any(p.startswith("etc/removed-dir") for p in out)
    assert not any(".wh." in p for p in out)
    # opaque directory: lower contents hidden, upper kept
    assert "opaque/lower" not in out and out["opaque/upper"][1] == b"kept\n"
    # hardlink whose original name was deleted by a later layer keeps data and metadata
    link = out["data/link"][0]
    assert link.isreg() and out["data/link"][1] == b"shared inode\n"
    assert (link.mode, link.uid, link.gid) == (0o640, 7, 8)
    # upper file replaces lower
    assert out["etc/passwd"][1].count(b"\n") == 2
    # modes, ownership, special bits, xattrs
    assert out["usr/bin/suid"][0].mode == 0o4755
    assert (out["usr/bin/sgid"][0].mode, out["usr/bin/sgid"][0].gid) == (0o2711, 50)
    assert out["tmp"][0].mode == 0o1777
    app = out["home/app"][0]
    assert (app.mode, app.uid, app.gid) == (0o700, 1000, 1000)
    cap = out["usr/bin/cap"][0].pax_headers
    raw_cap = cap["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
    assert raw_cap == b"\x01\x00\x00\x02\x00\x04\x00\x00"
    assert cap["SCHILY.xattr.user.note"] == "hello"
    assert out["bin/sh"][0].issym() and out["bin/sh"][0].linkname == "busybox"
    assert out["lib"][0].linkname == "usr/lib"
    # mtimes preserved
    assert out["etc/passwd"][0].mtime == 1_700_000_000
    # parents come before children
    names = list(out)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/suid")


def test_hardlinks_share_one_data_copy(tmp_path: Path) -> None:
    out_raw = flatten_bytes([
        make_layer(tmp_path, layer_tar([tar_entry("a", F, b"x" * 5000)])),
        make_layer(tmp_path, layer_tar([tar_entry("b", H, linkname="a"),
                                        tar_entry("c", H, linkname="./a")])),
    ])
    out = read_tar(out_raw)
    kinds = sorted((p, m.type) for p, (m, _) in out.items() if p in "abc")
    assert kinds == [("a", F), ("b", H), ("c", H)]
    assert out["b"][0].linkname == "a" and out["c"][0].linkname == "a"
    assert out_raw.count(b"x" * 5000) == 1


def test_replaced_link_target_keeps_old_data(tmp_path: Path) -> None:
    out = run(tmp_path,
              [tar_entry("a", F, b"old")],
              [tar_entry("b", H, linkname="a")],
              [tar_entry("a", F, b"new")])
    assert out["a"][1] == b"new" and out["b"][1] == b"old"


def test_whiteout_only_hides_lower_layers(tmp_path: Path) -> None:
    # The same layer re-adds what it whites out (entries after and before the whiteout).
    out = run(tmp_path,
              [tar_entry("d", D), tar_entry("d/x", F, b"1"), tar_entry("y", F, b"1")],
              [tar_entry("d/x", F, b"2"), tar_entry("d/.wh.x", F), tar_entry("d/.wh..wh..opq", F),
               tar_entry(".wh.y", F), tar_entry("d/z", F, b"3")])
    assert out["d/x"][1] == b"2" and out["d/z"][1] == b"3" and "y" not in out


def test_directory_replaced_by_file_drops_children(tmp_path: Path) -> None:
    out = run(tmp_path,
              [tar_entry("d", D), tar_entry("d/x", F, b"1")],
              [tar_entry("d", F, b"file")],
              [tar_entry("e/f/g", F, b"implicit parents")])
    assert out["d"][0].isreg() and "d/x" not in out
    assert out["e"][0].isdir() and out["e"][0].mode == 0o755 and out["e/f/g"][1]


def test_directories_merge_with_upper_metadata(tmp_path: Path) -> None:
    out = run(tmp_path,
              [tar_entry("d", D, mode=0o755), tar_entry("d/x", F, b"1")],
              [tar_entry("d", D, mode=0o700, uid=3)])
    assert out["d"][0].mode == 0o700 and out["d"][0].uid == 3 and out["d/x"][1] == b"1"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions(tmp_path: Path, compression: str) -> None:
    out = run(tmp_path, [tar_entry("a", F, b"data")], compression=compression)
    assert out["a"][1] == b"data"


def test_whiteout_of_missing_path_is_noop(tmp_path: Path) -> None:
    out = run(tmp_path, [tar_entry("a", F, b"1")], [tar_entry("no/such/.wh.x", F)])
    assert out["a"][1] == b"1"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([tar_entry("../etc/passwd", F, b"x")], "escapes"),
        ([tar_entry("a/../../x", F, b"x")], "escapes"),
        ([tar_entry("/etc/passwd", F, b"x")], "absolute"),
        ([tar_entry("lnk", S, linkname="/etc"), tar_entry("lnk/passwd", F, b"x")], "symlink"),
        ([tar_entry("f", F, b"x"), tar_entry("f/g", F, b"x")], "not a directory"),
        ([tar_entry("h", H, linkname="missing")], "missing"),
        ([tar_entry("h", H, linkname="../../etc/shadow")], "escapes"),
        ([tar_entry("d", D), tar_entry("h", H, linkname="d")], "directory"),
        ([tar_entry("etc/sda", tarfile.BLKTYPE)], "device node"),
        ([tar_entry("x" * 300, F, b"x")], "component"),
        ([tar_entry("/".join(["a"] * 2100), F, b"x")], "longer than"),
        ([tar_entry(".", F, b"x")], "root"),
    ],
)
def test_hostile_entries(tmp_path: Path, entries: list, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        run(tmp_path, entries)


def test_hardlink_through_symlink_from_lower_layer(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="symlink"):
        run(tmp_path, [tar_entry("l", S, linkname="/")], [tar_entry("h", H, linkname="l/etc/x")])


def test_device_nodes_under_dev_are_skipped(tmp_path: Path) -> None:
    null = tar_entry("dev/null", tarfile.CHRTYPE)
    null[0].devmajor, null[0].devminor = 1, 3
    out = run(tmp_path, [tar_entry("dev", D), null, tar_entry("dev/fifo", tarfile.FIFOTYPE)])
    assert "dev/null" not in out and out["dev/fifo"][0].isfifo()


def test_absurd_size_rejected_before_reading(tmp_path: Path) -> None:
    # A PAX header claiming a 100 GiB member (with no data behind it).
    hdr = tarfile.TarInfo("big")
    hdr.pax_headers = {"size": str(100 << 30)}
    raw = hdr.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024
    with pytest.raises(ImageError, match="absurd size"):
        flatten_bytes([make_layer(tmp_path, raw)])


def test_oversized_pax_header_rejected(tmp_path: Path) -> None:
    ti, data = tar_entry("a", F, b"x", xattrs={"user.big": b"v" * (2 << 20)})
    with pytest.raises(ImageError, match="extended header"):
        flatten_bytes([make_layer(tmp_path, layer_tar([(ti, data)]))])


def test_digest_mismatch(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, layer_tar([tar_entry("a", F, b"data")]))
    blob = bytearray(layer.path.read_bytes())
    blob[-20] ^= 0xFF  # inside the gzip trailer/padding region, still parseable or not
    layer.path.write_bytes(bytes(blob))
    with pytest.raises((DigestMismatch, ImageError)):
        flatten_bytes([layer])


def test_digest_mismatch_in_unread_tail(tmp_path: Path) -> None:
    raw = layer_tar([tar_entry("a", F, b"data")])
    layer = make_layer(tmp_path, raw, "none")
    blob = bytearray(layer.path.read_bytes())
    blob[-1] = 1  # tar padding the parser never looks at
    layer.path.write_bytes(bytes(blob))
    with pytest.raises(DigestMismatch):
        flatten_bytes([layer])


def test_truncated_layer(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, layer_tar([tar_entry("a", F, b"data" * 1000)]))
    layer.path.write_bytes(layer.path.read_bytes()[:40])
    with pytest.raises(ImageError, match="truncated"):
        flatten_bytes([layer])


def test_garbage_layer(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="corrupt|not a"):
        flatten_bytes([make_layer(tmp_path, b"\x1f\x8b" + b"garbage" * 100, "none")])
    with pytest.raises(ImageError, match="bzip2/xz"):
        flatten_bytes([make_layer(tmp_path, b"BZh91AY&SY" + b"\0" * 100, "none")])
