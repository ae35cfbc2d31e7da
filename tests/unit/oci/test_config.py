"""config.json and process.json as podman 4.3 and containerd 1.6 write them (shapes taken
from their real calls here, see docs/oci-runtime.md), and hostile ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.errors import UsageError
from supermachine.oci import config as c
from supermachine.spec import DEFAULT_MEMORY_MIB, Mount


def podman_config(tmp: Path, **changes) -> dict:
    """A rootful `podman run -d -p 18080:80 -v VOL:/data` config, trimmed."""
    userdata = tmp / "userdata"
    userdata.mkdir(exist_ok=True)
    for name in ("hostname", "resolv.conf", "hosts", ".containerenv"):
        (userdata / name).write_text(f"{name}\n")
    (userdata / "shm").mkdir(exist_ok=True)
    vol = tmp / "vol"
    vol.mkdir(exist_ok=True)
    (tmp / "merged").mkdir(exist_ok=True)
    cfg = {
        "ociVersion": "1.0.2-dev",
        "process": {"user": {"uid": 0, "gid": 0, "umask": 18}, "args": ["sleep", "100"],
                    "env": ["container=podman", "PATH=/usr/bin:/bin", "TERM=xterm",
                            "HOME=/root", "HOSTNAME=70658ba32f33"],
                    "cwd": "/", "capabilities": {"bounding": ["CAP_CHOWN"]},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
        "root": {"path": str(tmp / "merged")},
        "hostname": "70658ba32f33",
        "mounts": [
            {"destination": "/data", "type": "bind", "source": str(vol),
             "options": ["rw", "rprivate", "rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": []},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": []},
            {"destination": "/etc/hostname", "type": "bind",
             "source": str(userdata / "hostname"), "options": ["bind", "rprivate"]},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": str(userdata / "resolv.conf"), "options": ["bind", "rprivate"]},
            {"destination": "/etc/hosts", "type": "bind", "source": str(userdata / "hosts"),
             "options": ["bind", "rprivate"]},
            {"destination": "/dev/shm", "type": "bind", "source": str(userdata / "shm"),
             "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"]},
            {"destination": "/run/.containerenv", "type": "bind",
             "source": str(userdata / ".containerenv"), "options": ["bind", "rprivate"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["ro"]},
        ],
        "annotations": {"io.container.manager": "libpod"},
        "linux": {"namespaces": [{"type": "pid"},
                                 {"type": "network", "path": "/run/netns/netns-b8f5"},
                                 {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                  "resources": {"pids": {"limit": 2048}}},
    }
    cfg.update(changes)
    return cfg


def containerd_config() -> dict:
    """`ctr run -d c2 sleep 100`, trimmed: relative root, additionalGids, no network path."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {"user": {"uid": 0, "gid": 0, "additionalGids": [0]},
                    "args": ["sleep", "100"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/",
                    "noNewPrivileges": True},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/run", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                   {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                    "options": ["size=65536k"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                                 {"type": "mount"}, {"type": "network"}],
                  "resources": {"cpu": {"shares": 1024}}},
    }


def parse(tmp: Path, cfg: dict) -> c.Bundle:
    return c.parse_bundle(tmp, json.dumps(cfg).encode())


def test_a_podman_bundle(tmp_path: Path) -> None:
    b = parse(tmp_path, podman_config(tmp_path))
    assert b.root == str(tmp_path / "merged")
    assert b.readonly is False
    assert b.hostname == "70658ba32f33"
    assert b.network == "user" and b.netns == "/run/netns/netns-b8f5"
    assert b.memory_mib == DEFAULT_MEMORY_MIB and b.cpus == 1
    # The guest's own: proc, sysfs, devpts, mqueue, cgroup, /dev, /dev/shm.
    assert {m.target for m in b.mounts} == {"/data", "/etc/hostname", "/etc/resolv.conf",
                                            "/etc/hosts", "/run/.containerenv"}
    assert len(b.skipped) == 7
    assert Mount("bind", "/data", str(tmp_path / "vol")) in b.mounts
    assert b.process is not None
    w = b.process.workload()
    assert w.entrypoint == ("sleep", "100") and w.cmd == ()
    assert w.user == "0:0:"  # no supplementary groups: runc sets none either
    assert "HOSTNAME=70658ba32f33" in w.env and w.workdir == "/" and w.stdin
    spec = b.vm_spec("abc")
    assert spec.root_dir == b.root and spec.netns == b.netns and spec.network == "user"


