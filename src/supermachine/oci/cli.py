"""`supermachine-runtime`: a runc-compatible OCI runtime whose containers are microVMs.

Engines (podman through conmon, containerd's runc shim, CRI-O, dockerd) call it the way
they call runc: global flags (``--root``, ``--log``, ``--log-format``, ``--systemd-cgroup``),
then one of create, start, state, kill, delete, exec, ps, pause, resume, list, features.
Each call is a short process; the container itself is the process `create` starts
(oci/shim.py), whose pid goes to ``--pid-file`` and whose exit status is the container's.
Errors go to stderr and, as runc does, to ``--log`` (JSON lines with ``--log-format json``):
containerd reports a failed call from there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import termios
import time
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Error, UsageError
from ..home import atomic_write_bytes
from . import state as st

PROG = "supermachine-runtime"
#: how long `delete --force` waits for a container process that got SIGTERM
DELETE_GRACE = 10.0


def _global_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, add_help=True,
                                description="An OCI runtime whose containers are microVMs.")
    p.add_argument("--root", help="where container state lives")
    p.add_argument("--log", help="append errors (and --debug messages) to this file")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted, no effect (the "
                   "VM is the container's boundary)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--rootless", default="auto", help="accepted, no effect")
    p.add_argument("--criu", help=argparse.SUPPRESS)
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("command", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _command_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} {command}", allow_abbrev=False)
    if command == "create":
        p.add_argument("--bundle", "-b", default=".")
        p.add_argument("--pid-file")
        p.add_argument("--console-socket")
        p.add_argument("--no-pivot", action="store_true")
        p.add_argument("--no-new-keyring", action="store_true")
        p.add_argument("--preserve-fds", type=int, default=0)
        p.add_argument("--notify-socket")
    elif command == "exec":
        p.add_argument("--process", "-p")
        p.add_argument("--pid-file")
        p.add_argument("--console-socket")
        p.add_argument("--detach", "-d", action="store_true")
        p.add_argument("--tty", "-t", action="store_true")
        p.add_argument("--cwd")
        p.add_argument("--env", "-e", action="append", default=[])
        p.add_argument("--user", "-u")
        p.add_argument("--preserve-fds", type=int, default=0)
        p.add_argument("--process-label", help=argparse.SUPPRESS)
        p.add_argument("--apparmor", help=argparse.SUPPRESS)
        p.add_argument("--no-new-privs", action="store_true")
        p.add_argument("--cap", "-c", action="append", default=[])
        p.add_argument("--ignore-paused", action="store_true")
    elif command == "kill":
        p.add_argument("--all", "-a", action="store_true")
    elif command == "delete":
        p.add_argument("--force", "-f", action="store_true")
    elif command == "update":
        p.add_argument("--resources", "-r", required=True,
                       help="a LinuxResources JSON file, or - for stdin")
    elif command in ("ps", "list"):
        p.add_argument("--format", "-f", choices=("table", "json"), default="table")
        if command == "list":
            p.add_argument("--quiet", "-q", action="store_true")
    if command not in ("list", "features"):
        p.add_argument("id")
    if command == "exec":
        p.add_argument("command", nargs=argparse.REMAINDER)
    elif command == "kill":
        p.add_argument("signal", nargs="?", default="SIGTERM")
    elif command == "ps":
        p.add_argument("ps_args", nargs=argparse.REMAINDER)
    return p


COMMANDS = ("create", "start", "state", "kill", "delete", "exec", "ps", "pause", "resume",
            "list", "features", "update")


def main(argv: Sequence[str] | None = None) -> int:
    g = _global_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if g.version:
        print(f"{PROG} version {__version__}\nspec: {st.OCI_VERSION}")
        return 0
    log = st.RuntimeLog(g.log, g.log_format)
    if g.command not in COMMANDS:
        print(f"{PROG}: unknown command {str(g.command)[:32]!r}; one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    args = _command_parser(g.command).parse_args(g.args)
    root = Path(g.root) if g.root else st.default_root()
    try:
        return int(globals()[f"cmd_{g.command}"](root, args, g, log) or 0)
    except (Error, OSError) as e:
        msg = str(e) if isinstance(e, Error) else f"{e.strerror}: {e.filename or ''}".rstrip()
        log.write("error", msg)
        print(f"{PROG}: {msg}", file=sys.stderr)
        return 1  # runc's one failure status, whatever failed


# ---- create / start -----------------------------------------------------------------------

def cmd_create(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    from . import config as oci_config

    bundle = Path(os.path.abspath(args.bundle))
    b = oci_config.parse_bundle(bundle, oci_config.read_file(bundle / "config.json",
                                                            "config.json"))
    if b.process is None:
        raise oci_config.BundleError("config.json has no process: there is nothing to run")
    if b.process.terminal and not args.console_socket:
        raise UsageError("the process wants a terminal: give --console-socket")
    spec = b.vm_spec(args.id)
    c = st.container(root, args.id)
    st.create_dir(c)
    try:
        c.write({"id": c.id, "bundle": str(bundle), "rootfs": b.root, "status": st.CREATING,
                 "created": st.rfc3339(time.time()), "annotations": dict(b.annotations),
                 "vm": spec.to_json(), "workload": b.process.workload().to_json(),
                 "debug": g.debug, "log": os.path.abspath(g.log) if g.log else None,
                 "log_format": g.log_format, "new_netns": b.new_netns,
                 "hooks": {stage: [h.to_json() for h in hooks] for stage, hooks in b.hooks}})
        for line in b.skipped:
            log.write("debug", f"mount {line}")
        pid = _start_shim(c, args.console_socket, log)
    except BaseException:
        c.remove()
        raise
    if args.pid_file:
        atomic_write_bytes(Path(args.pid_file), str(pid).encode())
    return 0


def _start_shim(c: st.Container, console_socket: str | None, log: st.RuntimeLog) -> int:
    """Fork the container process (oci/shim.py); returns its pid once it reports."""
    slave = _send_new_pty(console_socket) if console_socket else None
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the container process: never returns into the command line
        code = 1
        try:
            os.close(ready_r)
            if slave is not None:  # the terminal is the container's stdio
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
            # Nothing of the engine's but stdio: it may leak fds into us (conmon's
            # reserved host ports, containerd's listener) that must not live on with us.
            keep = sorted({ready_w, 0, 1, 2})
            for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
                os.closerange(low + 1, high)
            from . import shim

            code = shim.run(c, ready_w, os.getppid())
        finally:
            os._exit(code)
    os.close(ready_w)
    if slave is not None:
        os.close(slave)
    from ..detached import ready

    report = ready.receive(ready_r) or {}
    if not report.get("ok"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise st.ContainerError(str(report.get("error") or "the container process died "
                                    f"while starting: {_last_line(c.shim_log)}"))
    log.write("info", f"container {c.id} created: process {pid}")
    return pid


def _last_line(path: Path) -> str:
    """The last line of a log about to be removed with its container, for the error."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1][-300:] if lines else "it left no log"


