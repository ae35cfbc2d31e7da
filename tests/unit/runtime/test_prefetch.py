"""prefetch: which files a bake reads, walked against an in-memory guest filesystem."""

from __future__ import annotations

from supermachine.runtime import prefetch
from supermachine.runtime.prefetch import prefetch_command
from tests.unit.images.test_elf import build_elf

PATH = "/usr/local/bin:/usr/bin:/bin"
BASE = {"/etc/passwd": b"root:x:0:0::/root:/bin/sh\n", "/etc/group": b"root:x:0:\n"}


def fs_reader(files: dict[str, bytes], log: list[str] | None = None):
    def read(path: str, max_size: int) -> bytes | None:
        if log is not None:
            log.append(path)
        data = files.get(path)
        return None if data is None or len(data) > max_size else data
    return read


def dynamic(*needed: bytes, runpath: bytes | None = None, interp=b"/lib64/ld.so") -> bytes:
    return build_elf(wide=True, little=True, interp=interp, needed=needed, runpath=runpath)


def test_static_program_found_on_path():
    files = {**BASE, "/bin/busybox-sh": b"\x7fELF static", "/usr/bin/app": b"\x7fELF..."}
    assert prefetch_command(fs_reader(files), ["app", "-x"], path_env=PATH) == \
        ["/etc/passwd", "/etc/group", "/usr/bin/app"]


def test_dynamic_program_its_loader_libraries_and_their_libraries():
    files = {
        **BASE,
        "/usr/bin/app": dynamic(b"libfoo.so.1", b"libc.so.6"),
        "/lib64/ld.so": b"loader",
        "/usr/lib/x86_64-linux-gnu/libfoo.so.1": dynamic(b"libbar.so", b"libc.so.6", interp=None),
        "/lib/x86_64-linux-gnu/libc.so.6": dynamic(b"ld.so", interp=None),
        "/usr/local/lib/libbar.so": dynamic(b"libfoo.so.1", interp=None),  # a cycle
        "/etc/ld.so.cache": b"cache",
    }
    got = prefetch_command(fs_reader(files), ["/usr/bin/app"], path_env=PATH)
    assert got == ["/etc/passwd", "/etc/group", "/usr/bin/app", "/lib64/ld.so",
                   "/usr/lib/x86_64-linux-gnu/libfoo.so.1", "/lib/x86_64-linux-gnu/libc.so.6",
                   "/usr/local/lib/libbar.so", "/etc/ld.so.cache"]


def test_runpath_with_origin_is_searched_first():
    files = {**BASE, "/opt/app/bin/app": dynamic(b"libx.so", runpath=b"$ORIGIN/../lib"),
             "/opt/app/lib/libx.so": b"x", "/usr/lib/libx.so": b"wrong one"}
    got = prefetch_command(fs_reader(files), ["/opt/app/bin/app"], path_env=PATH)
    assert "/opt/app/lib/libx.so" in got and "/usr/lib/libx.so" not in got


def test_env_script_brings_in_env_and_the_real_program():
    files = {**BASE, "/usr/local/bin/tool": b"#!/usr/bin/env python3 -u\nprint()\n",
             "/usr/bin/env": b"\x7fELF env", "/usr/bin/python3": dynamic(b"libm.so.6"),
             "/lib64/ld.so": b"ld", "/lib/libm.so.6": b"m", "/etc/ld.so.cache": b"c"}
    got = prefetch_command(fs_reader(files), ["tool"], path_env=PATH)
    assert got == ["/etc/passwd", "/etc/group", "/usr/local/bin/tool", "/usr/bin/env",
                   "/usr/bin/python3", "/lib64/ld.so", "/lib/libm.so.6", "/etc/ld.so.cache"]


def test_relative_program_is_found_from_the_working_directory():
    files = {"/srv/run.sh": b"#!/bin/sh\n", "/bin/sh": b"sh"}
    got = prefetch_command(fs_reader(files), ["./run.sh"], path_env=PATH, cwd="/srv")
    assert got == ["/srv/run.sh", "/bin/sh"]


def test_missing_program_reads_nothing_more():
    log: list[str] = []
    assert prefetch_command(fs_reader(BASE, log), ["nope"], path_env=PATH) == \
        ["/etc/passwd", "/etc/group"]
    assert log[2:] == ["/usr/local/bin/nope", "/usr/bin/nope", "/bin/nope"]


def test_budgets_bound_files_bytes_and_probes():
    files = {f"/lib/l{i}.so": dynamic(b"l%d.so" % (i + 1), interp=None) for i in range(100)}
    files["/bin/app"] = dynamic(b"l0.so", interp=None)
    got = prefetch_command(fs_reader(files), ["/bin/app"], path_env=PATH, max_files=5)
    assert len(got) == 5
    got = prefetch_command(fs_reader(files), ["/bin/app"], path_env=PATH,
                           max_bytes=3 * len(files["/bin/app"]))
    assert 1 <= len(got) <= 3
    log: list[str] = []
    prefetch_command(fs_reader({}, log), ["x"], path_env=":".join(f"/d{i}" for i in range(500)))
    assert len(log) <= prefetch.MAX_PROBES


def test_no_command_reads_only_the_always_files():
    assert prefetch_command(fs_reader(BASE), [], path_env=PATH) == ["/etc/passwd", "/etc/group"]
