"""The HTTP API (api.py's routes) on aiohttp, and `serve`: the service's process.

Handlers only translate: bodies through api.py, work to `Service` (core.py) on a worker
thread (VMs are blocking code), answers and errors back as JSON. A streaming exec is a
WebSocket whose binary messages are control-protocol frames (detached/protocol.py); a
bridge hands it to the sandbox's own control server, so an exec over HTTP and `exec NAME`
over the unix socket run the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import logging
import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from .. import __version__
from ..detached.protocol import ControlError, Decoder, Frame, RunArgsRequest, RunRequest
from ..detached.server import ControlServer
from ..errors import AgentError, Error, ImageError, SnapshotError, UsageError, VMError
from ..home import Home, atomic_write_bytes
from . import address, api
from .core import LimitError, Limits, NotFound, Service

log = logging.getLogger(__name__)

WORKERS = 256  # blocking VM calls and streaming execs run on threads
FIRST_FRAME_TIMEOUT = 10.0
WS_QUEUE = 64  # frames from a client not yet taken by its exec (backpressure)
_SERVICE = web.AppKey("service", Service)
_TOKEN = web.AppKey("token", str)


def _status_of(e: Error) -> int:
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, LimitError):
        return 409
    if isinstance(e, UsageError | ImageError | SnapshotError):
        return 400
    return 500 if not isinstance(e, VMError | AgentError) else 409


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status)


def _error(status: int, message: str) -> web.Response:
    return _json(api.error_body(status, message), status)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Error as e:
        return _error(_status_of(e), str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except json.JSONDecodeError as e:
        return _error(400, f"invalid JSON: {e.msg} at {e.pos}")


@web.middleware
async def _auth(request: web.Request, handler) -> web.StreamResponse:
    """TCP clients must send the bearer token; the unix socket's mode is its guard. Fails
    closed: a request not known to come over the unix socket (a unix socket's name is a
    path) needs the token, also when its connection is already gone."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, str):
        given = request.headers.get("Authorization", "")
        token = request.app[_TOKEN]
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token (see the service's token file)")
    return await handler(request)


async def _body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > api.MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=api.MAX_BODY,
                                            actual_size=request.content_length)
    data = b""
    while chunk := await request.content.read(api.MAX_BODY + 1 - len(data)):
        data += chunk  # read() gives what has arrived: a big body comes in several
        if len(data) > api.MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=api.MAX_BODY, actual_size=len(data))
    try:
        return json.loads(data or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"invalid JSON body: {e}") from None


def _thread(func, *args):
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


# ---- handlers ----------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    svc = request.app[_SERVICE]
    return _json({"status": "ok", "sandboxes": len(svc.sandboxes()),
                  "pools": len(svc.pools()), "uptime_s": round(time.time() - svc.started, 3),
                  "memory_budget_mib": svc.limits.memory_budget_mib})


async def version(request: web.Request) -> web.Response:
    return _json({"version": __version__, "api": api.API})


async def openapi(request: web.Request) -> web.Response:
    return _json(api.openapi(__version__))


async def list_sandboxes(request: web.Request) -> web.Response:
    return _json([sb.to_json() for sb in request.app[_SERVICE].sandboxes()])


async def create_sandbox(request: web.Request) -> web.Response:
    req = api.sandbox_request(await _body(request))
    svc = request.app[_SERVICE]
    sb = await _thread(lambda: svc.create(req.spec, name=req.name, ttl=req.ttl,
                                          workload=req.workload))
    return _json(sb.to_json(), 201)


async def get_sandbox(request: web.Request) -> web.Response:
    return _json(request.app[_SERVICE].get(request.match_info["name"]).to_json())


async def delete_sandbox(request: web.Request) -> web.Response:
    svc = request.app[_SERVICE]
    svc.get(request.match_info["name"])  # 404 now, not from a thread
    await _thread(svc.delete, request.match_info["name"])
    return web.Response(status=204)


