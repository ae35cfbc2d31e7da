"""The service's HTTP contract as pure code (service/api.py), the run socket's requests,
the pool's sizing rules, and how a client finds the service: hostile input included."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.detached import protocol, wire
from supermachine.errors import UsageError
from supermachine.service import address, api

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=12), children, max_size=4),
                    max_leaves=12)
KEYS = st.sampled_from([*api.VM_FIELDS, *api.SANDBOX_FIELDS, *api.WORKLOAD_FIELDS,
                        *api.POOL_FIELDS, "bogus"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, JSON, max_size=6) | JSON)
def test_hostile_bodies_are_one_line_usage_errors(body):
    for parse in (api.sandbox_request, api.pool_request, api.exec_request, api.port_request,
                  api.snapshot_request, lambda b: api.pool_request(b, resize=True)):
        try:
            parse(body)
        except UsageError as e:
            assert "\n" not in str(e) and len(str(e)) < 400


def test_sandbox_body_becomes_the_spec_run_would_make():
    from supermachine.spec import VMSpec

    req = api.sandbox_request({"image": "/img", "memory": "256M", "ports": ["8080:80"],
                               "network": "user", "name": "a", "ttl": 5})
    assert req.spec == VMSpec.create("/img", memory="256M", ports=["8080:80"])
    assert (req.name, req.ttl, req.workload) == ("a", 5, None)
    req = api.sandbox_request({"image": "/img", "cmd": ["sleep", "9"], "env": {"A": "1"},
                               "workdir": "/tmp"})
    assert (req.workload.cmd, req.workload.env, req.workload.workdir) == (
        ("sleep", "9"), ("A=1",), "/tmp")
    for bad in ({"cmd": "sleep 9"}, {"env": ["A=1"]}, {"workdir": "rel"}, {"user": 0}):
        with pytest.raises(UsageError):
            api.sandbox_request({"image": "/img", **bad})
    with pytest.raises(UsageError, match="unknown field"):
        api.sandbox_request({"image": "/img", "kernel_cmdline": "x"})
    with pytest.raises(UsageError, match="image"):
        api.sandbox_request({"memory": "1G"})
    with pytest.raises(UsageError):
        api.sandbox_request({"image": "/img", "memory": True})


def test_exec_body():
    call = api.exec_request({"argv": ["sh", "-c", "x"], "env": {"A": "1"}, "stdin": "aGk=",
                             "timeout": 3})
    assert (call.argv, call.env, call.stdin, call.timeout) == (("sh", "-c", "x"), ("A=1",),
                                                               b"hi", 3)
    for bad in ({"argv": []}, {"argv": ["a\0b"]}, {"argv": ["x"], "env": {"A=B": "1"}},
                {"argv": ["x"], "stdin": "!!"}, {"argv": ["x"], "timeout": 0}):
        with pytest.raises(UsageError):
            api.exec_request(bad)


def test_openapi_document_lists_every_route():
    doc = api.openapi("0")
    pairs = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert pairs == {(r.method, r.path) for r in api.ROUTES}
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_error_body_round_trip():
    assert api.error_message(api.error_body(400, "bad")) == "bad"
    assert api.error_message({"error": "x"}) is None
    assert api.error_message([1]) is None


def test_run_requests_round_trip_and_reject_hostile_fields():
    req = protocol.RunArgsRequest(argv=("img", "echo"), cwd="/tmp", env=("A=1",),
                                  stdin="pipe", winsize=(24, 80))
    (frame,) = protocol.Decoder().feed(protocol.encode_request(req))
    assert protocol.parse_request(frame) == req
    run = protocol.RunRequest(vm={"image": "x"}, workload={}, detach=True, name="n")
    (frame,) = protocol.Decoder().feed(protocol.encode_request(run))
    assert protocol.parse_request(frame) == run
    for obj in ({"op": "runargs", "argv": ["x"], "cwd": "rel"},
                {"op": "runargs", "argv": ["x"], "cwd": "/", "stdin": "file"},
                {"op": "run", "vm": [], "workload": {}},
                {"op": "run", "vm": {}, "workload": {}, "log_max_bytes": -1}):
        frame = protocol.Frame(protocol.Kind.REQUEST, json.dumps(obj).encode())
        with pytest.raises(protocol.ControlError):
            protocol.parse_request(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_wire_decoder_takes_any_bytes(data):
    decoder = wire.Decoder()
    try:
        frames = decoder.feed(data)
    except wire.ControlError:
        return
    assert all(f.kind in wire.KINDS and len(f.payload) <= wire.MAX_PAYLOAD for f in frames)
    assert decoder.pending <= wire.MAX_PAYLOAD + wire.HEADER.size


def test_pool_sizing_is_validated():
    from supermachine.runtime.pool import Pool

    pool = Pool("/img", 2, max_size=4, idle_timeout=10)
    assert (pool.size, pool.max_size, pool.idle_timeout) == (2, 4, 10)
    for args in ((2, 1), (-1, None), (1, 2000), (0, 0)):
        with pytest.raises(UsageError):
            pool.resize(*args)
    with pytest.raises(UsageError):
        pool.resize(1, 2, idle_timeout=-1)
    stats = pool.stats()
    assert (stats.ready, stats.hits, stats.misses, stats.acquire_ms_p50) == (0, 0, 0, None)
    pool.close()


def test_find_ignores_stale_or_foreign_service_files(tmp_path):
    d = tmp_path / "rt"
    d.mkdir()
    home = str(tmp_path / "home")
    assert address.find(home, d) is None  # nothing there
    (d / "service.json").write_text(json.dumps({"pid": os.getpid(), "home": home}))
    assert address.find(home, d) is None  # no one holds the lock: a dead service
    import fcntl

    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        info = address.find(home, d)
        assert info is not None and info.pid == os.getpid()
        assert address.find(str(tmp_path / "other"), d) is None  # another home's service
        (d / "service.json").write_text("[1, 2")
        assert address.find(home, d) is None
        (d / "service.json").write_text(json.dumps({"pid": True, "home": home}))
        assert address.find(home, d) is None
    finally:
        os.close(fd)
