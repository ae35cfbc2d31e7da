"""The Python client of the service's HTTP API, synchronous: `supermachine.connect()`.

Sandboxes have `VM`'s methods (exec, spawn, read_file, write_file, expose, snapshot,
close). What each call sends and how its answer is read is api.py's, shared with the
asyncio client (aio_client.py); this module is only the I/O: the standard library's
http.client (over the unix socket or TCP) and, for a streaming exec, a WebSocket from the
`websockets` package carrying control-protocol frames, read by the same `RemoteProcess`
that `supermachine exec NAME` uses.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..detached.client import RemoteProcess
from ..detached.protocol import Decoder, ExecRequest, Frame, encode_request
from ..errors import Error, UsageError, VMError
from . import address, api

TIMEOUT = 600.0


class ServiceError(Error):
    """The service refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    """Where the service is: a unix socket path, or an http://HOST:PORT base with a token."""

    unix: str | None = None
    base: str | None = None
    token: str | None = None

    @classmethod
    def resolve(cls, target: str | None = None, token: str | None = None) -> Endpoint:
        """``target``, else $SUPERMACHINE_HOST, else the unix socket in the runtime
        directory: ``unix:///path/api.sock``, a socket path, or ``http://HOST:PORT``."""
        target = target or os.environ.get(address.HOST_ENV)
        token = token or os.environ.get(address.TOKEN_ENV)
        if not target:
            return cls(unix=str(address.runtime_dir() / "api.sock"))
        if target.startswith("unix://"):
            return cls(unix=target[len("unix://"):])
        if target.startswith("/"):
            return cls(unix=target)
        url = urllib.parse.urlsplit(target)
        if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
            raise UsageError(f"cannot use service address {target[:100]!r}: give "
                             "unix:///path/api.sock or http://HOST:PORT")
        return cls(base=f"{url.hostname}:{url.port or 80}", token=token)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def check_answer(status: int, data: bytes) -> Any:
    """An answer's JSON, or the `ServiceError` it carries."""
    try:
        obj = json.loads(data) if data else None
    except ValueError:
        obj = None
    if status >= 400:
        raise ServiceError(status, api.error_message(obj) or f"HTTP {status}")
    return obj


def _exec_body(argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
               user: str | None, stdin: bytes | None, timeout: float | None) -> dict:
    body: dict[str, Any] = {"argv": list(argv)}
    if env:
        body["env"] = dict(env)
    for key, value in (("cwd", cwd), ("user", user), ("timeout", timeout)):
        if value is not None:
            body[key] = value
    if stdin is not None:
        body["stdin"] = base64.b64encode(stdin).decode()
    return body


def exec_result(obj: Any):
    from ..agent.client import ExecResult

    return ExecResult(exit_code=obj["exit_code"], stdout=base64.b64decode(obj["stdout"]),
                      stderr=base64.b64decode(obj["stderr"]), error=obj.get("error"))


def exec_request(argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
                 user: str | None, stdin: bool, tty: bool,
                 winsize: tuple[int, int] | None) -> bytes:
    """The first frame of a streaming exec."""
    return encode_request(ExecRequest(
        argv=tuple(argv), env=tuple(f"{k}={v}" for k, v in (env or {}).items()), cwd=cwd,
        user=user, stdin=stdin, tty=tty, winsize=winsize))


def quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class _WSFrames:
    """A WebSocket as a control connection: send(bytes), recv() -> Frame | None."""

    def __init__(self, ws) -> None:
        self._ws = ws
        self._decoder = Decoder()
        self._frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self._ws.send(data)

    def recv(self) -> Frame | None:
        from websockets.exceptions import ConnectionClosed

        while not self._frames:
            try:
                msg = self._ws.recv()
            except ConnectionClosed:
                return None
            if isinstance(msg, str):
                return None
            self._frames.extend(self._decoder.feed(msg))
        return self._frames.pop(0)

    def close(self) -> None:
        self._ws.close()

    release = close