def _send_new_pty(path: str) -> int:
    """A new pty: its master goes to the engine over ``path`` (SCM_RIGHTS, with the slave's
    name, as runc sends it); returns the slave, which becomes the container's stdio."""
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            socket.send_fds(s, [name.encode()], [master])
    except OSError:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave


def cmd_start(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    from ..detached.client import request
    from ..detached.protocol import StartRequest

    c = _existing(root, args.id)
    status = c.status()
    if status != st.CREATED:
        raise st.ContainerError(f"cannot start container {c.id} in state {status}")
    request(c, StartRequest(), "start")
    _run_hooks("poststart", c.read(), c.state(), log)
    return 0


def _run_hooks(stage: str, record: dict[str, Any], state: dict[str, Any],
               log: st.RuntimeLog) -> None:
    """poststart and poststop hooks: their failures are logged, as runc does."""
    wanted = (record.get("hooks") or {}).get(stage)
    if not wanted:
        return
    from . import hooks
    from .config import Hook

    for failure in hooks.run([Hook.from_json(h) for h in wanted], stage, state,
                             Path(str(state.get("bundle") or "/"))):
        log.write("warning", failure)
        print(f"{PROG}: {failure}", file=sys.stderr)


# ---- state / list / ps -------------------------------------------------------------------

def _existing(root: Path, container_id: str) -> st.Container:
    c = st.container(root, container_id)
    if not c.exists():
        raise st.ContainerError(f"container does not exist: {c.id}")
    return c


def cmd_state(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    print(json.dumps(_existing(root, args.id).state(), indent=2))
    return 0


def cmd_list(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    states = []
    for c in st.list_containers(root):
        with contextlib.suppress(Error):
            states.append(c.state())
    if args.format == "json":
        print(json.dumps(states))
    elif args.quiet:
        for s in states:
            print(s["id"])
    else:
        print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for s in states:
            print(f"{s['id']:<20} {s['pid']:<8} {s['status']:<10} {s['bundle']:<40} "
                  f"{s['created']}")
    return 0


def cmd_ps(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    """The host processes of the container: its process (the VM's owner) and each exec's."""
    c = _existing(root, args.id)
    state = c.state()
    pids = [state["pid"]] if state["pid"] else []
    pids += _exec_pids(c)
    if args.format == "json":
        print(json.dumps(pids))
    else:
        print("PID")
        for pid in pids:
            print(pid)
    return 0


def _exec_pids(c: st.Container) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in (c.path / "execs").iterdir():
            if entry.name.isdigit() and os.path.exists(f"/proc/{entry.name}"):
                out.append(int(entry.name))
    return sorted(out)


def cmd_features(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    from . import config as oci_config

    print(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": st.OCI_VERSION, "hooks": [],
        "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"],
        "linux": {"namespaces": ["mount", "network", "pid", "ipc", "uts", "user", "cgroup"],
                  "capabilities": [], "cgroup": {"v1": False, "v2": False},
                  "seccomp": {"enabled": False}},
        "annotations": {"org.supermachine.runtime": "microvm",
                        oci_config.MEMORY_ANNOTATION: "VM memory, e.g. 1G",
                        oci_config.CPUS_ANNOTATION: "VM vCPUs"}}, indent=2))
    return 0


def cmd_update(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    """CRI-O's `update --resources`: checked and recorded; a running VM keeps the memory and
    vCPUs it was made with (no hotplug), which the log says."""
    from . import config as oci_config

    c = _existing(root, args.id)
    data = sys.stdin.buffer.read(oci_config.MAX_CONFIG_BYTES + 1) if args.resources == "-" \
        else oci_config.read_file(Path(args.resources), "resources")
    resources = oci_config.load_json(data, "resources")
    c.update(resources=resources)
    log.write("warning", f"container {c.id}: resources recorded, not applied: the VM keeps "
                         "the memory and vCPUs it was created with")
    return 0


# ---- kill / delete / pause ----------------------------------------------------------------

def parse_signal(text: str) -> int:
    t = text.strip().upper()
    if t.isdigit():
        n = int(t)
    else:
        try:
            n = int(signal.Signals[t if t.startswith("SIG") else f"SIG{t}"])
        except KeyError:
            raise UsageError(f"unknown signal {text[:32]!r}") from None
    if not 1 <= n <= 64:
        raise UsageError(f"invalid signal number {n}")
    return n


def cmd_kill(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    from ..detached.client import request
    from ..detached.protocol import PauseRequest, SignalRequest

    c = _existing(root, args.id)
    signo = parse_signal(args.signal)
    record = c.read()
    status = c.status(record)
    if status == st.STOPPED:
        raise st.ContainerError(f"container {c.id} is not running")
    try:
        if status == st.PAUSED:  # a frozen guest cannot deliver it: thaw first, as runc does
            request(c, PauseRequest(False), "resume")
        request(c, SignalRequest(signo), "kill")
    except Error:
        if signo != signal.SIGKILL or not isinstance(record.get("pid"), int):
            raise
        _kill_process(record["pid"], signal.SIGKILL)  # the VM does not answer: end its owner
    return 0


def _kill_process(pid: int, signo: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signo)


def cmd_delete(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    c = st.container(root, args.id)
    if not c.path.exists():
        if args.force:
            return 0
        raise st.ContainerError(f"container does not exist: {c.id}")
    try:
        record = c.read()
    except st.ContainerError:
        record = {}
    status = c.status(record) if record else (st.CREATING if c.alive() else st.STOPPED)
    if status not in (st.STOPPED, st.CREATED) and not args.force:
        raise st.ContainerError(f"cannot delete container {c.id} in state {status}; "
                                "use --force")
    pid = record.get("pid")
    if c.alive() and isinstance(pid, int):
        _kill_process(pid, signal.SIGTERM)  # it tears its VM down and exits
        deadline = time.monotonic() + DELETE_GRACE
        while c.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if c.alive():
            _kill_process(pid, signal.SIGKILL)  # QEMU and passt die with it
            while c.alive() and time.monotonic() < deadline + 5:
                time.sleep(0.02)
    state = c.state() if record else {}
    c.remove()
    _run_hooks("poststop", record, state, log)
    log.write("info", f"container {c.id} deleted")
    return 0


def cmd_pause(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    return _pause(root, args.id, True)


def cmd_resume(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    return _pause(root, args.id, False)


def _pause(root: Path, container_id: str, pause: bool) -> int:
    from ..detached.client import request
    from ..detached.protocol import PauseRequest

    c = _existing(root, container_id)
    status = c.status()
    want = st.RUNNING if pause else st.PAUSED
    if status != want:
        raise st.ContainerError(f"container {c.id} is {status}, not {want}")
    request(c, PauseRequest(pause), "pause" if pause else "resume")
    return 0


# ---- exec ---------------------------------------------------------------------------------

def cmd_exec(root: Path, args: Any, g: Any, log: st.RuntimeLog) -> int:
    from ..detached.client import exec_in
    from ..detached.protocol import ExecRequest
    from . import config as oci_config

    c = _existing(root, args.id)
    status = c.status()
    if status != st.RUNNING and not (status == st.CREATED and args.ignore_paused):
        raise st.ContainerError(f"cannot exec in container {c.id} in state {status}")
    if args.process:
        p = oci_config.parse_process(oci_config.load_json(
            oci_config.read_file(Path(args.process), "process.json"), "process.json"))
    else:
        command = [a for a in args.command if a != "--"] if args.command else []
        p = oci_config.parse_process({"args": command, "env": args.env,
                                      "cwd": args.cwd or "/", "terminal": args.tty},
                                     "the command line")
    if p.terminal and args.detach and not args.console_socket:
        raise UsageError("a detached exec with a terminal needs --console-socket")
    slave = _send_new_pty(args.console_socket) if p.terminal and args.console_socket \
        else None
    from .. import terminal
    from .shim import make_controlling_raw

    req = ExecRequest(argv=p.args, env=p.env, cwd=p.cwd, user=p.user, stdin=True,
                      rlimits=p.rlimits,
                      tty=p.terminal, winsize=terminal.winsize(slave if slave is not None
                                                               else 0) if p.terminal else None)
    proc = exec_in(c, req)  # connected before we return: the exec has started
    if not args.detach:
        if slave is not None:
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            with contextlib.suppress(termios.error):
                tty.setraw(0)
        return _relay(c, proc, p.terminal)
    pid = os.fork()
    if pid == 0:  # the exec's process: relays its stdio and exits with its status
        code = 255
        try:
            if slave is not None:
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                make_controlling_raw(0)
            else:
                os.setsid()
            code = _relay(c, proc, p.terminal)
        finally:
            os._exit(code)
    proc.release()
    if slave is not None:
        os.close(slave)
    if args.pid_file:
        atomic_write_bytes(Path(args.pid_file), str(pid).encode())
    return 0


def _relay(c: st.Container, proc: Any, tty: bool) -> int:
    from .. import terminal

    marker = c.path / "execs" / str(os.getpid())
    with contextlib.suppress(OSError):
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    try:
        status = terminal.pump(proc, stdin_fd=0, tty_fd=0 if tty else None)
    except Error as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 255
    finally:
        with contextlib.suppress(OSError):
            marker.unlink()
    if status.error:
        print(f"{PROG}: {status.error}", file=sys.stderr)
    return status.exit_code


if __name__ == "__main__":
    sys.exit(main())
