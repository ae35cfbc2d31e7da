"""Build hook: compile the guest init (sm-init) whenever the package is built or installed.

All metadata lives in pyproject.toml; this file only adds the step setuptools cannot express
declaratively. ``build_py`` runs for ``pip install .`` (wheel) and for ``pip install -e .``
(PEP 660 editable wheels run it too), so running ``make`` at its start covers both: the
binary lands in src/supermachine/guest/init/ before package data is collected.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

INIT_DIR = Path(__file__).resolve().parent / "src" / "supermachine" / "guest" / "init"
ENGINE_DIR = Path(__file__).resolve().parent / "src" / "supermachine" / "engine"
#: LD_PRELOAD guards the engine runs its helpers with (engine/preload.py)
GUARDS = ("netguard", "fsguard")


def build_guest_init() -> None:
    if not (INIT_DIR / "Makefile").is_file():
        # An sdist or checkout without the C sources: nothing to build, and the library says
        # how to get a guest init when it needs one.
        print(f"supermachine: no {INIT_DIR / 'Makefile'}, not building the guest init")
        return
    make = shutil.which("make")
    if make is None:
        raise SystemExit("supermachine: `make` and a C compiler (musl-gcc or cc) are needed")
    # An explicit CC from the environment wins; the Makefile prefers musl-gcc otherwise.
    proc = subprocess.run([make, "-C", str(INIT_DIR), "sm-init"], env=os.environ.copy())
    if proc.returncode != 0 or not (INIT_DIR / "sm-init").is_file():
        raise SystemExit(f"supermachine: building the guest init failed (make -C {INIT_DIR})")


def build_guards() -> None:
    """The LD_PRELOAD guards passt and QEMU run with (engine/*guard.c), so VMs need no
    compiler. Named by their source's hash, as engine/preload.py looks for them; when a source
    changes later (an editable install), the library builds a fresh one into the cache."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    for name in GUARDS:
        src = ENGINE_DIR / f"{name}.c"
        if not src.is_file():
            continue
        if cc is None:
            raise SystemExit(f"supermachine: a C compiler is needed to build {src}")
        key = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        out = src.with_name(f"{name}-{key}.so")
        for old in src.parent.glob(f"{name}-*.so"):
            if old != out:
                old.unlink()
        if out.is_file():
            continue
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                               str(out), str(src), "-ldl"])
        if proc.returncode != 0:
            raise SystemExit(f"supermachine: building {src} failed")


class BuildPyWithInit(build_py):
    def run(self) -> None:
        build_guest_init()
        build_guards()
        super().run()


class SdistWithoutBinary(sdist):
    """Ship the init's sources, never a binary built on this machine: installs rebuild it."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        kept = [f for f in files if Path(f).as_posix() != "src/supermachine/guest/init/sm-init"
                and not Path(f).name.startswith(("netguard-", "fsguard-"))]
        super().make_release_tree(base_dir, kept)


class BinaryDistribution(Distribution):
    """sm-init is an x86-64 executable, so wheels are platform wheels, not pure ones."""

    def has_ext_modules(self) -> bool:
        return True


setup(
    cmdclass={"build_py": BuildPyWithInit, "sdist": SdistWithoutBinary},
    distclass=BinaryDistribution,
)
