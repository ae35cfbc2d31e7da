"""A small OCI Distribution (registry v2) client on the standard library.

HTTP/1.1 is ours (http11.py, connection.py: http.client imports the email package, a fifth
of a small pull) and gives us the control we need: bounded reads, Range requests, manual
redirects. ssl is imported on the first HTTPS attempt. One client serves one registry and
may be shared by threads; each thread borrows a keep-alive connection from a small pool.

Auth: a request that gets 401 is retried once with credentials chosen by the challenge in
``WWW-Authenticate``: Bearer (fetch a token from the realm, Basic-authenticated when we have
credentials) or Basic. Tokens are cached per scope.

Transport: HTTPS, verified against the system CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR`` work
as for OpenSSL) plus an optional CA file. Plain HTTP only for loopback registries and hosts
named as insecure: on loopback it is asked first, elsewhere only after HTTPS failed for a
reason other than an untrusted certificate.
"""

from __future__ import annotations

import _socket
import _thread
import binascii
import json
import sys
import time
from collections.abc import Iterator

from ..errors import AuthError, DigestMismatch, ImageError, RegistryError
from ..record import Record
from .auth import (
    Credentials,
    check_login_input,
    get_credentials,
    normalise_registry,
    store_credentials,
)
from .connection import Connection
from .http11 import InvalidRequest, ProtocolError
from .manifest import ACCEPT
from .verify import check_digest, sha256_digest

MANIFEST_MAX = 4 << 20  # OCI recommends registries accept at least 4 MiB manifests
TOKEN_MAX = 256 << 10
ERROR_BODY_MAX = 16 << 10
MAX_REDIRECTS = 5
TIMEOUT_S = 30.0
CHUNK = 1 << 20
POOL_MAX = 8  # idle keep-alive connections kept per origin

MANIFEST_ACCEPT = ", ".join(ACCEPT)

_LOOKUP = object()  # sentinel: look credentials up in the docker config when challenged


class TransientError(RegistryError):
    """A failure worth retrying: the network broke, or the registry had a 5xx/429 moment."""


def is_loopback(host: str) -> bool:
    """``host`` (no port) is localhost or a loopback address (127.0.0.0/8, ::1). The
    address is parsed by inet_pton, not ipaddress (2 ms of a small pull's start)."""
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return _socket.inet_pton(_socket.AF_INET, h)[0] == 127
    except OSError:
        pass
    try:
        return _socket.inet_pton(_socket.AF_INET6, h) == _IPV6_LOOPBACK
    except OSError:
        return False


_IPV6_LOOPBACK = bytes(15) + b"\x01"


def _basic(username: str, password: str) -> str:
    """An ``Authorization: Basic`` value (binascii, not base64: ~1 ms of start-up)."""
    return "Basic " + binascii.b2a_base64(f"{username}:{password}".encode(),
                                          newline=False).decode()


