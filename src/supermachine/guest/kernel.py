"""The guest kernel: Debian's cloud kernel fetched once with apt, or one the user names.

Fetching (no root needed): resolve the ``linux-image-cloud-amd64`` metapackage to the
versioned image package, ``apt-get download`` it (apt checks it against the signed index),
check the .deb's sha256 against ``apt-cache show`` ourselves too, unpack it with
``dpkg-deb -x`` and keep only what the guest needs::

    downloads/<package>_<version>.deb           the package, kept (checked against apt's
                                                SHA256 before every use)
    guest/kernel-<version>-<layout>/vmlinuz
    guest/kernel-<version>-<layout>/config
    guest/kernel-<version>-<layout>/kernel.json         where it came from, sha256 of vmlinuz
    guest/kernel-<version>-<layout>/modules/modules.{dep,order,builtin}
    guest/kernel-<version>-<layout>/modules/kernel/...  the guest's modules and dependencies
    guest/<package>.json                        pointer to the directory above

``<layout>`` is a digest of the code that assembles the directory (this module, and
vmlinux.py, which extracts ``vmlinux`` into it): a newer version of that code assembles its
own directory from the kept package, pinned to the same kernel version, without apt.

The .deb carries no modules.dep (depmod runs at install time), so we write one for the kept
modules from each module's ``.modinfo`` ``depends=`` field.

The directory is assembled under a temp name and renamed into place, then the pointer is
written; so the fast path (later runs) is one small read and one stat, with no apt at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..codeversion import code_version
from ..errors import GuestError
from ..home import Home, atomic_write_bytes, file_lock, sha256_file

DEFAULT_PACKAGE = "linux-image-cloud-amd64"

#: modules the guest init loads: virtio transport and devices, root fs and overlay
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtio_net",
    "squashfs",
    "overlay",
)
#: wanted but not required; skipped if a kernel lacks them. Empty: every module costs boot
#: time under emulation (fuse + virtiofs ~50 ms), so host directory sharing adds its own
#: when it comes, as does a balloon device.
OPTIONAL_MODULES: tuple[str, ...] = ()

_HINT = "or pass --kernel/--initrd"
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,100}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._~-]{0,100}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_POINTER = 64 << 10
_MAX_KERNEL = 256 << 20  # bigger than any real bzImage by far
_MAX_MODULE = 64 << 20
_MAX_MODULES = 512
#: The code that assembles a kernel directory (vmlinux.py writes into it too).
LAYOUT_SOURCES = ("guest/kernel.py", "guest/vmlinux.py")


def layout_version() -> str:
    return code_version(*LAYOUT_SOURCES)


def kernel_dirname(release: str) -> str:
    return f"kernel-{release}-{layout_version()}"


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    version: str  # `uname -r` of the guest, e.g. "6.1.0-56-cloud-amd64"
    sha256: str  # of the vmlinuz bytes
    modules_dir: Path | None  # holds modules.dep and the .ko files; None: none needed


# --------------------------------------------------------------------------------------------
# Reading kernels and modules


def bzimage_version(header: bytes) -> str:
    """The release string (``uname -r``) from the start of a bzImage (setup header).

    Raises GuestError when the bytes are not a bzImage with a version string.
    """
    # x86 boot protocol: "HdrS" at 0x202, protocol version at 0x206, and at 0x20e a pointer
    # (minus 0x200) to a NUL-terminated "6.1.0-56-cloud-amd64 (builder) #1 SMP ..." string.
    if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
        raise GuestError("not a Linux bzImage (no HdrS header)")
    (proto,) = struct.unpack_from("<H", header, 0x206)
    (ptr,) = struct.unpack_from("<H", header, 0x20E)
    start = ptr + 0x200
    if proto < 0x200 or ptr == 0 or start >= len(header):
        raise GuestError("bzImage has no kernel version string")
    raw = header[start : start + 256].split(b"\0", 1)[0]
    release = raw.split(b" ", 1)[0].decode("ascii", "replace")
    if not _VERSION_RE.match(release):
        raise GuestError(f"bzImage has an unreadable version string {release[:40]!r}")
    return release


def modinfo_depends(elf: bytes) -> list[str]:
    """Names in a kernel module's ``.modinfo`` ``depends=`` field (the input depmod uses)."""
    try:
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            raise GuestError("kernel module is not a little-endian ELF64 file")
        shoff, = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
        if shentsize < 64 or shnum > 4096 or shstrndx >= shnum:
            raise GuestError("kernel module has a malformed section table")

        def section(i: int) -> tuple[int, int, int]:
            name, = struct.unpack_from("<I", elf, shoff + i * shentsize)
            off, size = struct.unpack_from("<QQ", elf, shoff + i * shentsize + 0x18)
            if off + size > len(elf):
                raise GuestError("kernel module section runs past the end of the file")
            return name, off, size

        _, str_off, str_size = section(shstrndx)
        for i in range(shnum):
            name_off, off, size = section(i)
            if name_off >= str_size:
                continue
            name = elf[str_off + name_off : elf.index(b"\0", str_off + name_off)]
            if name != b".modinfo":
                continue
            for field in elf[off : off + size].split(b"\0"):
                if field.startswith(b"depends="):
                    value = field[len(b"depends=") :].decode("ascii", "replace")
                    return [d for d in value.split(",") if d]
            return []
    except (struct.error, ValueError, IndexError) as e:
        raise GuestError(f"kernel module ELF is malformed ({e})") from e
    return []