def test_a_containerd_bundle(tmp_path: Path) -> None:
    b = parse(tmp_path, containerd_config())
    assert b.root == str(tmp_path / "rootfs")  # relative to the bundle
    assert b.network == "none" and b.netns is None  # a new, empty network namespace
    assert b.mounts == (Mount("tmpfs", "/run", None, False, 65536 * 1024),)
    assert b.process is not None and b.process.user == "0:0:0"
    assert b.hostname is None


def test_no_network_namespace_is_the_vms_own_network(tmp_path: Path) -> None:
    cfg = containerd_config()
    cfg["linux"]["namespaces"] = [{"type": "pid"}]
    assert parse(tmp_path, cfg).network == "user"


def test_vm_size_from_annotations_or_limits(tmp_path: Path) -> None:
    cfg = containerd_config()
    cfg["linux"]["resources"] = {"memory": {"limit": 300 * 2**20 + 1},
                                 "cpu": {"quota": 150000, "period": 100000}}
    b = parse(tmp_path, cfg)
    assert (b.memory_mib, b.cpus) == (301, 2)
    cfg["linux"]["resources"] = {"memory": {"limit": 2**20}}
    assert parse(tmp_path, cfg).memory_mib == c.MIN_MEMORY_MIB
    cfg["annotations"] = {c.MEMORY_ANNOTATION: "1G", c.CPUS_ANNOTATION: "3"}
    b = parse(tmp_path, cfg)
    assert (b.memory_mib, b.cpus) == (1024, 3)


def test_readonly_root_and_read_only_binds(tmp_path: Path) -> None:
    cfg = podman_config(tmp_path, root={"path": str(tmp_path / "merged"), "readonly": True})
    cfg["mounts"][0]["options"] = ["ro", "rbind"]
    b = parse(tmp_path, cfg)
    assert b.readonly and Mount("bind", "/data", str(tmp_path / "vol"), True) in b.mounts
    assert b.vm_spec("x").read_only


def test_devices_stay_on_the_host(tmp_path: Path) -> None:
    cfg = containerd_config()
    cfg["mounts"].append({"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse",
                          "options": ["bind"]})
    b = parse(tmp_path, cfg)
    assert all(m.target != "/dev/fuse" for m in b.mounts)
    assert any("/dev/fuse" in s for s in b.skipped)


def test_too_many_shared_directories(tmp_path: Path) -> None:
    cfg = containerd_config()
    for i in range(4):
        d = tmp_path / f"d{i}"
        d.mkdir()
        cfg["mounts"].append({"destination": f"/m{i}", "type": "bind", "source": str(d),
                              "options": ["rbind"]})
    with pytest.raises(c.BundleError, match="too many bind-mounted directories"):
        parse(tmp_path, cfg)


