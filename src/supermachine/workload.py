"""What to run in the guest: the image config combined with the user's overrides, docker's way.

Pure functions, no I/O, so the docker semantics are unit-tested on their own:
- ``--entrypoint`` replaces Entrypoint and drops the image's Cmd; CMD arguments replace Cmd.
- ``-e KEY=VALUE`` overrides or adds; ``-e KEY`` copies KEY from the caller's environment
  (and is dropped if the caller has none), as docker does.
- ``-w`` replaces WorkingDir (default ``/``); ``-u`` replaces User. With neither a User nor
  ``-u`` the workload runs as uid 0, gid 0 without looking at the image's /etc/passwd (which
  a ``FROM scratch`` image does not have); only a user *name* needs that file.
- No PATH in the image's Env or the overrides: docker's default PATH.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Workload:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str | None  # None: uid 0, gid 0, no /etc/passwd needed (docker's default)


def merge_env(base: Iterable[str], overrides: Iterable[str],
              caller_env: Mapping[str, str]) -> tuple[str, ...]:
    """Apply ``KEY=VALUE`` / ``KEY`` overrides on top of ``base``, keeping first-seen order."""
    merged: dict[str, str] = {}
    for item in base:
        key, sep, value = item.partition("=")
        if key and sep:
            merged[key] = value
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid environment variable {item!r}: expected KEY=VALUE")
        if "\0" in item:
            raise UsageError("environment variables cannot contain NUL bytes")
        if sep:
            merged[key] = value
        elif key in caller_env:
            merged[key] = caller_env[key]
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH
    return tuple(f"{k}={v}" for k, v in merged.items())


def resolve(*, entrypoint: Sequence[str], cmd: Sequence[str], env: Sequence[str],
            working_dir: str, user: str,
            entrypoint_override: str | Sequence[str] | None = None,
            cmd_override: Sequence[str] | None = None,
            env_overrides: Iterable[str] = (),
            workdir_override: str | None = None,
            user_override: str | None = None,
            caller_env: Mapping[str, str] | None = None) -> Workload:
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
        env=merge_env(env, env_overrides, caller_env if caller_env is not None else {}),
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
