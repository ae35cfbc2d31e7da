"""Kernel reading, the apt fetch (one real fetch per session, into its fresh home; the package
is downloaded once per machine) and its cache."""

from __future__ import annotations

import json
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from supermachine.errors import GuestError
from supermachine.guest import initramfs as ir
from supermachine.guest import kernel as k
from supermachine.home import Home, file_lock


def fake_bzimage(release: str, payload: bytes = b"") -> bytes:
    """The parts of an x86 setup header that identify a bzImage and its version string."""
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<H", head, 0x20E, 0x300 - 0x200)
    text = f"{release} (someone@somewhere) #1 SMP".encode() + b"\0"
    head[0x300 : 0x300 + len(text)] = text
    return bytes(head) + payload


def test_bzimage_version_reads_release() -> None:
    assert k.bzimage_version(fake_bzimage("6.1.0-56-cloud-amd64")) == "6.1.0-56-cloud-amd64"


@pytest.mark.parametrize(
    "data",
    [b"", b"MZ" + b"\0" * 2000, fake_bzimage("x")[:0x205] + b"\0" * 3000],
)
def test_bzimage_version_rejects_non_kernels(data: bytes) -> None:
    with pytest.raises(GuestError):
        k.bzimage_version(data)


def test_bzimage_version_rejects_pointer_out_of_range() -> None:
    head = bytearray(fake_bzimage("6.1.0"))
    struct.pack_into("<H", head, 0x20E, 0xFFF0)
    with pytest.raises(GuestError, match="no kernel version"):
        k.bzimage_version(bytes(head))


def test_kernel_from_path(tmp_path: Path) -> None:
    good = tmp_path / "vmlinuz"
    good.write_bytes(fake_bzimage("6.9.0-test", b"\1" * 5000))
    kern = k.kernel_from_path(good)
    assert (kern.version, kern.modules_dir) == ("6.9.0-test", None)
    assert len(kern.sha256) == 64
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(b"\0" * 5000)
    with pytest.raises(GuestError, match="not a usable kernel"):
        k.kernel_from_path(corrupt)
    with pytest.raises(GuestError, match="cannot read kernel"):
        k.kernel_from_path(tmp_path / "missing")
    with pytest.raises(GuestError, match="modules.dep"):
        k.kernel_from_path(good, tmp_path)


def compile_module(tmp_path: Path, name: str, modinfo: str) -> bytes:
    """A real ELF relocatable object with a .modinfo section, as the kernel build makes."""
    src = tmp_path / f"{name}.c"
    src.write_text(
        "".join(
            f'__attribute__((section(".modinfo"), used)) static const char m{i}[] = '
            f"{json.dumps(field)};\n"
            for i, field in enumerate(modinfo.split("\0"))
        )
    )
    obj = tmp_path / f"{name}.ko"
    subprocess.run(["cc", "-c", "-o", obj, src], check=True)
    return obj.read_bytes()


def test_modinfo_depends_from_real_elf(tmp_path: Path) -> None:
    elf = compile_module(tmp_path, "a", "license=GPL\0depends=virtio,virtio_ring\0name=a")
    assert k.modinfo_depends(elf) == ["virtio", "virtio_ring"]
    assert k.modinfo_depends(compile_module(tmp_path, "b", "depends=\0name=b")) == []
    assert k.modinfo_depends(compile_module(tmp_path, "c", "name=c")) == []


def test_modinfo_depends_rejects_garbage(tmp_path: Path) -> None:
    elf = bytearray(compile_module(tmp_path, "a", "depends=x"))
    with pytest.raises(GuestError):
        k.modinfo_depends(b"not an elf at all" * 10)
    with pytest.raises(GuestError):
        k.modinfo_depends(bytes(elf[:100]))  # section table past the end
    struct.pack_into("<Q", elf, 0x28, 1 << 40)  # section table offset far away
    with pytest.raises(GuestError):
        k.modinfo_depends(bytes(elf))


