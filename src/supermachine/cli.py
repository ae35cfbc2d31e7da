"""The `supermachine` command: argument parsing and printing; the work is the public API's.

Imports of the heavy parts happen inside the command functions, so `supermachine --help`
and every command pay only for what they use (Python start-up counts in every figure).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .errors import Error, UsageError, VMError
from .interrupts import Interrupts

PROG = "supermachine"
#: SIGINT/SIGTERM/SIGHUP handling of this process (see interrupts.py)
INTERRUPTS = Interrupts()


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an environment variable (KEY alone copies it from here)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the VM")
    p.add_argument("-u", "--user", metavar="USER", help="user[:group] or uid[:gid] to run as")
    p.add_argument("--entrypoint", metavar="CMD", help="override the image's entrypoint")
    p.add_argument("-m", "--memory", default="512M", help="guest memory (default 512M)")
    p.add_argument("--cpus", default="1", help="virtual CPUs (default 1)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="keep stdin open even when it is a terminal")
    p.add_argument("-t", "--tty", action="store_true",
                   help="give the command a terminal (raw mode here; use with -i)")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background and print the VM's name")
    p.add_argument("--name", metavar="NAME", help="name of a detached VM (default: generated)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="accelerator (default: hardware KVM when usable, else TCG)")
    p.add_argument("--kernel", metavar="PATH", help="guest kernel to boot instead of the default")
    p.add_argument("--initrd", metavar="PATH", help="initramfs to use with --kernel")
    p.add_argument("--pull", choices=["always", "missing", "never"], default="missing",
                   help="pull a registry image before running (default: missing)")
    p.add_argument("--no-snapshot", action="store_true",
                   help="boot cold instead of restoring the image's automatic snapshot")
    p.add_argument("--hostname", metavar="NAME",
                   help="the VM's hostname (default: localhost; a detached VM's name)")
    p.add_argument("--machine-id", metavar="ID|random",
                   help="write /etc/machine-id in the VM: 32 hex digits, or 'random' for a "
                        "fresh one (default: the image's own)")
    _add_network_options(p)
    _add_registry_options(p)


def _add_network_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--publish", action="append", default=[],
                   metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]",
                   help="publish a guest port on the host (127.0.0.1 unless HOSTIP is given; "
                        "HOSTPORT empty or 0: any free port)")
    p.add_argument("-P", "--publish-all", action="store_true",
                   help="publish the image's exposed ports on free host ports")
    p.add_argument("--network", choices=["user", "none"], default="user",
                   help="user: outbound access through passt (default); none: no interface")
    p.add_argument("--allow-host", action="append", default=[], metavar="CIDR|NAME",
                   help="allow outbound traffic only to these (repeatable; names are "
                        "resolved here at start); default: anywhere but this host")
    p.add_argument("--allow-host-loopback", action="store_true",
                   help="let the guest reach this host's 127.0.0.1 services at 10.0.2.2")


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from a multi-platform image (default: this host's)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP / unverified TLS for this registry")
    p.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify registries with")
    p.add_argument("-q", "--quiet", action="store_true", help="no pull progress output")


class _Parser(argparse.ArgumentParser):
    """No prefix matching of long options, here and in every subcommand (the subparsers
    are made of this class too): `run --init` must not silently mean `--initrd`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Run OCI/Docker images as isolated microVMs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show boot output, QEMU's command line and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="show boot output")
    parser.add_argument("--home", metavar="DIR",
                        help="state and cache directory (default: $SUPERMACHINE_HOME or "
                             "~/.cache/supermachine)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a command in a new VM from an image",
                         description="Boot IMAGE in a fresh microVM and run its entrypoint "
                                     "and command (CMD replaces the image's Cmd).")
    _add_run_options(run)
    run.add_argument("image", metavar="IMAGE",
                     help="OCI layout dir, oci-archive or docker-archive (oci:, oci-archive:, "
                          "docker-archive: prefixes accepted)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ...")
    run.set_defaults(func=cmd_run)

    pull = sub.add_parser("pull", help="download an image from a registry")
    _add_registry_options(pull)
    pull.add_argument("image", metavar="REF",
                      help="e.g. alpine, ghcr.io/o/r:tag, host:5000/r@sha256:...")
    pull.set_defaults(func=cmd_pull)

    images = sub.add_parser("images", help="list pulled images")
    images.add_argument("--digests", action="store_true", help="show manifest digests")
    images.set_defaults(func=cmd_images)

    rmi = sub.add_parser("rmi", help="remove pulled images")
    rmi.add_argument("images", nargs="+", metavar="REF|DIGEST")
    rmi.set_defaults(func=cmd_rmi)

    prune = sub.add_parser("prune", help="delete blobs and root filesystems no image uses")
    prune.set_defaults(func=cmd_prune)

    login = sub.add_parser("login", help="save registry credentials (~/.docker/config.json)")
    login.add_argument("registry", metavar="REGISTRY")
    login.add_argument("-u", "--username", required=True)
    login.add_argument("-p", "--password", help="password (prefer --password-stdin)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]")
    login.add_argument("--ca-file", metavar="PEM")
    login.set_defaults(func=cmd_login)

    logout = sub.add_parser("logout", help="forget registry credentials")
    logout.add_argument("registry", metavar="REGISTRY")
    logout.set_defaults(func=cmd_logout)
    _add_vm_commands(sub)
    _add_snapshot_commands(sub)
    return parser


