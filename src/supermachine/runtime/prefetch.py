"""Pre-reading the image's default command into the guest's page cache before a bake.

Under TCG most of a restored VM's first exec is spent translating guest code, and reading
the program from the squashfs (block layer, LZ4, page cache insertion) is a large part of
that code; pages already cached in the snapshot skip it. The automatic snapshot therefore
holds the default command's program, its script interpreter and its shared libraries
(`images.elf` finds them), which every clone shares through the snapshot's memory file.

The walk is pure: ``read(path, max_size)`` is the only I/O, so tests drive it with a dict.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence

from ..images.elf import MAX_SHEBANG, ElfDeps, parse_elf, parse_shebang

#: Reads a guest file whole (following symlinks); None when missing, unreadable or larger.
Reader = Callable[[str, int], "bytes | None"]

MAX_FILES = 32
MAX_BYTES = 64 << 20
MAX_PROBES = 64  # reads that found nothing (PATH and library directories tried)
MAX_PATH_DIRS = 32

#: Read on every exec by the guest agent, to resolve the user (spawn.c).
ALWAYS = ("/etc/passwd", "/etc/group")

_MULTIARCH = {62: "x86_64-linux-gnu", 183: "aarch64-linux-gnu", 3: "i386-linux-gnu"}
_LIB_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib")


def library_dirs(deps: ElfDeps, origin: str) -> list[str]:
    """Where the dynamic loader looks for ``deps``' libraries (ld.so.cache aside)."""
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in deps.search]
    arch = _MULTIARCH.get(deps.machine)
    if arch:
        dirs += [f"/lib/{arch}", f"/usr/lib/{arch}"]
    return [d for d in dict.fromkeys(dirs + list(_LIB_DIRS)) if d.startswith("/")]


class _Walk:
    def __init__(self, read: Reader, max_files: int, max_bytes: int) -> None:
        self._read = read
        self.fetched: list[str] = []
        self._tried: set[str] = set()
        self._files, self._bytes, self._probes = max_files, max_bytes, MAX_PROBES

    def fetch(self, path: str) -> bytes | None:
        path = posixpath.normpath(path)
        if path in self._tried or self._files <= 0 or self._bytes <= 0 or self._probes <= 0:
            return None
        self._tried.add(path)
        data = self._read(path, self._bytes)
        if data is None:
            self._probes -= 1
            return None
        self.fetched.append(path)
        self._files -= 1
        self._bytes -= len(data)
        return data

    def program(self, name: str, path_env: str, cwd: str) -> tuple[str, bytes] | None:
        if "/" in name:
            candidates = [posixpath.join(cwd, name)]
        else:
            candidates = [posixpath.join(d or cwd, name)
                          for d in path_env.split(":")[:MAX_PATH_DIRS]]
        for candidate in candidates:
            data = self.fetch(candidate)
            if data is not None:
                return candidate, data
        return None


def prefetch_command(read: Reader, argv: Sequence[str], *, path_env: str, cwd: str = "/",
                     max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> list[str]:
    """Read ``argv[0]`` (found on ``path_env``) and what it needs to start, plus the files
    every exec reads; returns the paths read, in order."""
    walk = _Walk(read, max_files, max_bytes)
    for path in ALWAYS:
        walk.fetch(path)
    if not argv:
        return walk.fetched
    found = walk.program(argv[0], path_env, cwd)
    elves: list[tuple[str, bytes]] = []
    if found:
        elves.append(found)
        shebang = parse_shebang(found[1][:MAX_SHEBANG])
        if shebang:
            interp = walk.fetch(shebang[0])
            if interp is not None:
                elves.append((shebang[0], interp))
            # `#!/usr/bin/env prog`: the program that really runs is prog, found on PATH.
            if posixpath.basename(shebang[0]) == "env" and len(shebang) > 1 \
                    and not shebang[1].startswith("-"):
                target = walk.program(shebang[1].split()[0], path_env, cwd)
                if target:
                    elves.append(target)
    seen_libs: set[str] = set()
    loader = False
    while elves:
        path, data = elves.pop(0)
        deps = parse_elf(data)
        if deps is None:
            continue
        if deps.interpreter:
            loader = True
            walk.fetch(deps.interpreter)
            seen_libs.add(posixpath.basename(deps.interpreter))  # libc NEEDs it by name
        for name in deps.needed:
            if name in seen_libs:
                continue
            seen_libs.add(name)
            dirs = [""] if "/" in name else library_dirs(deps, posixpath.dirname(path))
            for d in dirs:
                lib = posixpath.join(d, name) if d else name
                if not lib.startswith("/"):
                    break
                content = walk.fetch(lib)
                if content is not None:
                    elves.append((lib, content))
                    break
    if loader:
        walk.fetch("/etc/ld.so.cache")
    return walk.fetched
