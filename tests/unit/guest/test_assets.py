"""ensure_guest_assets: caching, fingerprints, command line, and the init binary lookup."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from supermachine.errors import GuestError
from supermachine.guest import assets as a
from supermachine.guest.kernel import fetch_kernel
from supermachine.home import Home


def fake_bzimage(release: str, payload: bytes = b"") -> bytes:
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<H", head, 0x20E, 0x100)
    text = f"{release} (x@y) #1".encode() + b"\0"
    head[0x300 : 0x300 + len(text)] = text
    return bytes(head) + payload


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Home, Path, Path]:
    """A fake kernel and init: these tests rewrite them to check what the cache keys on
    (and parse no further than the header); the real ones are used at the end of the file."""
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(fake_bzimage("6.9.0-test", b"kernel body"))
    init = tmp_path / "sm-init"
    init.write_bytes(b"\x7fELF init v1")
    return Home(tmp_path / "home"), vmlinuz, init


def test_generated_initrd_is_cached_and_unpacks(setup: tuple[Home, Path, Path]) -> None:
    home, vmlinuz, init = setup
    first = a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000)
    assert first.kernel == vmlinuz and first.kernel_version == "6.9.0-test"
    assert first.initrd.parent == home.guest
    mtime = first.initrd.stat().st_mtime_ns
    again = a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000)
    assert again == first and again.initrd.stat().st_mtime_ns == mtime  # not rebuilt
    names = subprocess.run(
        ["cpio", "-it", "--quiet"], input=first.initrd.read_bytes(), capture_output=True,
        check=True,
    ).stdout.decode().split()
    assert "init" in names and "sm/modules" in names and "dev/console" in names


def test_initrd_packs_the_init_it_is_keyed_by(setup: tuple[Home, Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The init is rewritten while the initramfs is being built (a reinstall while VMs
    # start): the cached initrd must hold the bytes its key was computed from.
    home, vmlinuz, init = setup
    build = a.initramfs.build_initramfs

    def racing_build(init_arg, *args, **kw):
        init.write_bytes(b"\x7fELF init v2, half-writ")
        return build(init_arg, *args, **kw)

    monkeypatch.setattr(a.initramfs, "build_initramfs", racing_build)
    first = a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000)
    out = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "init"],
                         input=first.initrd.read_bytes(), capture_output=True, check=True)
    assert out.stdout == b"\x7fELF init v1"
    monkeypatch.setattr(a.initramfs, "build_initramfs", build)
    second = a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000)
    assert second.initrd != first.initrd and second.fingerprint != first.fingerprint


def test_fingerprint_tracks_kernel_initrd_init_and_cmdline(
    setup: tuple[Home, Path, Path], tmp_path: Path
) -> None:
    home, vmlinuz, init = setup
    base = a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000)
    seen = {base.fingerprint}

    init.write_bytes(b"\x7fELF init v2")  # new init -> new initramfs and fingerprint
    new_init = a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000)
    assert new_init.initrd != base.initrd
    seen.add(new_init.fingerprint)

    vmlinuz.write_bytes(fake_bzimage("6.9.0-test", b"other body"))  # same version, new bytes
    seen.add(a.ensure_guest_assets(home, kernel=vmlinuz, init=init, tsc_khz=2_000_000).fingerprint)

    user_initrd = tmp_path / "initrd.img"
    user_initrd.write_bytes(b"one")
    seen.add(a.ensure_guest_assets(home, kernel=vmlinuz, initrd=user_initrd).fingerprint)
    user_initrd.write_bytes(b"two")
    with_two = a.ensure_guest_assets(home, kernel=vmlinuz, initrd=user_initrd, tsc_khz=2_000_000)
    seen.add(with_two.fingerprint)
    assert with_two.initrd == user_initrd

    other_tsc = a.ensure_guest_assets(home, kernel=vmlinuz, initrd=user_initrd, tsc_khz=3_000_000)
    seen.add(other_tsc.fingerprint)
    assert len(seen) == 6


def test_bad_inputs_are_guest_errors(setup: tuple[Home, Path, Path], tmp_path: Path) -> None:
    home, vmlinuz, init = setup
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(GuestError):
        a.ensure_guest_assets(home, kernel=corrupt, init=init)
    with pytest.raises(GuestError, match="cannot read"):
        a.ensure_guest_assets(home, kernel=vmlinuz, initrd=tmp_path / "nope")
    with pytest.raises(GuestError, match="cannot read"):
        a.ensure_guest_assets(home, kernel=vmlinuz, init=tmp_path / "no-init")


def test_init_binary_is_built() -> None:
    # Installing the package builds it (install.sh, pip install -e .); a checkout without it
    # cannot boot anything, so this fails rather than skips.
    path = a.INIT_DIR / "sm-init"
    assert path.is_file(), f"the guest init is not built: run `make -C {a.INIT_DIR}`"
    assert a.init_binary() == path
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_missing_init_binary_says_how_to_build_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(a, "INIT_DIR", tmp_path)
    with pytest.raises(GuestError, match=f"make -C {tmp_path}"):
        a.init_binary()


@pytest.mark.parametrize(
    ("cpuinfo", "khz"),
    [
        ("model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\ncpu MHz\t\t: 1200.000\n",
         2_400_000),
        ("model name\t: Intel(R) Xeon(R) Processor\ncpu MHz\t\t: 2100.000\n", 2_100_000),
        ("model name\t: AMD EPYC\n", a.FALLBACK_TSC_KHZ),
        ("cpu MHz\t\t: 5.0\n", a.FALLBACK_TSC_KHZ),
    ],
)
def test_host_tsc_khz(cpuinfo: str, khz: int) -> None:
    assert a.host_tsc_khz(cpuinfo) == khz


def test_cmdline_is_microvm_ready() -> None:
    line = a.boot_cmdline(2_100_000)
    assert "console=ttyS0" in line and "tsc_early_khz=2100000" in line
    assert "panic=-1" in line and "pci=off" in line
    assert a.host_tsc_khz() >= 100_000  # kHz, not MHz: a MHz figure here hangs the guest


def test_real_assets_with_fetched_kernel(state_home: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home(state_home)
    kern = fetch_kernel(home)
    init = a.init_binary()  # the real init (test_init_binary_is_built says why it is there)
    assert shutil.which("lz4"), "lz4 is missing (install.sh installs it): the cloud kernel " \
        "could only be booted compressed"
    got = a.ensure_guest_assets(home, kernel="debian", init=init)
    assert got.kind == "debian" and got.note is None
    # Debian's kernel is booted uncompressed: its vmlinux is extracted next to the vmlinuz.
    assert got.kernel == kern.vmlinuz.with_name("vmlinux")
    assert got.kernel_version == kern.version
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # cached now: no apt, no tools
    assert a.ensure_guest_assets(home, kernel="debian", init=init) == got
    monkeypatch.undo()
    # naming the same kernel and modules explicitly gives the same initramfs and command
    # line; a kernel given explicitly is booted as given
    explicit = a.ensure_guest_assets(home, kernel=kern.vmlinuz, modules=kern.modules_dir, init=init)
    assert (explicit.initrd, explicit.cmdline) == (got.initrd, got.cmdline)
    assert explicit.kernel == kern.vmlinuz
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=got.initrd.read_bytes(), cwd=dest, check=True)
    assert (dest / "init").read_bytes() == init.read_bytes()
    listed = (dest / "sm/modules").read_text().splitlines()
    for name in ("virtio_mmio", "overlay", "squashfs", "virtio_net", "virtio_rng"):
        assert f"/sm/ko/{name}.ko" in listed
    assert listed.index("/sm/ko/failover.ko") < listed.index("/sm/ko/virtio_net.ko")
    assert listed.index("/sm/ko/virtio_ring.ko") < listed.index("/sm/ko/virtio_blk.ko")
    for p in listed:
        assert (dest / p.lstrip("/")).read_bytes()[:4] == b"\x7fELF"