def _add_snapshot_commands(sub) -> None:
    snap = sub.add_parser("snapshot", help="save a running detached VM as a named snapshot",
                          description="Save VM (as warmed up so far) as snapshot NAME; start "
                                      "VMs from it with `run snapshot:NAME`.")
    snap.add_argument("vm", metavar="VM")
    snap.add_argument("name", metavar="NAME")
    snap.set_defaults(func=cmd_snapshot)

    snaps = sub.add_parser("snapshots", help="list named snapshots (`snapshots rm NAME` removes)")
    snaps.add_argument("action", nargs="?", choices=["ls", "rm"], default="ls")
    snaps.add_argument("names", nargs="*", metavar="NAME")
    snaps.set_defaults(func=cmd_snapshots)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from . import detached, remote
    from .snapshot import check_name

    d = detached.find(_home(args), args.vm)
    remote.request_snapshot(d, check_name(args.name))
    print(args.name)
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    import time

    from . import snapshot
    from .images.progress import human_size

    home = _home(args)
    if args.action == "rm":
        if not args.names:
            raise UsageError("snapshots rm: name at least one snapshot")
        for name in args.names:
            snapshot.remove_named(home, name)
            print(name)
        return 0
    if args.names:
        raise UsageError("snapshots: names are only taken by `snapshots rm`")
    rows = [("NAME", "IMAGE", "MEMORY", "CREATED", "SIZE")]
    for s in snapshot.list_named(home):
        on_disk = sum(f.stat().st_blocks * 512 for f in (s.mem, s.state) if f.exists())
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.meta.get("created", 0)))
        rows.append((s.name, str(s.meta.get("image_source", "?")),
                     f"{s.inputs.get('memory_mib')}M", created, human_size(on_disk)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _add_vm_commands(sub) -> None:
    """Commands on detached VMs (`run -d`), found by name from any shell of the same user."""
    ex = sub.add_parser("exec", help="run a command in a running detached VM")
    ex.add_argument("-i", "--interactive", action="store_true", help="pass stdin through")
    ex.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]",
                    help="set an environment variable (KEY alone copies it from here)")
    ex.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the VM")
    ex.add_argument("-u", "--user", metavar="USER", help="user[:group] or uid[:gid] to run as")
    ex.add_argument("vm", metavar="VM")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ...")
    ex.set_defaults(func=cmd_exec)

    cp = sub.add_parser("cp", help="copy a file between here and a VM (VM:PATH on one side)")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    cp.set_defaults(func=cmd_cp)

    ps = sub.add_parser("ps", help="list detached VMs")
    ps.add_argument("-a", "--all", action="store_true", help="include stopped VMs")
    ps.add_argument("-q", "--quiet", action="store_true", help="names only")
    ps.set_defaults(func=cmd_ps)

    logs = sub.add_parser("logs", help="show the output of a detached VM's main command")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the VM exits")
    logs.add_argument("vm", metavar="VM")
    logs.set_defaults(func=cmd_logs)

    stop = sub.add_parser("stop", help="stop detached VMs (stop signal, then kill)")
    stop.add_argument("-t", "--time", type=float, default=10.0, metavar="SECS",
                      help="seconds to wait before killing (default 10)")
    stop.add_argument("vms", nargs="+", metavar="VM")
    stop.set_defaults(func=cmd_stop)

    rm = sub.add_parser("rm", help="remove stopped detached VMs")
    rm.add_argument("-f", "--force", action="store_true", help="stop running ones first")
    rm.add_argument("vms", nargs="+", metavar="VM")
    rm.set_defaults(func=cmd_rm)

    inspect = sub.add_parser("inspect", help="show detached VMs' state as JSON")
    inspect.add_argument("vms", nargs="+", metavar="VM")
    inspect.set_defaults(func=cmd_inspect)