@pytest.mark.parametrize("change, message", [
    ({"ociVersion": "2.0.0"}, "unsupported ociVersion"),
    ({"root": {"path": "../../etc"}}, "leads outside the bundle"),
    ({"root": {"path": ""}}, "root.path"),
    ({"root": "x"}, "root must be"),
    ({"process": {"args": []}}, "nothing to run"),
    ({"process": {"args": ["x"], "cwd": "relative"}}, "cwd"),
    ({"process": {"args": ["x"], "env": ["NOEQUALS"]}}, "KEY=VALUE"),
    ({"process": {"args": ["x"], "user": {"uid": -1}}}, "uid"),
    ({"process": {"args": ["x"], "user": {"uid": True}}}, "uid"),
    ({"process": {"args": ["x"], "user": {"additionalGids": list(range(65))}}},
     "more than 64"),
    ({"process": {"args": ["x\0y"]}}, "NUL"),
    ({"process": {"args": ["x"], "terminal": "yes"}}, "terminal"),
    ({"mounts": [{"destination": "rel", "type": "tmpfs"}]}, "must be absolute"),
    ({"mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]}, "absolute"),
    ({"mounts": "nope"}, "must be a list"),
    ({"linux": {"namespaces": [{"type": "network", "path": "netns"}]}}, "absolute"),
    ({"annotations": {c.MEMORY_ANNOTATION: "lots"}}, "memory"),
])
def test_bad_configs_are_one_clear_error(tmp_path: Path, change: dict, message: str) -> None:
    cfg = containerd_config()
    cfg.update(change)
    with pytest.raises(UsageError, match=message):
        parse(tmp_path, cfg)


def test_huge_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(c.BundleError, match="larger than"):
        c.parse_bundle(tmp_path, b" " * (c.MAX_CONFIG_BYTES + 1))
    with pytest.raises(c.BundleError, match="not valid JSON"):
        c.parse_bundle(tmp_path, b"{")
    with pytest.raises(c.BundleError, match="not valid JSON"):
        c.parse_bundle(tmp_path, b"[" * 100000)  # deep nesting
    with pytest.raises(c.BundleError, match="not a JSON object"):
        c.parse_bundle(tmp_path, b"[]")
    cfg = containerd_config()
    cfg["process"]["args"] = ["x"] * (c.MAX_ITEMS + 1)
    with pytest.raises(c.BundleError, match="more than"):
        parse(tmp_path, cfg)


def test_hooks(tmp_path: Path) -> None:
    cfg = containerd_config()
    cfg["hooks"] = {"prestart": [{"path": "/usr/bin/setup", "args": ["setup", "-x"],
                                  "env": ["A=1"], "timeout": 5}],
                    "poststop": [{"path": "/bin/cleanup"}],
                    "createContainer": [{"path": "/bin/inside"}]}
    b = parse(tmp_path, cfg)
    assert b.hooks_of("prestart") == (c.Hook("/usr/bin/setup", ("setup", "-x"), ("A=1",), 5),)
    assert b.hooks_of("poststop")[0].path == "/bin/cleanup" and b.hooks_of("poststart") == ()
    assert any("createContainer" in x and "guest's" in x for x in b.skipped)
    assert c.Hook.from_json(b.hooks_of("prestart")[0].to_json()) == b.hooks_of("prestart")[0]
    assert b.new_netns and b.network == "none"  # a namespace without a path: made new
    for bad, why in (({"prestart": [{"path": "rel"}]}, "absolute"),
                     ({"prestart": [{"path": "/x", "timeout": 0}]}, "timeout"),
                     ({"prestart": [{"path": "/x", "env": ["NOEQ"]}]}, "KEY=VALUE"),
                     ({"bogus": []}, "unknown hook stage"),
                     ({"prestart": {"path": "/x"}}, "must be a list")):
        cfg["hooks"] = bad
        with pytest.raises(c.BundleError, match=why):
            parse(tmp_path, cfg)


def test_process_rlimits() -> None:
    p = c.parse_process({"args": ["x"], "rlimits": [
        {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 2**64 - 1},
        {"type": "RLIMIT_NOFILE", "soft": 10, "hard": 10}]})
    assert p.rlimits == (("nofile", 10, 10), ("core", 0, 2**64 - 1))  # the last one wins
    assert p.workload().rlimit_numbers == ((7, 10, 10), (4, 0, 2**64 - 1))
    for bad in ([{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}],
                [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}],
                [{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1}],
                [{"type": "RLIMIT_NOFILE", "soft": 1}], "x"):
        with pytest.raises(c.BundleError):
            c.parse_process({"args": ["x"], "rlimits": bad})


def test_exec_process_file() -> None:
    p = c.parse_process(c.load_json(json.dumps(
        {"user": {"uid": 1000, "gid": 100, "additionalGids": [10, 20]}, "args": ["ls", "/"],
         "env": ["PATH=/bin"], "cwd": "/tmp", "terminal": True}).encode(), "process.json"))
    assert (p.args, p.user, p.cwd, p.terminal) == (("ls", "/"), "1000:100:10,20", "/tmp", True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=6),
    max_leaves=30)
config_keys = st.sampled_from(["ociVersion", "process", "root", "hostname", "mounts",
                               "annotations", "linux"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(config_keys, json_values, max_size=7), json_values)
def test_hostile_configs_give_a_bundle_or_one_error(tmp_path_factory, cfg, process) -> None:
    tmp = tmp_path_factory.mktemp("bundle")
    base = containerd_config()
    base.update(cfg)
    for doc in (cfg, base):
        try:
            c.parse_bundle(tmp, json.dumps(doc).encode())
        except UsageError:
            pass
    try:
        c.parse_process(process)
    except UsageError:
        pass
