"""Mutation fuzzing of the host's parsers of untrusted input, with counts (issue 11).

Each target gets valid inputs as seeds, then cases made by mutating them (bytes flipped,
inserted, deleted, duplicated, spliced with another seed, truncated, random tails), fed to
the real parser. A parser may only accept an input or refuse it with its own error type;
any other exception, a hang, or an input it accepts but should not (checked per target) is a
finding, saved under fuzz/findings/ with the target's name.

Targets (what a hostile guest, image or client controls):
- agent: the guest->host agent stream, through `agent.protocol.Connection.receive` after
  the host's HELLO (decoder and session state machine);
- control: the control protocol of detached VMs, OCI containers and the service's run
  socket and WebSocket execs (`detached.wire.Decoder`, `detached.protocol.parse_json`,
  `parse_request`);
- manifest: image indexes, manifests and configs (`images.manifest`);
- layer: layer tars through the bounded tar reader (`images.tarsafe.open_stream`), every
  member's header and data read.
- oci: an OCI bundle's config.json and an exec's process.json, as engines hand them to
  supermachine-runtime (`oci.config.parse_bundle`, `parse_process`).
- service: JSON bodies of the service's HTTP API, as a client sends them
  (`service.api`: sandbox, pool, resize, exec, port and snapshot bodies, and the VM spec
  each sandbox or pool body becomes).

    .venv/bin/python fuzz/host.py [--cases N] [--seed S] [--target NAME ...] [--out FILE]
                                  [--coverage N]

``--coverage N`` also replays each target's first N cases under a line tracer and reports
the lines of its parser modules they executed, out of all their executable lines.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from supermachine.agent import protocol as ap  # noqa: E402
from supermachine.detached import protocol as cp  # noqa: E402
from supermachine.detached import wire  # noqa: E402
from supermachine.errors import Error  # noqa: E402
from supermachine.images import manifest, tarsafe  # noqa: E402
from supermachine.oci import config as oci  # noqa: E402
from supermachine.service import api as service_api  # noqa: E402

NONCE = b"N" * ap.NONCE_SIZE
MAX_CASE = 1 << 16


# ---- targets: seeds and a check that raises on a finding -------------------------------------

def agent_seeds() -> list[bytes]:
    """Guest frames after its HELLO, for a host that opened session 1."""
    return [ap.encode_started(1, 42) + ap.encode_frame(ap.FrameType.DATA, 1, b"hi", 1)
            + ap.encode_exit(1, 0, 0),
            ap.encode_frame(ap.FrameType.PONG, 0, b"\0" * 8) + ap.encode_error(0, b"bad"),
            ap.encode_started(1, 7) + ap.encode_frame(ap.FrameType.CREDIT, 1,
                                                      (4096).to_bytes(4, "little"))
            + ap.encode_frame(ap.FrameType.EOF, 1, b"", 1) + ap.encode_exit(1, 1, 9, b"x"),
            ap.encode_guest_hello(NONCE)]


def agent_check(data: bytes) -> None:
    # before the guest's HELLO: the resynchronising decoder
    try:
        ap.Connection(NONCE).receive(data)
    except Error:
        pass
    # after it, with a session open: every frame type and the session state machine
    conn = ap.Connection(NONCE)
    conn.hello()
    conn.receive(ap.encode_guest_hello(NONCE))
    conn.open([b"true"])
    try:
        cut = len(data) // 3  # in two pieces, as a socket delivers them
        conn.receive(data[:cut])
        conn.receive(data[cut:])
    except Error:
        return


def control_seeds() -> list[bytes]:
    k = cp.Kind
    return [cp.encode_json(k(1), {"argv": ["sh"], "tty": False}),
            cp.encode_request(cp.SignalRequest(15)) + cp.encode_request(cp.StartRequest())
            + cp.encode_request(cp.PauseRequest(True)),
            cp.encode_data(k(2), b"stdin bytes") + cp.encode_resize(24, 80)
            + cp.encode_signal(15),
            cp.encode_json(k(1), {"a": [1, 2, {"b": None}]}) + cp.encode(k(3)),
            cp.encode_request(cp.ExecRequest(("sh", "-c", "x"), ("A=1",), "/", "1:1", True,
                                             True, (24, 80), (("nofile", 1, 2),))),
            cp.encode_request(cp.RunArgsRequest(("-it", "img", "sh"), "/tmp", ("A=1",),
                                                "tty", (24, 80))),
            cp.encode_request(cp.RunRequest({"image": "img"}, {"cmd": ["true"]}, True, "n",
                                            True, 1 << 20, None))
            + cp.encode_request(cp.WriteRequest("/x", 0o600))
            + cp.encode_request(cp.StopRequest(3.0))]


def control_check(data: bytes) -> None:
    d = cp.Decoder()
    try:
        for frame in d.feed(data):
            if frame.kind == cp.Kind.REQUEST:
                cp.parse_request(frame)
            elif frame.payload[:1] == b"{":
                cp.parse_json(frame)
            if len(frame.payload) == 4:
                cp.parse_resize(frame)
    except Error:
        return
    assert d.pending <= cp.MAX_PAYLOAD + 8, "the decoder holds more than one frame"


def manifest_seeds() -> list[bytes]:
    digest = "sha256:" + "a" * 64
    desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
            "size": 1234}
    man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {**desc, "mediaType": "application/vnd.oci.image.config.v1+json"},
           "layers": [desc, desc]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{**desc, "mediaType": man["mediaType"],
                            "platform": {"architecture": "amd64", "os": "linux"}}]}
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "x"],
                         "WorkingDir": "/w", "User": "1000:1000",
                         "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "b"}},
              "rootfs": {"type": "layers", "diff_ids": [digest]}}
    return [json.dumps(x).encode() for x in (man, index, config)]


def manifest_check(data: bytes) -> None:
    for parse in (manifest.parse_manifest, manifest.parse_index, manifest.parse_config):
        try:
            parse(data)
        except Error:
            continue


def layer_seeds() -> list[bytes]:
    out = []
    long = "d/" + "n" * 120 + "/f\u00e9"  # a pax or GNU long-name header
    for fmt, entries in (
            (tarfile.PAX_FORMAT, (("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
                                  ("bin/", None))),
            (tarfile.PAX_FORMAT, (("usr/lib/lib.so", b"\x7fELF" + b"\0" * 100),
                                  ("a/.wh.b", b""), ("link", "target"), (long, b"x"))),
            (tarfile.GNU_FORMAT, ((long, b"gnu"), ("l2", "t" * 120)))):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
            for name, body in entries:
                info = tarfile.TarInfo(name.rstrip("/"))
                if body is None:
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                elif isinstance(body, str):
                    info.type, info.linkname = tarfile.SYMTYPE, body
                    tf.addfile(info)
                else:
                    info.size = len(body)
                    tf.addfile(info, io.BytesIO(body))
        out.append(buf.getvalue())
    return out


def layer_check(data: bytes) -> None:
    try:
        tf = tarsafe.open_stream(io.BytesIO(data))
        for member in tf:
            if member.isfile():
                f = tf.extractfile(member)
                if f is not None:
                    f.read(MAX_CASE)
    except (Error, tarfile.TarError, EOFError):
        return


def oci_seeds() -> list[bytes]:
    process = {"terminal": False, "user": {"uid": 0, "gid": 0, "additionalGids": [0, 10]},
               "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "TERM=xterm"],
               "cwd": "/", "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]}
    podman = {"ociVersion": "1.0.2-dev", "process": process, "hostname": "h",
              "root": {"path": "/var/lib/containers/storage/overlay/x/merged"},
              "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                         {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
                          "options": ["bind", "rprivate"]},
                         {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                          "options": ["size=65536k"]}],
              "annotations": {oci.MEMORY_ANNOTATION: "1G", "io.container.manager": "libpod"},
              "linux": {"namespaces": [{"type": "pid"},
                                       {"type": "network", "path": "/run/netns/n"}],
                        "resources": {"memory": {"limit": 268435456},
                                      "cpu": {"quota": 200000, "period": 100000}}}}
    containerd = {"ociVersion": "1.0.2", "process": process, "root": {"path": "rootfs"},
                  "mounts": [], "linux": {"namespaces": [{"type": "network"}]}}
    return [json.dumps(x).encode() for x in (podman, containerd, process)]


def oci_check(data: bytes) -> None:
    try:
        oci.parse_bundle(Path("/bundle"), data)
    except Error:
        pass
    try:
        oci.parse_process(oci.load_json(data, "process.json"))
    except Error:
        pass


def service_seeds() -> list[bytes]:
    bodies = [
        {"image": "/img", "memory": "256M", "cpus": 2, "network": "user",
         "ports": ["8080:80", "127.0.0.1::53/udp"], "volumes": ["/srv:/srv:ro", "cache:/c"],
         "tmpfs": ["/tmp:size=64m"], "hostname": "h", "machine_id": "random",
         "read_only": True, "name": "sb-1", "ttl": 60},
        {"image": "/img", "cmd": ["sleep", "9"], "entrypoint": ["/bin/sh", "-c"],
         "env": {"A": "1"}, "workdir": "/w", "user": "app"},
        {"image": "snapshot:warm", "size": 2, "max_size": 4, "idle_timeout": 30.5},
        {"size": 0, "max_size": 1},
        {"argv": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "cwd": "/", "user": "1:1",
         "stdin": "aGk=", "timeout": 5},
        {"guest_port": 80, "host_port": 0, "host_ip": "127.0.0.1", "proto": "tcp"},
        {"name": "snap-1"},
    ]
    return [json.dumps(b).encode() for b in bodies]


def service_check(data: bytes) -> None:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return  # the server answers 400 before any parser sees it
    for parse in (service_api.sandbox_request, service_api.pool_request,
                  lambda b: service_api.pool_request(b, resize=True),
                  service_api.exec_request, service_api.port_request,
                  service_api.snapshot_request):
        try:
            parse(body)
        except Error as e:
            if "\n" in str(e):
                raise AssertionError(f"a multi-line error: {str(e)[:200]!r}") from None


#: the parsing code whose lines count as each target's coverage (functions and classes)
PARSERS = {
    "agent": (ap.Decoder, ap._parse, ap._text, ap.Connection.receive, ap.Connection._check),
    "control": (wire.Decoder, cp.parse_json, cp.parse_resize, cp.parse_request, cp._winsize,
                cp._rlimits, cp._str_list, cp._opt_str, cp._path, cp._bool),
    "manifest": (manifest.load_json, manifest._no_duplicates, manifest._depth_ok,
                 manifest._str, manifest._int, manifest._str_list, manifest._str_map,
                 manifest.parse_descriptor, manifest._check_schema, manifest.parse_index,
                 manifest.sniff_media_type, manifest.parse_manifest, manifest.parse_config),
    "layer": (tarsafe.BoundedTarInfo, tarsafe.open_stream, tarfile.TarInfo.frombuf,
              tarfile.TarInfo._proc_member, tarfile.TarInfo._proc_pax,
              tarfile.TarInfo._proc_gnulong, tarfile.TarFile.next),
    "oci": (oci.load_json, oci.parse_bundle, oci.parse_process, oci._mounts, oci._network,
            oci._annotations, oci._memory, oci._cpus, oci._tmpfs_size, oci._obj, oci._list,
            oci._text, oci._texts, oci._bool, oci._id),
    "service": (service_api._object, service_api.check_known, service_api.vm_spec,
                service_api._workload,
                service_api.sandbox_request, service_api.pool_request,
                service_api.exec_request, service_api.port_request,
                service_api.snapshot_request),
}

TARGETS: dict[str, tuple[Callable[[], list[bytes]], Callable[[bytes], None]]] = {
    "agent": (agent_seeds, agent_check),
    "control": (control_seeds, control_check),
    "manifest": (manifest_seeds, manifest_check),
    "layer": (layer_seeds, layer_check),
    "oci": (oci_seeds, oci_check),
    "service": (service_seeds, service_check),
}


# ---- mutation ------------------------------------------------------------------------------

def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(8)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2 and data:  # delete a run
            del data[pos:pos + rng.randint(1, 16)]
        elif op == 3 and data:  # duplicate a run
            run = data[pos:pos + rng.randint(1, 64)]
            data[pos:pos] = run * rng.randint(1, 4)
        elif op == 4:  # splice another seed in
            other = rng.choice(seeds)
            data[pos:pos] = other[rng.randrange(len(other) + 1):]
        elif op == 5:  # truncate
            del data[pos:]
        elif op == 6 and len(data) >= 4:  # an interesting 32-bit value
            at = min(pos, len(data) - 4)
            data[at:at + 4] = rng.choice((0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                                          65535, 65536, 65537)).to_bytes(4, "little")
        else:  # a random tail
            data += rng.randbytes(rng.randint(0, 32))
    return bytes(data[:MAX_CASE])


def _code_objects(obj) -> list:
    if isinstance(obj, type):
        return [c for v in vars(obj).values() for c in _code_objects(v)]
    func = getattr(obj, "__func__", obj)
    code = getattr(func, "__code__", None)
    return [code] if code is not None else []


def _executable_lines(objs) -> dict[str, set[int]]:
    """filename -> the lines of ``objs``' code (their bodies, nested functions included)."""
    out: dict[str, set[int]] = {}
    todo = [c for o in objs for c in _code_objects(o)]
    while todo:
        c = todo.pop()
        out.setdefault(c.co_filename, set()).update(
            line for _, _, line in c.co_lines() if line is not None and line != c.co_firstlineno)
        todo.extend(k for k in c.co_consts if hasattr(k, "co_lines"))
    return out