# ---- commands ---------------------------------------------------------------------------

def _home(args: argparse.Namespace):
    from pathlib import Path

    from .home import Home

    return Home(Path(os.path.abspath(args.home))) if args.home else Home.default()


def _machine(args: argparse.Namespace):
    """The VM an attached `run` (with or without -t) boots."""
    from .vm import VM
    from .workload import parse_cpus, parse_memory

    return VM(
        args.image, memory=parse_memory(args.memory), cpus=parse_cpus(args.cpus),
        accel=args.accel, kernel=args.kernel, initrd=args.initrd, home=_home(args),
        verbose=args.verbose or args.debug, on_notice=_notice, pull=args.pull,
        platform=args.platform, registry_options=_registry_options(args),
        snapshot=not args.no_snapshot, **_vm_kwargs(args))


def cmd_run(args: argparse.Namespace) -> int:
    if args.detach:
        return _run_detached(args)
    if args.name:
        raise UsageError("--name is for detached VMs: add -d")
    if args.tty:
        return _run_tty(args)
    stdin_piped = not os.isatty(0) if _fd_open(0) else False
    forward_stdin = args.interactive or stdin_piped
    machine = _machine(args)
    with INTERRUPTS.guarding(machine), machine:
        return machine.run_workload(
            cmd=args.cmd or None,
            entrypoint=args.entrypoint,
            env=args.env,
            workdir=args.workdir,
            user=args.user,
            stdin_fd=0 if forward_stdin else None,
            stdout_fd=1,
            stderr_fd=2,
        )


def _vm_options(args: argparse.Namespace) -> dict[str, object]:
    """How a detached VM's supervisor boots the VM and runs the workload (JSON-able)."""
    from .workload import parse_cpus, parse_memory

    return {
        "memory": parse_memory(args.memory), "cpus": parse_cpus(args.cpus),
        "accel": args.accel, "kernel": _abspath(args.kernel), "initrd": _abspath(args.initrd),
        "pull": args.pull, "platform": args.platform,
        "insecure": list(args.insecure_registry), "ca_file": _abspath(args.ca_file),
        "verbose": args.verbose or args.debug, "snapshot": not args.no_snapshot,
        "entrypoint": args.entrypoint, "cmd": list(args.cmd), "env": _expand_env(args.env),
        "workdir": args.workdir, "user": args.user, "stdin": args.interactive, "tty": args.tty,
        "vm_kwargs": _vm_kwargs(args),
    }


def _vm_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """VM keyword arguments from the networking and identity options of `run` (see
    supervisor.VM_KWARGS), checked now so a detached VM fails here, not in its supervisor.

    Values must be JSON-able: detached VMs carry them to the supervisor in state.json.
    """
    from .workload import parse_hostname, parse_machine_id

    return {"network": args.network, "ports": list(args.publish),
            "publish_all": args.publish_all, "allow_hosts": list(args.allow_host),
            "allow_host_loopback": args.allow_host_loopback,
            "hostname": parse_hostname(args.hostname),
            "machine_id": parse_machine_id(args.machine_id)}


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _expand_env(items: Sequence[str]) -> list[str]:
    """`-e KEY` copies KEY from here (dropped if unset), as docker does; KEY=VALUE stays."""
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not key or "\0" in item:
            raise UsageError(f"invalid environment variable {item!r}: expected KEY=VALUE")
        if sep:
            out.append(item)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def _run_detached(args: argparse.Namespace) -> int:
    from .detached import validate_name
    from .supervisor import launch

    name = launch(_home(args), validate_name(args.name) if args.name else None,
                  _image_arg(args.image), _vm_options(args))
    print(name)
    return 0


