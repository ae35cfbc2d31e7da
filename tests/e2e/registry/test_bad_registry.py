"""A scripted registry (real HTTP on loopback) for redirects, odd answers and hostile input."""

from __future__ import annotations

import base64
import json

import pytest

from supermachine.errors import AuthError, DigestMismatch, ImageError, RegistryError
from supermachine.images import auth
from supermachine.images import store as st
from supermachine.images.pull import pull

from .harness import FakeRegistry, layer_tar, simple_manifest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PLAIN_TAR = "application/vnd.oci.image.layer.v1.tar"


@pytest.fixture
def fake():
    f = FakeRegistry()
    yield f
    f.close()


@pytest.fixture
def storage():
    """A second origin that registries redirect blob downloads to (like S3)."""
    f = FakeRegistry()
    yield f
    f.close()


def test_basic_auth_and_redirect_to_storage_drops_credentials(fake, storage, home, docker_config):
    layer = layer_tar({"hello": b"world"})
    manifest = simple_manifest(fake, "r", layer, PLAIN_TAR)
    fake.serve_manifest("r", "t", manifest, OCI_MANIFEST)
    want = "Basic " + base64.b64encode(b"u:p").decode()
    challenge = {"WWW-Authenticate": 'Basic realm="fake"'}
    # Every registry path demands Basic auth; the layer itself lives on the storage host.
    layer_path = f"/v2/r/blobs/{json.loads(manifest)['layers'][0]['digest']}"
    storage.routes["/bucket/layer?sig=1"] = (200, {}, layer)
    fake.routes[layer_path] = (307, {"Location": f"http://{storage.host}/bucket/layer?sig=1"}, b"")
    for path, route in list(fake.routes.items()):
        fake.routes[path] = lambda h, route=route: (
            route if h.get("Authorization") == want else (401, challenge, b"")
        )
    auth.save_login(fake.host, "u", "p")
    image = pull(f"{fake.host}/r:t", home)
    assert image.layers[0].media_type == PLAIN_TAR
    image.layers[0].open().drain()
    # The storage host saw the request, but never the registry's credentials.
    assert [p for p, _ in storage.seen] == ["/bucket/layer?sig=1"]
    assert all("Authorization" not in h for _, h in storage.seen)


def test_redirect_loop_is_bounded(fake, home):
    manifest = simple_manifest(fake, "r", layer_tar({"a": b"b"}), PLAIN_TAR)
    fake.serve_manifest("r", "t", manifest, OCI_MANIFEST)
    layer_digest = json.loads(manifest)["layers"][0]["digest"]
    layer_path = f"/v2/r/blobs/{layer_digest}"
    fake.routes[layer_path] = (302, {"Location": layer_path}, b"")
    with pytest.raises(RegistryError, match="redirected more than 5 times"):
        pull(f"{fake.host}/r:t", home)
    assert st.list_images(home) == []


@pytest.mark.parametrize(
    ("route", "error", "message"),
    [
        ((429, {}, b""), RegistryError, "rate limit"),
        ((500, {}, b""), RegistryError, "server error HTTP 500"),
        ((403, {}, b'{"errors":[{"code":"DENIED","message":"no"}]}'), AuthError, "DENIED"),
        ((401, {}, b""), AuthError, "without saying how to log in"),
        ((401, {"WWW-Authenticate": "Negotiate x"}, b""), AuthError, "unsupported auth"),
        ((200, {"Content-Type": OCI_MANIFEST}, b"not json"), ImageError, "not valid JSON"),
        ((200, {"Content-Type": OCI_MANIFEST}, b"{" * 100 + b"}" * 100), ImageError, "nested"),
        ((200, {}, b"x" * (5 << 20)), ImageError, "over the 4194304 byte limit"),
        (
            (
                200,
                {"Content-Type": "application/vnd.foo+json"},
                b'{"mediaType": "application/foo"}',
            ),
            ImageError,
            "neither an image manifest nor an index",
        ),
        (
            (
                200,
                {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:" + "0" * 64},
                b'{"schemaVersion": 2}',
            ),
            DigestMismatch,
            "but the registry says",
        ),  # fmt: skip
    ],
)
def test_bad_manifest_answers_are_one_clear_line(fake, home, route, error, message):
    fake.routes["/v2/r/manifests/t"] = route
    with pytest.raises(error, match=message) as info:
        pull(f"{fake.host}/r:t", home)
    assert "\n" not in str(info.value)
    assert st.list_images(home) == []
    assert list(home.blobs.iterdir()) == []


def test_wrong_content_for_a_digest_and_oversized_config(fake, home):
    manifest = simple_manifest(fake, "r", layer_tar({"a": b"b"}), PLAIN_TAR)
    digest = fake.serve_manifest("r", "t", manifest, OCI_MANIFEST)
    fake.routes[f"/v2/r/manifests/{digest}"] = (200, {}, manifest + b" ")
    with pytest.raises(DigestMismatch, match="registry sent wrong content"):
        pull(f"{fake.host}/r@{digest}", home)

    big = json.loads(manifest)
    big["config"]["size"] = 64 << 20
    fake.serve_manifest("r", "big", json.dumps(big).encode(), OCI_MANIFEST)
    with pytest.raises(ImageError, match="config|limit"):
        pull(f"{fake.host}/r:big", home)
    # Nothing was fetched for the oversized config.
    assert not any(p.endswith(big["config"]["digest"]) for p, _ in fake.seen)


def test_unknown_layer_media_type_is_refused(fake, home):
    manifest = json.loads(simple_manifest(fake, "r", b"x", "application/vnd.foo.layer"))
    fake.serve_manifest("r", "t", json.dumps(manifest).encode(), OCI_MANIFEST)
    with pytest.raises(ImageError, match="unsupported layer media type"):
        pull(f"{fake.host}/r:t", home)
    assert st.list_images(home) == []


def test_oversized_layer_from_registry_is_cut_off(fake, home):
    layer = layer_tar({"a": b"b" * 3000})
    manifest = json.loads(simple_manifest(fake, "r", layer, PLAIN_TAR))
    path = f"/v2/r/blobs/{manifest['layers'][0]['digest']}"
    fake.routes[path] = (200, {}, layer + b"\0" * 4096)  # more bytes than the descriptor says
    fake.serve_manifest("r", "t", json.dumps(manifest).encode(), OCI_MANIFEST)
    with pytest.raises(DigestMismatch, match="larger than"):
        pull(f"{fake.host}/r:t", home)
    assert [p.name for p in home.blobs.iterdir() if "partial" in p.name] == []
