"""images.elf: dependencies of real host binaries (checked against readelf) and of
synthetic ELF files of both classes and byte orders; hostile bytes never raise."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.images import elf
from supermachine.images.elf import parse_elf, parse_shebang

# Dynamically linked files of this Debian host (install.sh installs each): programs with few
# and many libraries, and a library. A missing one fails the test, not vanishes from it.
HOST_BINARIES = ["/bin/true", "/usr/bin/python3", "/usr/bin/qemu-system-x86_64",
                 "/usr/lib/x86_64-linux-gnu/libssl.so.3"]


def readelf(path: str) -> tuple[str | None, list[str], list[str]]:
    out = subprocess.run(["readelf", "-ldW", path], capture_output=True, text=True,
                         check=True).stdout
    interp = re.search(r"Requesting program interpreter: (\S+)\]", out)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    search = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.+?)\]", out)
    return interp.group(1) if interp else None, needed, search


@pytest.mark.parametrize("path", HOST_BINARIES)
def test_host_binaries_match_readelf(path):
    assert Path(path).is_file(), f"{path} is missing; install.sh installs it"
    deps = parse_elf(Path(path).read_bytes())
    interp, needed, search = readelf(path)
    assert deps is not None
    assert deps.machine == 62
    assert deps.interpreter == interp
    assert list(deps.needed) == needed
    assert list(deps.search) == [p for s in search[:1] for p in s.split(":")]


def test_static_binary_has_no_dependencies():
    init = Path(__file__).parents[3] / "src/supermachine/guest/init/sm-init"
    deps = parse_elf(init.read_bytes())
    assert deps is not None and deps.interpreter is None and deps.needed == ()


def build_elf(*, wide: bool, little: bool, interp: bytes | None = b"/lib/ld.so",
              needed: tuple[bytes, ...] = (b"liba.so", b"libb.so"),
              runpath: bytes | None = b"$ORIGIN/../lib:/opt/lib",
              machine: int = 62) -> bytes:
    """A minimal ELF: header, PT_LOAD covering the file, PT_INTERP, PT_DYNAMIC."""
    e = "<" if little else ">"
    ehsize, phsize = (64, 56) if wide else (52, 32)
    phnum = 3
    strtab = b"\0" + b"".join(n + b"\0" for n in needed)
    offsets = []
    pos = 1
    for n in needed:
        offsets.append(pos)
        pos += len(n) + 1
    runpath_at = None
    if runpath is not None:
        runpath_at = len(strtab)
        strtab += runpath + b"\0"
    interp_blob = (interp + b"\0") if interp is not None else b""
    interp_off = ehsize + phnum * phsize
    strtab_off = interp_off + len(interp_blob)
    dyn_off = strtab_off + len(strtab)
    vaddr = 0x400000
    entries = [(elf.DT_NEEDED, o) for o in offsets] + [(elf.DT_STRTAB, vaddr + strtab_off)]
    if runpath_at is not None:
        entries.append((elf.DT_RUNPATH, runpath_at))
    entries.append((elf.DT_NULL, 0))
    dyn_fmt = e + ("qQ" if wide else "iI")
    dynamic = b"".join(struct.pack(dyn_fmt, t, v) for t, v in entries)
    total = dyn_off + len(dynamic)

    def ph(p_type: int, off: int, size: int) -> bytes:
        if wide:
            return struct.pack(e + "IIQQQQQQ", p_type, 4, off, vaddr + off, vaddr + off, size,
                               size, 8)
        return struct.pack(e + "IIIIIIII", p_type, off, vaddr + off, vaddr + off, size, size,
                           4, 4)

    phdrs = ph(elf.PT_LOAD, 0, total)
    phdrs += ph(elf.PT_INTERP, interp_off, len(interp_blob)) if interp is not None \
        else ph(6, 0, 0)  # PT_PHDR stands in
    phdrs += ph(elf.PT_DYNAMIC, dyn_off, len(dynamic))
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if little else 2, 1]) + bytes(9)
    if wide:
        header = ident + struct.pack(e + "HHIQQQIHHHHHH", 3, machine, 1, 0, ehsize, 0, 0,
                                     ehsize, phsize, phnum, 64, 0, 0)
    else:
        header = ident + struct.pack(e + "HHIIIIIHHHHHH", 3, machine, 1, 0, ehsize, 0, 0,
                                     ehsize, phsize, phnum, 40, 0, 0)
    return header + phdrs + interp_blob + strtab + dynamic


@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("little", [True, False])
def test_synthetic_elf_of_each_class_and_byte_order(wide, little):
    deps = parse_elf(build_elf(wide=wide, little=little, machine=183))
    assert deps == elf.ElfDeps(183, "/lib/ld.so", ("liba.so", "libb.so"),
                               ("$ORIGIN/../lib", "/opt/lib"))


def test_library_without_interpreter_or_runpath():
    deps = parse_elf(build_elf(wide=True, little=True, interp=None, runpath=None))
    assert deps == elf.ElfDeps(62, None, ("liba.so", "libb.so"), ())


@pytest.mark.parametrize("bad", [
    b"", b"\x7fELF", b"MZ" + bytes(100), b"\x7fELF\x03\x01" + bytes(100),
    build_elf(wide=True, little=True)[:100],  # program headers cut off
    build_elf(wide=True, little=True, interp=b"relative/ld.so"),  # loader must be absolute
])
def test_malformed_files_are_not_elf(bad):
    assert parse_elf(bad) is None


def test_strtab_outside_every_segment_is_refused():
    data = bytearray(build_elf(wide=True, little=True))
    # point DT_STRTAB far away: the library names cannot be located
    at = data.find(struct.pack("<qQ", elf.DT_STRTAB, 0)[:8])
    struct.pack_into("<Q", data, at + 8, 0xdead0000)
    assert parse_elf(bytes(data)) is None


def test_counts_are_bounded():
    many = tuple(b"l%d.so" % i for i in range(elf.MAX_NEEDED + 50))
    deps = parse_elf(build_elf(wide=True, little=True, needed=many))
    assert deps is not None and len(deps.needed) == elf.MAX_NEEDED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(data):
    result = parse_elf(b"\x7fELF" + data)
    assert result is None or isinstance(result, elf.ElfDeps)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_elf_never_raises_and_stays_bounded(data):
    blob = bytearray(build_elf(wide=data.draw(st.booleans()), little=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    result = parse_elf(bytes(blob))
    if result is not None:
        assert len(result.needed) <= elf.MAX_NEEDED
        assert all(len(n) < elf.MAX_STRING for n in result.needed)
        assert result.interpreter is None or result.interpreter.startswith("/")


@pytest.mark.parametrize("head, want", [
    (b"#!/bin/sh\necho", ("/bin/sh",)),
    (b"#! /usr/bin/env python3 -u\n", ("/usr/bin/env", "python3 -u")),
    (b"#!/bin/bash -e", ("/bin/bash", "-e")),
    (b"#!relative\n", None),
    (b"#!\n", None),
    (b"\x7fELF", None),
    (b"#!/bin/\xff\n", None),
])
def test_shebang(head, want):
    assert parse_shebang(head) == want