def _module_name(rel: str) -> str:
    return Path(rel).name.split(".ko", 1)[0].replace("-", "_")


def select_modules(
    modules_root: Path, wanted: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, list[str]]:
    """The modules.dep entries (path -> dependency paths) of ``wanted``, transitively.

    ``modules_root`` is a ``lib/modules/<version>`` directory with a modules.order; each
    module's dependencies come from its own ``.modinfo``. Missing optional modules are skipped.
    """
    try:
        order = (modules_root / "modules.order").read_text("utf-8", "replace").split()
    except OSError as e:
        raise GuestError(f"kernel package has no modules.order ({e.strerror}); {_HINT}") from e
    by_name = {_module_name(p): p for p in order}
    optional_names = {n.replace("-", "_") for n in optional}
    todo = [n.replace("-", "_") for n in (*wanted, *optional)]
    result: dict[str, list[str]] = {}
    while todo:
        name = todo.pop()
        rel = by_name.get(name)
        if rel is None:
            if name in optional_names:
                continue
            raise GuestError(f"kernel package lacks module {name}; {_HINT}")
        if rel in result:
            continue
        if len(result) >= _MAX_MODULES:
            raise GuestError("kernel module dependencies are implausibly many; " + _HINT)
        try:
            with open(modules_root / rel, "rb") as f:
                elf = f.read(_MAX_MODULE + 1)
        except OSError as e:
            raise GuestError(f"cannot read kernel module {rel}: {e.strerror}; {_HINT}") from e
        if len(elf) > _MAX_MODULE:
            raise GuestError(f"kernel module {rel} is implausibly large; {_HINT}")
        deps = modinfo_depends(elf)
        missing = [d for d in deps if d.replace("-", "_") not in by_name]
        if missing:
            raise GuestError(f"module {name} needs {missing[0]}, absent from the package")
        result[rel] = [by_name[d.replace("-", "_")] for d in deps]
        todo.extend(d.replace("-", "_") for d in deps)
    return result