def _image_arg(image: str) -> str:
    """Local paths are made absolute: the supervisor runs from /."""
    from .images.source import parse_source

    src = parse_source(image)
    if src is None:
        return image
    path = os.path.abspath(src.path)
    if src.kind == "auto":
        return path
    return f"{src.kind}:{path}" + (f":{src.tag}" if src.tag else "")


def _run_tty(args: argparse.Namespace) -> int:
    """Attached `run -t`: the workload on a guest terminal, this terminal in raw mode."""
    from . import terminal
    from .workload import resolve

    terminal.require_tty(0)
    machine = _machine(args)
    with INTERRUPTS.guarding(machine), machine:
        cfg = machine.image.config
        work = resolve(entrypoint=cfg.entrypoint, cmd=cfg.cmd, env=cfg.env,
                       working_dir=cfg.working_dir, user=cfg.user,
                       entrypoint_override=args.entrypoint, cmd_override=args.cmd or None,
                       env_overrides=args.env, workdir_override=args.workdir,
                       user_override=args.user, caller_env=os.environ)
        proc = machine.spawn(list(work.argv), env=list(work.env), cwd=work.cwd, user=work.user,
                             stdin=args.interactive, tty=True, winsize=terminal.winsize(0))
        with proc, terminal.raw_mode(0):
            status = terminal.pump(proc, stdin_fd=0 if args.interactive else None, tty_fd=0)
    return _report_exit(status)


def _report_exit(status) -> int:
    if status.error:
        print(f"{PROG}: {status.error}", file=sys.stderr)
    return status.exit_code


def cmd_exec(args: argparse.Namespace) -> int:
    from . import detached, remote, terminal
    from .control import ExecRequest

    if not args.cmd:
        raise UsageError("exec needs a command after the VM name")
    if args.tty:
        terminal.require_tty(0)
    d = detached.find(_home(args), args.vm)
    if not d.state_now().running:
        raise VMError(f"VM {d.name} is not running; start a new one with `supermachine run -d`")
    req = ExecRequest(argv=tuple(args.cmd), env=tuple(_expand_env(args.env)), cwd=args.workdir,
                      user=args.user, stdin=args.interactive, tty=args.tty,
                      winsize=terminal.winsize(0) if args.tty else None)
    with remote.exec_in(d, req) as proc:
        raw = terminal.raw_mode(0) if args.tty and args.interactive else _nothing()
        with raw:
            status = terminal.pump(proc, stdin_fd=0 if args.interactive else None,
                                   tty_fd=0 if args.tty else None)
    return _report_exit(status)


@contextlib.contextmanager
def _nothing():
    yield


def _split_vm_path(arg: str) -> tuple[str | None, str]:
    """`NAME:PATH` -> (NAME, PATH); a local path (with a / before any colon) -> (None, arg)."""
    from .detached import NAME_RE

    name, sep, path = arg.partition(":")
    if sep and NAME_RE.match(name):
        return name, path
    return None, arg


