"""Pulls against a real docker-registry on loopback: the happy paths, the store, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from supermachine.errors import DigestMismatch, ImageError, RegistryError
from supermachine.home import Home
from supermachine.images import ensure_rootfs, open_image
from supermachine.images import store as st
from supermachine.images.progress import Progress
from supermachine.images.pull import ensure_image, open_pulled, pull

from .harness import Registry, build_image


class Recorder(Progress):
    """Remembers what a pull reported, to see what was downloaded, skipped or resumed."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, int]] = []
        self.done: dict[str, str] = {}
        self.bytes = 0

    def layer_start(self, digest, size, offset):
        self.starts.append((digest, offset))

    def layer_advance(self, digest, n):
        self.bytes += n

    def layer_done(self, digest, size, status):
        self.done[digest] = status


def _blob_names(home: Home) -> set[str]:
    return {p.name for p in home.blobs.iterdir()}


def test_pull_tag_then_open_offline_matches_layout(registry, small_image, home, tmp_path):
    ref = f"{registry.host}/test/img:latest"
    rec = Recorder()
    image = pull(ref, home, progress=rec)
    assert image.config_digest == small_image.config_digests["amd64"]
    assert image.manifest_digest == small_image.manifest_digests["amd64"]
    assert image.architecture == "amd64" and image.config.cmd == ("/bin/amd64",)
    assert set(rec.done.values()) == {"Pull complete"} and len(rec.done) == 3
    # Every layer is in the store, verified, and nothing else is lying around.
    for layer in image.layers:
        layer.open().drain()
    assert not [n for n in _blob_names(home) if n.startswith(".")]

    # Offline: open_image goes through open_pulled and sees the same image.
    again = open_image(ref, home)
    assert again.config_digest == image.config_digest
    assert [ly.digest for ly in again.layers] == [ly.digest for ly in image.layers]
    local = open_image(str(small_image.layout), home)
    assert local.config_digest == again.config_digest
    rootfs = ensure_rootfs(again, home)
    assert rootfs.is_file() and rootfs.name.startswith(image.config_hex)

    infos = st.list_images(home)
    assert [(i.reference, i.platform) for i in infos] == [(ref, "linux/amd64")]
    assert infos[0].created == "2024-01-02T03:04:05Z" and infos[0].size > 0

    # A second pull downloads nothing.
    rec2 = Recorder()
    pull(ref, home, progress=rec2)
    assert set(rec2.done.values()) == {"Already exists"} and rec2.bytes == 0


def test_digest_references_and_platforms(registry, small_image, home):
    base = f"{registry.host}/test/img"
    by_index = pull(f"{base}@{small_image.index_digest}", home)
    assert by_index.config_digest == small_image.config_digests["amd64"]
    # Only the arm64 variant is pulled under the tag: with one platform stored, the tag
    # opens offline as that platform (docker's behaviour too).
    arm = pull(f"{base}:latest", home, platform="linux/arm64")
    assert open_pulled(f"{base}:latest", home).architecture == "arm64"
    pull(f"{base}:latest", home)
    arm = pull(f"{base}:latest", home, platform="linux/arm64")
    assert arm.config_digest == small_image.config_digests["arm64"]
    assert arm.architecture == "arm64"
    # Both platforms of the tag are recorded; each opens offline by platform.
    assert open_pulled(f"{base}:latest", home, platform="linux/arm64").architecture == "arm64"
    assert open_pulled(f"{base}:latest", home).architecture == "amd64"
    # A manifest digest (no index) pulls that manifest whatever the host is.
    direct = pull(f"{base}@{small_image.manifest_digests['arm64']}", home)
    assert direct.config_digest == small_image.config_digests["arm64"]
    # Layers are shared by both platforms: stored once.
    layers = {ly.digest.partition(":")[2] for ly in arm.layers}
    assert layers <= _blob_names(home)
    with pytest.raises(ImageError, match=r"no variant for platform linux/s390x.*linux/amd64"):
        pull(f"{base}:latest", home, platform="linux/s390x")


