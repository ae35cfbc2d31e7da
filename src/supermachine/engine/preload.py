"""Building the engine's LD_PRELOAD guards: netguard.c (for passt) and fsguard.c (for QEMU).

Each is compiled once per source version: at install time next to its source (setup.py), or
else on first use into the home's guest cache (a C compiler is then needed, like the guest
init at install time). Named ``<name>-<sha256 of the source, 16 hex>.so``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import EngineError
from ..home import atomic_path, file_lock

ENGINE_DIR = Path(__file__).resolve().parent


def ensure_guard(name: str, cache: Path, hint: str = "") -> Path:
    """The compiled guard ``name`` (netguard, fsguard), built into ``cache`` if need be."""
    source = ENGINE_DIR / f"{name}.c"
    key = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    packaged = source.with_name(f"{name}-{key}.so")  # built at install time (setup.py)
    if packaged.is_file():
        return packaged
    lib = cache / f"{name}-{key}.so"
    if lib.is_file():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise EngineError(f"building {name} needs a C compiler (Debian: apt-get install "
                          f"gcc) the first time{hint}")
    with file_lock(cache / f".{name}-{key}.lock"):
        if lib.is_file():
            return lib
        with atomic_path(lib, suffix=".so") as tmp:
            proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                                   str(tmp), str(source), "-ldl"],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise EngineError(f"building {name} failed: "
                                  f"{proc.stderr.strip().splitlines()[-1:]}")
            os.chmod(tmp, 0o755)
    return lib