async def exec_once(request: web.Request) -> web.Response:
    call = api.exec_request(await _body(request))
    sb = request.app[_SERVICE].get(request.match_info["name"])

    def run():
        return sb.vm.exec(list(call.argv), env=list(call.env), cwd=call.cwd, user=call.user,
                          stdin=call.stdin, timeout=call.timeout)

    result = await _thread(run)
    out, err = result.stdout, result.stderr
    if len(out) + len(err) > api.MAX_EXEC_OUTPUT:
        raise UsageError("the output exceeds 16 MiB: use the streaming exec")
    return _json(api.exec_result(result.exit_code, out, err, result.error))


class _WSConn:
    """A WebSocket seen from a worker thread as a control connection: send(bytes),
    recv() -> Frame | None, close(), as detached/server.py serves."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ws: web.WebSocketResponse) -> None:
        self._loop, self._ws = loop, ws
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue(WS_QUEUE)

    def send(self, data: bytes) -> None:
        if self._ws.closed:
            raise OSError("the client went away")
        fut = asyncio.run_coroutine_threadsafe(self._ws.send_bytes(data), self._loop)
        try:
            fut.result()
        except (ConnectionError, RuntimeError) as e:
            raise OSError(str(e)) from None

    def recv(self) -> Frame | None:
        return asyncio.run_coroutine_threadsafe(self.frames.get(), self._loop).result()

    def close(self) -> None:
        """End this side: whoever waits in recv() gets None. The WebSocket itself is closed
        by exec_stream once the exec has returned (closing it from here, while the EXIT
        frame was on its way, lost that frame now and then under load)."""
        def end() -> None:
            with contextlib.suppress(asyncio.QueueFull):
                self.frames.put_nowait(None)

        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self._loop.call_soon_threadsafe(end)

    async def read_loop(self) -> None:
        decoder = Decoder()
        try:
            async for msg in self._ws:
                if msg.type != WSMsgType.BINARY:
                    break
                for frame in decoder.feed(msg.data):
                    await self.frames.put(frame)
        except ControlError as e:
            log.debug("bad frames from a client: %s", e)
        finally:
            await self.frames.put(None)


async def exec_stream(request: web.Request) -> web.StreamResponse:
    sb = request.app[_SERVICE].get(request.match_info["name"])
    ws = web.WebSocketResponse(max_msg_size=1 << 17, heartbeat=30)
    await ws.prepare(request)
    conn = _WSConn(asyncio.get_running_loop(), ws)
    reader = asyncio.create_task(conn.read_loop())
    try:
        first = await asyncio.wait_for(conn.frames.get(), FIRST_FRAME_TIMEOUT)
        if first is not None:
            await _thread(sb.hosted.serve_conn, conn, first)
    except TimeoutError:
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()
    return ws


def _guest_path(request: web.Request) -> str:
    path = request.query.get("path", "")
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise UsageError("files: ?path= must be an absolute path")
    return path


async def read_file(request: web.Request) -> web.StreamResponse:
    from ..agent.client import GuestFileError

    sb = request.app[_SERVICE].get(request.match_info["name"])
    path = _guest_path(request)
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    started = False

    class Sink:
        def write(self, data: bytes) -> int:
            nonlocal started
            if not started:
                asyncio.run_coroutine_threadsafe(resp.prepare(request), loop).result()
                started = True
            asyncio.run_coroutine_threadsafe(resp.write(data), loop).result()
            return len(data)

    try:
        await _thread(sb.vm.read_file_to, path, Sink())
    except GuestFileError as e:
        if started:  # the status is sent: all we can do is cut the body short
            raise ConnectionResetError(str(e)) from None
        return _error(404 if e.errno == 2 else 400, str(e))
    if not started:
        await resp.prepare(request)
    await resp.write_eof()
    return resp


async def write_file(request: web.Request) -> web.Response:
    from ..agent.client import GuestFileError

    sb = request.app[_SERVICE].get(request.match_info["name"])
    path = _guest_path(request)
    try:
        mode = int(request.query.get("mode", "644"), 8)
    except ValueError:
        raise UsageError("files: ?mode= must be octal, e.g. 644") from None
    if not 0 <= mode <= 0o7777:
        raise UsageError("files: ?mode= must be from 0 to 7777")
    loop = asyncio.get_running_loop()
    total = 0

    class Source:
        def read(self, n: int = -1) -> bytes:
            nonlocal total
            data = asyncio.run_coroutine_threadsafe(
                request.content.read(65536 if n < 0 else min(n, 65536)), loop).result()
            total += len(data)
            if total > api.MAX_FILE:
                raise UsageError(f"files: more than {api.MAX_FILE >> 20} MiB")
            return data

    try:
        await _thread(lambda: sb.vm.write_file_from(path, Source(), mode=mode))
    except GuestFileError as e:
        return _error(400, str(e))
    return web.Response(status=204)


async def publish_port(request: web.Request) -> web.Response:
    guest, host, proto, ip = api.port_request(await _body(request))
    sb = request.app[_SERVICE].get(request.match_info["name"])
    port = await _thread(lambda: sb.vm.expose(guest, host, proto, ip))
    return _json({"host_port": port, "guest_port": guest, "proto": proto, "host_ip": ip})


async def snapshot_sandbox(request: web.Request) -> web.Response:
    name = api.snapshot_request(await _body(request))
    sb = request.app[_SERVICE].get(request.match_info["name"])
    snap = await _thread(sb.vm.snapshot, name)
    return _json({"name": snap.name}, 201)


async def list_snapshots(request: web.Request) -> web.Response:
    from ..runtime import snapshot

    home = request.app[_SERVICE].home
    snaps = await _thread(snapshot.list_named, home)
    return _json([{"name": s.name, "image": s.meta.get("image_source"),
                   "memory_mib": s.inputs.get("memory_mib"), "created": s.meta.get("created")}
                  for s in snaps])


async def delete_snapshot(request: web.Request) -> web.Response:
    from ..runtime import snapshot

    try:
        await _thread(snapshot.remove_named, request.app[_SERVICE].home,
                      request.match_info["name"])
    except SnapshotError as e:
        raise NotFound(str(e)) from None
    return web.Response(status=204)


async def list_pools(request: web.Request) -> web.Response:
    return _json([p.to_json() for p in request.app[_SERVICE].pools()])


async def create_pool(request: web.Request) -> web.Response:
    req = api.pool_request(await _body(request))
    entry = request.app[_SERVICE].create_pool(req.spec, req.size, req.max_size,
                                              req.idle_timeout)
    return _json(entry.to_json(), 201)


async def get_pool(request: web.Request) -> web.Response:
    return _json(request.app[_SERVICE].pool(request.match_info["id"]).to_json())


async def resize_pool(request: web.Request) -> web.Response:
    req = api.pool_request(await _body(request), resize=True)
    svc = request.app[_SERVICE]
    entry = await _thread(svc.resize_pool, request.match_info["id"], req.size, req.max_size,
                          req.idle_timeout)
    return _json(entry.to_json())


async def delete_pool(request: web.Request) -> web.Response:
    svc = request.app[_SERVICE]
    svc.pool(request.match_info["id"])
    await _thread(svc.delete_pool, request.match_info["id"])
    return web.Response(status=204)


HANDLERS = {
    ("GET", "/v1/health"): health, ("GET", "/v1/version"): version,
    ("GET", "/v1/openapi.json"): openapi,
    ("GET", "/v1/sandboxes"): list_sandboxes, ("POST", "/v1/sandboxes"): create_sandbox,
    ("GET", "/v1/sandboxes/{name}"): get_sandbox,
    ("DELETE", "/v1/sandboxes/{name}"): delete_sandbox,
    ("POST", "/v1/sandboxes/{name}/exec"): exec_once,
    ("GET", "/v1/sandboxes/{name}/exec/stream"): exec_stream,
    ("GET", "/v1/sandboxes/{name}/files"): read_file,
    ("PUT", "/v1/sandboxes/{name}/files"): write_file,
    ("POST", "/v1/sandboxes/{name}/ports"): publish_port,
    ("POST", "/v1/sandboxes/{name}/snapshot"): snapshot_sandbox,
    ("GET", "/v1/snapshots"): list_snapshots,
    ("DELETE", "/v1/snapshots/{name}"): delete_snapshot,
    ("GET", "/v1/pools"): list_pools, ("POST", "/v1/pools"): create_pool,
    ("GET", "/v1/pools/{id}"): get_pool, ("PATCH", "/v1/pools/{id}"): resize_pool,
    ("DELETE", "/v1/pools/{id}"): delete_pool,
}


def make_app(service: Service, token: str) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=api.MAX_BODY)
    app[_SERVICE] = service
    app[_TOKEN] = token
    for route in api.ROUTES:  # the document and the router come from one table
        app.router.add_route(route.method, route.path, HANDLERS[route.method, route.path])
    return app


# ---- the service process -----------------------------------------------------------------

def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {text!r}: use HOST:PORT (e.g. 127.0.0.1:7777; port 0: any)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _token(directory: Path) -> str:
    """The bearer token for TCP clients: made once, kept 0600 in the runtime directory."""
    path = directory / "token"
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if len(text) >= 32:
            return text
    token = secrets.token_urlsafe(32)
    atomic_write_bytes(path, token.encode() + b"\n", mode=0o600)
    return token


def serve(home: Home, *, listen: str | None = None, pools: tuple = (),
          limits: Limits | None = None, ready=None, parse_run=None) -> int:
    """Run the service until SIGTERM/SIGINT; ``pools``: ``(VMSpec, size)`` pairs;
    ``parse_run``: see `Service`."""
    directory = address.runtime_dir()
    address.ensure_private(directory)
    lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise Error(f"a service already runs on {directory} (stop it, or set "
                    "SUPERMACHINE_RUNTIME_DIR for a second one)") from None
    for stale in ("service.json", "api.sock", "run.sock"):  # a killed service's
        with contextlib.suppress(FileNotFoundError):
            (directory / stale).unlink()
    tcp = _parse_listen(listen) if listen else None
    try:
        service = Service(home, limits or Limits(), parse_run=parse_run)
        return asyncio.run(_serve(service, directory, tcp, pools, ready))
    finally:
        for name in ("service.json", "api.sock", "run.sock"):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        os.close(lock_fd)


async def _serve(service: Service, directory: Path, tcp: tuple[str, int] | None,
                 pools: tuple, ready) -> int:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="service-worker")
    loop.set_default_executor(executor)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    service.start()
    run_server = ControlServer(None, directory, streams={
        RunRequest: service.handle_run, RunArgsRequest: service.handle_run}, name="run.sock")
    runner = web.AppRunner(make_app(service, _token(directory) if tcp else ""),
                           handle_signals=False, access_log=None)
    try:
        for spec, size in pools:
            service.create_pool(spec, size, 2 * size)
        run_server.start()
        await runner.setup()
        sock_path = directory / "api.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        await web.UnixSite(runner, str(sock_path)).start()
        os.chmod(sock_path, 0o600)
        bound = None
        if tcp:
            site = web.TCPSite(runner, tcp[0], tcp[1])
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            bound = f"{tcp[0]}:{sockets[0].getsockname()[1]}" if sockets else \
                f"{tcp[0]}:{tcp[1]}"
        info = {"pid": os.getpid(), "home": os.path.realpath(service.home.root),
                "version": __version__, "tcp": bound}
        atomic_write_bytes(directory / "service.json", json.dumps(info).encode(), mode=0o600)
        if ready is not None:
            ready(directory, bound)
        await stop.wait()
        log.info("stopping: draining %d sandboxes", len(service.sandboxes()))
    finally:
        with contextlib.suppress(FileNotFoundError):
            (directory / "service.json").unlink()
        # VMs first, while the loop still runs: streaming execs end through their
        # WebSockets, then the sites close.
        await loop.run_in_executor(None, run_server.close)
        await loop.run_in_executor(None, service.close)
        await runner.cleanup()
        executor.shutdown(wait=False, cancel_futures=True)
    return 0
