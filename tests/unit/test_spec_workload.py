"""Docker's rules for combining the image config with run-time overrides."""

from __future__ import annotations

import pytest

from supermachine.errors import UsageError
from supermachine.spec import (
    DEFAULT_PATH,
    WorkloadSpec,
    env_items,
    parse_cpus,
    parse_hostname,
    parse_machine_id,
    parse_memory,
    random_machine_id,
    resolve,
)

IMAGE = dict(entrypoint=("/entry",), cmd=("--serve",), env=("A=1", "PATH=/bin"),
             working_dir="/app", user="app")


def test_image_defaults():
    w = resolve(**IMAGE)
    assert w.argv == ("/entry", "--serve")
    assert w.env == ("A=1", "PATH=/bin")
    assert w.cwd == "/app" and w.user == "app"


def test_cmd_override_replaces_cmd_keeps_entrypoint():
    assert resolve(**IMAGE, cmd_override=["x", "y"]).argv == ("/entry", "x", "y")


def test_entrypoint_override_drops_image_cmd():
    assert resolve(**IMAGE, entrypoint_override="/bin/sh").argv == ("/bin/sh",)
    assert resolve(**IMAGE, entrypoint_override="/bin/sh",
                   cmd_override=["-c", "true"]).argv == ("/bin/sh", "-c", "true")


def test_empty_entrypoint_override_resets_entrypoint():
    assert resolve(**IMAGE, entrypoint_override="", cmd_override=["ls"]).argv == ("ls",)


def test_env_overrides_and_passthrough():
    w = resolve(**IMAGE, env_overrides=env_items(["A=2", "B=x=y", "HOMEISH", "MISSING"],
                                                 {"HOMEISH": "/h"}))
    assert w.env == ("A=2", "PATH=/bin", "B=x=y", "HOMEISH=/h")


def test_default_path_added_when_image_has_none():
    w = resolve(entrypoint=(), cmd=("sh",), env=(), working_dir="", user="")
    assert w.env == (f"PATH={DEFAULT_PATH}",)
    assert w.cwd == "/" and w.user is None  # uid 0 without /etc/passwd, as docker does


def test_no_command_is_a_usage_error():
    with pytest.raises(UsageError, match="no command"):
        resolve(entrypoint=(), cmd=(), env=(), working_dir="", user="")


def test_relative_workdir_rejected():
    with pytest.raises(UsageError, match="absolute"):
        resolve(**IMAGE, workdir_override="rel")


def test_bad_env_rejected():
    with pytest.raises(UsageError):
        resolve(**IMAGE, env_overrides=["=x"])


@pytest.mark.parametrize("text,mib", [("512M", 512), ("1g", 1024), ("2GB", 2048),
                                       (str(256 * 1024 * 1024), 256), (128, 128)])
def test_parse_memory(text, mib):
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["lots", "1M", "-5G", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(UsageError):
        parse_memory(text)


def test_parse_cpus():
    assert parse_cpus("1") == 1 and parse_cpus("1.5") == 2 and parse_cpus(0.5) == 1
    with pytest.raises(UsageError):
        parse_cpus("many")
    with pytest.raises(UsageError):
        parse_cpus(100)


@pytest.mark.parametrize("value, want", [
    (None, None), (False, None), (True, True), ("random", True),
    ("0123456789ABCDEF0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ("01234567-89ab-cdef-0123-456789abcdef", "0123456789abcdef0123456789abcdef"),
])
def test_parse_machine_id(value, want):
    assert parse_machine_id(value) == want


@pytest.mark.parametrize("value", ["", "xyz", "0" * 31, "0" * 33, "g" * 32, "rand"])
def test_parse_machine_id_rejects(value):
    with pytest.raises(UsageError, match="machine id"):
        parse_machine_id(value)


def test_parse_hostname():
    assert parse_hostname(None) is None
    assert parse_hostname("web-1") == "web-1"
    for bad in ("", "h" * 65, "a\0b", "é" * 33):  # the limit is 64 bytes, not characters
        with pytest.raises(UsageError, match="hostname"):
            parse_hostname(bad)


def test_random_machine_ids_are_v4_shaped_and_distinct():
    ids = {random_machine_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        assert parse_machine_id(i) == i and i[12] == "4" and i[16] in "89ab"


def test_rlimits_as_docker_names_them():
    from supermachine.spec import RLIM_INFINITY, parse_ulimit

    assert parse_ulimit("nofile=1024") == ("nofile", 1024, 1024)
    assert parse_ulimit("nproc=10:20") == ("nproc", 10, 20)
    assert parse_ulimit("core=-1") == ("core", RLIM_INFINITY, RLIM_INFINITY)
    for bad in ("nofile", "nofiles=1", "nofile=x", "nofile=-2", "=1"):
        with pytest.raises(UsageError, match="--ulimit"):
            parse_ulimit(bad)
    w = WorkloadSpec(rlimits=(("nofile", 10, 20), ("core", 0, 0)))
    assert w.rlimit_numbers == ((7, 10, 20), (4, 0, 0))
    assert WorkloadSpec.from_json(w.to_json()) == w
    for bad in ([("nofile", 20, 10)], [("nofile", 1, 1), ("nofile", 1, 1)], [("x", 1, 1)],
                [("nofile", 1)], "nofile", [("nofile", True, 1)]):
        with pytest.raises(UsageError):
            WorkloadSpec(rlimits=bad)
