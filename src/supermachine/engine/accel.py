"""Choose the accelerator: hardware KVM where it can run a standard guest kernel, TCG otherwise.

A usable KVM needs three things: /dev/kvm that we can open read-write, a CPU with hardware
virtualization (vmx or svm in /proc/cpuinfo), and a KVM that is not the PVM flavour. A PVM
host (module kvm_pvm) exposes /dev/kvm without vmx/svm and only runs PVM-patched guests;
standard kernels crawl or crash there, so we must not pick it.

Detection reads files only (no ioctl), so it is unit-tested against fake /proc, /sys and /dev
trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AccelError

ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str  # one line: why this accelerator (shown when it is not hardware KVM)

    @property
    def hardware(self) -> bool:
        return self.name == "kvm"


def _cpu_has_virt(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.partition(":")[2].split()
            if "vmx" in flags or "svm" in flags:
                return True
    return False


def detect(root: Path = Path("/")) -> AccelChoice:
    """Pick an accelerator from the state of the host under ``root`` (``/`` normally)."""
    dev_kvm = root / "dev" / "kvm"
    if (root / "sys" / "module" / "kvm_pvm").exists():
        return AccelChoice("tcg", "/dev/kvm is a PVM host (kvm_pvm), which cannot run standard "
                                  "guest kernels; using TCG software emulation")
    if not dev_kvm.exists():
        return AccelChoice("tcg", "no /dev/kvm; using TCG software emulation")
    if not _cpu_has_virt(root / "proc" / "cpuinfo"):
        return AccelChoice("tcg", "the CPU has no hardware virtualization (vmx/svm); "
                                  "using TCG software emulation")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return AccelChoice("tcg", "no permission to use /dev/kvm (join the kvm group); "
                                  "using TCG software emulation")
    return AccelChoice("kvm", "hardware KVM")


def choose(requested: str | None, root: Path = Path("/")) -> AccelChoice:
    """Honour ``--accel``: ``None``/``auto`` detects; ``kvm`` insists on working KVM."""
    if requested in (None, "", "auto"):
        return detect(root)
    if requested not in ACCELS:
        raise AccelError(f"unknown accelerator {requested!r}; use auto, kvm or tcg")
    if requested == "tcg":
        return AccelChoice("tcg", "TCG software emulation (--accel tcg)")
    found = detect(root)
    if not found.hardware:
        raise AccelError(f"--accel kvm is not usable here: {found.reason.split(';')[0]}")
    return found
