"""The least a Python process can do to pull an image, for bench_pull's "python floor" row.

    python pull_floor.py HOST:PORT REPOSITORY TAG OUTDIR

Plain HTTP/1.1 over one socket with only socket, json and hashlib imported: ping /v2/, GET
the manifest, then the config and each layer in turn; each blob's sha256 is checked and it
is written, fsynced and renamed into OUTDIR, then a ref file is written the same way. No
auth, redirects, retries, resumption, bounds, locks or parallelism: not a puller anyone
should use, only the cost of the interpreter and the work itself, measured beside
`supermachine pull` (which does all of those) and skopeo.
"""

import hashlib
import json
import os
import socket
import sys


def main() -> int:
    hostport, repository, tag, out = sys.argv[1:5]
    host, _, port = hostport.rpartition(":")
    sock = socket.create_connection((host, int(port)), 30)
    reader = sock.makefile("rb")

    def get(path: str, accept: str = "") -> bytes:
        head = f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\n"
        sock.sendall((head + (f"Accept: {accept}\r\n" if accept else "") + "\r\n").encode())
        status = reader.readline().split()[1]
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = reader.read(length)
        if status != b"200":
            raise SystemExit(f"GET {path}: {status.decode()}")
        return body

    def store(data: bytes, name: str) -> None:
        tmp = os.path.join(out, f".tmp-{name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(out, name))

    get("/v2/")
    manifest = get(f"/v2/{repository}/manifests/{tag}",
                   "application/vnd.oci.image.manifest.v1+json, "
                   "application/vnd.docker.distribution.manifest.v2+json")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    store(manifest, digest)
    for desc in [json.loads(manifest)["config"], *json.loads(manifest)["layers"]]:
        blob = get(f"/v2/{repository}/blobs/{desc['digest']}")
        if "sha256:" + hashlib.sha256(blob).hexdigest() != desc["digest"]:
            raise SystemExit(f"blob {desc['digest']} is corrupt")
        store(blob, desc["digest"])
    store(json.dumps({"reference": f"{hostport}/{repository}:{tag}",
                      "manifest": digest}).encode(), "ref.json")
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