def kernel_from_path(vmlinuz: Path, modules_dir: Path | None = None) -> Kernel:
    """Use a kernel the user names (``--kernel``), optionally with its ``lib/modules/<ver>``.

    Without ``modules_dir`` no modules are loaded: the kernel must have virtio-mmio and its
    devices, squashfs and overlay built in (as Firecracker-style guest kernels do).
    """
    try:
        size = vmlinuz.stat().st_size
        with open(vmlinuz, "rb") as f:
            header = f.read(64 << 10)
    except OSError as e:
        raise GuestError(f"cannot read kernel {vmlinuz}: {e.strerror}") from e
    if size > _MAX_KERNEL:
        raise GuestError(f"kernel {vmlinuz} is over {_MAX_KERNEL >> 20} MiB; is it a kernel?")
    digest = sha256_file(vmlinuz)
    if header.startswith(b"\x7fELF"):
        version = "elf-" + digest[:16]  # an uncompressed vmlinux (PVH boot) has no header string
    else:
        try:
            version = bzimage_version(header)
        except GuestError as e:
            raise GuestError(f"{vmlinuz} is not a usable kernel: {e}") from e
    if modules_dir is not None and not (modules_dir / "modules.dep").is_file():
        raise GuestError(f"{modules_dir} has no modules.dep; run `depmod -b` or pass --initrd")
    return Kernel(vmlinuz, version, digest, modules_dir)


