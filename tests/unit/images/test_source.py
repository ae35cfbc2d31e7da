"""Local image sources: reference detection, OCI layouts, oci-archive and docker-archive."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from supermachine.errors import DigestMismatch, ImageError
from supermachine.home import Home
from supermachine.images import open_image
from supermachine.images.source import parse_source
from tests.fixtures import images as fx

BUSYBOX_CMD = ("sh",)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def test_parse_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_source("alpine") is None
    assert parse_source("alpine:3.20") is None
    assert parse_source("ghcr.io/owner/img@sha256:" + "a" * 64) is None
    (tmp_path / "alpine").mkdir()
    assert parse_source("alpine") is None  # a bare word stays a registry reference
    s = parse_source("./alpine")
    assert s is not None and s.kind == "auto" and s.path == Path("alpine")
    s = parse_source("oci:/x/y:v1")
    assert s is not None and (s.kind, s.path, s.tag) == ("oci", Path("/x/y"), "v1")
    s = parse_source("docker-archive:/a.tar:repo/x:tag")
    assert s is not None and (s.path, s.tag) == (Path("/a.tar"), "repo/x:tag")
    # a path that itself contains a colon: the longest existing prefix wins
    (tmp_path / "we:ird").mkdir()
    s = parse_source(f"oci:{tmp_path}/we:ird:v2")
    assert s is not None and (s.path, s.tag) == (tmp_path / "we:ird", "v2")
    (tmp_path / "img.tar").write_bytes(b"")
    s = parse_source("img.tar")
    assert s is not None and s.kind == "auto"
    with pytest.raises(ImageError, match="names no path"):
        parse_source("oci:")


def test_non_local_references_delegate_to_pull(home: Home) -> None:
    # A registry reference must not be treated as a path: it reaches the puller, which
    # fails here without network (any ImageError is fine, a local-path error is not).
    with pytest.raises(ImageError) as info:
        open_image("localhost:1/nothing/here:tag", home)
    assert "does not exist" not in str(info.value)


def expect_busybox(img, layers: int = 1) -> None:
    assert img.config.cmd == BUSYBOX_CMD and img.config.env[0].startswith("PATH=")
    assert (img.os, img.architecture) == ("linux", "amd64")
    assert len(img.layers) == layers
    for layer in img.layers:
        with layer.open() as f:
            data = f.read()
        assert len(data) == layer.size


@pytest.mark.parametrize(
    "ref",
    [
        "{busybox}", "oci:{busybox}", "oci:{busybox}:latest",
        "{oci_archive}", "oci-archive:{oci_archive}", "oci-archive:{oci_archive}:latest",
        "{docker_archive}", "docker-archive:{docker_archive}",
        "docker-archive:{docker_archive}:busybox:latest",
    ],
)
def test_open_fixture_sources(ref: str, home: Home) -> None:
    text = ref.format(busybox=fx.busybox(), oci_archive=fx.busybox_oci_archive(),
                      docker_archive=fx.busybox_docker_archive())
    img = open_image(text, home)
    expect_busybox(img)
    assert img.source == text
    # all three forms describe the same image config (skopeo preserves it)
    assert img.config_digest == open_image(str(fx.busybox()), home).config_digest


def test_format_is_sniffed_from_content(tmp_path: Path, home: Home) -> None:
    odd = tmp_path / "image.oci"
    shutil.copy(fx.busybox_docker_archive(), odd)
    expect_busybox(open_image(str(odd), home))
    odd2 = tmp_path / "docker.tar"
    shutil.copy(fx.busybox_oci_archive(), odd2)
    assert open_image(str(odd2), home).manifest_digest is not None


def test_unknown_tags(home: Home) -> None:
    with pytest.raises(ImageError, match="no image tagged 'nope'"):
        open_image(f"oci:{fx.busybox()}:nope", home)
    with pytest.raises(ImageError, match="no image tagged"):
        open_image(f"docker-archive:{fx.busybox_docker_archive()}:other:tag", home)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (gzip.compress(b"x" * 1000), "compressed"),
        (b"hello world" * 100, "not a tar archive"),
    ],
)
def test_not_an_image_file(tmp_path: Path, home: Home, content: bytes, message: str) -> None:
    p = tmp_path / "thing.tar"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        open_image(str(p), home)


def test_tar_that_is_not_an_image(tmp_path: Path, home: Home) -> None:
    p = tmp_path / "plain.tar"
    p.write_bytes(fx.layer_tar([fx.tar_entry("hello", data=b"hi")]))
    with pytest.raises(ImageError, match="not an OCI or Docker image archive"):
        open_image(str(p), home)


def test_missing_path(tmp_path: Path, home: Home) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        open_image(str(tmp_path / "nothing"), home)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="not an OCI image layout"):
        open_image(str(tmp_path / "empty"), home)


def copy_layout(tmp_path: Path) -> Path:
    dst = tmp_path / "layout"
    shutil.copytree(fx.busybox(), dst)
    return dst


def test_layout_config_digest_mismatch(tmp_path: Path, home: Home) -> None:
    layout = copy_layout(tmp_path)
    manifest, _ = fx.read_layout(layout)
    cfg = layout / "blobs" / "sha256" / manifest["config"]["digest"].partition(":")[2]
    data = bytearray(cfg.read_bytes())
    data[data.index(b'"sh"') + 1] = ord("x")  # same size, different content
    cfg.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        open_image(str(layout), home)


def test_layout_layer_size_and_missing_blob(tmp_path: Path, home: Home) -> None:
    layout = copy_layout(tmp_path)
    manifest, _ = fx.read_layout(layout)
    blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].partition(":")[2]
    with open(blob, "ab") as f:
        f.write(b"extra")
    with pytest.raises(ImageError, match="descriptor says"):
        open_image(str(layout), home)
    blob.unlink()
    with pytest.raises(ImageError, match="missing"):
        open_image(str(layout), home)


def test_truncated_archives(tmp_path: Path, home: Home) -> None:
    for src in (fx.busybox_docker_archive(), fx.busybox_oci_archive()):
        data = src.read_bytes()
        p = tmp_path / f"cut-{src.name}"
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError):
            img = open_image(str(p), home)
            for layer in img.layers:  # a cut inside a layer shows when the layer is read
                with layer.open() as f:
                    f.read()


def write_docker_archive(path: Path, layer: bytes, config: dict, tags: list[str]) -> None:
    """An old-style `docker save` archive: <id>/layer.tar, with a symlinked duplicate."""
    cfg = json.dumps(config).encode()
    cfg_name = fx.hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": tags,
                 "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]
    entries = [
        fx.tar_entry("aaa", tarfile.DIRTYPE), fx.tar_entry("aaa/layer.tar", data=layer),
        fx.tar_entry("bbb", tarfile.DIRTYPE),
        fx.tar_entry("bbb/layer.tar", tarfile.SYMTYPE, linkname="../aaa/layer.tar"),
        fx.tar_entry(cfg_name, data=cfg),
        fx.tar_entry("manifest.json", data=json.dumps(manifest).encode()),
    ]
    path.write_bytes(fx.layer_tar(entries))


def test_handmade_docker_archive(tmp_path: Path, home: Home) -> None:
    layer = fx.layer_tar([fx.tar_entry("hello", data=b"hi")])
    diff = "sha256:" + fx.hashlib.sha256(layer).hexdigest()
    config = fx.image_config([diff, diff], {"Cmd": ["/hello"], "User": "app"})
    p = tmp_path / "saved.tar"
    write_docker_archive(p, layer, config, ["example.com/x:1"])
    img = open_image(str(p), home)
    assert img.name == "example.com/x:1" and img.config.user == "app"
    assert [x.digest for x in img.layers] == [diff, diff]
    with img.layers[1].open() as f:
        assert f.read() == layer

    # The config's diff_ids do not match the layer bytes: reading the layer fails.
    bad = fx.image_config(["sha256:" + "0" * 64] * 2, {})
    write_docker_archive(p, layer, bad, [])
    img = open_image(str(p), home)
    with pytest.raises(DigestMismatch), img.layers[0].open() as f:
        f.read()

    # A config whose file name does not match its content.
    data = io.BytesIO(p.read_bytes())
    names = [m.name for m in tarfile.open(fileobj=data)]
    cfg_name = next(n for n in names if n.endswith(".json") and n != "manifest.json")
    wrong = fx.layer_tar([
        fx.tar_entry("aaa/layer.tar", data=layer),
        fx.tar_entry(cfg_name, data=json.dumps(config).encode()),
        fx.tar_entry("manifest.json", data=json.dumps(
            [{"Config": cfg_name, "RepoTags": None, "Layers": ["aaa/layer.tar"] * 2}]).encode()),
    ])
    p.write_bytes(wrong)
    with pytest.raises(DigestMismatch):
        open_image(str(p), home)


def test_malformed_docker_manifest(tmp_path: Path, home: Home) -> None:
    p = tmp_path / "bad.tar"
    p.write_bytes(fx.layer_tar([fx.tar_entry("manifest.json", data=b'[{"Config": 5}]')]))
    with pytest.raises(ImageError, match="malformed entry"):
        open_image(str(p), home)


def test_platform_mismatch(home: Home) -> None:
    with pytest.raises(ImageError, match="not the requested linux/arm64"):
        open_image(str(fx.busybox()), home, platform="linux/arm64")
    assert open_image(str(fx.busybox()), home, platform="linux/amd64").architecture == "amd64"


def test_layout_with_nested_multi_platform_index(tmp_path: Path, home: Home) -> None:
    layout = copy_layout(tmp_path)
    top = json.loads((layout / "index.json").read_text())
    mdesc = dict(top["manifests"][0])
    mdesc.pop("annotations")
    entries = [{**mdesc, "platform": {"os": "linux", "architecture": "amd64"}},
               {**mdesc, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]
    blob = json.dumps({"schemaVersion": 2, "mediaType": fx.OCI_INDEX,
                       "manifests": entries}).encode()
    d = fx._put_blob(layout, blob)
    top["manifests"] = [
        {"mediaType": fx.OCI_INDEX, **d, "annotations": {fx.REF_NAME_KEY: "v1"}},
        {**mdesc, "annotations": {fx.REF_NAME_KEY: "other"}},
    ]
    (layout / "index.json").write_text(json.dumps(top))
    img = open_image(f"oci:{layout}:v1", home, platform="linux/amd64")
    assert img.manifest_digest == mdesc["digest"]
    # the arm64 entry points at an amd64 config: the mismatch is caught
    with pytest.raises(ImageError, match="not the requested linux/arm64"):
        open_image(f"oci:{layout}:v1", home, platform="linux/arm64")
    with pytest.raises(ImageError, match="several images"):
        open_image(str(layout), home)
