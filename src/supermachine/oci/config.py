"""An OCI bundle's config.json and an exec's process.json: pure parsing, bytes in, typed out.

The engine that hands us a bundle is trusted to run containers, but the bundle's content
(written from an image, a Kubernetes pod spec or a user) is not: every length is bounded,
every field type-checked, and anything we cannot honour in a VM is either mapped to its VM
equivalent or refused in one line. What a VM gives a container by itself (its own /proc,
/sys, /dev, cgroups, namespaces, capabilities) is taken from the guest, not the config.

What maps where (runtime-spec 1.0): ``process`` becomes the workload (args, env, cwd,
uid:gid and supplementary groups, terminal, rlimits); ``root.path`` the VM's root directory
(shared over 9p, written through, read-only with ``root.readonly``); ``hostname`` the
guest's; ``mounts`` of type bind become shared directories or copied files, tmpfs mounts
tmpfs, and the kernel filesystems the guest's own; a ``network`` namespace with a path is
where the VM's traffic leaves, one without a path is made new (for the hooks to set up);
``hooks`` run on the host at their stages; memory and vCPUs come from annotations, else
from ``linux.resources`` limits, else the defaults.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..spec import (
    DEFAULT_MEMORY_MIB,
    MAX_SHARES,
    RLIM_INFINITY,
    RLIMITS,
    Mount,
    VMSpec,
    WorkloadSpec,
    parse_cpus,
    parse_memory,
)

MAX_CONFIG_BYTES = 4 << 20
MAX_ITEMS = 4096  # args, env, mounts, options, annotations
MAX_TEXT = 1 << 16
MAX_GROUPS = 64  # supplementary groups the guest agent sets (sm.h MAX_GROUPS)

#: annotations that size the VM (as `supermachine run --memory/--cpus` take them)
MEMORY_ANNOTATION = "org.supermachine.memory"
CPUS_ANNOTATION = "org.supermachine.cpus"
#: smallest VM a memory limit makes (the guest kernel and agent need some)
MIN_MEMORY_MIB = 128

#: filesystems every VM's guest mounts by itself, so the config's entries for them are met
GUEST_FILESYSTEMS = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"})
#: destinations the guest provides whatever the config says (its own /dev and /dev/shm)
GUEST_DESTINATIONS = frozenset({"/dev", "/dev/shm", "/dev/pts", "/dev/mqueue", "/proc", "/sys",
                                "/sys/fs/cgroup"})


class BundleError(UsageError):
    """A config.json or process.json we cannot run."""


@dataclass(frozen=True)
class Process:
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    terminal: bool
    rlimits: tuple[tuple[str, int, int], ...] = ()  # (docker's name, soft, hard)

    @property
    def user(self) -> str:
        """The agent's user: exactly these ids and groups, as runc sets them."""
        return f"{self.uid}:{self.gid}:{','.join(map(str, self.additional_gids))}"

    def workload(self) -> WorkloadSpec:
        return WorkloadSpec(entrypoint=self.args, cmd=(), env=self.env, workdir=self.cwd,
                            user=self.user, stdin=True, tty=self.terminal,
                            rlimits=self.rlimits)


#: hook stages run on the host: at create once the container's network namespace exists
#: (createRuntime, and the older prestart), after start, after the container is gone.
#: createContainer and startContainer run inside the container's namespaces, which are the
#: guest's here: they are skipped, and the log says so.
HOOK_STAGES = ("createRuntime", "prestart", "poststart", "poststop")
GUEST_HOOK_STAGES = ("createContainer", "startContainer")
MAX_HOOK_TIMEOUT = 3600


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...]  # argv, argv[0] included (may be empty: then the path)
    env: tuple[str, ...]
    timeout: int | None  # seconds

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "args": list(self.args), "env": list(self.env),
                "timeout": self.timeout}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Hook:
        return _hook(obj, "hook")


