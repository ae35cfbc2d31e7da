"""OCI hooks: host programs an engine names in config.json, run at their stages with the
container's state on stdin (runtime-spec "Lifecycle").

createRuntime and prestart run at create, once the container's network namespace exists
(docker configures its network from one), and a failure fails create; poststart runs after
start and poststop after the container is gone, where a failure is logged and the others
still run. Each runs with its own argv and environment only, the bundle as its working
directory, and a timeout (its own, else DEFAULT_TIMEOUT)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..engine import netns
from .config import Hook
from .state import ContainerError

DEFAULT_TIMEOUT = 30


def _enter_netns(fd: int) -> None:
    """In the hook's child before exec: back to the runtime's network namespace."""
    try:
        netns.enter(fd)
    except OSError:
        os._exit(126)


def run(hooks: Iterable[Hook], stage: str, state: dict[str, Any], bundle: Path) -> list[str]:
    """Run ``hooks`` in order; their failures, each one line (`run_or_fail` stops at the
    first)."""
    failures = []
    for hook in hooks:
        why = _run_one(hook, state, bundle)
        if why is not None:
            failures.append(f"{stage} hook {hook.path}: {why}")
    return failures


def run_or_fail(hooks: Iterable[Hook], stage: str, state: dict[str, Any], bundle: Path,
                host_netns: int | None = None) -> None:
    """``host_netns``: an fd of the network namespace the hooks run in, when the caller's
    thread has moved to the container's (hooks run in the runtime's namespaces)."""
    for hook in hooks:
        why = _run_one(hook, state, bundle, host_netns)
        if why is not None:
            raise ContainerError(f"{stage} hook {hook.path} failed: {why}")


def _run_one(hook: Hook, state: dict[str, Any], bundle: Path,
             host_netns: int | None = None) -> str | None:
    argv = list(hook.args) or [hook.path]
    env = dict(e.split("=", 1) for e in hook.env)
    try:
        p = subprocess.run(argv, executable=hook.path, env=env, cwd=bundle,
                           input=json.dumps(state).encode(), capture_output=True,
                           timeout=hook.timeout or DEFAULT_TIMEOUT,
                           pass_fds=() if host_netns is None else (host_netns,),
                           preexec_fn=None if host_netns is None else
                           functools.partial(_enter_netns, host_netns))
    except subprocess.TimeoutExpired:
        return f"timed out after {hook.timeout or DEFAULT_TIMEOUT} s"
    except OSError as e:
        return e.strerror or str(e)
    if p.returncode != 0:
        said = p.stderr.decode(errors="replace").strip().splitlines()
        return f"exit status {p.returncode}" + (f": {said[-1][:300]}" if said else "")
    return None
