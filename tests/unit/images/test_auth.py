"""Docker config credentials: lookup order, helpers (real executables on PATH), writing."""

from __future__ import annotations

import json
import os
import stat

import pytest

from supermachine.errors import AuthError
from supermachine.images import auth


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    d = tmp_path / "dc"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d / "config.json"


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """docker-credential-fake: answers `get` for ghcr.io, logs every call with its stdin."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-fake"
    script.write_text(
        "#!/bin/sh\n"
        f'input=$(cat); echo "$1 $input" >> {log}\n'
        'case "$1:$input" in\n'
        '  get:ghcr.io) echo \'{"ServerURL":"ghcr.io","Username":"hu","Secret":"hs"}\' ;;\n'
        '  get:*) echo "credentials not found in native keychain"; exit 1 ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_config_path_follows_docker_config(cfg):
    assert auth.config_path() == str(cfg)


def test_auths_lookup_and_docker_hub_key(cfg):
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": "aHViOnB3"},  # hub:pw
                    "https://reg.example:5000": {"auth": "dTpwOmFzcw=="},  # u:p:ass
                    "other.example": {"username": "x", "password": "y"},
                }
            }
        )
    )
    hub = auth.get_credentials("docker.io")
    assert (hub.username, hub.password) == ("hub", "pw")
    assert "pw" not in repr(hub)
    reg = auth.get_credentials("reg.example:5000")
    assert (reg.username, reg.password) == ("u", "p:ass")
    assert auth.get_credentials("other.example").password == "y"
    assert auth.get_credentials("nowhere.example") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"auths": {"r.io": {"auth": "!!!"}}}', "bad `auth` value for r.io"),
        ('{"auths": {"r.io": {"auth": "bm9jb2xvbg=="}}}', "bad `auth` value"),  # "nocolon"
        (" " * (auth.CONFIG_MAX + 1), "larger than"),
    ],
)
def test_bad_config_is_a_clear_error(cfg, content, message):
    cfg.write_text(content)
    with pytest.raises(AuthError, match=message):
        auth.get_credentials("r.io")


def test_cred_helpers_and_store(cfg, helper):
    cfg.write_text(json.dumps({"credHelpers": {"ghcr.io": "fake"}}))
    creds = auth.get_credentials("ghcr.io")
    assert (creds.username, creds.password) == ("hu", "hs")
    assert helper.read_text() == "get ghcr.io\n"
    # credsStore: asked for everything; "not found" falls back to auths.
    cfg.write_text(json.dumps({"credsStore": "fake", "auths": {"r.io": {"auth": "YTpi"}}}))
    assert auth.get_credentials("r.io").username == "a"
    assert auth.get_credentials("ghcr.io").username == "hu"
    cfg.write_text(json.dumps({"credHelpers": {"x.io": "missing-helper"}}))
    with pytest.raises(AuthError, match="docker-credential-missing-helper not found"):
        auth.get_credentials("x.io")
    cfg.write_text(json.dumps({"credHelpers": {"x.io": "../evil"}}))
    with pytest.raises(AuthError, match="invalid credential helper name"):
        auth.get_credentials("x.io")


def test_login_with_helper_stores_through_it(cfg, helper):
    cfg.write_text(json.dumps({"credsStore": "fake"}))
    auth.save_login("docker.io", "me", "pw")
    line = helper.read_text().splitlines()[-1]
    assert line.startswith("store ")
    assert json.loads(line[6:]) == {
        "ServerURL": "https://index.docker.io/v1/",
        "Username": "me",
        "Secret": "pw",
    }
    assert auth.logout("docker.io") is True
    assert helper.read_text().splitlines()[-1] == "erase https://index.docker.io/v1/"


def test_login_logout_keep_other_settings(cfg):
    cfg.write_text(json.dumps({"auths": {"https://r.io/v1/": {"auth": "b2xkOm9sZA=="}},
                               "psFormat": "table"}))  # fmt: skip
    auth.save_login("https://r.io", "new", "pw")
    data = json.loads(cfg.read_text())
    assert data["psFormat"] == "table"
    assert data["auths"] == {"r.io": {"auth": "bmV3OnB3"}}  # the old key for r.io is replaced
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    auth.save_login("", "hub", "pw")
    assert "https://index.docker.io/v1/" in json.loads(cfg.read_text())["auths"]
    assert auth.logout("r.io") is True
    assert auth.logout("r.io") is False
    assert list(json.loads(cfg.read_text())["auths"]) == ["https://index.docker.io/v1/"]


@pytest.mark.parametrize(("user", "pw"), [("", "x"), ("a:b", "x"), ("a", "")])
def test_login_rejects_bad_input(cfg, user, pw):
    with pytest.raises(AuthError):
        auth.save_login("r.io", user, pw)
    assert not cfg.exists()