def cmd_cp(args: argparse.Namespace) -> int:
    from . import detached, remote

    src_vm, src = _split_vm_path(args.src)
    dst_vm, dst = _split_vm_path(args.dst)
    if (src_vm is None) == (dst_vm is None):
        raise UsageError("cp copies between here and a VM: give VM:PATH as exactly one side")
    home = _home(args)
    if dst_vm is not None:  # host -> VM
        d = detached.find(home, dst_vm)
        _need_running(d)
        if os.path.isdir(src):
            raise UsageError(f"{src} is a directory; cp copies files (tar it, copy the "
                             "archive, and `exec ... tar x` it)")
        target = _guest_abs(dst)
        if target.endswith("/"):
            target += os.path.basename(src)
        with open(src, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode & 0o7777
            try:
                remote.write_file_from(d, target, f, mode)
            except VMError as e:
                if not remote.is_dir_error(e):
                    raise
                f.seek(0)  # DST is a directory in the VM: copy into it, as cp does
                remote.write_file_from(d, f"{target}/{os.path.basename(src)}", f, mode)
        return 0
    d = detached.find(home, src_vm)  # VM -> host
    _need_running(d)
    source = _guest_abs(src)
    if dst == "-":
        remote.read_file_to(d, source, sys.stdout.buffer)
        sys.stdout.flush()
        return 0
    target = os.path.join(dst, os.path.basename(source.rstrip("/"))) if os.path.isdir(dst) \
        else dst
    from pathlib import Path

    from .home import atomic_path

    try:
        with atomic_path(Path(target)) as tmp, open(tmp, "wb") as f:
            remote.read_file_to(d, source, f)
    except VMError as e:
        if remote.is_dir_error(e):
            raise VMError(f"{source} is a directory in the VM; cp copies files (tar it "
                          "there with `exec`, then copy the archive)") from None
        raise
    return 0


def _guest_abs(path: str) -> str:
    if not path:
        raise UsageError("give a path after VM:")
    return path if path.startswith("/") else "/" + path


def _need_running(d) -> None:
    if not d.state_now().running:
        raise VMError(f"VM {d.name} is not running; files of stopped VMs are gone with them")


def cmd_ps(args: argparse.Namespace) -> int:
    import shlex
    import time

    from . import detached

    now = time.time()
    states = [s for s in detached.list_states(_home(args)) if args.all or s.running]
    if args.quiet:
        for s in states:
            print(s.record.name)
        return 0
    rows = [("NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS")]
    for s in states:
        r = s.record
        command = shlex.join(r.command)
        if len(command) > 30:
            command = command[:29] + "…"
        rows.append((r.name, _short_image(r.image), f'"{command}"',
                     f"{detached.human_duration(now - r.created)} ago",
                     detached.status_text(s, now),
                     ", ".join(r.ports) if s.running else ""))
    _print_table(rows)
    return 0


def _short_image(image: str) -> str:
    return image if len(image) <= 40 else "…" + image[-39:]


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_logs(args: argparse.Namespace) -> int:
    import time

    from . import detached
    from .control import Decoder, Kind

    d = detached.find(_home(args), args.vm)
    decoder = Decoder()
    out = {Kind.STDOUT: sys.stdout.buffer, Kind.STDERR: sys.stderr.buffer}
    try:
        f = open(d.log, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return 0
    with f:
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                for frame in decoder.feed(chunk):
                    stream = out.get(frame.kind)
                    if stream is not None:
                        stream.write(frame.payload)
                        stream.flush()
                continue
            if not args.follow:
                break
            if not d.alive():
                # The supervisor is gone: whatever it wrote is there now; read it and stop.
                if not (rest := f.read()):
                    break
                f.seek(-len(rest), os.SEEK_CUR)
                continue
            time.sleep(0.1)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from . import detached

    home = _home(args)
    for name in args.vms:
        d = detached.find(home, name)
        _stop(d, args.time)
        print(name)
    return 0


def _stop(d, timeout: float) -> None:
    """Stop signal, kill after ``timeout``; returns once the supervisor (and QEMU) is gone."""
    import time

    from . import remote

    if not d.alive():
        return
    try:
        remote.request_stop(d, timeout)
    except VMError:
        _signal_supervisor(d, signal.SIGTERM)  # still starting: no socket yet
    deadline = time.monotonic() + timeout + 30
    killed = False
    while d.alive():
        if time.monotonic() > deadline:
            if killed:
                raise VMError(f"VM {d.name} does not stop; its supervisor pid is in "
                              f"`supermachine inspect {d.name}`")
            _signal_supervisor(d, signal.SIGKILL)  # QEMU dies with it (PR_SET_PDEATHSIG)
            killed = True
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def _signal_supervisor(d, signo: int) -> None:
    try:
        pid = d.read().supervisor_pid
    except VMError:
        return
    # The lock is still held, so the recorded pid is the live supervisor's, not a reused one.
    if pid and d.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signo)


def cmd_rm(args: argparse.Namespace) -> int:
    from . import detached

    home = _home(args)
    failed = 0
    for name in args.vms:
        try:
            d = detached.find(home, name)
            if d.alive():
                if not args.force:
                    raise VMError(f"VM {name} is running; stop it first or use `rm -f`")
                _stop(d, 0)
            detached.remove(d)
            print(name)
        except VMError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            failed = 1
    return failed


def cmd_inspect(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from datetime import UTC, datetime

    from . import detached

    def iso(t: float | None) -> str | None:
        return datetime.fromtimestamp(t, UTC).isoformat() if t else None

    home = _home(args)
    out = []
    for name in args.vms:
        s = detached.find(home, name).state_now()
        r = s.record
        info = asdict(r)
        info.update(created=iso(r.created), started=iso(r.started), finished=iso(r.finished))
        info["state"] = {"status": s.status, "running": s.running, "dead": s.status == "dead",
                         "exit_code": r.exit_code, "error": r.error}
        out.append(info)
    print(json.dumps(out, indent=2))
    return 0


def _registry_options(args: argparse.Namespace) -> dict[str, object]:
    from .images.progress import make_progress

    return {"insecure_registries": tuple(args.insecure_registry), "ca_file": args.ca_file,
            "progress": make_progress(sys.stderr, quiet=args.quiet)}


def cmd_pull(args: argparse.Namespace) -> int:
    from .images.pull import pull

    image = pull(args.image, _home(args), platform=args.platform, **_registry_options(args))
    print(image.manifest_digest or image.config_digest)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from .images import store
    from .images.progress import human_size

    rows = [("REFERENCE", "PLATFORM", "DIGEST" if args.digests else "IMAGE ID", "CREATED",
             "SIZE")]
    for info in store.list_images(_home(args)):
        ident = info.manifest_digest if args.digests else info.config_digest[7:19]
        rows.append((info.name, info.platform, ident, (info.created or "-")[:19],
                     human_size(info.size)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from .images import store

    home = _home(args)
    for ref in args.images:
        for removed in store.remove_image(home, ref):
            print(f"Untagged: {removed}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .bake import bake_version
    from .engine import default_engine
    from .guest.kernel import prune_stale_layouts
    from .images import store
    from .images.progress import human_size
    from .snapshot import prune_auto

    home = _home(args)
    result = store.prune(home)
    snapshots = prune_auto(home, default_engine().identity(), bake_version())
    prune_stale_layouts(home)
    print(f"Deleted {result.blobs_removed} blobs and {len(snapshots)} stale automatic "
          f"snapshots, reclaimed {human_size(result.bytes_freed)} of blobs")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from .images import registry

    if args.password_stdin:
        password = sys.stdin.read().rstrip("\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass

        password = getpass.getpass("Password: ")
    registry.login(args.registry, args.username, password,
                       insecure_registries=tuple(args.insecure_registry), ca_file=args.ca_file)
    print("Login Succeeded")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from .images import auth

    if auth.logout(args.registry):
        print(f"Removing login credentials for {args.registry}")
    else:
        print(f"Not logged in to {args.registry}")
    return 0


# ---- plumbing ---------------------------------------------------------------------------

def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _notice(message: str) -> None:
    """One-line notices to the user (e.g. which accelerator), on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    INTERRUPTS.install()
    try:
        status = args.func(args)
        # A signal killed the VM: whatever the workload's status, the run was interrupted.
        return INTERRUPTS.exit_code if INTERRUPTS.exit_code is not None else status
    except Error as e:
        if INTERRUPTS.exit_code is not None:
            return INTERRUPTS.exit_code  # the error is the VM dying of the signal
        if args.debug:
            raise
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # SIGINT raised by code run before main() installed ours
        if args.debug:
            raise
        return 130
    except BrokenPipeError:
        return 141
    except OSError as e:
        if args.debug:
            raise
        print(f"{PROG}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 125
    except Exception as e:  # a bug of ours: still one line, the traceback is behind --debug
        if args.debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (run with --debug for "
              "details)", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main())
