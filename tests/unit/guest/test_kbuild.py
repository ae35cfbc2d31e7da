"""The supermachine kernel's config and cache keys (kbuild.py), and how VMs pick a kernel.

The build itself (minutes) runs in install.sh and in tests/e2e/test_kernel_build.py; these
tests check what decides whether a build is needed and which kernel a VM boots."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from supermachine.errors import GuestError
from supermachine.guest import assets, kbuild
from supermachine.home import Home


def test_every_fragment_line_is_an_option_or_a_comment() -> None:
    frags = kbuild.fragments()
    assert len(frags) >= 5
    for path in frags:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            ok = not line or (line.startswith("#") and not line.startswith("#CONFIG")) or \
                kbuild._OPTION.match(line)
            assert ok, f"{path.name}:{n}: {line!r}"
    wanted = kbuild.wanted_options(kbuild.merged_fragments())
    # what the issue lists as built in, and what the guest init relies on
    for option in ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE",
                   "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_VIRTIO_NET", "CONFIG_SQUASHFS_LZ4",
                   "CONFIG_OVERLAY_FS", "CONFIG_TMPFS", "CONFIG_DEVTMPFS", "CONFIG_9P_FS",
                   "CONFIG_NET_9P_VIRTIO", "CONFIG_EXT4_FS", "CONFIG_PVH", "CONFIG_KVM_GUEST",
                   "CONFIG_ACPI", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_SECCOMP_FILTER",
                   "CONFIG_USER_NS", "CONFIG_CGROUPS", "CONFIG_IPV6"):
        assert wanted.get(option) == "y", option
    assert "CONFIG_MODULES" in wanted and wanted["CONFIG_MODULES"] is None


def test_config_problems_names_what_kconfig_dropped() -> None:
    wanted = {"CONFIG_A": "y", "CONFIG_B": "64", "CONFIG_C": None}
    dotconfig = "CONFIG_A=y\nCONFIG_B=64\n# CONFIG_C is not set\n"
    assert kbuild.config_problems(wanted, dotconfig) == []
    bad = "# CONFIG_A is not set\nCONFIG_B=8\nCONFIG_C=y\n"
    assert kbuild.config_problems(wanted, bad) == [
        "CONFIG_A=unset (wanted y)", "CONFIG_B=8 (wanted 64)", "CONFIG_C=y (wanted unset)"]


def _fake_build(home: Home, config: str, body: bytes) -> Path:
    """A kernel entry as `kbuild.build` leaves one (the real build takes minutes; it is
    exercised by the e2e test), for the lookups below."""
    from supermachine.home import sha256_file

    key = hashlib.sha256(config.encode() + body).hexdigest()[:24]
    d = home.kernels / f"sm-{key}"
    d.mkdir(parents=True)
    (d / "vmlinux").write_bytes(body)
    rec = {"key": key, "version": f"6.1.0-sm-{key[:8]}",
           "vmlinux_sha256": sha256_file(d / "vmlinux")}
    (d / "kernel.json").write_text(json.dumps(rec))
    (home.kernels / f"sm-{config}.json").write_text(json.dumps(rec))
    return d / "vmlinux"


def test_a_changed_fragment_needs_a_new_kernel_and_changes_the_fingerprint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERMACHINE_KERNELS", raising=False)
    frags = tmp_path / "kconfig"
    shutil.copytree(kbuild.FRAGMENT_DIR, frags)
    monkeypatch.setattr(kbuild, "FRAGMENT_DIR", frags)
    home = Home(tmp_path / "home")
    first = kbuild.config_digest()
    vmlinux = _fake_build(home, first, b"\x7fELF kernel A")
    built = kbuild.built_kernel(home)
    assert built is not None and built.path == vmlinux

    init = tmp_path / "init"
    init.write_bytes(b"\x7fELF init")
    a = assets.ensure_guest_assets(home, init=init, tsc_khz=2_000_000)
    assert (a.kind, a.kernel, a.note) == ("supermachine", vmlinux, None)

    with open(frags / "network.config", "a") as f:
        f.write("CONFIG_NETFILTER=y\n")
    second = kbuild.config_digest()
    assert second != first
    assert kbuild.built_kernel(home) is None  # the next `kernel build` makes a new one
    with pytest.raises(GuestError, match="not built"):
        assets.ensure_guest_assets(home, kernel="supermachine", init=init)
    _fake_build(home, second, b"\x7fELF kernel B")
    b = assets.ensure_guest_assets(home, init=init, tsc_khz=2_000_000)
    assert b.kind == "supermachine" and b.kernel != a.kernel
    assert b.fingerprint != a.fingerprint  # so snapshots of kernel A are not restored
    # prune keeps only the current config's kernel
    removed = kbuild.prune(home)
    assert [p.name for p in removed] == [vmlinux.parent.name]
    assert kbuild.built_kernel(home) is not None


def test_damaged_records_are_not_kernels(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERMACHINE_KERNELS", raising=False)
    home = Home(tmp_path / "home")
    pointer = home.kernels / f"sm-{kbuild.config_digest()}.json"
    for raw in (b"", b"{", b"[]", json.dumps({"key": "../../etc", "version": "x",
                                             "vmlinux_sha256": "0" * 64}).encode(),
                json.dumps({"key": "a" * 24, "version": "x",
                            "vmlinux_sha256": "0" * 64}).encode()):  # no such directory
        pointer.write_bytes(raw)
        assert kbuild.built_kernel(home) is None


def test_spec_kernel_names() -> None:
    from supermachine.errors import UsageError
    from supermachine.spec import VMSpec

    assert VMSpec.create("img", kernel="debian").kernel_choice == "debian"
    assert VMSpec.create("img").kernel_choice is None
    spec = VMSpec.create("img", kernel="k", initrd="i")
    assert isinstance(spec.kernel_choice, Path) and spec.kernel_choice.is_absolute()
    with pytest.raises(UsageError, match="goes with a kernel file"):
        VMSpec.create("img", kernel="supermachine", initrd="/i")
    with pytest.raises(UsageError, match="unknown kernel"):
        VMSpec.from_json({"image": "img", "kernel": "linux"})
