"""The supermachine guest kernel: built from Debian's kernel source with our own config.

Debian's cloud kernel spends most of a cold boot under emulation initialising what a microVM
never has and loading modules; this one has everything a VM uses built in (kconfig/*.config,
each option commented) and nothing else, so the initramfs carries only the init.

Building (``supermachine kernel build``, run by install.sh; minutes, not seconds)::

    apt-get download linux-source-6.1      kept in downloads/, checked against apt's SHA256
    make allnoconfig KCONFIG_ALLCONFIG=<the fragments, concatenated>
    check that every option the fragments ask for is set as asked (Kconfig silently drops an
        option whose dependencies are missing: that must fail the build, not ship)
    make -j<cpus> vmlinux

Layout (``home.kernels``, shared by every home through ``SUPERMACHINE_KERNELS``)::

    kernels/sm-<key>/vmlinux        the kernel, booted directly through its PVH entry point
    kernels/sm-<key>/config         the .config it was built with
    kernels/sm-<key>/kernel.json    its inputs, sha256, and what the build took
    kernels/sm-<config>.json        pointer: the kernel last built for this config
    kernels/build-<key>.log         the last build's output (kept when it fails)

``<key>`` digests the source package (name, version, sha256), the fragments, the compiler and
linker versions and this module's code: change any and the next build makes a new kernel. VMs
find it through the pointer named by ``<config>`` (fragments and this code only), without
running apt or the compiler on every start. Builds hold ``kernels/.build.lock``, so two
installs racing build once, and happen in a staging directory renamed into place, so a
killed build leaves nothing half-built under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..codeversion import code_version
from ..errors import GuestError
from ..home import Home, atomic_write_bytes, file_lock
from . import kernel as kernel_mod

SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT_DIR = Path(__file__).resolve().parent / "kconfig"
BUILDER_SOURCES = ("guest/kbuild.py",)
#: how `--kernel` names this kernel and Debian's
NAME = "supermachine"
DEBIAN = "debian"
BUILD_TIMEOUT = 4 * 3600  # a slow single-core machine; a build here takes ~6 min on 2 cores
_MAX_RECORD = 64 << 10
_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_KEY_RE = re.compile(r"^[0-9a-f]{24}$")


# ---- the config -------------------------------------------------------------------------------


def fragments() -> list[Path]:
    return sorted(FRAGMENT_DIR.glob("*.config"))


def merged_fragments() -> str:
    return "".join(p.read_text() for p in fragments())


def wanted_options(text: str) -> dict[str, str | None]:
    """Every option the fragments set (``CONFIG_X=y`` -> "y") or unset (-> None)."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _OPTION.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            out[m.group(1)] = None
    return out


def config_problems(wanted: dict[str, str | None], dotconfig: str) -> list[str]:
    """Options of ``wanted`` that the resolved ``.config`` does not have as asked."""
    have = {k: v for k, v in (wanted_options(dotconfig)).items() if v is not None}
    problems = []
    for option, value in wanted.items():
        got = have.get(option)
        if value is None and got is not None:
            problems.append(f"{option}={got} (wanted unset)")
        elif value is not None and got != value:
            problems.append(f"{option}={got or 'unset'} (wanted {value})")
    return problems


def config_digest() -> str:
    """What VMs look the kernel up by: the fragments and this builder's code."""
    h = hashlib.sha256(b"supermachine-kconfig-v1\0")
    for path in fragments():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(code_version(*BUILDER_SOURCES).encode())
    return h.hexdigest()[:24]


# ---- the inputs ---------------------------------------------------------------------------------


def toolchain() -> str:
    """The compiler and linker versions (their first lines): part of the build key."""
    lines = []
    for tool in ("gcc", "ld"):
        exe = shutil.which(tool)
        if exe is None:
            raise GuestError(f"{tool} not found: building the kernel needs gcc, make, flex, "
                             "bison, bc and libelf-dev (install.sh installs them)")
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        lines.append(out.splitlines()[0].strip() if out else tool)
    return " | ".join(lines)