# --------------------------------------------------------------------------------------------
# Fetching with apt


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    exe = shutil.which(argv[0])
    if exe is None:
        raise GuestError(f"{argv[0]} not found, cannot fetch the guest kernel; install apt {_HINT}")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        proc = subprocess.run(
            [exe, *argv[1:]], cwd=cwd, env=env, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise GuestError(f"{argv[0]} timed out fetching the guest kernel; retry {_HINT}") from e
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = why[-1] if why else f"exit status {proc.returncode}"
        raise GuestError(f"{' '.join(argv[:2])} failed ({detail[:200]}); {_HINT}")
    return proc.stdout.decode("utf-8", "replace")


def _fields(stanza: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in stanza.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            out.setdefault(key.strip(), value.strip())
    return out


@dataclass(frozen=True)
class _Candidate:
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian version, e.g. 6.1.192-2
    sha256: str
    size: int
    release: str  # uname -r, e.g. 6.1.0-56-cloud-amd64


def resolve_package(meta: str = DEFAULT_PACKAGE) -> _Candidate:
    """Follow the metapackage to the versioned image package apt would install now."""
    show = _fields(_run(["apt-cache", "show", "--no-all-versions", meta]))
    target = meta
    depends = show.get("Depends", "")
    m = re.search(r"\b(linux-image-[0-9][A-Za-z0-9.+-]*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", depends)
    if m:  # a metapackage; a versioned package name is also accepted as-is
        target = m.group(1) + (f"={m.group(2)}" if m.group(2) else "")
        show = _fields(_run(["apt-cache", "show", "--no-all-versions", target]))
    cand = _candidate(show, target)
    release = cand.package.removeprefix("linux-image-")
    if not _VERSION_RE.match(release) or release == cand.package:
        raise GuestError(f"{cand.package} is not a linux-image package; {_HINT}")
    return dataclasses.replace(cand, release=release)


def apt_package(name: str) -> _Candidate:
    """The version of package ``name`` apt would install now (``release`` left empty)."""
    return _candidate(_fields(_run(["apt-cache", "show", "--no-all-versions", name])), name)


def _candidate(show: dict[str, str], target: str) -> _Candidate:
    name, version, sha = show.get("Package", ""), show.get("Version", ""), show.get("SHA256", "")
    if not (_PKG_RE.match(name) and _VERSION_RE.match(version) and _SHA_RE.match(sha)):
        raise GuestError(f"apt-cache show {target} gave no package/version/SHA256; {_HINT}")
    try:
        size = int(show.get("Size", "0"))
    except ValueError:
        size = 0
    return _Candidate(name, version, sha, size, "")


def download(cand: _Candidate, downloads: Path) -> Path:
    """The package's .deb in ``downloads``: the kept one if its SHA256 is apt's, else fetched."""
    kept = downloads / f"{cand.package}_{cand.version}.deb"
    # Checked before locking too: a user who may only read a shared ``downloads`` (an
    # unprivileged user beside root's) uses a kept package without creating a lock file.
    with contextlib.suppress(OSError):
        if sha256_file(kept) == cand.sha256:
            return kept
    with file_lock(downloads / f".{cand.package}.lock"):  # homes may share ``downloads``
        with contextlib.suppress(OSError):
            if sha256_file(kept) == cand.sha256:
                return kept  # another process downloaded it while we waited
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".tmp-download-") as work:
            _run(["apt-get", "download", "-q", f"{cand.package}={cand.version}"],
                 cwd=Path(work), timeout=1800)
            debs = list(Path(work).glob("*.deb"))
            if len(debs) != 1:
                raise GuestError(f"apt-get download left {len(debs)} .deb files; {_HINT}")
            deb = debs[0]
            if cand.size and deb.stat().st_size != cand.size:
                raise GuestError(f"{deb.name} has the wrong size; retry, {_HINT}")
            if sha256_file(deb) != cand.sha256:
                raise GuestError(f"{deb.name} does not match apt's SHA256; retry, {_HINT}")
            os.chmod(deb, 0o644)  # a kernel is not secret; other users' homes may share it
            os.replace(deb, kept)
    return kept


def _assemble(
    cand: _Candidate, deb: Path, unpacked: Path, stage: Path, dirname: str
) -> dict[str, str]:
    """Copy the parts the guest needs from the unpacked package into ``stage``."""
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)], timeout=600)
    boot = unpacked / "boot"
    src_kernel = boot / f"vmlinuz-{cand.release}"
    modules_root = unpacked / "lib" / "modules" / cand.release
    if not src_kernel.is_file() or not modules_root.is_dir():
        raise GuestError(f"{deb.name} has no vmlinuz-{cand.release} or modules; {_HINT}")
    with open(src_kernel, "rb") as f:
        if bzimage_version(f.read(64 << 10)) != cand.release:
            raise GuestError(f"vmlinuz in {deb.name} reports another version; {_HINT}")
    selected = select_modules(modules_root, GUEST_MODULES, OPTIONAL_MODULES)
    mods = stage / "modules"
    mods.mkdir(parents=True)
    for rel in selected:
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules_root / rel, mods / rel)
    dep_lines = [f"{rel}: {' '.join(deps)}".rstrip() + "\n" for rel, deps in selected.items()]
    order = (modules_root / "modules.order").read_text().split()
    (mods / "modules.dep").write_text("".join(sorted(dep_lines)))
    (mods / "modules.order").write_text("".join(p + "\n" for p in order if p in selected))
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(modules_root / "modules.builtin", mods / "modules.builtin")
    shutil.copyfile(src_kernel, stage / "vmlinuz")
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(boot / f"config-{cand.release}", stage / "config")
    record = {
        "dir": dirname,
        "version": cand.release,
        "package": cand.package,
        "package_version": cand.version,
        "deb_sha256": cand.sha256,
        "vmlinuz_sha256": sha256_file(stage / "vmlinuz"),
    }
    (stage / "kernel.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _pointer(home: Home, package: str) -> Path:
    if not _PKG_RE.match(package):
        raise GuestError(f"invalid kernel package name {package!r}")
    return home.guest / f"{package}.json"


def _from_record(home: Home, raw: bytes) -> Kernel | None:
    """The kernel a pointer/kernel.json describes, or None if it is stale or malformed."""
    try:
        rec = json.loads(raw)
        dirname, version, sha = rec["dir"], rec["version"], rec["vmlinuz_sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (
        isinstance(version, str)
        and isinstance(dirname, str)
        and dirname == kernel_dirname(version)
        and _VERSION_RE.match(version)
        and isinstance(sha, str)
        and _SHA_RE.match(sha)
    ):
        return None
    kdir = home.guest / dirname
    vmlinuz = kdir / "vmlinuz"
    if not vmlinuz.is_file():
        return None
    return Kernel(vmlinuz, version, sha, kdir / "modules")


def prune_stale_layouts(home: Home) -> list[Path]:
    """Delete kernel directories assembled by other versions of this code (the kept package
    reassembles one when needed); waits for a fetch in progress."""
    removed = []
    with file_lock(home.guest / ".kernel.lock"):
        suffix = f"-{layout_version()}"
        for entry in home.guest.glob("kernel-*"):
            if entry.is_dir() and not entry.name.endswith(suffix):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _pinned(home: Home, package: str) -> _Candidate | None:
    """The package version an earlier fetch chose (kept across upgrades of this code, so a
    new directory layout reassembles the same kernel instead of whatever apt has now)."""
    try:
        with open(_pointer(home, package), "rb") as f:
            rec = json.loads(f.read(_MAX_POINTER))
        cand = _Candidate(rec["package"], rec["package_version"], rec["deb_sha256"], 0,
                          rec["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fields = (cand.package, cand.version, cand.sha256, cand.release)
    if not all(isinstance(f, str) for f in fields) or not (
            _PKG_RE.match(cand.package) and _VERSION_RE.match(cand.version)
            and _SHA_RE.match(cand.sha256) and _VERSION_RE.match(cand.release)
            and cand.package == f"linux-image-{cand.release}"):
        return None
    return cand


def cached_kernel(home: Home, package: str = DEFAULT_PACKAGE) -> Kernel | None:
    """The kernel fetched earlier for ``package``, if any: no subprocess, two syscalls' work."""
    try:
        with open(_pointer(home, package), "rb") as f:
            raw = f.read(_MAX_POINTER)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GuestError(f"cannot read the kernel cache: {e.strerror}") from e
    return _from_record(home, raw)


def fetch_kernel(home: Home, package: str = DEFAULT_PACKAGE, *, refresh: bool = False) -> Kernel:
    """Debian's cloud kernel under ``home.guest``, fetched with apt on first use.

    Later calls return the cached kernel without asking apt (pinning the guest kernel keeps
    snapshots valid); ``refresh=True`` asks apt for the current version.
    """
    if not refresh and (k := cached_kernel(home, package)) is not None:
        return k
    with file_lock(home.guest / ".kernel.lock"):
        if not refresh and (k := cached_kernel(home, package)) is not None:
            return k  # another process fetched it while we waited
        # Under the lock no fetch is in progress, so staging dirs left here were abandoned by
        # killed processes.
        for stale in home.guest.glob(".tmp-kernel-*"):
            shutil.rmtree(stale, ignore_errors=True)
        cand = None if refresh else _pinned(home, package)
        if cand is None:
            cand = resolve_package(package)
        final = home.guest / kernel_dirname(cand.release)
        existing = None
        with contextlib.suppress(OSError):
            existing = _from_record(home, (final / "kernel.json").read_bytes())
        if existing is None:
            if final.exists():  # a damaged entry
                shutil.rmtree(final)
            with tempfile.TemporaryDirectory(dir=home.tmp, prefix="kernel-fetch-") as tmp:
                unpacked = Path(tmp) / "root"
                deb = download(cand, home.downloads)
                stage = Path(tempfile.mkdtemp(dir=home.guest, prefix=f".tmp-{final.name}-"))
                try:
                    _assemble(cand, deb, unpacked, stage, final.name)
                    os.chmod(stage, 0o755)  # mkdtemp made it private; the kernel is not secret
                    os.rename(stage, final)
                except BaseException:
                    shutil.rmtree(stage, ignore_errors=True)
                    raise
            existing = _from_record(home, (final / "kernel.json").read_bytes())
            if existing is None:
                raise GuestError(f"fetched kernel in {final} is unreadable; remove it and retry")
        atomic_write_bytes(_pointer(home, package), (final / "kernel.json").read_bytes())
        return existing
