"""Registry credentials in docker's own file format, so `docker login` and ours share them.

``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``) holds::

    {"auths": {"ghcr.io": {"auth": base64("user:password")}},
     "credHelpers": {"gcr.io": "gcloud"},      # per-registry helper
     "credsStore": "pass"}                      # helper for everything else

A helper is the program ``docker-credential-<name>``: ``get`` reads the server URL on stdin
and prints ``{"Username": ..., "Secret": ...}``; ``store`` reads that JSON plus
``ServerURL``; ``erase`` reads the server URL.
"""

from __future__ import annotations

import binascii
import json
import os

from ..errors import AuthError
from ..home import atomic_write_bytes, file_lock
from ..record import Record
from .reference import DEFAULT_REGISTRY, DOCKER_HUB_API_HOST

CONFIG_MAX = 1 << 20  # a config.json bigger than this is not one we wrote or should trust
HELPER_OUTPUT_MAX = 64 << 10
HELPER_TIMEOUT_S = 30
# Docker Hub's credentials are keyed by this historical URL in every docker config.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"


class Credentials(Record):
    __slots__ = ("username", "password")

    username: str
    password: str

    def __repr__(self) -> str:  # never print a secret into a log or traceback
        return f"Credentials(username={self.username!r}, password=***)"


def config_path() -> str:
    """docker's config file: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/``'s. (A
    string: pathlib is not imported on a pull's path, see home.py.)"""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _server_key(registry: str) -> str:
    """The key docker writes for ``registry`` under ``auths`` and passes to helpers."""
    if registry in (DEFAULT_REGISTRY, DOCKER_HUB_API_HOST, "index.docker.io"):
        return DOCKER_HUB_AUTH_KEY
    return registry


def _normalise_key(key: str) -> str:
    """``https://host/v1/`` and friends -> ``host`` (how docker matches old-style keys)."""
    k = key.removeprefix("https://").removeprefix("http://")
    host = k.split("/", 1)[0].lower()
    return DEFAULT_REGISTRY if host in ("index.docker.io", DOCKER_HUB_API_HOST) else host


def load_config(path: str | os.PathLike | None = None) -> dict:
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise AuthError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    if len(data) > CONFIG_MAX:
        raise AuthError(f"{path} is larger than {CONFIG_MAX} bytes; fix or remove it")
    if not data.strip():
        return {}
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise AuthError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(config, dict):
        raise AuthError(f"{path} is not a JSON object; fix or remove it")
    return config


def _decode_auth(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    auth = entry.get("auth")
    if not isinstance(auth, str) or not auth:
        return None
    import base64  # here: a pull from a registry that asks no login never decodes one

    try:
        user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise AuthError(
            f"bad `auth` value for {where} in docker config; run `supermachine login`"
        ) from e
    if not sep:
        raise AuthError(f"bad `auth` value for {where} in docker config; run `supermachine login`")
    return Credentials(user, password)


def _run_helper(helper: str, action: str, stdin: bytes) -> bytes:
    if not helper or not all(c.isalnum() or c in "-_." for c in helper):
        raise AuthError(f"invalid credential helper name {helper!r} in docker config")
    import subprocess  # here: only credential helpers need it (start-up)

    prog = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [prog, action], input=stdin, capture_output=True, timeout=HELPER_TIMEOUT_S
        )
    except FileNotFoundError as e:
        raise AuthError(
            f"credential helper {prog} not found; install it or edit docker config"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise AuthError(f"credential helper {prog} {action} timed out") from e
    if proc.returncode != 0:
        out = (proc.stdout or proc.stderr)[:200].decode(errors="replace").strip()
        if action == "get" and "credentials not found" in out.lower():
            return b""
        first = out.splitlines()[0] if out else f"exit status {proc.returncode}"
        raise AuthError(f"credential helper {prog} {action} failed: {first}")
    return proc.stdout[:HELPER_OUTPUT_MAX]


def _helper_get(helper: str, registry: str) -> Credentials | None:
    out = _run_helper(helper, "get", _server_key(registry).encode())
    if not out:
        return None
    try:
        data = json.loads(out)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError) as e:
        raise AuthError(f"credential helper docker-credential-{helper} printed bad JSON") from e
    if not isinstance(user, str) or not isinstance(secret, str):
        raise AuthError(f"credential helper docker-credential-{helper} printed bad JSON")
    return Credentials(user, secret)