@dataclass(frozen=True)
class BuildInputs:
    package: str
    version: str
    sha256: str
    toolchain: str
    config: str  # config_digest()

    @property
    def key(self) -> str:
        h = hashlib.sha256(json.dumps(
            [self.package, self.version, self.sha256, self.toolchain, self.config]).encode())
        return h.hexdigest()[:24]


@dataclass(frozen=True)
class BuiltKernel:
    path: Path  # vmlinux
    sha256: str
    version: str  # e.g. "6.1.192-sm-<key>"
    record: dict


def _pointer(home: Home, config: str) -> Path:
    return home.kernels / f"sm-{config}.json"


def _read_record(home: Home, path: Path) -> BuiltKernel | None:
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read(_MAX_RECORD))
        key, sha, version = rec["key"], rec["vmlinux_sha256"], rec["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(key, str) and _KEY_RE.match(key) and isinstance(sha, str)
            and re.fullmatch(r"[0-9a-f]{64}", sha) and isinstance(version, str)
            and len(version) < 128):
        return None
    vmlinux = home.kernels / f"sm-{key}" / "vmlinux"
    if not vmlinux.is_file():
        return None
    return BuiltKernel(vmlinux, sha, version, rec)


def built_kernel(home: Home) -> BuiltKernel | None:
    """The kernel built for the current config, if any: one small read and one stat."""
    return _read_record(home, _pointer(home, config_digest()))


# ---- building ------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # Reproducible and quiet: no locale, build stamps that do not change from run to run.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
            "HOME": os.environ.get("HOME", "/"), "KBUILD_BUILD_USER": "supermachine",
            "KBUILD_BUILD_HOST": "supermachine", "KBUILD_BUILD_TIMESTAMP": "1970-01-01"}


def _step(what: str, argv: list[str], log, cwd: Path | None = None) -> float:
    """Run one build step, its output into ``log``; raise a one-line error if it fails."""
    t0 = time.monotonic()
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    try:
        proc = subprocess.run(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              env=_env(), timeout=BUILD_TIMEOUT, check=False,
                              preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise GuestError(f"{what}: {argv[0]} not found (install.sh installs the kernel's "
                         "build tools)") from None
    except subprocess.TimeoutExpired:
        raise GuestError(f"{what} did not finish within {BUILD_TIMEOUT // 60} min") from None
    if proc.returncode != 0:
        raise GuestError(f"{what} failed (exit status {proc.returncode}): "
                         f"{_last_error(Path(log.name))}")
    return time.monotonic() - t0


def _die_with_parent() -> None:
    # A killed `kernel build` must not leave make compiling into a staging directory the
    # next build sweeps away (make's own children finish their file and exit).
    import ctypes

    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed step's output."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - (64 << 10)))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()
                     if ln.strip()]
    except OSError:
        return "see the build log"
    for marker in ("error:", "Error", "not found", "No such file"):
        for line in reversed(lines):
            if marker in line and not line.startswith("make"):
                return line[:200]
    return lines[-1][:200] if lines else "no output"