@dataclass(frozen=True)
class Bundle:
    path: Path  # the bundle directory
    root: str  # root.path, absolute
    readonly: bool
    process: Process | None
    hostname: str | None
    mounts: tuple[Mount, ...]
    skipped: tuple[str, ...]  # mounts the guest provides itself or cannot take, for the log
    network: str  # "user" or "none"
    netns: str | None
    #: a network namespace without a path: runc makes a new one; the container process
    #: does (hooks then configure it, as docker's do) and joins the VM to it if it has a
    #: route out by the time the hooks are done
    new_netns: bool
    memory_mib: int
    cpus: int
    annotations: tuple[tuple[str, str], ...]
    hooks: tuple[tuple[str, tuple[Hook, ...]], ...] = ()  # (stage, hooks) of HOOK_STAGES

    def hooks_of(self, stage: str) -> tuple[Hook, ...]:
        return dict(self.hooks).get(stage, ())

    def vm_spec(self, container_id: str) -> VMSpec:
        return VMSpec(image=f"oci:{container_id}", root_dir=self.root, read_only=self.readonly,
                      hostname=self.hostname, mounts=self.mounts, network=self.network,
                      netns=self.netns,
                      memory_mib=self.memory_mib, cpus=self.cpus, pull="never")


def load_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_CONFIG_BYTES:
        raise BundleError(f"{what} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{what} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{what} is not a JSON object")
    return obj


