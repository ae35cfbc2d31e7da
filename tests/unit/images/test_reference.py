"""Reference parsing: docker's grammar and normalisation, and clear errors for bad input."""

from __future__ import annotations

import pytest

from supermachine.errors import ImageError
from supermachine.images.reference import looks_like_reference, parse_reference

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("library/alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("ghcr.io/o/r:tag", "ghcr.io", "o/r", "tag", None),
        ("GHCR.io/o/r", "ghcr.io", "o/r", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:v1", "localhost:5000", "app", "v1", None),
        (f"host:5000/r@sha256:{HEX}", "host:5000", "r", None, f"sha256:{HEX}"),
        (f"r:t@sha256:{HEX}", "docker.io", "library/r", "t", f"sha256:{HEX}"),
        ("127.0.0.1:5000/a/b/c:1.0-x_y", "127.0.0.1:5000", "a/b/c", "1.0-x_y", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("a.b-c--d/e", "a.b-c--d", "e", "latest", None),
        ("my-org/my__app.x", "docker.io", "my-org/my__app.x", "latest", None),
    ],
)
def test_parse_and_normalise(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    got = (ref.registry, ref.repository, ref.tag, ref.digest)
    assert got == (registry, repository, tag, digest)
    assert looks_like_reference(text)
    # The canonical string parses back to the same reference.
    assert parse_reference(str(ref)) == ref


def test_api_host_and_familiar_forms():
    hub = parse_reference("alpine:3.20")
    assert hub.api_host == "registry-1.docker.io"
    assert str(hub) == "docker.io/library/alpine:3.20"
    assert hub.familiar == "alpine:3.20"
    assert hub.target == "3.20"
    pinned = parse_reference(f"ghcr.io/o/r:t@sha256:{HEX}")
    assert pinned.api_host == "ghcr.io"
    assert pinned.target == f"sha256:{HEX}"
    assert pinned.familiar == f"ghcr.io/o/r:t@sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Alpine", "lowercase"),
        ("user/App", "lowercase"),
        ("alpine:", "tag"),
        ("alpine:-x", "tag"),
        ("alpine:" + "x" * 129, "tag"),
        ("alpine@sha256:abc", "digest"),
        (f"alpine@sha256:{'A' * 64}", "digest"),
        (f"alpine@md5:{HEX}", "digest"),
        ("a//b", "path component"),
        ("a/", "path component"),
        ("/a", "path component"),
        ("a_-b", "path component"),
        ("-a", "path component"),
        ("a b", "whitespace"),
        ("alpine\n", "whitespace"),
        ("ålpine", "non-ASCII"),
        ("host:99999/a", "port"),
        ("ho_st.io/a", "registry host"),
        ("ghcr.io/", "missing repository"),
        ("x" * 600, "longer than"),
        ("a.io/" + "b" * 260, "longer than 255"),
    ],
)
def test_malformed_references_say_why(text, why):
    with pytest.raises(ImageError, match=why) as info:
        parse_reference(text)
    assert "\n" not in str(info.value)
    assert not looks_like_reference(text)


def test_looks_like_reference_rejects_paths():
    assert not looks_like_reference("./layout")
    assert not looks_like_reference("/tmp/image.tar")
    assert looks_like_reference("python:3.12-slim")
