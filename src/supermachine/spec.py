"""One typed description of a VM and of the workload run in it.

`VMSpec` says which machine to make (image, memory, vCPUs, network, identity, ...);
`WorkloadSpec` says what to run in it, as overrides of the image's config. Both are frozen,
validated when made, and round-trip through JSON (``to_json``/``from_json``), so the Python
API, the CLI, detached VMs' state files, the service and the OCI runtime all speak the same
thing. Defaults live here and only here.

``VMSpec.create`` takes what people type (``memory="1G"``, ``ports={8080: 80}``, ...) and
normalises it; ``from_json`` takes untrusted JSON (state files, API clients) and is strict:
unknown keys, wrong types and out-of-range values are one-line `UsageError`s. Pure code.

Docker's override rules, applied once (`WorkloadSpec.resolve`, through `resolve`):
- ``--entrypoint`` replaces Entrypoint and drops the image's Cmd; CMD arguments replace Cmd.
- ``-e KEY=VALUE`` overrides or adds; ``-e KEY`` copies KEY from the caller's environment
  (and is dropped if the caller has none), as docker does.
- ``-w`` replaces WorkingDir (default ``/``); ``-u`` replaces User. With neither a User nor
  ``-u`` the workload runs as uid 0, gid 0 without looking at the image's /etc/passwd (which
  a ``FROM scratch`` image does not have); only a user *name* needs that file.
- No PATH in the image's Env or the overrides: docker's default PATH.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import net
from .errors import UsageError

# ---- docker's override rules, and parsing of what people type ----------------------------

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Workload:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str | None  # None: uid 0, gid 0, no /etc/passwd needed (docker's default)


def merge_env(base: Iterable[str], overrides: Iterable[str]) -> tuple[str, ...]:
    """``KEY=VALUE`` overrides on top of ``base``, keeping first-seen order, docker's PATH
    when neither has one. A bare ``KEY`` is `env_items`' business (docker's ``-e KEY``)."""
    merged: dict[str, str] = {}
    for item in base:
        key, sep, value = item.partition("=")
        if key and sep:
            merged[key] = value
    for item in env_items(overrides):
        key, _, value = item.partition("=")
        merged[key] = value
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH
    return tuple(f"{k}={v}" for k, v in merged.items())


def resolve(*, entrypoint: Sequence[str], cmd: Sequence[str], env: Sequence[str],
            working_dir: str, user: str,
            entrypoint_override: str | Sequence[str] | None = None,
            cmd_override: Sequence[str] | None = None,
            env_overrides: Iterable[str] = (),
            workdir_override: str | None = None,
            user_override: str | None = None) -> Workload:
    if entrypoint_override is not None:
        ep = [entrypoint_override] if isinstance(entrypoint_override, str) \
            else list(entrypoint_override)
        ep = [part for part in ep if part != ""]
        base_cmd: Sequence[str] = []  # docker: a new entrypoint resets the image's Cmd
    else:
        ep = list(entrypoint)
        base_cmd = cmd
    args = list(cmd_override) if cmd_override else list(base_cmd)
    argv = tuple(ep + args)
    if not argv:
        raise UsageError("no command specified: the image has no Entrypoint or Cmd; "
                         "give one after the image name")
    cwd = workdir_override if workdir_override is not None else (working_dir or "/")
    if not cwd.startswith("/"):
        raise UsageError(f"working directory {cwd!r} must be an absolute path")
    return Workload(
        argv=argv,
        env=merge_env(env, env_overrides),
        cwd=cwd,
        user=user_override or user or None,
    )


def parse_memory(text: str | int) -> int:
    """``512M``, ``1g``, ``268435456`` (bytes) or an int of MiB -> MiB."""
    if isinstance(text, int):
        mib = text
    else:
        s = text.strip().lower().removesuffix("b")
        units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
        try:
            if s and s[-1] in units:
                mib = int(float(s[:-1]) * units[s[-1]])
            else:
                mib = int(s) // (1024 * 1024)
        except ValueError:
            raise UsageError(f"invalid memory size {text!r}: use e.g. 512M or 2G") from None
    if not 64 <= mib <= 1024 * 1024:
        raise UsageError(f"memory size {text!r} out of range: use 64M to 1T")
    return mib


def parse_cpus(value: str | int | float) -> int:
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"invalid CPU count {value!r}") from None
    cpus = max(1, int(n + 0.999))  # docker allows fractions; a VM gets whole vCPUs
    if cpus > 64:
        raise UsageError(f"CPU count {value!r} out of range: 1 to 64")
    return cpus


def parse_hostname(value: str | None) -> str | None:
    """A guest hostname: 1..64 bytes (the kernel's limit), no NUL."""
    if value is None:
        return None
    size = len(value.encode())
    if not 1 <= size <= 64 or "\0" in value:
        raise UsageError(f"invalid hostname {value!r}: use 1 to 64 characters")
    return value


def parse_machine_id(value: str | bool | None) -> str | bool | None:
    """None/False: the image's own /etc/machine-id; True or ``random``: a fresh one for each
    VM; else 32 hex digits (a UUID's dashes allowed), kept lowercase as machine-id(5) wants."""
    if value is None or value is False:
        return None
    if value is True or value == "random":
        return True
    text = str(value).strip().lower().replace("-", "")
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise UsageError(f"invalid machine id {value!r}: use 32 hex digits or 'random'")
    return text


def random_machine_id() -> str:
    """A fresh machine id, shaped like a version-4 UUID as systemd makes them (without
    importing uuid, which costs the CLI ~5 ms of start-up through `platform`)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


# ---- the specs ------------------------------------------------------------------------------

SPEC_VERSION = 1
DEFAULT_MEMORY = "512M"
DEFAULT_MEMORY_MIB = 512
ACCELS = ("auto", "kvm", "tcg")
KERNEL_NAMES = ("supermachine", "debian")  # guest/kbuild.py's NAME and DEBIAN
PULL_POLICIES = ("always", "missing", "never")

# Bounds on what a spec may carry (specs come from untrusted JSON too).
MAX_TEXT = 4096  # an image reference, a path, a user, a working directory
MAX_ARG = 128 << 10  # one argument or environment entry (Linux's MAX_ARG_STRLEN)
MAX_ARGS = 4096  # arguments, environment entries
MAX_TOTAL = 1 << 20  # all arguments and environment together (well under ARG_MAX)
MAX_LIST = 1024  # registries, allowed hosts


def _text(value: object, what: str, *, limit: int = MAX_TEXT, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, not {type(value).__name__}")
    if not value and not empty:
        raise UsageError(f"{what} must not be empty")
    if len(value) > limit or "\0" in value:
        raise UsageError(f"{what} is too long or contains a NUL byte")
    return value


def _opt_text(value: object, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _texts(value: object, what: str, *, limit: int = MAX_LIST,
           item_limit: int = MAX_TEXT, empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise UsageError(f"{what} must be a list of strings")
    if len(value) > limit:
        raise UsageError(f"{what} has more than {limit} entries")
    return tuple(_text(v, f"an entry of {what}", limit=item_limit, empty=empty) for v in value)


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be true or false")
    return value


def _check_total(*groups: Sequence[str]) -> None:
    if sum(len(s) + 1 for g in groups for s in g) > MAX_TOTAL:
        raise UsageError("the command and environment are too large (over 1 MiB)")


#: resource limits by docker's `--ulimit` names, with Linux's RLIMIT_* numbers
RLIMITS = {"cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6,
           "nofile": 7, "memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12,
           "nice": 13, "rtprio": 14, "rttime": 15}
RLIM_INFINITY = (1 << 64) - 1


def _rlimits(value: object) -> tuple[tuple[str, int, int], ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) > len(RLIMITS):
        raise UsageError("rlimits must be a list of [name, soft, hard] (at most one per limit)")
    out: list[tuple[str, int, int]] = []
    for item in value:
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3):
            raise UsageError("an rlimit is [name, soft, hard]")
        name, soft, hard = item
        if name not in RLIMITS or any(n == name for n, _, _ in out):
            raise UsageError(f"unknown or repeated rlimit {str(name)[:32]!r}: use "
                             f"{', '.join(RLIMITS)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (soft, hard)) or \
                not 0 <= soft <= hard <= RLIM_INFINITY:
            raise UsageError(f"rlimit {name}: want 0 <= soft <= hard")
        out.append((name, soft, hard))
    return tuple(out)


def parse_ulimit(text: str) -> tuple[str, int, int]:
    """docker's ``--ulimit NAME=SOFT[:HARD]`` (-1: unlimited; HARD defaults to SOFT)."""
    name, sep, values = text.partition("=")
    soft_text, _, hard_text = values.partition(":")
    try:
        soft, hard = (RLIM_INFINITY if v.strip() == "-1" else int(v)
                      for v in (soft_text, hard_text or soft_text))
    except ValueError:
        soft = hard = -1
    if not sep or name not in RLIMITS or soft < 0 or hard < 0:
        raise UsageError(f"invalid --ulimit {text[:64]!r}: use NAME=SOFT[:HARD] with NAME one "
                         f"of {', '.join(RLIMITS)}")
    return name, soft, hard


@dataclass(frozen=True)
class WorkloadSpec:
    """What to run: overrides of the image's config, applied the way docker applies them.

    ``entrypoint`` None keeps the image's (a tuple replaces it and drops the image's Cmd);
    ``cmd`` empty keeps the image's Cmd; ``env`` entries are ``KEY=VALUE``; ``workdir`` and
    ``user`` None keep the image's.
    """

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    stdin: bool = False
    tty: bool = False
    #: ``(name, soft, hard)`` set in the process (`RLIMITS` names, like docker's --ulimit);
    #: the guest's defaults otherwise
    rlimits: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rlimits", _rlimits(self.rlimits))
        if self.entrypoint is not None:
            object.__setattr__(self, "entrypoint", _texts(
                self.entrypoint, "entrypoint", limit=MAX_ARGS, item_limit=MAX_ARG, empty=True))
        object.__setattr__(self, "cmd", _texts(self.cmd, "command", limit=MAX_ARGS,
                                               item_limit=MAX_ARG, empty=True))
        env = _texts(self.env, "environment", limit=MAX_ARGS, item_limit=MAX_ARG)
        for item in env:
            key, sep, _ = item.partition("=")
            if not key or not sep:
                raise UsageError(f"invalid environment variable {item[:64]!r}: expected "
                                 "KEY=VALUE")
        object.__setattr__(self, "env", env)
        _check_total(self.entrypoint or (), self.cmd, env)
        if self.workdir is not None and not _text(self.workdir, "working directory") \
                .startswith("/"):
            raise UsageError(f"working directory {self.workdir[:64]!r} must be an absolute "
                             "path")
        _opt_text(self.user, "user")
        _flag(self.stdin, "stdin")
        _flag(self.tty, "tty")

    @classmethod
    def command(cls, argv: Sequence[str], **overrides: Any) -> WorkloadSpec:
        """A command run as it is, without the image's Entrypoint and Cmd (`exec`)."""
        return cls(entrypoint=tuple(argv), **overrides)

    def resolve(self, config: Any) -> Workload:
        """Argv, environment, working directory and user: ``config`` (the image's runtime
        config) with these overrides. The one place docker's override rules are applied."""
        return resolve(entrypoint=config.entrypoint, cmd=config.cmd, env=config.env,
                       working_dir=config.working_dir, user=config.user,
                       entrypoint_override=self.entrypoint, cmd_override=self.cmd or None,
                       env_overrides=self.env, workdir_override=self.workdir,
                       user_override=self.user)

    def to_json(self) -> dict[str, Any]:
        return {"entrypoint": None if self.entrypoint is None else list(self.entrypoint),
                "cmd": list(self.cmd), "env": list(self.env), "workdir": self.workdir,
                "user": self.user, "stdin": self.stdin, "tty": self.tty,
                "rlimits": [list(r) for r in self.rlimits]}

    @property
    def rlimit_numbers(self) -> tuple[tuple[int, int, int], ...]:
        """The rlimits as the guest agent takes them."""
        return tuple((RLIMITS[name], soft, hard) for name, soft, hard in self.rlimits)

    @classmethod
    def from_json(cls, obj: object) -> WorkloadSpec:
        return cls(**_fields(cls, obj, "workload"))


def env_items(env: Mapping[str, str] | Iterable[str] | None,
              caller_env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``KEY=VALUE`` entries from a mapping or a list; a bare ``KEY`` takes its value from
    ``caller_env`` and is dropped if that has none (docker's ``-e KEY``)."""
    if env is None:
        return ()
    if isinstance(env, Mapping):
        return tuple(f"{k}={v}" for k, v in env.items())
    out = []
    for item in env:
        if not isinstance(item, str):
            raise UsageError(f"invalid environment variable {item!r}: expected KEY=VALUE")
        key, sep, _ = item.partition("=")
        if not key or "\0" in item:
            raise UsageError(f"invalid environment variable {item[:64]!r}: expected KEY=VALUE")
        if sep:
            out.append(item)
        elif caller_env is not None and key in caller_env:
            out.append(f"{key}={caller_env[key]}")
    return tuple(out)


MAX_ENV_FILE = 1 << 20  # bytes of one --env-file


def parse_env_file(text: str, caller_env: Mapping[str, str] | None = None,
                   what: str = "env file") -> tuple[str, ...]:
    """Docker's ``--env-file`` format: one ``KEY=VALUE`` per line taken literally (no quotes,
    no expansion), a bare ``KEY`` copied from ``caller_env`` (dropped if unset there), blank
    lines and lines starting with ``#`` ignored; a name with whitespace is an error."""
    if len(text) > MAX_ENV_FILE:
        raise UsageError(f"{what} is over {MAX_ENV_FILE >> 20} MiB")
    items = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, _ = line.partition("=")
        if not key or any(c.isspace() for c in key) or "\0" in line:
            raise UsageError(f"{what} line {n}: invalid variable name {key[:64]!r}")
        items.append(line if sep else key)
    return env_items(items, caller_env)


# ---- mounts (volumes) -------------------------------------------------------------------------

MOUNT_TYPES = ("bind", "volume", "tmpfs")
MAX_MOUNTS = 32
#: host directories and named volumes a VM can have at once: one virtio-9p device each, or
#: for a size-capped volume one virtio-blk disk, present in every machine (see
#: engine/base.py `Share` and `Disk`)
MAX_SHARES = 4
_VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Mount:
    """One mount in the VM: a host path (``bind``), a named volume (``volume``) or a tmpfs,
    at ``target`` (an absolute guest path). ``size``: a tmpfs's size in bytes (0: the
    kernel's default, half the guest's RAM)."""

    type: str
    target: str
    source: str | None = None
    readonly: bool = False
    size: int = 0

    def __post_init__(self) -> None:
        if self.type not in MOUNT_TYPES:
            raise UsageError(f"unknown mount type {str(self.type)[:32]!r}: use bind, volume "
                             "or tmpfs")
        target = _text(self.target, "mount target")
        if not target.startswith("/"):
            raise UsageError(f"mount target {target[:64]!r} must be an absolute path")
        norm = posixpath.normpath(target)
        if norm.startswith("//"):
            norm = norm[1:]
        if norm == "/":
            raise UsageError("a mount cannot replace the root directory")
        object.__setattr__(self, "target", norm)
        _flag(self.readonly, "readonly")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or \
                not 0 <= self.size <= 1 << 50:
            raise UsageError("a tmpfs size must be a number of bytes")
        if self.type == "tmpfs":
            if self.source is not None:
                raise UsageError("a tmpfs mount has no source")
            return
        if self.size:
            raise UsageError("only tmpfs mounts take a size")
        source = _text(self.source, f"{self.type} mount source")
        if self.type == "bind" and not source.startswith("/"):
            raise UsageError(f"bind mount source {source[:64]!r} must be an absolute path")
        if self.type == "volume" and not _VOLUME_NAME.match(source):
            raise UsageError(f"invalid volume name {source[:64]!r}: use letters, digits, "
                             "_ . - (at most 128, starting with a letter or digit)")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "target": self.target, "source": self.source,
                "readonly": self.readonly, "size": self.size}

    @classmethod
    def from_json(cls, obj: object) -> Mount:
        return cls(**_fields(cls, obj, "mount"))


def parse_volume(text: str, cwd: str | None = None) -> Mount:
    """docker's ``-v SRC:DST[:OPTS]``: SRC absolute or starting with ``.`` is a host path
    (made absolute against ``cwd``), anything else a volume name; OPTS ``ro``/``rw``."""
    parts = text.split(":")
    if len(parts) == 1:
        raise UsageError(f"invalid volume {text[:64]!r}: anonymous volumes are not "
                         "supported; use SRC:DST")
    if len(parts) > 3:
        raise UsageError(f"invalid volume {text[:64]!r}: use SRC:DST[:ro|rw]")
    src, dst = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 else []
    readonly = False
    for opt in opts:
        if opt in ("ro", "readonly"):
            readonly = True
        elif opt == "rw":
            readonly = False
        elif opt in ("z", "Z", "rprivate", "private", "rshared", "shared", "rslave",
                     "slave", "nocopy", "consistent", "cached", "delegated"):
            continue  # docker options that mean nothing for a VM's share
        else:
            raise UsageError(f"invalid volume option {opt[:32]!r} in {text[:64]!r}")
    if not src:
        raise UsageError(f"invalid volume {text[:64]!r}: empty source")
    if src.startswith(("/", ".")) or src == "~" or src.startswith("~/"):
        host = os.path.abspath(os.path.join(cwd or os.getcwd(), os.path.expanduser(src)))
        return Mount("bind", dst, host, readonly)
    return Mount("volume", dst, src, readonly)


def parse_mount_flag(text: str) -> Mount:
    """docker's ``--mount type=...,source=...,target=...[,readonly][,tmpfs-size=N]``."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if key in ("readonly", "ro") and not sep:
            value = "true"
        elif not sep:
            raise UsageError(f"invalid --mount field {item[:32]!r}: expected KEY=VALUE")
        if key in fields:
            raise UsageError(f"--mount field {key!r} given twice")
        fields[key] = value
    kind = fields.pop("type", "volume")
    source = fields.pop("source", None) or fields.pop("src", None)
    target = fields.pop("target", None) or fields.pop("destination", None) or \
        fields.pop("dst", None)
    if target is None:
        raise UsageError("--mount needs target=PATH")
    ro_text = fields.pop("readonly", None) or fields.pop("ro", None)
    readonly = ro_text is not None and ro_text.lower() in ("true", "1", "yes", "")
    if ro_text is not None and ro_text.lower() not in ("true", "1", "yes", "false", "0",
                                                       "no", ""):
        raise UsageError(f"invalid --mount readonly value {ro_text[:16]!r}")
    size = 0
    if "tmpfs-size" in fields:
        size = parse_size_bytes(fields.pop("tmpfs-size"))
    if fields:
        raise UsageError(f"unsupported --mount field(s): {', '.join(sorted(fields))[:64]}")
    if kind == "bind" and source is not None and not source.startswith("/"):
        raise UsageError(f"--mount type=bind source {source[:64]!r} must be an absolute path "
                         "(as docker requires)")
    if kind in ("bind", "volume") and source is None:
        raise UsageError(f"--mount type={kind} needs source=...")
    return Mount(kind, target, source, readonly, size)


def parse_tmpfs(text: str) -> Mount:
    """docker's ``--tmpfs PATH[:OPTS]`` (OPTS: size=N, ro, rw; others ignored)."""
    path, _, opts = text.partition(":")
    size, readonly = 0, False
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key == "size":
            size = parse_size_bytes(value)
        elif key == "ro":
            readonly = True
    return Mount("tmpfs", path, None, readonly, size)


def parse_size_bytes(text: str) -> int:
    s = text.strip().lower().removesuffix("b")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        n = int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)
    except (ValueError, KeyError, OverflowError):  # OverflowError: "infk"
        raise UsageError(f"invalid size {text[:32]!r}: use e.g. 64m or 1g") from None
    if n <= 0:
        raise UsageError(f"invalid size {text[:32]!r}: must be positive")
    return n


def check_mounts(mounts: Sequence[Mount], *, count_shares: bool = True) -> None:
    """Bounds and duplicates; ``count_shares``: whether each bind mount and volume needs a
    share (not with a host directory as the root, where single files are copied in and the
    volume plan counts what it shares)."""
    if len(mounts) > MAX_MOUNTS:
        raise UsageError(f"too many mounts (at most {MAX_MOUNTS})")
    seen: set[str] = set()
    for m in mounts:
        if m.target in seen:
            raise UsageError(f"duplicate mount target {m.target[:64]!r}")
        seen.add(m.target)
    shares = sum(1 for m in mounts if m.type != "tmpfs")
    if count_shares and shares > MAX_SHARES:
        raise UsageError(f"too many host directories and volumes ({shares}): a VM has "
                         f"{MAX_SHARES}")


def _port_text(forward: net.PortForward) -> str:
    return f"{forward.host_ip}:{forward.host_port}:{forward.guest_port}/{forward.proto}"


@dataclass(frozen=True)
class VMSpec:
    """Which machine to make. ``image`` is anything `supermachine run` takes (a layout or
    archive path, a registry reference, ``snapshot:NAME``)."""

    image: str
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    accel: str = "auto"
    #: None: the supermachine kernel if built, else Debian's; "supermachine" or "debian"
    #: insist on one; else an absolute path to a kernel file (with ``initrd``)
    kernel: str | None = None
    initrd: str | None = None
    snapshot: bool = True
    pull: str = "missing"
    platform: str | None = None
    insecure_registries: tuple[str, ...] = ()
    ca_file: str | None = None
    network: str = "user"
    #: published ports as ``HOSTIP:HOSTPORT:GUESTPORT/PROTO`` (host port 0: any free one)
    ports: tuple[str, ...] = ()
    publish_all: bool = False
    allow_hosts: tuple[str, ...] = ()
    allow_host_loopback: bool = False
    hostname: str | None = None
    #: None: the image's own; True: a fresh one per VM; else 32 hex digits
    machine_id: str | bool | None = None
    #: host directories, named volumes and tmpfs mounts (`Mount`)
    mounts: tuple[Mount, ...] = ()
    #: the image's root filesystem read-only (mounts stay as they are)
    read_only: bool = False
    #: a host directory that is the VM's root filesystem instead of an image's (an OCI
    #: bundle's ``root.path``, shared over 9p and written through, read-only with
    #: ``read_only``); ``image`` then only names it, and gives no process defaults
    root_dir: str | None = None
    #: a network namespace (a path like /run/netns/NAME) the VM's network process joins, so
    #: the VM's traffic leaves through it (an OCI container's network namespace)
    netns: str | None = None

    def __post_init__(self) -> None:
        _text(self.image, "image")
        if isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int):
            raise UsageError("memory_mib must be an integer number of MiB")
        parse_memory(self.memory_mib)
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or \
                parse_cpus(self.cpus) != self.cpus:
            raise UsageError(f"cpus must be a whole number from 1 to 64, not {self.cpus!r}")
        if self.accel not in ACCELS:
            raise UsageError(f"unknown accelerator {self.accel!r}: use auto, kvm or tcg")
        kernel = _opt_text(self.kernel, "kernel")
        if kernel in KERNEL_NAMES:
            if self.initrd is not None:
                raise UsageError(f"--initrd goes with a kernel file, not --kernel {kernel}")
        elif kernel is not None and not kernel.startswith("/"):
            raise UsageError(f"unknown kernel {kernel[:64]!r}: use {' or '.join(KERNEL_NAMES)}"
                             " or a kernel file's path")
        elif (kernel is None) != (_opt_text(self.initrd, "initrd") is None):
            raise UsageError("--kernel FILE and --initrd go together: give both or neither")
        _flag(self.snapshot, "snapshot")
        if self.pull not in PULL_POLICIES:
            raise UsageError(f"unknown pull policy {self.pull!r}: use always, missing or never")
        _opt_text(self.platform, "platform")
        object.__setattr__(self, "insecure_registries",
                           _texts(self.insecure_registries, "insecure registries"))
        _opt_text(self.ca_file, "CA file")
        object.__setattr__(self, "ports", _texts(self.ports, "ports"))
        forwards = net.parse_ports(self.ports)
        object.__setattr__(self, "ports", tuple(_port_text(f) for f in forwards))
        _flag(self.publish_all, "publish_all")
        hosts = _texts(self.allow_hosts, "allowed hosts")
        for item in hosts:
            net.parse_allow_host(item)
        object.__setattr__(self, "allow_hosts", hosts)
        _flag(self.allow_host_loopback, "allow_host_loopback")
        # Checks the combination (no ports or allow-list without an interface).
        net.Network(mode=self.network, ports=forwards, allow_hosts=hosts,
                    allow_host_loopback=self.allow_host_loopback)
        if self.publish_all and self.network == "none":
            raise UsageError("network 'none' has no interface: it cannot publish ports")
        parse_hostname(_opt_text(self.hostname, "hostname"))
        mid = self.machine_id
        if isinstance(mid, str):
            mid = parse_machine_id(_text(mid, "machine id"))  # "random" -> True
        elif mid is not None and not isinstance(mid, bool):
            raise UsageError("machine_id must be 32 hex digits, 'random', true or null")
        object.__setattr__(self, "machine_id", mid or None)
        mounts = self.mounts
        if isinstance(mounts, str) or not isinstance(mounts, Sequence):
            raise UsageError("mounts must be a list")
        if len(mounts) > MAX_MOUNTS:
            raise UsageError(f"too many mounts (at most {MAX_MOUNTS})")
        mounts = tuple(m if isinstance(m, Mount) else Mount.from_json(m) for m in mounts)
        check_mounts(mounts, count_shares=self.root_dir is None)
        object.__setattr__(self, "mounts", mounts)
        _flag(self.read_only, "read_only")
        for what, path in (("root directory", self.root_dir), ("network namespace", self.netns)):
            if _opt_text(path, what) is not None and not path.startswith("/"):
                raise UsageError(f"the {what} {path[:64]!r} must be an absolute path")
        if self.root_dir is not None and self.image.startswith("snapshot:"):
            raise UsageError("a VM with a host directory as its root has no snapshot image")
        if self.netns is not None and self.network == "none":
            raise UsageError("network 'none' has no interface: it cannot join a namespace")

    @classmethod
    def create(cls, image: str | Any, *, memory: str | int = DEFAULT_MEMORY,
               cpus: int | str | float = 1, accel: str | None = None,
               kernel: Any = None, initrd: Any = None,
               ports: Mapping[int | str, int] | Sequence[str | int] | None = None,
               machine_id: str | bool | None = None,
               volumes: Sequence[str | Mount] | Mapping[str, str] = (),
               tmpfs: Sequence[str] = (), **fields: Any) -> VMSpec:
        """A spec from what people write: ``memory="1G"``, ``cpus="2"``, ``ports={8080:
        80}`` or ``["8080:80"]``, paths as `os.PathLike`, ``machine_id="random"``,
        ``volumes=["./src:/work", "cache:/root/.cache:ro"]`` (docker's ``-v``; or a
        ``{host_or_name: guest_path}`` mapping, or `Mount`s), ``tmpfs=["/tmp:size=64m"]``."""
        if isinstance(volumes, Mapping):
            volumes = [f"{src}:{dst}" for src, dst in volumes.items()]
        mounts = (*fields.pop("mounts", ()),
                  *(v if isinstance(v, Mount) else parse_volume(os.fspath(v)) for v in volumes),
                  *(parse_tmpfs(t) for t in tmpfs))
        return cls(image=os.fspath(image), memory_mib=parse_memory(memory), mounts=mounts,
                   cpus=parse_cpus(cpus), accel=accel or "auto",
                   kernel=kernel if kernel is None or kernel in KERNEL_NAMES
                   else os.path.abspath(kernel),
                   initrd=None if initrd is None else os.path.abspath(initrd),
                   ports=tuple(_port_text(f) for f in net.parse_ports(ports)),
                   machine_id=parse_machine_id(machine_id), **fields)

    @property
    def kernel_choice(self) -> str | Any:
        """What `guest.assets.select_kernel` takes: None, a kernel name, or a `Path`."""
        if self.kernel is None or self.kernel in KERNEL_NAMES:
            return self.kernel
        from pathlib import Path

        return Path(self.kernel)

    @property
    def forwards(self) -> tuple[net.PortForward, ...]:
        return net.parse_ports(self.ports)

    @property
    def network_config(self) -> net.Network:
        """The network, with the published ports not yet claimed (host port 0 kept)."""
        return net.Network(mode=self.network, ports=self.forwards,
                           allow_hosts=self.allow_hosts,
                           allow_host_loopback=self.allow_host_loopback, netns=self.netns)

    def replace(self, **changes: Any) -> VMSpec:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": SPEC_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["mounts"] = [m.to_json() for m in self.mounts]
        return out

    @classmethod
    def from_json(cls, obj: object) -> VMSpec:
        if isinstance(obj, dict) and obj.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise UsageError(f"unsupported VM spec version {obj.get('version')!r}")
        fields = _fields(cls, {k: v for k, v in obj.items() if k != "version"}
                         if isinstance(obj, dict) else obj, "VM spec")
        return cls(**fields)


def check_known(obj: dict, known: Container[str], what: str) -> None:
    """Refuse keys of a JSON object that are not ``known``, naming a few of them quoted (a
    hostile key with a newline must not make the one-line error two lines)."""
    unknown = sorted(repr(str(k)[:32]) for k in obj if k not in known)
    if unknown:
        raise UsageError(f"{what}: unknown field(s) {', '.join(unknown[:5])}")


def _fields(cls: type, obj: object, what: str) -> dict[str, Any]:
    """``obj``'s fields for ``cls``: a JSON object with known keys only; lists as tuples."""
    if not isinstance(obj, dict):
        raise UsageError(f"{what} must be a JSON object")
    check_known(obj, {f.name for f in dataclasses.fields(cls)}, what)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in obj
               and f.default is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{what}: missing field(s) {', '.join(missing)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()}