def test_missing_tag_and_repository_are_404(registry, home):
    with pytest.raises(RegistryError, match="not found.*MANIFEST_UNKNOWN"):
        pull(f"{registry.host}/test/img:nope", home)
    with pytest.raises(RegistryError, match="not found"):
        pull(f"{registry.host}/no/such:latest", home)
    assert st.list_images(home) == []
    with pytest.raises(ImageError, match="not present locally; run `supermachine pull"):
        open_pulled(f"{registry.host}/test/img:nope", home)


def test_pull_policies(registry, home):
    ref = f"{registry.host}/test/img:v2"
    with pytest.raises(ImageError, match="not present locally"):
        ensure_image(ref, home, "never")
    first = ensure_image(ref, home, "missing")
    rec = Recorder()
    # "missing" with the image present never touches the registry (progress stays empty).
    assert ensure_image(ref, home, "missing", progress=rec).config_digest == first.config_digest
    assert rec.done == {}
    ensure_image(ref, home, "always", progress=rec)
    assert set(rec.done.values()) == {"Already exists"}


def test_rmi_and_prune(registry, small_image, home, tmp_path):
    latest, v2 = f"{registry.host}/test/img:latest", f"{registry.host}/test/img:v2"
    image = pull(latest, home)
    pull(v2, home)
    pull(latest, home, platform="linux/arm64")
    rootfs = ensure_rootfs(image, home)
    before = _blob_names(home)
    # The amd64 image is still referenced by v2 and keeps its blobs and rootfs; only the
    # arm64 manifest and config (pulled under :latest alone) go.
    assert st.remove_image(home, latest) == [latest]
    assert st.prune(home).blobs_removed == 2
    assert rootfs.exists()
    assert {ly.digest[7:] for ly in image.layers} <= _blob_names(home)
    open_pulled(v2, home).layers[0].open().drain()
    # Removing by digest prefix removes the last reference: the rootfs goes at once, the
    # blobs at prune.
    assert st.remove_image(home, image.manifest_digest[7:19]) == [v2]
    assert not rootfs.exists()
    result = st.prune(home)
    assert result.blobs_removed == len(before) - 2 and result.bytes_freed > 0
    assert _blob_names(home) == set()
    with pytest.raises(ImageError, match="no such image"):
        st.remove_image(home, latest)


def test_prune_waits_for_a_pull_in_progress(home):
    done = threading.Event()
    with st.pull_guard(home):
        t = threading.Thread(target=lambda: (st.prune(home), done.set()))
        t.start()
        assert not done.wait(0.3), "prune ran while a pull held the store"
    t.join(5)
    assert done.is_set()


