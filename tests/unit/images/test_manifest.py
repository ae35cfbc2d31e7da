"""Index/manifest/config parsing: valid documents, platform choice, hostile JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.errors import ImageError
from supermachine.images import manifest as mf

DIG = "sha256:" + "a" * 64


def desc(media_type: str = mf.OCI_MANIFEST, size: int = 10, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": DIG, "size": size, **extra}


def manifest_doc(**over: object) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": mf.OCI_MANIFEST,
           "config": desc(mf.OCI_CONFIG), "layers": [desc(mf.OCI_LAYER_GZIP, 100)]}
    doc.update(over)
    return json.dumps(doc).encode()


def test_parse_manifest_oci_and_docker() -> None:
    m = mf.parse_manifest(manifest_doc(), None)
    assert m.media_type == mf.OCI_MANIFEST and m.config.digest == DIG
    assert [x.size for x in m.layers] == [100]
    d = mf.parse_manifest(manifest_doc(mediaType=mf.DOCKER_MANIFEST,
                                       config=desc(mf.DOCKER_CONFIG),
                                       layers=[desc(mf.DOCKER_LAYER_GZIP)]), mf.DOCKER_MANIFEST)
    assert d.media_type == mf.DOCKER_MANIFEST


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"schemaVersion": 1}, "schemaVersion"),
        ({"mediaType": mf.OCI_INDEX}, "not a manifest"),
        ({"config": desc("application/vnd.cncf.helm.config.v1+json")}, "not a container image"),
        ({"layers": [desc(mf.DOCKER_FOREIGN_LAYER)]}, "foreign"),
        ({"layers": [desc("text/plain")]}, "unsupported layer"),
        ({"layers": [desc(mf.OCI_LAYER_GZIP, -1)]}, "integer"),
        ({"layers": [desc(mf.OCI_LAYER_GZIP, True)]}, "integer"),
        ({"layers": [desc(mf.OCI_LAYER_GZIP, 1 << 40)]}, "integer"),
        ({"layers": [{**desc(mf.OCI_LAYER_GZIP), "digest": "sha256:abc"}]}, "invalid digest"),
        ({"layers": [{**desc(mf.OCI_LAYER_GZIP), "digest": "md5:" + "a" * 32}]}, "digest"),
        ({"layers": [desc(mf.OCI_LAYER_GZIP)] * (mf.MAX_LAYERS + 1)}, "layers"),
        ({"layers": "nope"}, "layers"),
        ({"config": {**desc(mf.OCI_CONFIG), "size": 5 << 20}}, "integer"),
    ],
)
def test_bad_manifests(over: dict, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        mf.parse_manifest(manifest_doc(**over), None)


def test_duplicate_keys_deep_nesting_and_size() -> None:
    with pytest.raises(ImageError, match="duplicate"):
        mf.parse_manifest(b'{"schemaVersion": 2, "schemaVersion": 2}', None)
    with pytest.raises(ImageError, match="nested"):
        mf.parse_manifest(b"[" * 100000 + b"]" * 100000, None)
    with pytest.raises(ImageError, match="limit"):
        mf.parse_manifest(b" " * (mf.MAX_MANIFEST_BYTES + 1), None)
    with pytest.raises(ImageError, match="JSON object"):
        mf.parse_index(b"[]")
    with pytest.raises(ImageError, match="valid JSON"):
        mf.parse_index(b"\xff\xfe")


def test_media_type_disagreement() -> None:
    with pytest.raises(ImageError, match="disagrees"):
        mf.parse_manifest(manifest_doc(), mf.DOCKER_MANIFEST)


def index_doc() -> bytes:
    entries = [
        desc(platform={"os": "linux", "architecture": "amd64"}),
        desc(platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
        desc(platform={"os": "linux", "architecture": "arm", "variant": "v6"}),
        desc(platform={"os": "linux", "architecture": "arm", "variant": "v7"}),
        desc(platform={"os": "unknown", "architecture": "unknown"}),
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX,
                       "manifests": entries}).encode()


def test_select_platform() -> None:
    entries = mf.parse_index(index_doc())
    assert len(entries) == 5

    def pick(p: str | None) -> str:
        return str(mf.select_platform(entries, p).platform)

    assert pick("linux/amd64") == "linux/amd64"
    assert pick("linux/arm64") == "linux/arm64/v8"
    assert pick("linux/arm64/v8") == "linux/arm64/v8"
    assert pick("linux/arm/v7") == "linux/arm/v7"
    assert pick(None) == str(mf.host_platform()).rstrip("/")
    with pytest.raises(ImageError, match="no variant for platform linux/s390x.*linux/amd64"):
        mf.select_platform(entries, "linux/s390x")
    with pytest.raises(ImageError, match="invalid platform"):
        mf.select_platform(entries, "linux")
    # An arm64 entry without a variant matches a request for v8.
    bare = [mf.Descriptor(mf.OCI_MANIFEST, DIG, 1, mf.Platform("linux", "arm64"))]
    assert mf.select_platform(bare, "linux/arm64/v8") is bare[0]
    # A single platform-less manifest (a local layout) is the host's by default.
    plain = [mf.Descriptor(mf.OCI_MANIFEST, DIG, 1)]
    assert mf.select_platform(plain, None) is plain[0]


def test_parse_config() -> None:
    doc = {"os": "linux", "architecture": "arm64", "rootfs": {"diff_ids": [DIG]},
           "config": {"Entrypoint": ["/bin/ep"], "Cmd": None, "Env": ["A=1", "B="],
                      "WorkingDir": "/w", "User": "1000:1000",
                      "ExposedPorts": {"80/tcp": {}}, "Labels": {"k": "v"}}}
    cfg, os_, arch = mf.parse_config(json.dumps(doc).encode())
    assert (os_, arch) == ("linux", "arm64")
    assert cfg.entrypoint == ("/bin/ep",) and cfg.cmd == () and cfg.env == ("A=1", "B=")
    assert (cfg.working_dir, cfg.user) == ("/w", "1000:1000")
    assert cfg.exposed_ports == ("80/tcp",) and cfg.labels == (("k", "v"),)
    assert mf.parse_diff_ids(json.dumps(doc).encode()) == (DIG,)


@pytest.mark.parametrize(
    "config",
    [{"Env": ["NOEQUALS"]}, {"Env": ["=x"]}, {"Cmd": "sh"}, {"Cmd": [1]},
     {"Entrypoint": ["a\x00b"]}, {"Labels": {"k": 1}}, {"User": 0}, {"Labels": []}],
)
def test_bad_configs(config: dict) -> None:
    doc = {"os": "linux", "architecture": "amd64", "config": config}
    with pytest.raises(ImageError):
        mf.parse_config(json.dumps(doc).encode())


def test_sniff_media_type() -> None:
    assert mf.sniff_media_type(index_doc(), None) == mf.OCI_INDEX
    assert mf.sniff_media_type(manifest_doc(), "application/json") == mf.OCI_MANIFEST
    assert mf.sniff_media_type(b"{}", mf.DOCKER_MANIFEST_LIST) == mf.DOCKER_MANIFEST_LIST
    with pytest.raises(ImageError):
        mf.sniff_media_type(b'{"x": 1}', None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "digest",
                        "size", "platform", "os", "architecture", "Env", "Cmd", "rootfs"])
docs = st.dictionaries(keys, json_values, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), docs.map(lambda d: json.dumps(d).encode())))
def test_hostile_documents_only_raise_image_error(data: bytes) -> None:
    # Each parser returns its typed result or raises ImageError; any other exception fails.
    expected = {
        "manifest": (lambda: mf.parse_manifest(data, None),
                     lambda r: isinstance(r, mf.Manifest)),
        "index": (lambda: mf.parse_index(data),
                  lambda r: isinstance(r, list) and all(isinstance(d, mf.Descriptor) for d in r)),
        "config": (lambda: mf.parse_config(data),
                   lambda r: isinstance(r[0], mf.ImageConfig) and all(
                       isinstance(x, str) for x in r[1:])),
        "diff_ids": (lambda: mf.parse_diff_ids(data),
                     lambda r: isinstance(r, tuple) and all(x.startswith("sha256:") for x in r)),
        "media type": (lambda: mf.sniff_media_type(data, None),
                       lambda r: r in mf.INDEX_TYPES or r in mf.MANIFEST_TYPES),
    }
    for what, (parse, valid) in expected.items():
        try:
            result = parse()
        except ImageError:
            continue
        assert valid(result), (what, result)