def read_file(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise BundleError(f"cannot read {what} {path}: {e.strerror}") from None
    return data


def parse_bundle(bundle: Path, data: bytes) -> Bundle:
    """config.json's ``data`` of the bundle directory ``bundle`` (absolute)."""
    c = load_json(data, "config.json")
    version = _text(c.get("ociVersion"), "ociVersion")
    if not version.startswith("1."):
        raise BundleError(f"unsupported ociVersion {version[:32]!r}: this runtime takes 1.x")
    root = _obj(c.get("root"), "root")
    root_path = _text(root.get("path"), "root.path")
    if not root_path.startswith("/"):
        joined = posixpath.normpath(posixpath.join(str(bundle), root_path))
        if not (joined + "/").startswith(str(bundle).rstrip("/") + "/"):
            raise BundleError(f"root.path {root_path[:200]!r} leads outside the bundle")
        root_path = joined
    process = parse_process(c["process"], "process") if c.get("process") is not None else None
    hostname = c.get("hostname")
    if hostname is not None:
        hostname = _text(hostname, "hostname", empty=True) or None
    annotations = _annotations(c.get("annotations"))
    linux = _obj(c.get("linux", {}), "linux")
    mounts, skipped = _mounts(c.get("mounts", []))
    network, netns = _network(linux.get("namespaces", []))
    hooks, skipped_hooks = _hooks(c.get("hooks"))
    return Bundle(path=bundle, root=root_path, readonly=_bool(root.get("readonly", False),
                                                               "root.readonly"),
                  process=process, hostname=hostname, mounts=mounts,
                  skipped=skipped + skipped_hooks, network=network, netns=netns,
                  new_netns=network == "none", hooks=hooks,
                  memory_mib=_memory(annotations, linux), cpus=_cpus(annotations, linux),
                  annotations=tuple(sorted(annotations.items())))


def parse_process(obj: object, what: str = "process") -> Process:
    p = _obj(obj, what)
    args = _texts(p.get("args"), f"{what}.args")
    if not args:
        raise BundleError(f"{what}.args is empty: there is nothing to run")
    env = _texts(p.get("env", []), f"{what}.env")
    for item in env:
        if "=" not in item:
            raise BundleError(f"{what}.env entry {item[:64]!r} is not KEY=VALUE")
    cwd = _text(p.get("cwd", "/"), f"{what}.cwd")
    if not cwd.startswith("/"):
        raise BundleError(f"{what}.cwd {cwd[:64]!r} must be an absolute path")
    user = _obj(p.get("user", {}), f"{what}.user")
    uid = _id(user.get("uid", 0), f"{what}.user.uid")
    gid = _id(user.get("gid", 0), f"{what}.user.gid")
    groups = tuple(_id(g, f"{what}.user.additionalGids")
                   for g in _list(user.get("additionalGids") or [],
                                  f"{what}.user.additionalGids"))
    if len(groups) > MAX_GROUPS:
        raise BundleError(f"{what}.user.additionalGids has more than {MAX_GROUPS} groups")
    return Process(args=args, env=env, cwd=cwd, uid=uid, gid=gid, additional_gids=groups,
                   terminal=_bool(p.get("terminal", False), f"{what}.terminal"),
                   rlimits=_process_rlimits(p.get("rlimits") or [], f"{what}.rlimits"))


def _process_rlimits(value: object, what: str) -> tuple[tuple[str, int, int], ...]:
    """``[{"type": "RLIMIT_NOFILE", "soft": N, "hard": N}, ...]`` as docker's names; a
    repeated type takes its last value, as runc does."""
    out: dict[str, tuple[str, int, int]] = {}
    for i, item in enumerate(_list(value, what)):
        r = _obj(item, f"{what}[{i}]")
        kind = _text(r.get("type"), f"{what}[{i}].type")
        name = kind.lower().removeprefix("rlimit_")
        if name not in RLIMITS:
            raise BundleError(f"{what}[{i}]: unknown rlimit type {kind[:32]!r}")
        soft, hard = (_u64(r.get(k), f"{what}[{i}].{k}") for k in ("soft", "hard"))
        if soft > hard:
            raise BundleError(f"{what}[{i}]: soft limit above the hard limit")
        out[name] = (name, soft, hard)
    return tuple(out.values())


def _mounts(value: object) -> tuple[tuple[Mount, ...], tuple[str, ...]]:
    mounts: list[Mount] = []
    skipped: list[str] = []
    shares = 1  # the root directory takes one share
    for i, item in enumerate(_list(value, "mounts")):
        m = _obj(item, f"mounts[{i}]")
        dest = posixpath.normpath(_text(m.get("destination"), f"mounts[{i}].destination"))
        if not dest.startswith("/"):
            raise BundleError(f"mounts[{i}].destination {dest[:64]!r} must be absolute")
        kind = _text(m.get("type", "none"), f"mounts[{i}].type", empty=True) or "none"
        source = _text(m.get("source", ""), f"mounts[{i}].source", empty=True)
        options = _texts(m.get("options", []), f"mounts[{i}].options")
        bind = kind == "bind" or "bind" in options or "rbind" in options
        if dest in GUEST_DESTINATIONS or kind in GUEST_FILESYSTEMS or dest == "/":
            skipped.append(f"{dest} ({kind}): the guest's own")
            continue
        readonly = "ro" in options
        if bind:
            if not source.startswith("/"):
                raise BundleError(f"mounts[{i}]: bind source {source[:64]!r} must be absolute")
            if source.startswith("/dev/") or source == "/dev":
                skipped.append(f"{dest} (device {source}): host devices stay on the host")
                continue
            if Path(source).is_dir():
                shares += 1
                if shares > MAX_SHARES:
                    raise BundleError(f"too many bind-mounted directories: a VM takes "
                                      f"{MAX_SHARES - 1} besides its root")
            mounts.append(Mount("bind", dest, source, readonly))
        elif kind == "tmpfs":
            mounts.append(Mount("tmpfs", dest, None, readonly, _tmpfs_size(options)))
        else:
            skipped.append(f"{dest} ({kind[:32]}): not supported in a VM")
    return tuple(mounts), tuple(skipped)


def _tmpfs_size(options: tuple[str, ...]) -> int:
    from ..spec import parse_size_bytes

    for opt in options:
        if opt.startswith("size="):
            return parse_size_bytes(opt[5:])
    return 0


def _network(value: object) -> tuple[str, str | None]:
    """The VM's network mode and namespace, as runc would network the container: a network
    namespace with a path is joined (the VM's traffic leaves through it: the engine's
    network, its port mappings), one without a path is new and empty (no network), and
    none at all means the host's network (the VM's own user-mode network)."""
    for i, item in enumerate(_list(value, "linux.namespaces")):
        ns = _obj(item, f"linux.namespaces[{i}]")
        if ns.get("type") != "network":
            continue
        if not ns.get("path"):
            return "none", None
        path = _text(ns["path"], f"linux.namespaces[{i}].path")
        if not path.startswith("/"):
            raise BundleError(f"network namespace path {path[:64]!r} must be absolute")
        return "user", path
    return "user", None


def _hooks(value: object) -> tuple[tuple[tuple[str, tuple[Hook, ...]], ...], tuple[str, ...]]:
    obj = _obj(value if value is not None else {}, "hooks")
    out, skipped = [], []
    for stage, items in obj.items():
        hooks = tuple(_hook(h, f"hooks.{stage}[{i}]")
                      for i, h in enumerate(_list(items, f"hooks.{stage}")))
        if stage in HOOK_STAGES:
            out.append((stage, hooks))
        elif stage in GUEST_HOOK_STAGES:
            skipped += [f"hook {stage} {h.path}: runs in the container's namespaces, which "
                        "are the guest's" for h in hooks]
        else:
            raise BundleError(f"unknown hook stage {str(stage)[:32]!r}")
    return tuple(out), tuple(skipped)


def _hook(value: object, what: str) -> Hook:
    h = _obj(value, what)
    path = _text(h.get("path"), f"{what}.path")
    if not path.startswith("/"):
        raise BundleError(f"{what}.path {path[:64]!r} must be absolute")
    env = _texts(h.get("env") or [], f"{what}.env")
    if any("=" not in e for e in env):
        raise BundleError(f"{what}.env entries must be KEY=VALUE")
    timeout = h.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or
                                not 0 < timeout <= MAX_HOOK_TIMEOUT):
        raise BundleError(f"{what}.timeout must be 1 to {MAX_HOOK_TIMEOUT} seconds")
    return Hook(path, _texts(h.get("args") or [], f"{what}.args"), env, timeout)


