"""The CLI's argument helpers for detached VMs (no VM needed): VM:PATH splitting, -e
expansion, local image paths made absolute for the supervisor, and usage errors."""

from __future__ import annotations

import os

import pytest

from supermachine.cli import app, run, vms
from supermachine.errors import UsageError
from supermachine.spec import env_items


@pytest.mark.parametrize(("arg", "expected"), [
    ("web:/etc/hosts", ("web", "/etc/hosts")),
    ("web-1.x:rel/path", ("web-1.x", "rel/path")),
    ("./web:/etc", (None, "./web:/etc")),
    ("/tmp/a:b", (None, "/tmp/a:b")),
    ("plain", (None, "plain")),
    ("-:x", (None, "-:x")),
])
def test_split_vm_path(arg, expected):
    assert vms.split_vm_path(arg) == expected


def test_expand_env(monkeypatch):
    monkeypatch.setenv("FROM_HERE", "v=1")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    assert env_items(["A=1", "FROM_HERE", "UNSET_HERE", "B="], os.environ) == \
        ("A=1", "FROM_HERE=v=1", "B=")
    with pytest.raises(UsageError):
        env_items(["=x"], os.environ)


def test_image_arg_makes_local_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "layout").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run._image_arg("./layout") == str(tmp_path / "layout")
    assert run._image_arg("oci:layout:v1") == f"oci:{tmp_path / 'layout'}:v1"
    assert run._image_arg("alpine:3.19") == "alpine:3.19"  # a registry reference stays


@pytest.mark.parametrize("argv", [
    ["exec", "vm"],  # no command
    ["cp", "a", "b"],  # neither side is in a VM
    ["cp", "a:/x", "b:/y"],  # both are
    ["run", "--name", "n", "img"],  # --name without -d
    ["run", "-d", "--name", "bad name", "img"],
])
def test_usage_errors_exit_2_with_one_line(argv, capsys, tmp_path):
    assert app.main(["--home", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supermachine: ") and err.count("\n") == 1


def test_ps_and_inspect_on_an_empty_home(capsys, tmp_path):
    assert app.main(["--home", str(tmp_path), "ps", "-a"]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS",
                                               "PORTS", "MOUNTS"]
    assert app.main(["--home", str(tmp_path), "inspect", "nope"]) != 0
    assert "no such VM" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # reading commands create nothing


def test_ps_and_inspect_show_a_record(capsys, tmp_path):
    import json

    from supermachine.detached import state
    from supermachine.home import Home

    d = state.create(Home(tmp_path).vms, "rec")
    d.write(state.VMRecord(name="rec", id="ab" * 32, image="busybox", command=["sh", "-c", "x"],
                           created=1.0e9, status=state.EXITED, exit_code=3,
                           ports=["127.0.0.1:8080->80/tcp"]))
    assert app.main(["--home", str(tmp_path), "ps", "-a"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.startswith("rec ") and '"sh -c x"' in row and "Exited (3)" in row
    assert app.main(["--home", str(tmp_path), "inspect", "rec"]) == 0
    [info] = json.loads(capsys.readouterr().out)
    assert (info["name"], info["command"], info["exit_code"]) == ("rec", ["sh", "-c", "x"], 3)
    assert info["created"].startswith("2001-09-09T") and info["state"]["status"] == "exited"
    assert info["ports"] == ["127.0.0.1:8080->80/tcp"]