def get_credentials(registry: str, path: str | os.PathLike | None = None) -> Credentials | None:
    """Credentials for ``registry`` (as in Reference.registry), or None for anonymous access.

    Order as docker: a per-registry credHelper, else the credsStore, else ``auths``.
    """
    config = load_config(path)
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if isinstance(helper, str) and _normalise_key(key) == registry:
                return _helper_get(helper, registry)
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        creds = _helper_get(store, registry)
        if creds is not None:
            return creds
    auths = config.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if isinstance(key, str) and _normalise_key(key) == registry:
                creds = _decode_auth(entry, registry)
                if creds is not None:
                    return creds
    return None


def _save(path: str | os.PathLike, config: dict) -> None:
    data = (json.dumps(config, indent="\t") + "\n").encode()
    try:
        # 0600: the file holds (base64, not encrypted) passwords.
        atomic_write_bytes(path, data, mode=0o600)
    except OSError as e:
        raise AuthError(f"cannot write {path}: {e.strerror}") from e


def store_credentials(registry: str, creds: Credentials,
                      path: str | os.PathLike | None = None) -> None:
    """Save credentials where docker would: the registry's helper, the credsStore, or auths."""
    path = path or config_path()
    with file_lock(f"{path}.lock"):
        config = load_config(path)
        helper = _helper_for(config, registry)
        key = _server_key(registry)
        if helper:
            payload = {"ServerURL": key, "Username": creds.username, "Secret": creds.password}
            _run_helper(helper, "store", json.dumps(payload).encode())
            return
        auths = config.get("auths")
        if not isinstance(auths, dict):
            auths = config["auths"] = {}
        for old in [k for k in auths if _normalise_key(k) == registry]:
            del auths[old]
        token = binascii.b2a_base64(f"{creds.username}:{creds.password}".encode(),
                                    newline=False).decode()
        auths[key] = {"auth": token}
        _save(path, config)


def _helper_for(config: dict, registry: str) -> str | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if isinstance(helper, str) and _normalise_key(key) == registry:
                return helper
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def erase_credentials(registry: str, path: str | os.PathLike | None = None) -> bool:
    """Forget credentials for ``registry``; True if any were removed from the file."""
    path = path or config_path()
    with file_lock(f"{path}.lock"):
        config = load_config(path)
        helper = _helper_for(config, registry)
        if helper:
            _run_helper(helper, "erase", _server_key(registry).encode())
        auths = config.get("auths")
        if not isinstance(auths, dict):
            return bool(helper)
        old = [k for k in auths if _normalise_key(k) == registry]
        for k in old:
            del auths[k]
        if old:
            _save(path, config)
        return bool(old) or bool(helper)


def normalise_registry(registry: str) -> str:
    """What a user types after `login` (``docker.io``, ``https://ghcr.io``) -> registry name."""
    if not registry:
        return DEFAULT_REGISTRY
    return _normalise_key(registry)


def save_login(registry: str, username: str, password: str,
               config_path: str | os.PathLike | None = None) -> None:
    """Save credentials for ``registry`` (checked against it first by `registry.login`)."""
    check_login_input(username, password)
    store_credentials(normalise_registry(registry), Credentials(username, password), config_path)


def check_login_input(username: str, password: str) -> None:
    if not username or ":" in username:
        raise AuthError("username must be non-empty and must not contain ':'")
    if not password:
        raise AuthError("password must not be empty")


def logout(registry: str, config_path: str | os.PathLike | None = None) -> bool:
    """Remove saved credentials; False when there were none."""
    return erase_credentials(normalise_registry(registry), config_path)
