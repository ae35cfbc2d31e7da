"""What an image's program needs to start: its script interpreter or its ELF dependencies.

Pure parsing of untrusted bytes (a file from an image): every offset, count and string is
bounded, and anything malformed gives ``None`` rather than an exception. Used to pre-read a
program and its shared libraries into the guest's page cache before a snapshot is baked.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

MAX_PHDRS = 1024
MAX_DYNAMIC = 8192
MAX_NEEDED = 128
MAX_STRING = 4096
MAX_SHEBANG = 256

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29


@dataclass(frozen=True)
class ElfDeps:
    machine: int  # e_machine: 62 x86-64, 183 AArch64, 3 i386
    interpreter: str | None  # PT_INTERP: the dynamic loader's path
    needed: tuple[str, ...]  # DT_NEEDED library names, in order
    search: tuple[str, ...]  # DT_RUNPATH, else DT_RPATH, split on ':'


def parse_shebang(head: bytes) -> tuple[str, ...] | None:
    """``#!`` line of a script: the interpreter and its (at most one) argument, or None."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:MAX_SHEBANG].split(b"\n", 1)[0]
    try:
        words = line.decode().split(None, 1)
    except UnicodeDecodeError:
        return None
    if not words or not words[0].startswith("/"):
        return None
    return tuple(w.strip() for w in words)


def _string(data: bytes, offset: int) -> str | None:
    if not 0 <= offset < len(data):
        return None
    end = data.find(b"\0", offset, offset + MAX_STRING)
    if end <= offset:
        return None
    try:
        return data[offset:end].decode()
    except UnicodeDecodeError:
        return None


def parse_elf(data: bytes) -> ElfDeps | None:
    """Dependencies of an ELF executable or library; None when ``data`` is not valid ELF."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    wide = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    try:
        machine, = struct.unpack_from(end + "H", data, 18)
        if wide:
            phoff, = struct.unpack_from(end + "Q", data, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
            ph_fmt, ph_size = end + "IIQQQQQQ", 56
        else:
            phoff, = struct.unpack_from(end + "I", data, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
            ph_fmt, ph_size = end + "IIIIIIII", 32
        if phentsize != ph_size or phnum > MAX_PHDRS or phoff + phnum * ph_size > len(data):
            return None
        loads: list[tuple[int, int, int]] = []  # (vaddr, filesz, offset)
        interp_at = dynamic = None
        for i in range(phnum):
            f = struct.unpack_from(ph_fmt, data, phoff + i * ph_size)
            if wide:
                p_type, _, p_offset, p_vaddr, _, p_filesz = f[:6]
            else:
                p_type, p_offset, p_vaddr, _, p_filesz = f[:5]
            if p_type == PT_LOAD:
                loads.append((p_vaddr, p_filesz, p_offset))
            elif p_type == PT_INTERP and interp_at is None:
                interp_at = p_offset
            elif p_type == PT_DYNAMIC and dynamic is None:
                dynamic = (p_offset, p_filesz)
        interpreter = _string(data, interp_at) if interp_at is not None else None
        if interp_at is not None and not (interpreter and interpreter.startswith("/")):
            return None
        bare = ElfDeps(machine, interpreter, (), ())
        return bare if dynamic is None else _dynamic(data, wide, end, dynamic, loads, bare)
    except struct.error:
        return None


def _dynamic(data: bytes, wide: bool, end: str, dynamic: tuple[int, int],
             loads: list[tuple[int, int, int]], bare: ElfDeps) -> ElfDeps | None:
    fmt, size = (end + "qQ", 16) if wide else (end + "iI", 8)
    offset, length = dynamic
    count = min(length // size, MAX_DYNAMIC)
    if offset + count * size > len(data):
        return None
    needed: list[int] = []
    strtab = runpath = rpath = None
    for i in range(count):
        tag, value = struct.unpack_from(fmt, data, offset + i * size)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED and len(needed) < MAX_NEEDED:
            needed.append(value)
        elif tag == DT_STRTAB:
            strtab = value
        elif tag == DT_RUNPATH:
            runpath = value
        elif tag == DT_RPATH:
            rpath = value
    if strtab is None:
        return bare
    # DT_STRTAB is an address: find the file offset of the loaded segment that holds it.
    base = next((off + strtab - vaddr for vaddr, filesz, off in loads
                 if vaddr <= strtab < vaddr + filesz), None)
    if base is None:
        return None

    def at(index: int) -> str | None:
        return _string(data, base + index)

    names = tuple(n for n in map(at, needed) if n)
    search_at = runpath if runpath is not None else rpath
    search_text = at(search_at) if search_at is not None else None
    search = tuple(p for p in (search_text or "").split(":") if p)
    return dataclasses.replace(bare, needed=names, search=search)