def coverage(name: str, cases: int, seed: int) -> dict[str, str]:
    """Lines of the target's parsing code run by its first ``cases`` cases (the same cases
    as `run`), as "covered/executable" per file."""
    seeds_of, check = TARGETS[name]
    seeds = seeds_of()
    lines = _executable_lines(PARSERS[name])
    hit: dict[str, set[int]] = {f: set() for f in lines}

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if f not in hit:
            return None
        if event in ("call", "line"):
            hit[f].add(frame.f_lineno)
        return tracer

    rng = random.Random(f"{name}:{seed}")
    sys.settrace(tracer)
    try:
        for i in range(cases):
            data = seeds[i] if i < len(seeds) else mutate(rng, seeds)
            try:
                check(data)
            except Exception:
                pass
    finally:
        sys.settrace(None)
    return {Path(f).name: f"{len(hit[f] & want)}/{len(want)}" for f, want in lines.items()}


def run(name: str, cases: int, seed: int, findings: Path) -> dict:
    seeds_of, check = TARGETS[name]
    seeds = seeds_of()
    rng = random.Random(f"{name}:{seed}")
    found, slowest = 0, 0.0
    t0 = time.perf_counter()
    for i in range(cases):
        data = seeds[i] if i < len(seeds) else mutate(rng, seeds)
        c0 = time.perf_counter()
        try:
            check(data)
        except Exception as e:  # a finding: anything but the parser's own refusal
            found += 1
            findings.mkdir(parents=True, exist_ok=True)
            (findings / f"{name}-{seed}-{i}.bin").write_bytes(data)
            print(f"{name}: case {i}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        slowest = max(slowest, time.perf_counter() - c0)
    wall = time.perf_counter() - t0
    return {"cases": cases, "findings": found, "wall_s": wall, "cases_per_s": cases / wall,
            "slowest_case_s": slowest, "seed": seed}


def main(argv: list[str] | None = None) -> int:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--cases", type=int, default=1_000_000)
    ap_.add_argument("--seed", type=int, default=1)
    ap_.add_argument("--target", action="append", choices=sorted(TARGETS))
    ap_.add_argument("--out", type=Path, help="write the results as JSON here")
    ap_.add_argument("--coverage", type=int, default=0, metavar="N",
                     help="also measure line coverage over each target's first N cases")
    args = ap_.parse_args(argv)
    results = {}
    for name in args.target or list(TARGETS):
        results[name] = r = run(name, args.cases, args.seed, ROOT / "fuzz" / "findings")
        if args.coverage:
            r["coverage_cases"] = args.coverage
            r["lines_covered"] = coverage(name, args.coverage, args.seed)
        print(f"{name}: {r['cases']:,} cases in {r['wall_s']:.0f} s "
              f"({r['cases_per_s']:,.0f}/s), slowest {r['slowest_case_s'] * 1000:.1f} ms, "
              f"{r['findings']} findings"
              + (f"; lines covered {r['lines_covered']}" if args.coverage else ""),
              flush=True)
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime()),
                                        "cpu": os.cpu_count(), "targets": results}, indent=1))
    return 1 if any(r["findings"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