def test_select_modules_follows_modinfo(tmp_path: Path) -> None:
    root = tmp_path / "lib/modules/6.9.0"
    layout = {
        "kernel/drivers/virtio/virtio_ring.ko": "",
        "kernel/drivers/virtio/virtio.ko": "virtio_ring",
        "kernel/drivers/virtio/virtio_mmio.ko": "virtio,virtio_ring",
        "kernel/drivers/char/hw_random/virtio-rng.ko": "virtio,virtio_ring",
        "kernel/fs/unrelated.ko": "",
    }
    for i, (rel, deps) in enumerate(layout.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(compile_module(tmp_path, f"m{i}", f"depends={deps}"))
    (root / "modules.order").write_text("\n".join(layout) + "\n")
    sel = k.select_modules(root, ["virtio_mmio", "virtio_rng"], optional=["fuse"])
    assert set(sel) == set(layout) - {"kernel/fs/unrelated.ko"}
    assert sel["kernel/drivers/virtio/virtio.ko"] == ["kernel/drivers/virtio/virtio_ring.ko"]
    with pytest.raises(GuestError, match="lacks module overlay"):
        k.select_modules(root, ["overlay"])


def write_cached_kernel(home: Home, release: str) -> Path:
    kdir = home.guest / k.kernel_dirname(release)
    (kdir / "modules").mkdir(parents=True)
    (kdir / "vmlinuz").write_bytes(fake_bzimage(release))
    rec = {"dir": kdir.name, "version": release, "vmlinuz_sha256": "ab" * 32}
    (kdir / "kernel.json").write_text(json.dumps(rec))
    (home.guest / f"{k.DEFAULT_PACKAGE}.json").write_text(json.dumps(rec))
    return kdir


def test_cache_hit_needs_no_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home(tmp_path / "home")
    kdir = write_cached_kernel(home, "6.9.0-cached")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get, no apt-cache, no dpkg
    kern = k.fetch_kernel(home)
    assert kern.vmlinuz == kdir / "vmlinuz"
    assert (kern.version, kern.sha256) == ("6.9.0-cached", "ab" * 32)
    assert kern.modules_dir == kdir / "modules"


def test_missing_apt_or_stale_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Home(tmp_path / "home")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestError, match="apt-cache not found.*--kernel/--initrd"):
        k.fetch_kernel(home)
    # A pointer whose kernel vanished, or a tampered pointer, is ignored (so apt is asked).
    kdir = write_cached_kernel(home, "6.9.0-gone")
    (kdir / "vmlinuz").unlink()
    with pytest.raises(GuestError, match="apt-cache not found"):
        k.fetch_kernel(home)
    pointer = home.guest / f"{k.DEFAULT_PACKAGE}.json"
    for bad in ['{"dir": "../../etc", "version": "x", "vmlinuz_sha256": "00"}', "nonsense"]:
        pointer.write_text(bad)
        assert k.cached_kernel(home) is None


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GuestError, match="apt-cache show failed.*--kernel/--initrd"):
        k.fetch_kernel(Home(tmp_path / "home"), "no-such-package-supermachine")


def test_real_fetch_and_modules(state_home: Path) -> None:
    # This session's home is new, so the cache checked here is the one this code writes
    # (the package itself may come from the shared downloads directory).
    home = Home(state_home)
    kern = k.fetch_kernel(home)
    assert kern.version.endswith("-cloud-amd64")
    assert k.bzimage_version(kern.vmlinuz.read_bytes()[:65536]) == kern.version
    assert k.cached_kernel(home) == kern
    rec = json.loads((kern.vmlinuz.parent / "kernel.json").read_text())
    assert len(rec["deb_sha256"]) == 64 and rec["package"] == f"linux-image-{kern.version}"
    mods = kern.modules_dir
    assert mods is not None
    files = sorted(str(p.relative_to(mods)) for p in mods.rglob("*.ko*"))
    by_name = {ir.module_name(f): f for f in files}

    def depends(rel: str) -> list[str]:
        """A module's dependencies as the kernel's own metadata says (kmod's modinfo)."""
        out = subprocess.run(["/usr/sbin/modinfo", "-F", "depends", mods / rel],
                             capture_output=True, text=True, check=True).stdout.strip()
        return sorted(d.replace("-", "_") for d in out.split(",") if d)

    # The cache holds exactly the guest's modules and what they need, transitively. (Optional
    # modules are kept where the kernel has them; OPTIONAL_MODULES is empty today.)
    closure: dict[str, list[str]] = {}
    todo = [*k.GUEST_MODULES, *(m for m in k.OPTIONAL_MODULES if m in by_name)]
    while todo:
        name = todo.pop()
        if name not in closure:
            assert name in by_name, f"the kernel cache lacks module {name}"
            closure[name] = depends(by_name[name])
            todo += closure[name]
    assert sorted(closure) == sorted(by_name), "the cache keeps modules nothing needs"
    # modules.dep and modules.order list those modules and nothing else; each line's
    # dependencies are modinfo's, and each is itself a kept module.
    deps = ir.read_modules_dep(mods)
    assert sorted(deps) == files
    for rel, dep_paths in deps.items():
        assert sorted(ir.module_name(p) for p in dep_paths) == closure[ir.module_name(rel)]
        assert all(p in deps for p in dep_paths), rel
    assert sorted((mods / "modules.order").read_text().split()) == files
    # Loading follows the dependencies.
    order = [ir.module_name(p)
             for p in ir.load_order(deps, k.GUEST_MODULES, optional=k.OPTIONAL_MODULES)]
    assert sorted(order) == sorted(closure)
    for name, needs in closure.items():
        assert all(order.index(d) < order.index(name) for d in needs), name
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_mmio")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")


def test_waiter_uses_the_kernel_a_concurrent_fetch_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Home(tmp_path / "home")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # the waiter must not need apt
    result: list[object] = []
    with file_lock(home.guest / ".kernel.lock"):  # "another process" is mid-fetch
        waiter = threading.Thread(target=lambda: result.append(k.fetch_kernel(home)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # blocked on the lock, not failing for want of apt
        kdir = write_cached_kernel(home, "6.9.0-raced")
    waiter.join(10)
    assert isinstance(result[0], k.Kernel) and result[0].vmlinuz == kdir / "vmlinuz"
