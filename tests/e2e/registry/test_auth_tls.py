"""Registries that demand credentials (htpasswd Basic, token) or speak TLS with our own CA."""

from __future__ import annotations

import json

import pytest

from supermachine.errors import AuthError, RegistryError
from supermachine.images import auth, registry
from supermachine.images.pull import pull

from .harness import Registry, TokenServer, htpasswd_file, make_ca_and_cert


@pytest.fixture
def pushed(tmp_path, small_image):
    """A registry pre-loaded anonymously; tests restart it with auth or TLS on the same storage."""
    reg = Registry(tmp_path / "reg")
    reg.start()
    reg.push(small_image.layout, "private/img")
    reg.stop()
    yield reg
    reg.stop()


def test_htpasswd_basic_auth(pushed, small_image, home, docker_config, tmp_path):
    pw = htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    pushed.start(auth=f"  htpasswd:\n    realm: test\n    path: {pw}\n")
    ref = f"{pushed.host}/private/img:latest"
    with pytest.raises(AuthError, match=f"requires login; run `supermachine login {pushed.host}`"):
        pull(ref, home)
    with pytest.raises(AuthError, match="rejected|unauthorized|UNAUTHORIZED"):
        registry.login(pushed.host, "alice", "wrong")
    assert not docker_config.exists()  # a failed login saves nothing

    # A wrong password already in the config (e.g. stale) is rejected at pull time.
    auth.save_login(pushed.host, "alice", "wrong")
    with pytest.raises(AuthError, match="credentials were rejected"):
        pull(ref, home)

    registry.login(pushed.host, "alice", "s3cret")
    saved = json.loads(docker_config.read_text())["auths"][pushed.host]["auth"]
    assert saved == "YWxpY2U6czNjcmV0"  # base64("alice:s3cret"), docker's format
    assert oct(docker_config.stat().st_mode & 0o777) == "0o600"
    image = pull(ref, home)
    assert image.config_digest == small_image.config_digests["amd64"]

    assert auth.logout(pushed.host) is True
    assert auth.logout(pushed.host) is False
    assert pushed.host not in json.loads(docker_config.read_text())["auths"]


def test_token_auth_challenge_flow(pushed, small_image, home, docker_config, tmp_path):
    tokens = TokenServer(tmp_path / "token", "bob", "hunter2", "test-service", "test-issuer")
    try:
        pushed.start(
            auth=(
                f"  token:\n    realm: {tokens.realm}\n    service: test-service\n"
                f"    issuer: test-issuer\n    rootcertbundle: {tokens.cert}\n"
            )
        )
        ref = f"{pushed.host}/private/img:latest"
        with pytest.raises(AuthError, match="anonymous access denied"):
            pull(ref, home)
        registry.login(pushed.host, "bob", "hunter2")
        image = pull(ref, home)
        assert image.config_digest == small_image.config_digests["amd64"]
        scopes = [r.get("scope") for r in tokens.requests]
        assert "repository:private/img:pull" in scopes
        assert all(r.get("service") == "test-service" for r in tokens.requests)
    finally:
        tokens.close()


def test_tls_with_a_custom_ca(pushed, small_image, home, docker_config, tmp_path, monkeypatch):
    ca, cert, key = make_ca_and_cert(tmp_path / "pki")
    pushed.start(tls=(cert, key))
    ref = f"{pushed.host}/private/img:latest"
    # Loopback does not mean "skip verification": an unknown CA is refused, clearly.
    with pytest.raises(RegistryError, match="certificate .* not trusted.*--ca-file"):
        pull(ref, home)
    image = pull(ref, home, ca_file=str(ca))
    assert image.config_digest == small_image.config_digests["amd64"]
    # The usual environment variable works as well.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    pull(ref, home, platform="linux/arm64")
    monkeypatch.delenv("SSL_CERT_FILE")
    # --insecure-registry skips verification, as docker's option does.
    pull(ref, home, insecure_registries=(pushed.host,))