def _disk_used(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def build(home: Home, *, force: bool = False, jobs: int | None = None,
          source_deb: Path | None = None, progress=None) -> BuiltKernel:
    """Build the kernel for the current config (or return the one built already).

    ``source_deb``: a ``linux-source-*`` package to use instead of asking apt (tests).
    ``progress``: called with a line per step.
    """
    say = progress or (lambda _line: None)
    config = config_digest()
    if source_deb is None:
        cand = kernel_mod.apt_package(SOURCE_PACKAGE)
        inputs = BuildInputs(cand.package, cand.version, cand.sha256, toolchain(), config)
    else:
        from ..home import sha256_file

        inputs = BuildInputs(source_deb.name, "local", sha256_file(source_deb), toolchain(),
                             config)
    kernels = home.kernels
    final = kernels / f"sm-{inputs.key}"
    record_path = final / "kernel.json"
    with file_lock(kernels / ".build.lock"):
        # Under the lock no build is running: staging left here belongs to killed builds.
        for stale in kernels.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if force and final.exists():
            shutil.rmtree(final)
        existing = _read_record(home, record_path)
        if existing is None:
            if final.exists():  # a damaged entry
                shutil.rmtree(final)
            deb = source_deb or kernel_mod.download(cand, home.downloads)
            existing = _build(home, inputs, deb, final, jobs, say)
        atomic_write_bytes(_pointer(home, config), record_path.read_bytes())
    return existing


def _build(home: Home, inputs: BuildInputs, deb: Path, final: Path, jobs: int | None,
           say) -> BuiltKernel:
    kernels = home.kernels
    log_path = kernels / f"build-{inputs.key}.log"
    stage = Path(tempfile.mkdtemp(dir=kernels, prefix=f".tmp-{final.name}-"))
    t_start = time.monotonic()
    result: Path | None = None
    try:
        src, out = stage / "src", stage / "out"
        src.mkdir()
        out.mkdir()
        frag = stage / "fragments.config"
        merged = merged_fragments()
        frag.write_text(merged)
        timings: dict[str, float] = {}
        with open(log_path, "wb") as log:
            say(f"extracting {deb.name}")
            timings["extract_s"] = _step("extracting the kernel source", [
                "sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -xO --wildcards '
                '"./usr/src/linux-source-*.tar.xz" | tar -xJ --strip-components=1 -C "$2"',
                "extract", str(deb), str(src)], log)
            if not (src / "Makefile").is_file():
                raise GuestError(f"{deb.name} holds no kernel source tree")
            say("configuring (allnoconfig + kconfig fragments)")
            timings["config_s"] = _step("configuring the kernel", [
                "make", "-s", "-C", str(src), f"O={out}", f"KCONFIG_ALLCONFIG={frag}",
                "allnoconfig"], log)
            dotconfig = (out / ".config").read_text()
            problems = config_problems(wanted_options(merged), dotconfig)
            if problems:
                raise GuestError("the kernel config does not take these options (missing "
                                 f"dependencies?): {', '.join(problems[:6])}")
            n = jobs or os.cpu_count() or 1
            say(f"building vmlinux with {n} jobs (minutes)")
            timings["build_s"] = _step("building the kernel", [
                "make", "-s", "-C", str(src), f"O={out}", f"-j{n}", "vmlinux"], log)
            release = (out / "include/config/kernel.release").read_text().strip()
        disk_peak = _disk_used(stage)
        result = Path(tempfile.mkdtemp(dir=kernels, prefix=f".tmp-result-{inputs.key}-"))
        shutil.copyfile(out / "vmlinux", result / "vmlinux")
        shutil.copyfile(out / ".config", result / "config")
        from ..home import sha256_file

        record = {
            "key": inputs.key, "version": f"{release}-sm-{inputs.key[:8]}",
            "vmlinux_sha256": sha256_file(result / "vmlinux"),
            "source": {"package": inputs.package, "version": inputs.version,
                       "sha256": inputs.sha256},
            "toolchain": inputs.toolchain, "config": inputs.config,
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "wall_s": round(time.monotonic() - t_start, 1),
            "disk_peak_bytes": disk_peak,
            "vmlinux_bytes": (result / "vmlinux").stat().st_size,
            "jobs": n,
        }
        (result / "kernel.json").write_text(json.dumps(record, indent=1) + "\n")
        for p in (result, *result.iterdir()):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)  # not secret; other homes share it
        os.rename(result, final)
    except BaseException:
        if result is not None:
            shutil.rmtree(result, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log_path.unlink(missing_ok=True)  # kept only when a build fails
    built = _read_record(home, final / "kernel.json")
    if built is None:
        raise GuestError(f"the built kernel in {final} is unreadable; remove it and rebuild")
    return built


def prune(home: Home) -> list[Path]:
    """Remove kernels other than the one the current config's pointer names (built for other
    configs, sources or toolchains), and pointers of other configs."""
    removed = []
    with file_lock(home.kernels / ".build.lock"):
        current = _pointer(home, config_digest())
        keep = set()
        for pointer in home.kernels.glob("sm-*.json"):
            rec = _read_record(home, pointer)
            if pointer != current or rec is None:
                pointer.unlink(missing_ok=True)
            else:
                keep.add(rec.path.parent.name)
        for entry in home.kernels.glob("sm-*"):
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
