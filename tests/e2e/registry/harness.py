"""Real registries for the pull tests: Debian's docker-registry on loopback, images pushed
with skopeo, TLS certificates and token signing with openssl, a tiny token server.

Test images are built here as OCI layouts from real tar archives (gzip, zstd or plain
layers, one or two platforms), so every test knows exactly what bytes it expects.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- OCI layouts ----------------------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


_LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def _compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@dataclass
class BuiltImage:
    layout: Path
    manifest_digests: dict[str, str] = field(default_factory=dict)  # arch -> digest
    config_digests: dict[str, str] = field(default_factory=dict)  # arch -> digest
    layer_digests: list[str] = field(default_factory=list)
    index_digest: str | None = None  # set for multi-platform images


def _manifest(layout: Path, arch: str, layers: list[tuple[bytes, str]], cmd: str) -> tuple:
    descs, diff_ids = [], []
    for raw, how in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        descs.append({"mediaType": _LAYER_TYPES[how], **_blob(layout, _compress(raw, how))})
    config = {
        "created": "2024-01-02T03:04:05Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": [cmd], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdesc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_blob(layout, json.dumps(config).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": descs,
    }
    mdesc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_blob(layout, json.dumps(manifest).encode()),
    }
    return mdesc, cdesc, descs


def build_image(
    layout: Path,
    layers: list[tuple[dict[str, bytes], str]],
    *,
    archs: tuple[str, ...] = ("amd64",),
    tag: str = "latest",
) -> BuiltImage:
    """An OCI layout at ``layout``; more than one arch makes it an image index."""
    built = BuiltImage(layout)
    raws = [(layer_tar(files), how) for files, how in layers]
    entries = []
    for arch in archs:
        mdesc, cdesc, ldescs = _manifest(layout, arch, raws, f"/bin/{arch}")
        built.manifest_digests[arch] = mdesc["digest"]
        built.config_digests[arch] = cdesc["digest"]
        built.layer_digests = [d["digest"] for d in ldescs]
        entries.append({**mdesc, "platform": {"os": "linux", "architecture": arch}})
    ann = {"annotations": {"org.opencontainers.image.ref.name": tag}}
    if len(archs) == 1:
        top = {**entries[0], **ann}
        del top["platform"]
    else:
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
        idesc = {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            **_blob(layout, json.dumps(index).encode()),
        }
        built.index_digest = idesc["digest"]
        top = {**idesc, **ann}
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return built


# -- certificates and tokens -----------------------------------------------------------------


def make_ca_and_cert(d: Path, ip: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """-> (ca.pem, server cert.pem, server key.pem), the server cert valid for ``ip``."""
    d.mkdir(parents=True, exist_ok=True)
    names = ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    ca_key, ca, key, csr, cert = (d / n for n in names)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
        "-out", ca, "-days", "2", "-subj", "/CN=supermachine test CA")  # fmt: skip
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
        "-subj", f"/CN={ip}")  # fmt: skip
    ext = d / "ext.cnf"
    ext.write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return ca, cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues RS256 JWTs the registry trusts (x5c header, cert in its rootcertbundle).

    Only ``user``/``password`` (Basic) get a token; anyone else gets 401.
    """

    def __init__(self, d: Path, user: str, password: str, service: str, issuer: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = d / "token.key", d / "token.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
             "-out", self.cert, "-days", "2", "-subj", "/CN=token signer"],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", self.cert, "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.requests: list[dict] = []
        self._want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.service, self.issuer = service, issuer
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit

                q = parse_qs(urlsplit(self.path).query)
                server.requests.append({k: v[0] for k, v in q.items()})
                if self.headers.get("Authorization") != server._want:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": server.sign(q.get("scope", [""])[0])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def sign(self, scope: str) -> str:
        access = []
        if scope.count(":") >= 2:
            typ, rest = scope.split(":", 1)
            name, actions = rest.rsplit(":", 1)
            access.append({"type": typ, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": "tester",
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        head, body = (_b64url(json.dumps(x).encode()) for x in (header, claims))
        signing_input = f"{head}.{body}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(sig)}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- the registry -----------------------------------------------------------------------------


class Registry:
    """docker-registry on 127.0.0.1 with filesystem storage; restartable on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.storage = root / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.tls: tuple[Path, Path] | None = None

    def start(self, *, auth: str = "", tls: tuple[Path, Path] | None = None) -> None:
        """``auth`` is a YAML ``auth:`` block body (indented 2), or empty for anonymous."""
        self.tls = tls
        tls_yaml = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else ""
        config = (
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n{tls_yaml}" + (f"auth:\n{auth}" if auth else "")
        )
        cfg = self.root / "config.yml"
        cfg.write_text(config)
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - lives as long as proc
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "registry.log").read_text()[-2000:])
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            time.sleep(0.02)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def push(self, layout: Path, name: str, tag: str = "latest", src_tag: str = "latest") -> str:
        """skopeo copy the layout's ``src_tag`` to NAME:TAG here (all platforms)."""
        dest = f"docker://{self.host}/{name}:{tag}"
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
             f"oci:{layout}:{src_tag}", dest],
            check=True, capture_output=True,
        )  # fmt: skip
        return f"{self.host}/{name}:{tag}"

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.partition(":")[2]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def htpasswd_file(path: Path, user: str, password: str) -> Path:
    subprocess.run(
        ["htpasswd", "-B", "-b", "-c", str(path), user, password], check=True, capture_output=True
    )
    return path


# -- a scripted registry for failures a real one will not produce ------------------------------


Route = tuple[int, dict[str, str], bytes]


class FakeRegistry:
    """An HTTP server answering each path from ``routes`` (path -> (status, headers, body),
    or a callable taking the request headers and returning one); unknown paths get 404.
    Every request's path and headers are kept in ``seen``."""

    def __init__(self) -> None:
        self.routes: dict[str, Route | object] = {"/v2/": (200, {}, b"{}")}
        self.seen: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                headers = dict(self.headers.items())
                fake.seen.append((self.path, headers))
                route = fake.routes.get(self.path, (404, {}, b'{"errors":[{"code":"NOT_FOUND"}]}'))
                status, extra, body = route(headers) if callable(route) else route
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

    def serve_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.routes[f"/v2/{repo}/blobs/{digest}"] = (200, {}, data)
        return digest

    def serve_manifest(self, repo: str, tag: str, data: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        route = (200, {"Content-Type": media_type}, data)
        self.routes[f"/v2/{repo}/manifests/{tag}"] = route
        self.routes[f"/v2/{repo}/manifests/{digest}"] = route
        return digest

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def simple_manifest(fake: FakeRegistry, repo: str, layer: bytes, layer_type: str) -> bytes:
    """Serve a one-layer image's config and layer on ``fake``; return its manifest bytes."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/x"]},
         "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": fake.serve_blob(repo, config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": layer_type, "digest": fake.serve_blob(repo, layer), "size": len(layer)}
        ],
    }
    return json.dumps(manifest).encode()