def test_tampered_blob_is_rejected_and_nothing_is_cached(tmp_path, home):
    built = build_image(tmp_path / "layout", [({"f": os.urandom(4096)}, "none")])
    reg = Registry(tmp_path / "reg")
    reg.start()
    try:
        ref = reg.push(built.layout, "t/img")
        # skopeo may recompress; find the pushed layer through a pull of the manifest.
        layer = pull(ref, Home(tmp_path / "probe")).layers[0]
        path = reg.blob_file(layer.digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(DigestMismatch, match=f"blob {layer.digest}.*hashes to") as info:
            pull(ref, home)
        assert "\n" not in str(info.value)
    finally:
        reg.stop()
    assert layer.digest.partition(":")[2] not in _blob_names(home)
    assert not [n for n in _blob_names(home) if n.startswith(".partial")]
    assert st.list_images(home) == []


class KillAfter(Recorder):
    def __init__(self, reg: Registry, after: int) -> None:
        super().__init__()
        self.reg, self.after = reg, after

    def layer_advance(self, digest, n):
        super().layer_advance(digest, n)
        if self.bytes >= self.after and self.reg.proc is not None:
            self.reg.kill()


def test_registry_killed_mid_pull_then_resumes(tmp_path, home):
    size = 48 << 20  # incompressible, far more than loopback socket buffers hold
    built = build_image(tmp_path / "layout", [({"big": os.urandom(size)}, "none")])
    reg = Registry(tmp_path / "reg")
    reg.start()
    try:
        ref = reg.push(built.layout, "big/img")
        with pytest.raises(RegistryError, match="registry|connection") as info:
            pull(ref, home, progress=KillAfter(reg, 4 << 20))
        assert "\n" not in str(info.value)
        hexpart = built.layer_digests[0].partition(":")[2]
        partial = home.blobs / f".partial-{hexpart}"
        kept = partial.stat().st_size
        assert 0 < kept < size
        assert hexpart not in _blob_names(home) and st.list_images(home) == []

        reg.start()
        rec = Recorder()
        image = pull(ref, home, progress=rec)
    finally:
        reg.stop()
    assert rec.starts[0] == (built.layer_digests[0], kept)  # resumed with a Range request
    assert rec.bytes < image.layers[0].size
    image.layers[0].open().drain()
    assert not partial.exists()


def test_two_concurrent_pulls_of_the_same_image(registry, small_image, home):
    ref = f"{registry.host}/test/img:latest"
    code = (
        "import sys; from pathlib import Path; from supermachine.home import Home; "
        "from supermachine.images.pull import pull; "
        "print(pull(sys.argv[1], Home(Path(sys.argv[2]))).config_digest)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, ref, str(home.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
        assert out.decode().strip() == small_image.config_digests["amd64"]
    names = _blob_names(home)
    assert not [n for n in names if n.startswith(".")]
    assert {d.partition(":")[2] for d in small_image.layer_digests} <= names
    assert len(st.list_images(home)) == 1


def test_unreachable_registry_is_one_clear_line(home):
    from .harness import free_port

    port = free_port()
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}.*refused"):
        pull(f"127.0.0.1:{port}/x/y:latest", home)
    with pytest.raises(ImageError, match="invalid image reference"):
        pull("Not A Ref", home)
    with pytest.raises(ImageError, match="invalid platform"):
        pull(f"127.0.0.1:{port}/x/y", home, platform="linux")


def test_blob_store_path_is_shared_by_images(registry, small_image, tmp_path):
    # Two repositories with the same layers: the second pull fetches no layer bytes.
    home = Home(tmp_path / "h")
    pull(f"{registry.host}/test/img:latest", home)
    registry.push(small_image.layout, "other/img")
    rec = Recorder()
    pull(f"{registry.host}/other/img:latest", home, progress=rec)
    assert set(rec.done.values()) == {"Already exists"}
    assert Path(home.blobs).is_dir()


def test_the_pull_command_imports_only_what_a_pull_needs(registry, small_image, tmp_path):
    """`supermachine pull` of a three-layer image, whole, as a user runs it: it must not load
    what made a small pull 4x skopeo's time (issue 10): http.client and the email package,
    dataclasses (inspect, ast), typing, tempfile (shutil, bz2, lzma), concurrent.futures,
    logging, and ssl for a registry on loopback; nor what kept it at 1.5x: argparse (gettext,
    locale) for a regular command line, pathlib (urllib.parse, ipaddress), socket (enum,
    selectors), threading and base64. The modules a process loaded are what it prints at
    its exit."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print(sorted(sys.modules), file=sys.stderr))\n"
             "from supermachine.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", probe, "--home", str(tmp_path / "h"), "pull", "-q",
                        f"{registry.host}/test/img:latest"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == st.list_images(Home(tmp_path / "h"))[0].manifest_digest
    loaded = set(eval(r.stderr.strip().splitlines()[-1]))  # noqa: S307 (our own output)
    heavy = {"http.client", "email", "dataclasses", "inspect", "typing", "tempfile", "shutil",
             "concurrent.futures", "logging", "datetime", "encodings.idna",
             "ssl",  # a loopback registry is asked in plain HTTP first: no TLS attempt
             "argparse", "gettext", "locale", "pathlib", "urllib.parse", "ipaddress",
             "socket", "selectors", "threading", "base64"}
    assert loaded & heavy == set()
    assert "supermachine.images.connection" in loaded