def _annotations(value: object) -> dict[str, str]:
    obj = _obj(value if value is not None else {}, "annotations")
    if len(obj) > MAX_ITEMS:
        raise BundleError(f"too many annotations (at most {MAX_ITEMS})")
    return {_text(k, "annotation key"): _text(v, f"annotation {k[:64]}", empty=True)
            for k, v in obj.items()}


def _memory(annotations: dict[str, str], linux: dict[str, Any]) -> int:
    if MEMORY_ANNOTATION in annotations:
        return parse_memory(annotations[MEMORY_ANNOTATION])
    resources = _obj(linux.get("resources") or {}, "linux.resources")
    limit = _obj(resources.get("memory") or {}, "linux.resources.memory").get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return parse_memory(max(MIN_MEMORY_MIB, -(-limit // (1 << 20))))
    return DEFAULT_MEMORY_MIB


def _cpus(annotations: dict[str, str], linux: dict[str, Any]) -> int:
    if CPUS_ANNOTATION in annotations:
        return parse_cpus(annotations[CPUS_ANNOTATION])
    resources = _obj(linux.get("resources") or {}, "linux.resources")
    cpu = _obj(resources.get("cpu") or {}, "linux.resources.cpu")
    quota, period = cpu.get("quota"), cpu.get("period")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (quota, period)):
        return min(64, max(1, math.ceil(quota / period)))
    return 1


# ---- field checks ------------------------------------------------------------------------

def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{what} must be a JSON object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BundleError(f"{what} must be a list")
    if len(value) > MAX_ITEMS:
        raise BundleError(f"{what} has more than {MAX_ITEMS} entries")
    return value


def _text(value: object, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise BundleError(f"{what} must be a non-empty string")
    if len(value) > MAX_TEXT or "\0" in value:
        raise BundleError(f"{what} is too long or holds a NUL byte")
    return value


def _texts(value: object, what: str) -> tuple[str, ...]:
    return tuple(_text(v, what, empty=True) for v in _list(value, what))


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise BundleError(f"{what} must be true or false")
    return value


def _u64(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= RLIM_INFINITY:
        raise BundleError(f"{what} must be a number from 0 to 2^64-1")
    return value


def _id(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        raise BundleError(f"{what} must be a number from 0 to 4294967295")
    return value
