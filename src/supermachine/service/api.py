"""The HTTP API's contract, as pure code: its routes, what each body may hold, the error
shape, and the OpenAPI document built from the same table. No I/O: the server (http.py)
and the clients (client.py, aio.py) both use it, and hostile bodies are cheap to test.

Every error is ``{"error": {"status": N, "message": "one line"}}``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

API = "v1"
PREFIX = f"/{API}"
MAX_BODY = 1 << 20  # JSON bodies
MAX_FILE = 1 << 30  # file uploads (streamed)
MAX_EXEC_OUTPUT = 16 << 20  # the JSON exec's captured output; stream bigger outputs (WS)

#: what a sandbox or pool body may say about its VM: `VMSpec.create`'s keywords
VM_FIELDS: dict[str, dict[str, Any]] = {
    "image": {"type": "string", "description": "an image reference, OCI layout or archive "
              "path, or snapshot:NAME"},
    "memory": {"type": ["string", "integer"], "description": "e.g. \"512M\" (default)"},
    "cpus": {"type": ["integer", "string"]},
    "accel": {"type": "string", "enum": ["auto", "kvm", "tcg"]},
    "kernel": {"type": "string"},
    "initrd": {"type": "string"},
    "snapshot": {"type": "boolean"},
    "pull": {"type": "string", "enum": ["always", "missing", "never"]},
    "platform": {"type": "string"},
    "insecure_registries": {"type": "array", "items": {"type": "string"}},
    "ca_file": {"type": "string"},
    "network": {"type": "string", "enum": ["user", "none"]},
    "ports": {"type": "array", "items": {"type": "string"},
              "description": "docker's -p: [HOSTIP:]HOSTPORT:GUESTPORT[/PROTO]"},
    "publish_all": {"type": "boolean"},
    "allow_hosts": {"type": "array", "items": {"type": "string"}},
    "allow_host_loopback": {"type": "boolean"},
    "hostname": {"type": "string"},
    "machine_id": {"type": ["string", "boolean"]},
    "volumes": {"type": "array", "items": {"type": "string"},
                "description": "docker's -v: HOST_PATH_OR_VOLUME:GUEST_PATH[:ro]"},
    "tmpfs": {"type": "array", "items": {"type": "string"}},
    "read_only": {"type": "boolean"},
}
_STR_LISTS = ("insecure_registries", "ports", "allow_hosts", "volumes", "tmpfs")
SANDBOX_FIELDS = {"name": {"type": "string"},
                  "ttl": {"type": "number", "description": "seconds until the service "
                          "destroys it"}}
#: a sandbox's main process, as `run -d` has one (any of these given: the image's
#: Entrypoint + Cmd with them applied; the sandbox ends when it exits)
WORKLOAD_FIELDS = {
    "cmd": {"type": "array", "items": {"type": "string"}, "description": "replaces the "
            "image's Cmd"},
    "entrypoint": {"type": "array", "items": {"type": "string"}},
    "env": {"type": "object", "additionalProperties": {"type": "string"}},
    "workdir": {"type": "string"}, "user": {"type": "string"},
}
POOL_FIELDS = {"size": {"type": "integer", "description": "VMs kept ready"},
               "max_size": {"type": "integer", "description": "VMs alive at most (ready, "
                            "in use, starting; default twice size)"},
               "idle_timeout": {"type": "number", "description": "seconds without an "
                                "acquire after which it shrinks back to size"}}
EXEC_FIELDS = {"argv": {"type": "array", "items": {"type": "string"}},
               "env": {"type": "object", "additionalProperties": {"type": "string"}},
               "cwd": {"type": "string"}, "user": {"type": "string"},
               "stdin": {"type": "string", "description": "base64"},
               "timeout": {"type": "number"}}
PORT_FIELDS = {"guest_port": {"type": "integer"}, "host_port": {"type": "integer"},
               "host_ip": {"type": "string"}, "proto": {"type": "string",
                                                        "enum": ["tcp", "udp"]}}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message[:2000]}}


def error_message(obj: object) -> str | None:
    """The message of an error body, or None when ``obj`` is not one."""
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        msg = obj["error"].get("message")
        return msg if isinstance(msg, str) else None
    return None


def _object(body: object, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise UsageError(f"the {what} body must be a JSON object")
    return body


def check_known(body: dict[str, Any], allowed: dict[str, Any], what: str) -> None:
    from ..spec import check_known as check  # spec.py's rule; imported when a body comes

    check(body, allowed, what)


def vm_spec(body: dict[str, Any], what: str):
    """The `VMSpec` of a body's VM fields (the others are the caller's)."""
    from ..spec import VMSpec

    fields = {k: v for k, v in body.items() if k in VM_FIELDS}
    if not isinstance(fields.get("image"), str):
        raise UsageError(f"{what}: image must be given, as a string")
    for key in _STR_LISTS:
        value = fields.get(key)
        if value is not None and (not isinstance(value, list) or
                                  not all(isinstance(v, str) for v in value)):
            raise UsageError(f"{what}: {key} must be a list of strings")
    for key, value in fields.items():
        if key in ("memory", "cpus") and isinstance(value, bool):
            raise UsageError(f"{what}: {key} must be a number or a size")
        if VM_FIELDS[key].get("type") == "boolean" and not isinstance(value, bool):
            raise UsageError(f"{what}: {key} must be true or false")
        if VM_FIELDS[key].get("type") == "string" and not isinstance(value, str):
            raise UsageError(f"{what}: {key} must be a string")
    image = fields.pop("image")
    try:
        return VMSpec.create(image, **fields)
    except UsageError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise UsageError(f"{what}: invalid VM fields ({type(e).__name__})") from None


@dataclass(frozen=True)
class SandboxRequest:
    spec: Any  # VMSpec
    name: str | None
    ttl: float | None
    workload: Any = None  # WorkloadSpec of its main process, if it has one


def sandbox_request(body: object) -> SandboxRequest:
    body = _object(body, "sandbox")
    check_known(body, {**VM_FIELDS, **SANDBOX_FIELDS, **WORKLOAD_FIELDS}, "sandbox")
    name, ttl = body.get("name"), body.get("ttl")
    if name is not None and not isinstance(name, str):
        raise UsageError("sandbox: name must be a string")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise UsageError("sandbox: ttl must be a number of seconds")
    return SandboxRequest(vm_spec(body, "sandbox"), name, ttl, _workload(body))


def _workload(body: dict[str, Any]):
    """The main process a sandbox body asks for, or None."""
    if not any(k in body for k in WORKLOAD_FIELDS):
        return None
    from ..spec import WorkloadSpec

    for key in ("cmd", "entrypoint"):
        value = body.get(key)
        if value is not None and (not isinstance(value, list) or
                                  not all(isinstance(v, str) for v in value)):
            raise UsageError(f"sandbox: {key} must be a list of strings")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            for k, v in env.items()):
        raise UsageError("sandbox: env must be an object of strings (names without '=')")
    for key in ("workdir", "user"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise UsageError(f"sandbox: {key} must be a string")
    entrypoint = body.get("entrypoint")
    return WorkloadSpec(entrypoint=None if entrypoint is None else tuple(entrypoint),
                        cmd=tuple(body.get("cmd") or ()),
                        env=tuple(f"{k}={v}" for k, v in env.items()),
                        workdir=body.get("workdir"), user=body.get("user"))


@dataclass(frozen=True)
class PoolRequest:
    spec: Any  # VMSpec; None in a resize
    size: int
    max_size: int | None
    idle_timeout: float | None


def pool_request(body: object, *, resize: bool = False) -> PoolRequest:
    body = _object(body, "pool")
    check_known(body, POOL_FIELDS if resize else {**VM_FIELDS, **POOL_FIELDS}, "pool")
    size, max_size, idle = body.get("size", 1), body.get("max_size"), body.get("idle_timeout")
    for key, value in (("size", size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"pool: {key} must be an integer")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int | float)):
        raise UsageError("pool: idle_timeout must be a number of seconds")
    if max_size is None and not resize and isinstance(size, int) and size >= 0:
        max_size = max(2 * size, 1)  # VMs in use do not eat into the ready ones
    return PoolRequest(None if resize else vm_spec(body, "pool"), size, max_size, idle)


@dataclass(frozen=True)
class ExecCall:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str | None
    user: str | None
    stdin: bytes | None
    timeout: float | None


def exec_request(body: object) -> ExecCall:
    body = _object(body, "exec")
    check_known(body, EXEC_FIELDS, "exec")
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv or len(argv) > 4096 or \
            not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise UsageError("exec: argv must be a non-empty list of strings")
    env = body.get("env") or {}
    if not isinstance(env, dict) or len(env) > 4096 or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and
            "\0" not in k + v for k, v in env.items()):
        raise UsageError("exec: env must be an object of strings (names without '=')")
    for key in ("cwd", "user"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise UsageError(f"exec: {key} must be a string")
    stdin = body.get("stdin")
    if stdin is not None:
        if not isinstance(stdin, str):
            raise UsageError("exec: stdin must be base64 text")
        try:
            stdin = base64.b64decode(stdin, validate=True)
        except ValueError:
            raise UsageError("exec: stdin is not valid base64") from None
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, int | float) or not 0 < timeout <= 86400):
        raise UsageError("exec: timeout must be from 0 to 86400 seconds")
    return ExecCall(tuple(argv), tuple(f"{k}={v}" for k, v in env.items()),
                    body.get("cwd"), body.get("user"), stdin, timeout)


def exec_result(code: int, stdout: bytes, stderr: bytes, error: str | None) -> dict[str, Any]:
    return {"exit_code": code, "error": error,
            "stdout": base64.b64encode(stdout).decode(),
            "stderr": base64.b64encode(stderr).decode()}


def port_request(body: object) -> tuple[int, int, str, str]:
    body = _object(body, "port")
    check_known(body, PORT_FIELDS, "port")
    guest, host = body.get("guest_port"), body.get("host_port", 0)
    ip, proto = body.get("host_ip", "127.0.0.1"), body.get("proto", "tcp")
    for key, value in (("guest_port", guest), ("host_port", host)):
        if isinstance(value, bool) or not isinstance(value, int) or \
                not (1 if key == "guest_port" else 0) <= value <= 65535:
            raise UsageError(f"port: {key} must be a port number")
    if not isinstance(ip, str) or len(ip) > 64 or proto not in ("tcp", "udp"):
        raise UsageError("port: host_ip must be an address and proto tcp or udp")
    return guest, host, proto, ip


def snapshot_request(body: object) -> str:
    body = _object(body, "snapshot")
    check_known(body, {"name": None}, "snapshot")
    name = body.get("name")
    if not isinstance(name, str):
        raise UsageError("snapshot: name must be a string")
    return name


# ---- the routes, and the OpenAPI document made from them -------------------------------

@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp's syntax: /v1/sandboxes/{name}
    summary: str
    body: dict[str, Any] | None = None  # JSON body fields
    content: str | None = None  # a raw body's media type
    answer: str = "application/json"
    query: tuple[str, ...] = ()
    status: int = 200


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", "liveness and load"),
    Route("GET", "/v1/version", "service and API version"),
    Route("GET", "/v1/openapi.json", "this document"),
    Route("GET", "/v1/sandboxes", "list sandboxes"),
    Route("POST", "/v1/sandboxes", "create a sandbox (from a warm pool when one matches); "
          "with cmd, entrypoint, env, workdir or user it runs that main process, as "
          "`run -d` does, and ends with it", body={**VM_FIELDS, **SANDBOX_FIELDS,
                                                  **WORKLOAD_FIELDS}, status=201),
    Route("GET", "/v1/sandboxes/{name}", "inspect a sandbox"),
    Route("DELETE", "/v1/sandboxes/{name}", "destroy a sandbox", status=204),
    Route("POST", "/v1/sandboxes/{name}/exec", "run a command to completion (output "
          "captured, base64)", body=EXEC_FIELDS),
    Route("GET", "/v1/sandboxes/{name}/exec/stream", "WebSocket: run a command with "
          "streaming stdio, resize and signals (binary messages are control-protocol "
          "frames, docs/protocol.md)", status=101),
    Route("GET", "/v1/sandboxes/{name}/files", "read a file (streamed)", query=("path",),
          answer="application/octet-stream"),
    Route("PUT", "/v1/sandboxes/{name}/files", "write a file (streamed body)",
          query=("path", "mode"), content="application/octet-stream", status=204),
    Route("POST", "/v1/sandboxes/{name}/ports", "publish a guest port on the host",
          body=PORT_FIELDS),
    Route("POST", "/v1/sandboxes/{name}/snapshot", "save the sandbox as a named snapshot",
          body={"name": {"type": "string"}}, status=201),
    Route("GET", "/v1/snapshots", "list named snapshots"),
    Route("DELETE", "/v1/snapshots/{name}", "delete a named snapshot", status=204),
    Route("GET", "/v1/pools", "list warm pools with their stats"),
    Route("POST", "/v1/pools", "create a warm pool", body={**VM_FIELDS, **POOL_FIELDS},
          status=201),
    Route("GET", "/v1/pools/{id}", "a pool's stats"),
    Route("PATCH", "/v1/pools/{id}", "resize a pool", body=POOL_FIELDS),
    Route("DELETE", "/v1/pools/{id}", "delete a pool and its VMs", status=204),
)


def _schema(fields: dict[str, Any]) -> dict[str, Any]:
    props = {}
    for key, schema in fields.items():
        s = dict(schema or {"type": "string"})
        if isinstance(s.get("type"), list):  # OpenAPI 3.0 has no type lists
            s = {"oneOf": [{"type": t} for t in s["type"]],
                 **{k: v for k, v in s.items() if k != "type"}}
        props[key] = s
    return {"type": "object", "properties": props, "additionalProperties": False}


def openapi(version: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ROUTES."""
    error = {"description": "an error", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"}}}}
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": _op_id(r),
                              "responses": {str(r.status): {"description": "success"},
                                            "4XX": error}}
        if r.status not in (101, 204):
            op["responses"][str(r.status)]["content"] = {r.answer: {"schema": {}}}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in _path_params(r.path)]
        params += [{"name": q, "in": "query", "required": q == "path",
                    "schema": {"type": "string"}} for q in r.query]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _schema(r.body)}}}
        elif r.content:
            op["requestBody"] = {"required": True, "content": {
                r.content: {"schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "supermachine service", "version": version,
                 "description": "Sandboxes (microVMs), warm pools and snapshots. Over the "
                 "unix socket no credentials are needed; over TCP every request carries "
                 "`Authorization: Bearer TOKEN`."},
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "properties": {"error": {
                "type": "object", "properties": {"status": {"type": "integer"},
                                                 "message": {"type": "string"}}}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _op_id(r: Route) -> str:
    words = [p.strip("{}").replace(".", "_") for p in r.path.split("/")[2:]]
    return r.method.lower() + "_" + "_".join(words)