class Client:
    """A client of the service; thread-safe. Each thread keeps one HTTP connection open
    (keep-alive), so a call costs one request, not a connection too."""

    def __init__(self, target: str | None = None, *, token: str | None = None,
                 timeout: float = TIMEOUT) -> None:
        import threading

        self.endpoint = Endpoint.resolve(target, token)
        self.timeout = timeout
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's connection (others close when their threads' go)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _conn(self) -> http.client.HTTPConnection:
        """A new connection (not kept: for a streamed answer)."""
        if self.endpoint.unix:
            return _UnixHTTPConnection(self.endpoint.unix, self.timeout)
        host, _, port = (self.endpoint.base or "").rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None, *,
                raw: bytes | Any = None, headers: dict[str, str] | None = None) -> Any:
        hdrs = {**self.endpoint.headers(), **(headers or {})}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            kept = conn is not None
            if conn is None:
                conn = self._local.conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                # A kept connection the service closed while idle never saw the request:
                # send it again, once, on a new one.
                if kept and attempt == 1 and isinstance(e, ConnectionError | BrokenPipeError):
                    continue
                raise VMError(f"cannot reach the service ({e}); is `supermachine serve` "
                              "running?") from None
            if resp.will_close:
                self.close()
            return check_answer(resp.status, payload)
        raise AssertionError("unreachable")

    # ---- the API ------------------------------------------------------------------------

    def health(self) -> dict:
        return self.request("GET", "/v1/health")

    def version(self) -> dict:
        return self.request("GET", "/v1/version")

    def create(self, image: str, *, name: str | None = None, ttl: float | None = None,
               **vm_fields: Any) -> Sandbox:
        """A new sandbox of ``image`` with `run`'s options as keywords (memory="1G",
        ports=["8080:80"], volumes=[...], network="none", ...)."""
        body = {"image": image, **vm_fields}
        if name is not None:
            body["name"] = name
        if ttl is not None:
            body["ttl"] = ttl
        return Sandbox(self, self.request("POST", "/v1/sandboxes", body))

    VM = create  # `client.VM(image)` reads like `supermachine.VM(image)`

    def sandboxes(self) -> list[Sandbox]:
        return [Sandbox(self, obj) for obj in self.request("GET", "/v1/sandboxes")]

    def sandbox(self, name: str) -> Sandbox:
        return Sandbox(self, self.request("GET", f"/v1/sandboxes/{quote(name)}"))

    def pools(self) -> list[dict]:
        return self.request("GET", "/v1/pools")

    def pool(self, pool_id: str) -> dict:
        """A pool's spec and stats (ready, in_use, hits, misses, acquire latency)."""
        return self.request("GET", f"/v1/pools/{quote(pool_id)}")

    def create_pool(self, image: str, size: int = 2, *, max_size: int | None = None,
                    idle_timeout: float | None = None, **vm_fields: Any) -> dict:
        body = {"image": image, "size": size, **vm_fields}
        if max_size is not None:
            body["max_size"] = max_size
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        return self.request("POST", "/v1/pools", body)

    def resize_pool(self, pool_id: str, size: int, *, max_size: int | None = None,
                    idle_timeout: float | None = None) -> dict:
        body: dict[str, Any] = {"size": size}
        if max_size is not None:
            body["max_size"] = max_size
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        return self.request("PATCH", f"/v1/pools/{quote(pool_id)}", body)

    def delete_pool(self, pool_id: str) -> None:
        self.request("DELETE", f"/v1/pools/{quote(pool_id)}")

    def snapshots(self) -> list[dict]:
        return self.request("GET", "/v1/snapshots")

    def delete_snapshot(self, name: str) -> None:
        self.request("DELETE", f"/v1/snapshots/{quote(name)}")

    def websocket(self, path: str):
        from websockets.sync import client as ws_client

        # legacy: the connection itself, closed by the process handle that owns it
        kw = {"additional_headers": self.endpoint.headers(), "max_size": 1 << 20,
              "open_timeout": self.timeout, "legacy": True}
        if self.endpoint.unix:
            return ws_client.unix_connect(self.endpoint.unix, f"ws://localhost{path}", **kw)
        return ws_client.connect(f"ws://{self.endpoint.base}{path}", **kw)


class Sandbox:
    """A sandbox in the service, with `VM`'s methods; `close()` (or leaving ``with``)
    destroys it."""

    def __init__(self, client: Client, info: dict) -> None:
        self._client = client
        self.info = info
        self.name: str = info["name"]
        self._path = f"/v1/sandboxes/{quote(self.name)}"

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r}, image={self.info.get('image')!r})"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> dict:
        self.info = self._client.request("GET", self._path)
        return self.info

    def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, stdin: bytes | None = None,
             timeout: float | None = None):
        """Run ``argv`` to completion; an `ExecResult` as `VM.exec` returns."""
        return exec_result(self._client.request(
            "POST", f"{self._path}/exec", _exec_body(argv, env, cwd, user, stdin, timeout)))

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: str | None = None, stdin: bool = False,
              tty: bool = False, winsize: tuple[int, int] | None = None) -> RemoteProcess:
        """Start ``argv`` with streaming stdio: iterate ``(stream, bytes)`` (1 stdout, 2
        stderr), write(), close_stdin(), resize(), signal(), wait()."""
        ws = self._client.websocket(f"{self._path}/exec/stream")
        conn = _WSFrames(ws)
        try:
            conn.send(exec_request(argv, env, cwd, user, stdin, tty, winsize))
        except BaseException:
            conn.close()
            raise
        return RemoteProcess(conn, argv[0] if argv else "the command")

    def read_file(self, path: str) -> bytes:
        conn = self._client._conn()
        try:
            conn.request("GET", f"{self._path}/files?path={quote(path)}",
                         headers=self._client.endpoint.headers())
            resp = conn.getresponse()
            data = resp.read()
            if resp.status >= 400:
                check_answer(resp.status, data)
            return data
        finally:
            conn.close()

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self._client.request("PUT", f"{self._path}/files?path={quote(path)}&mode={mode:o}",
                             raw=data, headers={"Content-Type": "application/octet-stream"})

    def expose(self, guest_port: int, host_port: int = 0, proto: str = "tcp",
               host_ip: str = "127.0.0.1") -> int:
        return self._client.request("POST", f"{self._path}/ports", {
            "guest_port": guest_port, "host_port": host_port, "proto": proto,
            "host_ip": host_ip})["host_port"]

    def snapshot(self, name: str) -> str:
        return self._client.request("POST", f"{self._path}/snapshot", {"name": name})["name"]

    def close(self) -> None:
        """Destroy the sandbox (a sandbox already gone is fine)."""
        try:
            self._client.request("DELETE", self._path)
        except ServiceError as e:
            if e.status != 404:
                raise


def connect(target: str | None = None, *, token: str | None = None) -> Client:
    """A client of the running service (see `Endpoint.resolve` for ``target``)."""
    return Client(target, token=token)
