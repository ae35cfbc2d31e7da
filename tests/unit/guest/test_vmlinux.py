"""Extracting the uncompressed kernel from a bzImage (real and synthetic ones)."""

from __future__ import annotations

import gzip
import lzma
import struct

import pytest
import zstandard

from supermachine.errors import GuestError
from supermachine.guest import vmlinux as v
from supermachine.guest.kernel import fetch_kernel
from supermachine.home import Home


def elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal little-endian ELF64 whose one PT_NOTE segment holds ``notes``."""
    blob = b""
    for name, ntype in notes:
        n = name + b"\0"
        blob += struct.pack("<III", len(n), 4, ntype) + n.ljust((len(n) + 3) // 4 * 4, b"\0")
        blob += b"\0" * 4
    phoff = 64
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    ph = struct.pack("<IIQQQQQQ", 4, 0, phoff + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(header) + ph + blob


def bzimage(payload_stream: bytes, size: int, setup_sects: int = 4) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    payload = payload_stream + struct.pack("<I", size)
    struct.pack_into("<II", setup, 0x248, 0, len(payload))
    return bytes(setup) + payload


PVH = elf_with_notes([(b"Linux", 1), (b"Xen", v.XEN_ELFNOTE_PHYS32_ENTRY)])


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress,
                                      lambda d: zstandard.ZstdCompressor().compress(d)])
def test_extracts_each_format(tmp_path, compress):
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(bzimage(compress(PVH), len(PVH)))
    out = v.ensure_vmlinux(vmlinuz)
    assert out == tmp_path / "vmlinux" and out.read_bytes() == PVH
    assert v.ensure_vmlinux(vmlinuz) == out  # cached


def test_pvh_note_detection():
    assert v.has_pvh_entry(PVH)
    assert not v.has_pvh_entry(elf_with_notes([(b"Linux", 1), (b"Xen", 5)]))
    assert not v.has_pvh_entry(b"MZ" + PVH[2:])
    assert not v.has_pvh_entry(PVH[:80])  # program header cut off


def test_kernel_without_pvh_entry_keeps_the_bzimage(tmp_path):
    plain = elf_with_notes([(b"Linux", 1)])
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(bzimage(gzip.compress(plain), len(plain)))
    assert v.ensure_vmlinux(vmlinuz) is None
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize("image", [
    b"not a kernel" * 100,
    bzimage(gzip.compress(PVH), len(PVH) + 1),  # wrong size trailer
    bzimage(gzip.compress(PVH), v.MAX_VMLINUX + 1),  # absurd size
    bzimage(b"\x00\x01garbage" * 10, 100),  # unknown compression
    bzimage(gzip.compress(PVH), len(PVH))[:-50],  # payload runs past the end
])
def test_hostile_or_broken_images_fall_back(tmp_path, image):
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(image)
    assert v.ensure_vmlinux(vmlinuz) is None


def test_payload_errors_are_clear():
    with pytest.raises(GuestError, match="HdrS"):
        v._payload(b"x" * 1024)


def test_debian_cloud_kernel_boots_uncompressed(state_home):
    kern = fetch_kernel(Home(state_home))
    elf = v._decompress(v._payload(kern.vmlinuz.read_bytes()))
    assert v.has_pvh_entry(elf)
    assert 20 << 20 < len(elf) < v.MAX_VMLINUX
