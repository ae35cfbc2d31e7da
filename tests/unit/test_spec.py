"""The typed VM and workload spec: defaults, normalisation, JSON round trips, and one-line
errors for every bad field (specs also come from untrusted JSON: state files, API clients)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.errors import UsageError
from supermachine.images.model import ImageConfig
from supermachine.spec import DEFAULT_MEMORY_MIB, VMSpec, WorkloadSpec, env_items


def test_defaults_live_in_one_place():
    s = VMSpec("img")
    assert (s.memory_mib, s.cpus, s.network, s.snapshot, s.pull) == \
        (DEFAULT_MEMORY_MIB, 1, "user", True, "missing")
    assert VMSpec.create("img") == s


def test_create_normalises_what_people_write(tmp_path):
    s = VMSpec.create(tmp_path / "img", memory="1G", cpus="1.5", ports={8080: 80},
                      machine_id="random", accel=None)
    assert s.image == str(tmp_path / "img")
    assert (s.memory_mib, s.cpus, s.accel, s.machine_id) == (1024, 2, "auto", True)
    assert s.ports == ("127.0.0.1:8080:80/tcp",)
    assert VMSpec.create("i", ports=["0.0.0.0::53/udp", 9000]).ports == \
        ("0.0.0.0:0:53/udp", "127.0.0.1:0:9000/tcp")
    assert VMSpec.create("i", machine_id="AB" * 16).machine_id == "ab" * 16


@pytest.mark.parametrize(("fields", "message"), [
    ({"image": ""}, "image must not be empty"),
    ({"memory_mib": 1}, "out of range"),
    ({"memory_mib": "512M"}, "integer number of MiB"),
    ({"cpus": 0.5}, "whole number"),
    ({"cpus": 65}, "out of range"),
    ({"accel": "xen"}, "unknown accelerator"),
    ({"kernel": "/k"}, "go together"),
    ({"pull": "sometimes"}, "unknown pull policy"),
    ({"network": "bridge"}, "unknown network mode"),
    ({"network": "none", "ports": ["80"]}, "cannot publish"),
    ({"network": "none", "publish_all": True}, "cannot publish"),
    ({"ports": ["1:2:3:4"]}, "port"),
    ({"allow_hosts": ["not a host!"]}, "neither a CIDR nor a host name"),
    ({"hostname": "x" * 65}, "invalid hostname"),
    ({"machine_id": "xyz"}, "invalid machine id"),
    ({"machine_id": 5}, "machine_id"),
    ({"mounts": ({"source": "/"},)}, "missing field"),
    ({"mounts": "x"}, "must be a list"),
    ({"mounts": ({"type": "bind", "target": "/x", "source": "rel"},)}, "absolute"),
    ({"snapshot": "yes"}, "true or false"),
    ({"insecure_registries": "host"}, "list of strings"),
])
def test_bad_fields_are_one_line_errors(fields, message):
    with pytest.raises(UsageError, match=message) as e:
        VMSpec(**{"image": "img", **fields})
    assert "\n" not in str(e.value)


def test_json_is_strict():
    with pytest.raises(UsageError, match="unknown field"):
        VMSpec.from_json({"image": "i", "memroy_mib": 5})
    with pytest.raises(UsageError, match="JSON object"):
        VMSpec.from_json(["i"])
    with pytest.raises(UsageError, match="version"):
        VMSpec.from_json({"version": 99, "image": "i"})
    with pytest.raises(UsageError, match="unknown field"):
        WorkloadSpec.from_json({"argv": []})
    with pytest.raises(UsageError, match="unknown field") as e:  # a run socket's client's
        VMSpec.from_json({"image": "i", "x\ny": 1})
    assert "\n" not in str(e.value)


def test_workload_overrides_follow_docker():
    cfg = ImageConfig(entrypoint=("/ep",), cmd=("a",), env=("PATH=/bin", "X=1"),
                      working_dir="/app", user="app")
    w = WorkloadSpec().resolve(cfg)
    assert (w.argv, w.cwd, w.user) == (("/ep", "a"), "/app", "app")
    w = WorkloadSpec(cmd=("b",), env=("X=2",), workdir="/w", user="1:2").resolve(cfg)
    assert (w.argv, w.env, w.cwd, w.user) == (("/ep", "b"), ("PATH=/bin", "X=2"), "/w", "1:2")
    w = WorkloadSpec.command(["ls", "-l"]).resolve(cfg)  # exec: no Entrypoint, no Cmd
    assert (w.argv, w.cwd, w.user) == (("ls", "-l"), "/app", "app")
    assert WorkloadSpec().resolve(ImageConfig(cmd=("sh",))).user is None  # uid 0, no passwd


def test_env_items():
    assert env_items({"A": "1"}) == ("A=1",)
    assert env_items(["A=1", "B", "C"], {"B": "2"}) == ("A=1", "B=2")
    with pytest.raises(UsageError):
        env_items(["=x"])
    with pytest.raises(UsageError, match="KEY=VALUE"):
        WorkloadSpec(env=("NOVALUE",))


texts = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=20)
vm_specs = st.builds(
    VMSpec,
    image=texts.filter(bool),
    memory_mib=st.integers(64, 1 << 20),
    cpus=st.integers(1, 64),
    accel=st.sampled_from(["auto", "kvm", "tcg"]),
    snapshot=st.booleans(),
    pull=st.sampled_from(["always", "missing", "never"]),
    platform=st.none() | texts.filter(bool),
    insecure_registries=st.lists(texts.filter(bool), max_size=3).map(tuple),
    ports=st.lists(st.integers(1, 65535).map(str), max_size=3, unique=True).map(tuple),
    publish_all=st.booleans(),
    allow_host_loopback=st.booleans(),
    hostname=st.none() | st.text(st.characters(min_codepoint=97, max_codepoint=122),
                                 min_size=1, max_size=64),
    machine_id=st.none() | st.just(True) | st.binary(min_size=16, max_size=16)
    .map(bytes.hex),
)
workloads = st.builds(
    WorkloadSpec,
    entrypoint=st.none() | st.lists(texts, max_size=3).map(tuple),
    cmd=st.lists(texts, max_size=3).map(tuple),
    env=st.lists(st.tuples(texts.filter(lambda t: t and "=" not in t), texts)
                 .map("=".join), max_size=3).map(tuple),
    workdir=st.none() | texts.map(lambda t: "/" + t),
    user=st.none() | texts.filter(bool),
    stdin=st.booleans(), tty=st.booleans(),
)


@settings(max_examples=300)
@given(vm_specs, workloads)
def test_json_round_trip(spec, work):
    assert VMSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert WorkloadSpec.from_json(json.loads(json.dumps(work.to_json()))) == work


@settings(max_examples=500)
@given(st.dictionaries(st.sampled_from(["image", "memory_mib", "cpus", "accel", "ports",
                                        "network", "hostname", "machine_id", "mounts",
                                        "allow_hosts", "kernel", "bogus"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=30)
                       | st.lists(st.text(max_size=10), max_size=3)))
def test_hostile_json_gives_a_spec_or_a_usage_error(obj):
    try:
        VMSpec.from_json(obj)
    except UsageError as e:
        assert str(e) and "\n" not in str(e)


def test_env_file_parsing_is_dockers() -> None:
    from supermachine.spec import parse_env_file

    text = "# c\n\nA=1\n  B=2 \nC\nD\nE=x=y\n"
    assert parse_env_file(text, {"C": "from host"}) == ("A=1", "B=2 ", "C=from host", "E=x=y")
    for bad in ("=novalue\n", "B C=1\n", "B =1\n"):
        with pytest.raises(UsageError, match="line 1: invalid variable name"):
            parse_env_file(bad)


@given(st.text(max_size=300))
def test_env_file_never_crashes(text: str) -> None:
    from supermachine.spec import parse_env_file

    try:
        items = parse_env_file(text, {})
    except UsageError as e:
        assert "\n" not in str(e)
        return
    for item in items:
        key, sep, _ = item.partition("=")
        assert key and sep and not any(c.isspace() for c in key)


def test_volume_flags_follow_docker() -> None:
    from supermachine.spec import Mount, parse_mount_flag, parse_tmpfs, parse_volume

    assert parse_volume("/srv/data:/data:ro") == Mount("bind", "/data", "/srv/data", True)
    assert parse_volume("./src:/work", cwd="/home/u") == Mount("bind", "/work", "/home/u/src")
    assert parse_volume("cache:/c") == Mount("volume", "/c", "cache")
    assert parse_volume("/a:/b/../c/:rw,z").target == "/c"
    assert parse_mount_flag("type=bind,src=/x,dst=/y,readonly") == \
        Mount("bind", "/y", "/x", True)
    assert parse_mount_flag("type=tmpfs,target=/t,tmpfs-size=1m") == \
        Mount("tmpfs", "/t", None, False, 1 << 20)
    assert parse_tmpfs("/run:size=64m,noexec") == Mount("tmpfs", "/run", None, False, 64 << 20)
    for bad, words in (("/x", "anonymous volumes"), ("/a:/b:/c:ro", "use SRC:DST"),
                       ("/a:rel", "absolute path"), ("bad name:/x", "invalid volume name"),
                       ("/a:/b:rx", "invalid volume option"), (":/x", "empty source")):
        with pytest.raises(UsageError, match=words):
            parse_volume(bad)
    for bad, words in (("type=bind,target=/x", "needs source"), ("source=/x", "needs target"),
                       ("type=bind,source=/x,target=/y,foo=1", "unsupported --mount field"),
                       ("type=tmpfs,target=/x,tmpfs-size=0", "must be positive"),
                       ("type=bind,source=/x,target=/y,readonly=maybe", "readonly value"),
                       ("type=bind,source=rel,target=/y", "must be an absolute path")):
        with pytest.raises(UsageError, match=words):
            parse_mount_flag(bad)


def test_mounts_in_the_spec_round_trip_and_are_checked() -> None:
    spec = VMSpec.create("img", volumes=["/a:/x", "name:/y:ro"], tmpfs=["/t:size=1k"],
                         read_only=True)
    assert VMSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(UsageError, match="duplicate mount target"):
        VMSpec.create("img", volumes=["/a:/x"], tmpfs=["/x"])
    with pytest.raises(UsageError, match="a VM has 4"):
        VMSpec.create("img", volumes=[f"/h{i}:/g{i}" for i in range(5)])
    with pytest.raises(UsageError, match="mount: unknown field"):
        VMSpec.from_json({"image": "i", "mounts": [{"type": "bind", "target": "/x",
                                                    "source": "/y", "evil": 1}]})


@given(st.lists(st.text(max_size=40), max_size=4))
def test_hostile_mount_text_is_one_line(texts: list[str]) -> None:
    from supermachine.spec import parse_mount_flag, parse_tmpfs, parse_volume

    for text in texts:
        for parse in (parse_volume, parse_mount_flag, parse_tmpfs):
            try:
                m = parse(text)
            except UsageError as e:
                assert "\n" not in str(e)
            else:
                assert m.target.startswith("/") and m.target != "/"
