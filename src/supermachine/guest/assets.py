"""Everything a VM boots from: kernel, initramfs, kernel command line, and their fingerprint.

``ensure_guest_assets`` is the one entry point: it picks the kernel (the supermachine kernel
built by `kbuild` when there is one, else Debian's cloud kernel, or one the user names), builds the
initramfs for it once (cached under ``home.guest`` by kernel, init binary, module list and
a digest of the initramfs writer's code) and returns a ``GuestAssets``. Its ``fingerprint``
changes whenever anything that shapes the booted guest changes, so snapshots can be matched
to the assets they need.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..codeversion import code_version
from ..errors import GuestError
from ..home import Home, atomic_write_bytes, file_lock
from . import initramfs, kbuild
from .kernel import GUEST_MODULES, OPTIONAL_MODULES, Kernel, fetch_kernel, kernel_from_path
from .vmlinux import ensure_vmlinux

#: The code that writes an initramfs: its digest is part of every cached initrd's key.
BUILDER_SOURCES = ("guest/initramfs.py",)

INIT_DIR = Path(__file__).resolve().parent / "init"
_MAX_INITRD = 1 << 30
#: used when the host's TSC rate cannot be read; any value near the truth keeps boots working
FALLBACK_TSC_KHZ = 2_000_000

# Kernel command line for a fast, quiet boot under QEMU microvm.
#
# Measured under TCG (QEMU 7.2 -M microvm, Debian 6.1.0-56-cloud-amd64, 256 MiB, busybox
# initramfs whose /init prints /proc/uptime). Wall-clock figures were useless here (other VMs
# shared the 2 cores: the same config ranged 2.3-7.5 s), so guest work was counted instead:
# with `-icount shift=0,sleep=off` guest time advances 1 ns per emulated instruction, so
# uptime at /init = instructions the kernel spent booting (resolution 10 ms = 10M insns).
#
#   configuration                              uptime at /init (G instructions)
#   console=ttyS0 tsc_early_khz panic=-1 reboot=t    1.21   (baseline)
#   baseline + every option below                    0.35
#   ... without cryptomgr.notests                    1.22   (crypto self-tests: 70% of boot)
#   ... without quiet/loglevel, i8042.*, pci=off,    0.34-0.35 each: no measurable work
#       8250.nr_uarts, mitigations=off                  saved at boot (see below why kept)
#   also tried and dropped (no gain): nokaslr, apparmor=0 ima_appraise=off,
#       random.trust_cpu=on (already the config default), rcupdate.rcu_expedited=1
#
# Findings that are about hangs, not speed:
# - tsc_early_khz is in kHz (2100000 for a 2.1 GHz TSC). Without it the guest sometimes hangs
#   in "tsc: Unable to calibrate against PIT"; with a MHz figure (2100) its clock runs 1000x
#   fast and `reboot -f` never completes.
# - reboot=t: the default reboot path pokes a keyboard controller microvm does not have and
#   often spun past 20 s; a triple fault resets at once, and -no-reboot makes QEMU exit.
_BASE_CMDLINE = (
    "console=ttyS0",
    # Printing costs little guest work, but every byte to the emulated 16550 is a trap into
    # QEMU; the engine shows boot output only with --verbose anyway.
    "quiet",
    "loglevel=1",
    "panic=-1",  # a guest panic reboots at once, and QEMU's -no-reboot turns that into exit
    "reboot=t",
    # microvm has no i8042 and no PCI bus: skip the probes and their timeouts outright.
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "i8042.noprobe",
    "pci=off",
    "8250.nr_uarts=1",
    # The self-tests check the kernel's own crypto code; pure CPU work, slow when emulated.
    "cryptomgr.notests",
    # TCG does not speculate, so these only cost (page-table isolation on every syscall);
    # under KVM they would only protect the guest's processes from each other, and the
    # guest runs one container: the VM is the boundary.
    "mitigations=off",
)


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path
    kernel_version: str
    cmdline: tuple[str, ...]
    fingerprint: str
    #: which kernel: "supermachine" (built from source), "debian" (the cloud kernel) or
    #: "custom" (a path the user gave)
    kind: str = "custom"
    #: a line for the user about the choice (the fallback to Debian's kernel), or None
    note: str | None = None


NOT_BUILT = (f"the {kbuild.NAME} kernel is not built (`supermachine kernel build`, which "
             "install.sh runs); using Debian's cloud kernel")


def select_kernel(home: Home, kernel: Path | str | None,
                  modules: Path | None = None) -> tuple[Kernel, Path, str, str | None]:
    """The kernel to boot, the file QEMU loads, its kind and a note for the user.

    ``kernel``: None picks the supermachine kernel when it is built and Debian's otherwise
    (saying so); "supermachine" or "debian" insist on one; a path is the user's own.
    """
    if isinstance(kernel, Path):
        kern = kernel_from_path(kernel, modules)
        return kern, kern.vmlinuz, "custom", None
    note = None
    if kernel != kbuild.DEBIAN:
        built = kbuild.built_kernel(home)
        if built is not None:
            return Kernel(built.path, built.version, built.sha256, None), built.path, \
                kbuild.NAME, None
        if kernel == kbuild.NAME:
            raise GuestError(f"the {kbuild.NAME} kernel is not built; build it with "
                             "`supermachine kernel build` (install.sh does)")
        note = NOT_BUILT
    kern = fetch_kernel(home)
    # Boot uncompressed when we can: no decompressor to emulate.
    return kern, ensure_vmlinux(kern.vmlinuz) or kern.vmlinuz, kbuild.DEBIAN, note


def init_binary() -> Path:
    """The guest init (PID 1), built from init/ when the package is installed."""
    path = INIT_DIR / "sm-init"
    if not path.is_file():
        raise GuestError(
            f"guest init {path} is missing; build it with `make -C {INIT_DIR}` "
            "or reinstall supermachine (pip install .)"
        )
    return path


def host_tsc_khz(cpuinfo: str | None = None) -> int:
    """The host's TSC rate in kHz, which a TCG guest sees as its own TSC rate.

    QEMU's TCG answers RDTSC with the host's TSC, but the guest cannot calibrate it (microvm
    has no PIT/HPET to compare with) and sometimes hangs in the attempt, so the command line
    tells it (``tsc_early_khz=``). The nominal frequency in the model name ("@ 2.10GHz") is
    the TSC rate on Intel; otherwise ``cpu MHz`` is the best guess /proc offers.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return FALLBACK_TSC_KHZ
    m = re.search(r"^model name\s*:.*@\s*([0-9]+(?:\.[0-9]+)?)\s*GHz", cpuinfo, re.M)
    if m:
        return round(float(m.group(1)) * 1_000_000)
    m = re.search(r"^cpu MHz\s*:\s*([0-9]+(?:\.[0-9]+)?)", cpuinfo, re.M)
    if m and 100 <= float(m.group(1)) <= 20_000:
        return round(float(m.group(1)) * 1000)
    return FALLBACK_TSC_KHZ


