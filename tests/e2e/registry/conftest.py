from __future__ import annotations

import os
from pathlib import Path

import pytest

from supermachine.home import Home

from .harness import BuiltImage, Registry, build_image


@pytest.fixture(scope="session")
def small_image(tmp_path_factory) -> BuiltImage:
    """Two platforms, three layers: gzip, zstd and (before skopeo recompresses it) plain."""
    layout = tmp_path_factory.mktemp("layout")
    return build_image(
        layout,
        [
            ({"bin/hello": b"#!/bin/sh\necho hello\n" * 50}, "gzip"),
            ({"etc/zstd-layer": b"zstd\n"}, "zstd"),
            ({"etc/plain-layer": b"plain\n"}, "none"),
        ],
        archs=("amd64", "arm64"),
    )


@pytest.fixture(scope="session")
def registry(tmp_path_factory, small_image) -> Registry:
    """An anonymous registry holding test/img:latest and test/img:v2 (the same image)."""
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    reg.push(small_image.layout, "test/img")
    reg.push(small_image.layout, "test/img", tag="v2")
    yield reg
    reg.stop()


@pytest.fixture
def home(tmp_path) -> Home:
    return Home(tmp_path / "home")


@pytest.fixture
def docker_config(tmp_path, monkeypatch) -> Path:
    """An empty docker config dir for this test only (DOCKER_CONFIG)."""
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert os.environ["DOCKER_CONFIG"] == str(d)
    return d / "config.json"