def split_host_port(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    host, sep, port = hostport.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return hostport, None


class _Origin(Record):
    __slots__ = ("scheme", "host", "port")

    scheme: str
    host: str
    port: int

    @classmethod
    def of_url(cls, url: str) -> _Origin:
        import urllib.parse  # only for redirects and token realms: ~4.5 ms with ipaddress

        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RegistryError(f"registry sent an unusable URL {url[:100]!r}")
        try:
            port = u.port
        except ValueError as e:
            raise RegistryError(f"registry sent an unusable URL {url[:100]!r}") from e
        return cls(u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80))

    @property
    def display(self) -> str:
        """host, or host:port when the port is not the scheme's default (for messages)."""
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else self.netloc

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _is_untrusted_certificate(e: BaseException) -> bool:
    """An ssl.SSLCertVerificationError, without importing ssl where no TLS was tried."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(e, ssl.SSLCertVerificationError)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            val = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                val.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(val)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


def _error_detail(body: bytes) -> str:
    """First code/message of an OCI error body, for the one-line error we raise."""
    try:
        errors = json.loads(body)["errors"]
        first = errors[0]
        parts = [str(first.get("code", "")), str(first.get("message", ""))]
        return ": ".join(p for p in parts if p)[:200]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


class Response:
    """A response whose body is still on the wire; ``close()`` returns the connection."""

    def __init__(self, client: RegistryClient, origin: _Origin, conn, resp) -> None:
        self._client = client
        self._origin = origin
        self._conn = conn
        self._resp = resp
        self.status: int = resp.status

    def header(self, name: str) -> str | None:
        return self._resp.getheader(name)

    @property
    def length(self) -> int | None:
        v = self.header("Content-Length")
        return int(v) if v and v.isdigit() else None

    def read_capped(self, cap: int, what: str) -> bytes:
        if self.length is not None and self.length > cap:
            self.close(reuse=False)
            raise ImageError(f"{what} is {self.length} bytes, over the {cap} byte limit")
        try:
            data = self._resp.read(cap + 1)
        except (OSError, ProtocolError) as e:
            self.close(reuse=False)
            raise TransientError(f"connection to {self._origin.display} broke: {e}") from e
        if len(data) > cap:
            self.close(reuse=False)
            raise ImageError(f"{what} is over the {cap} byte limit")
        self.close()
        return data

    def iter_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        while True:
            try:
                chunk = self._resp.read(size)
            except (OSError, ProtocolError) as e:
                self.close(reuse=False)
                raise TransientError(f"connection to {self._origin.display} broke: {e}") from e
            if not chunk:
                self.close()
                return
            yield chunk

    def close(self, reuse: bool = True) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if reuse and self._resp.isclosed() and not self._resp.will_close:
            self._client._release(self._origin, conn)
        else:
            self._resp.close()
            conn.close()


class RegistryClient:
    """Talks to one registry. Thread-safe; ``close()`` drops pooled connections."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None | object = _LOOKUP,
        insecure_registries: tuple[str, ...] | list[str] = (),
        ca_file: str | None = None,
        timeout: float = TIMEOUT_S,
    ) -> None:
        from .reference import DEFAULT_REGISTRY, DOCKER_HUB_API_HOST

        self.registry = registry
        self.api_host = DOCKER_HUB_API_HOST if registry == DEFAULT_REGISTRY else registry
        self._host, port = split_host_port(self.api_host)
        self._port = port
        self._insecure = {h.lower() for h in insecure_registries}
        self._timeout = timeout
        self._credentials = credentials
        self._ca_file = ca_file
        if ca_file is not None:  # a wrong path fails now, not at the first TLS connection
            try:
                with open(ca_file, "rb"):
                    pass
            except OSError as e:
                raise RegistryError(f"cannot load CA file {ca_file}: {e}; check the path") \
                    from e
        # Built on the first TLS connection: loading the system CA store costs ~30 ms, which
        # a plain-HTTP (loopback) registry never needs.
        self._ssl = None  # the verifying ssl.SSLContext
        self._lock = _thread.allocate_lock()  # threading's Lock, without its import
        self._pool: dict[_Origin, list[Connection]] = {}
        self._origin: _Origin | None = None  # decided by the first request
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._challenge: tuple[str, dict[str, str]] | None = None

    # -- transport ---------------------------------------------------------------------

    def _allows_http(self, host: str, port: int | None) -> bool:
        hostport = f"{host}:{port}" if port else host
        return is_loopback(host) or host.lower() in self._insecure or hostport in self._insecure

    def _connect(self, origin: _Origin) -> Connection:
        if origin.scheme == "https":
            import ssl

            if origin.host.lower() in self._insecure or origin.netloc in self._insecure:
                # --insecure-registry means what it means for docker: HTTP, or HTTPS with
                # an unverified certificate. Loopback alone does not skip verification.
                # (No verifying context is built for these: loading the CA store is ~30 ms.)
                ctx = ssl._create_unverified_context()
            else:
                ctx = self._verifying_context()
            return Connection(origin.host, origin.port, timeout=self._timeout, ssl_context=ctx)
        return Connection(origin.host, origin.port, timeout=self._timeout)

    def _verifying_context(self):
        import ssl

        with self._lock:
            if self._ssl is None:
                try:
                    self._ssl = ssl.create_default_context(cafile=self._ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise RegistryError(f"cannot load CA file {self._ca_file}: {e}; check "
                                        "the path") from e
            return self._ssl

    def _acquire(self, origin: _Origin) -> Connection:
        with self._lock:
            idle = self._pool.get(origin)
            if idle:
                return idle.pop()
        return self._connect(origin)

    def _release(self, origin: _Origin, conn: Connection) -> None:
        with self._lock:
            idle = self._pool.setdefault(origin, [])
            if len(idle) < POOL_MAX:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._pool = self._pool, {}
        for conns in pools.values():
            for c in conns:
                c.close()

    def _send(self, origin: _Origin, method: str, target: str, headers: dict[str, str]) -> Response:
        """One request; a stale pooled connection is retried once on a fresh one."""
        for attempt in range(2):
            conn = self._acquire(origin)
            try:
                conn.request(method, target, headers)
                resp = conn.getresponse()
            except (ConnectionResetError, BrokenPipeError):  # ConnectionClosed included
                conn.close()
                if attempt:
                    raise
                continue
            except InvalidRequest as e:
                conn.close()
                raise RegistryError(f"cannot send a request to {origin.display}: {e}") from e
            except BaseException:
                conn.close()
                raise
            return Response(self, origin, conn, resp)
        raise AssertionError("unreachable")

    def _network_error(self, host: str, e: BaseException) -> RegistryError:
        if isinstance(e, _socket.gaierror):
            return RegistryError(f"cannot resolve registry host {host}; check the name and network")
        if _is_untrusted_certificate(e):
            return RegistryError(
                f"TLS certificate of {host} is not trusted ({e.verify_message}); "
                "pass --ca-file or set SSL_CERT_FILE"
            )
        if isinstance(e, ConnectionRefusedError):
            return TransientError(f"cannot connect to registry {host}: connection refused")
        if isinstance(e, TimeoutError):
            return TransientError(f"registry {host} timed out; check the network and retry")
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return TransientError(f"connection to registry {host} failed: {reason}")

    def _base(self) -> _Origin:
        """The registry's origin: HTTPS, or HTTP where allowed and HTTPS does not work. On
        loopback HTTP is asked first (containerd's default resolver speaks plain HTTP to
        localhost): HTTP is allowed there anyway, and the HTTPS attempt (importing ssl, a
        context, a handshake) was a tenth of a small pull from a local registry."""
        if self._origin is not None:
            return self._origin
        http = _Origin("http", self._host, self._port or 80)
        if is_loopback(self._host) and self._answers_as_registry(http):
            self._origin = http
            return http
        https = _Origin("https", self._host, self._port or 443)
        try:
            self._send(https, "GET", "/v2/", {}).read_capped(ERROR_BODY_MAX, "registry ping")
            origin = https
        except (OSError, ProtocolError, ImageError) as e:
            plain_ok = self._allows_http(self._host, self._port)
            if (
                not plain_ok
                or _is_untrusted_certificate(e)
                or isinstance(e, _socket.gaierror | ImageError)
            ):
                if isinstance(e, ImageError):
                    raise
                raise self._network_error(self.api_host, e) from e
            origin = http
        self._origin = origin
        return origin

    def _answers_as_registry(self, origin: _Origin) -> bool:
        """Whether ``GET /v2/`` at ``origin`` answers as a registry does: 200, or 401 asking
        for a login. (A TLS server asked in plain HTTP answers 400, or not in HTTP.)"""
        try:
            resp = self._send(origin, "GET", "/v2/", {})
            resp.read_capped(ERROR_BODY_MAX, "registry ping")
        except (OSError, ProtocolError, ImageError):
            return False
        return resp.status in (200, 401)

    # -- auth --------------------------------------------------------------------------

    def _creds(self) -> Credentials | None:
        if self._credentials is _LOOKUP:
            self._credentials = get_credentials(self.registry)
        return self._credentials  # type: ignore[return-value]

    def _authenticate(self, challenge_header: str | None, scope: str) -> str:
        """Authorization header value answering a 401 challenge for ``scope``."""
        if not challenge_header:
            raise AuthError(f"registry {self.registry} refused access without saying how to log in")
        scheme, params = parse_challenge(challenge_header[:8192])
        creds = self._creds()
        if scheme == "basic":
            if creds is None:
                raise AuthError(
                    f"registry {self.registry} requires login; "
                    f"run `supermachine login {self.registry}`"
                )
            return _basic(creds.username, creds.password)
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"registry {self.registry} asks for unsupported auth {scheme!r}")
        return "Bearer " + self._fetch_token(params, scope, creds)

    def _fetch_token(self, params: dict[str, str], scope: str, creds: Credentials | None) -> str:
        realm = params["realm"]
        origin = _Origin.of_url(realm)
        if origin.scheme == "http" and not self._allows_http(origin.host, origin.port):
            raise AuthError(
                f"token server {origin.host} is plain HTTP; refusing to send credentials"
            )
        import urllib.parse  # see _Origin.of_url

        query = {"service": params["service"]} if "service" in params else {}
        if scope:
            query["scope"] = scope
        u = urllib.parse.urlsplit(realm)
        path = u.path or "/"
        q = "&".join(p for p in (u.query, urllib.parse.urlencode(query)) if p)
        target = f"{path}?{q}" if q else path
        headers = {"Accept": "application/json"}
        if creds is not None:
            headers["Authorization"] = _basic(creds.username, creds.password)
        try:
            resp = self._send(origin, "GET", target, headers)
            body = resp.read_capped(TOKEN_MAX, "token response")
        except (OSError, ProtocolError) as e:
            raise self._network_error(origin.display, e) from e
        if resp.status in (401, 403):
            who = "credentials were rejected" if creds else "anonymous access denied"
            raise AuthError(f"{self.registry}: {who}; run `supermachine login {self.registry}`")
        if resp.status != 200:
            raise RegistryError(f"token server {origin.host} answered HTTP {resp.status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError) as e:
            raise RegistryError(f"token server {origin.host} sent invalid JSON") from e
        if not isinstance(token, str) or not token or not token.isascii() or "\n" in token:
            raise RegistryError(f"token server {origin.host} sent no usable token")
        return token

    # -- requests ----------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, scope: str, headers: dict[str, str] | None = None
    ) -> Response:
        """Send ``method path`` with auth and redirects handled; returns a non-3xx response."""
        base = self._base()
        hdrs = dict(headers or {})
        hdrs.setdefault("User-Agent", "supermachine")
        auth = self._auth.get(scope)
        retried_auth = False
        origin, target = base, path
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(hdrs)
            # Credentials go only to the registry itself, never to where it redirects us.
            if auth and origin == base:
                send["Authorization"] = auth
            try:
                resp = self._send(origin, method, target, send)
            except (OSError, ProtocolError) as e:
                raise self._network_error(origin.display, e) from e
            if resp.status == 401 and origin == base and not retried_auth:
                challenge = resp.header("WWW-Authenticate")
                resp.read_capped(ERROR_BODY_MAX, "error body")
                auth = self._authenticate(challenge, scope)
                with self._lock:
                    self._auth[scope] = auth
                retried_auth = True
                continue
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.header("Location")
                resp.read_capped(ERROR_BODY_MAX, "redirect body")
                if not location:
                    raise RegistryError(f"registry {self.registry} redirected without a Location")
                import urllib.parse  # see _Origin.of_url

                url = urllib.parse.urljoin(f"{origin.scheme}://{origin.netloc}{target}", location)
                new = _Origin.of_url(url)
                if new.scheme == "http" and not self._allows_http(new.host, new.port):
                    raise RegistryError(
                        f"registry {self.registry} redirected to plain HTTP {new.host}"
                    )
                u = urllib.parse.urlsplit(url)
                origin, target = new, (u.path or "/") + (f"?{u.query}" if u.query else "")
                if method == "HEAD" or resp.status != 303:
                    continue
                method = "GET"
                continue
            return resp
        raise RegistryError(f"registry {self.registry} redirected more than {MAX_REDIRECTS} times")

    def _raise_for(self, resp: Response, what: str) -> None:
        body = resp.read_capped(ERROR_BODY_MAX, "error body")
        detail = _error_detail(body)
        suffix = f" ({detail})" if detail else ""
        s = resp.status
        if s == 401:
            creds = self._creds()
            hint = "credentials were rejected" if creds else "login required"
            raise AuthError(f"{what}: {hint}{suffix}; run `supermachine login {self.registry}`")
        if s == 403:
            raise AuthError(f"{what}: access denied{suffix}; check your permissions and login")
        if s == 404:
            raise RegistryError(f"{what} not found{suffix}; check the name and tag")
        if s == 429:
            raise TransientError(f"{what}: registry rate limit reached (HTTP 429); retry later")
        if s >= 500:
            raise TransientError(f"{what}: registry server error HTTP {s}{suffix}; retry later")
        raise RegistryError(f"{what}: registry answered HTTP {s}{suffix}")

    @staticmethod
    def scope(repository: str) -> str:
        return f"repository:{repository}:pull"

    def check_login(self) -> None:
        """Prove the credentials work (``GET /v2/`` authenticated), else raise AuthError."""
        resp = self.request("GET", "/v2/", scope="")
        if resp.status != 200:
            self._raise_for(resp, f"login to {self.registry}")
        resp.read_capped(ERROR_BODY_MAX, "ping body")

    def get_manifest(self, repository: str, target: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest -> (bytes, media type, digest).

        A digest reference is verified against the bytes; a tag's digest is computed.
        """
        what = f"manifest {self.registry}/{repository}:{target}"
        if "@" not in target and target.startswith("sha256:"):
            check_digest(target)
            what = f"manifest {self.registry}/{repository}@{target}"
        resp = self.request(
            "GET",
            f"/v2/{repository}/manifests/{target}",
            scope=self.scope(repository),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status != 200:
            self._raise_for(resp, what)
        media_type = (resp.header("Content-Type") or "").split(";")[0].strip()
        header_digest = resp.header("Docker-Content-Digest")
        data = resp.read_capped(MANIFEST_MAX, what)
        digest = sha256_digest(data)
        if target.startswith("sha256:") and digest != target:
            raise DigestMismatch(f"{what} hashes to {digest}; the registry sent wrong content")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise DigestMismatch(
                f"{what} hashes to {digest} but the registry says {header_digest[:80]}"
            )
        return data, media_type, digest

    def get_blob(self, repository: str, digest: str, size: int, cap: int) -> bytes:
        """A small blob (config) read into memory, size- and digest-checked."""
        from .verify import verify_bytes

        if size > cap:
            raise ImageError(f"blob {digest} is {size} bytes, over the {cap} byte limit")
        resp = self.open_blob(repository, digest, 0)
        data = resp.read_capped(cap, f"blob {digest}")
        return verify_bytes(data, digest, size, f"blob {digest}")

    def open_blob(self, repository: str, digest: str, offset: int) -> Response:
        """Start a blob download at ``offset``; status 206 means the Range was honoured.

        The caller streams ``iter_chunks()`` and verifies; 200 means start from zero.
        """
        check_digest(digest)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request(
            "GET", f"/v2/{repository}/blobs/{digest}", scope=self.scope(repository), headers=headers
        )
        if resp.status == 200 or (offset and resp.status == 206):
            return resp
        if resp.status == 416 and offset:
            # Our partial is as long as (or longer than) the blob: start over.
            resp.read_capped(ERROR_BODY_MAX, "error body")
            return self.open_blob(repository, digest, 0)
        self._raise_for(resp, f"blob {digest}")
        raise AssertionError("unreachable")


def backoff(attempt: int) -> None:
    time.sleep(min(0.25 * (2**attempt), 2.0))


def login(registry: str, username: str, password: str, config_path=None, *,
          insecure_registries: tuple[str, ...] = (), ca_file: str | None = None) -> None:
    """Check the credentials against the registry, then save them (`docker login`)."""
    check_login_input(username, password)
    name = normalise_registry(registry)
    creds = Credentials(username, password)
    client = RegistryClient(name, credentials=creds, insecure_registries=insecure_registries,
                            ca_file=ca_file)
    try:
        client.check_login()
    finally:
        client.close()
    store_credentials(name, creds, config_path)