def boot_cmdline(tsc_khz: int | None = None) -> tuple[str, ...]:
    """Kernel arguments for a quiet, fast microvm boot (the engine may add its own)."""
    khz = tsc_khz if tsc_khz is not None else host_tsc_khz()
    return (*_BASE_CMDLINE, f"tsc_early_khz={khz}")


def _sha256(path: Path, limit: int = _MAX_INITRD) -> str:
    h = hashlib.sha256()
    total = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise GuestError(f"{path} is over {limit >> 20} MiB; is it the right file?")
                h.update(chunk)
    except OSError as e:
        raise GuestError(f"cannot read {path}: {e.strerror}") from e
    return h.hexdigest()


def _generated_initrd(
    home: Home, kern: Kernel, init: bytes, init_sha: str, compression: str
) -> Path:
    key_material = {
        "builder": code_version(*BUILDER_SOURCES),
        "kernel": kern.version,
        "kernel_sha256": kern.sha256,
        "init_sha256": init_sha,
        "modules": list(GUEST_MODULES) if kern.modules_dir else [],
        "optional": list(OPTIONAL_MODULES) if kern.modules_dir else [],
        "compression": compression,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
    path = home.guest / f"initrd-{key}.img"
    if path.is_file():
        return path
    with file_lock(home.guest / ".initrd.lock"):  # builds take ~0.1 s: one lock is plenty
        if not path.is_file():  # someone else may have built it while we waited
            data = initramfs.build_initramfs(
                init,
                kern.modules_dir,
                GUEST_MODULES,
                optional=OPTIONAL_MODULES,
                compression=compression,
            )
            atomic_write_bytes(path, data)
    return path


def ensure_guest_assets(
    home: Home,
    *,
    kernel: Path | str | None = None,
    initrd: Path | None = None,
    modules: Path | None = None,
    init: Path | None = None,
    compression: str = initramfs.DEFAULT_COMPRESSION,
    tsc_khz: int | None = None,
) -> GuestAssets:
    """Kernel, initramfs and command line to boot a guest, fetched/built once and cached.

    ``kernel``: see `select_kernel`; a path is a vmlinuz (or vmlinux) of the user's, with its
    ``modules`` dir (``lib/modules/<version>``, holding modules.dep) unless its drivers are
    built in.
    ``initrd``: a ready initramfs; then no init binary or modules are needed.
    ``init``: another guest init binary (default: the package's sm-init).
    """
    kern, boot_image, kind, note = select_kernel(home, kernel, modules)
    init_sha = ""
    if initrd is None:
        # Hashed and packed from one read: an init rewritten meanwhile (a reinstall while
        # VMs start) must not leave a cached initrd whose content differs from its key.
        init_bytes = initramfs.read_capped(init if init is not None else init_binary(),
                                            _MAX_INITRD, "guest init")
        init_sha = hashlib.sha256(init_bytes).hexdigest()
        initrd_path = _generated_initrd(home, kern, init_bytes, init_sha, compression)
    else:
        initrd_path = initrd
    initrd_sha = _sha256(initrd_path)
    cmdline = boot_cmdline(tsc_khz)
    # The command line is part of the identity: a snapshot taken with other arguments (or
    # another TSC rate) is a different guest.
    fp = hashlib.sha256()
    for part in ("supermachine-guest-v1", kern.sha256, boot_image.name, initrd_sha, init_sha,
                 *cmdline):
        fp.update(part.encode() + b"\0")
    return GuestAssets(boot_image, initrd_path, kern.version, cmdline, fp.hexdigest(), kind,
                       note)
