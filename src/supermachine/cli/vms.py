"""Commands on detached VMs (`run -d`), found by name from any shell of the same user:
exec, cp, ps, logs, stop, rm, inspect. The work is detached/client.py's."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError, VMError
from .common import PROG, print_table, report_exit, vms_of


def add_exec(sub) -> None:
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


def add_cp(sub) -> None:
    cp = sub.add_parser("cp", help="copy a file between here and a VM (VM:PATH on one side)")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    cp.set_defaults(func=cmd_cp)


def add_ps(sub) -> None:
    ps = sub.add_parser("ps", help="list detached VMs")
    ps.add_argument("-a", "--all", action="store_true", help="include stopped VMs")
    ps.add_argument("-q", "--quiet", action="store_true", help="names only")
    ps.set_defaults(func=cmd_ps, logs_nothing=True)


def add_logs(sub) -> None:
    logs = sub.add_parser("logs", help="show the output of a detached VM's main command")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the VM exits")
    logs.add_argument("vm", metavar="VM")
    logs.set_defaults(func=cmd_logs, logs_nothing=True)


def add_stop(sub) -> None:
    stop = sub.add_parser("stop", help="stop detached VMs (stop signal, then kill)")
    stop.add_argument("-t", "--time", type=float, default=10.0, metavar="SECS",
                      help="seconds to wait before killing (default 10)")
    stop.add_argument("vms", nargs="+", metavar="VM")
    stop.set_defaults(func=cmd_stop)


def add_rm(sub) -> None:
    rm = sub.add_parser("rm", help="remove stopped detached VMs")
    rm.add_argument("-f", "--force", action="store_true", help="stop running ones first")
    rm.add_argument("vms", nargs="+", metavar="VM")
    rm.set_defaults(func=cmd_rm)


def add_inspect(sub) -> None:
    inspect = sub.add_parser("inspect", help="show detached VMs' state as JSON")
    inspect.add_argument("vms", nargs="+", metavar="VM")
    inspect.set_defaults(func=cmd_inspect, logs_nothing=True)


#: this group's commands, in the order `--help` lists them: name -> adds its parser

def cmd_exec(args: argparse.Namespace) -> int:
    from .. import terminal
    from ..detached import client, state
    from ..detached.protocol import ExecRequest
    from ..spec import env_items

    if not args.cmd:
        raise UsageError("exec needs a command after the VM name")
    if args.tty:
        terminal.require_tty(0)
    d = state.find(vms_of(args), args.vm)
    if not d.state_now().running:
        raise VMError(f"VM {d.name} is not running; start a new one with `supermachine run -d`")
    req = ExecRequest(argv=tuple(args.cmd), env=env_items(args.env, os.environ),
                      cwd=args.workdir, user=args.user, stdin=args.interactive, tty=args.tty,
                      winsize=terminal.winsize(0) if args.tty else None)
    import contextlib  # here, not at the top: 1 ms of `ps`

    with client.exec_in(d, req) as proc:
        raw = terminal.raw_mode(0) if args.tty and args.interactive else \
            contextlib.nullcontext()
        with raw:
            status = terminal.pump(proc, stdin_fd=0 if args.interactive else None,
                                   tty_fd=0 if args.tty else None)
    return report_exit(status)


def split_vm_path(arg: str) -> tuple[str | None, str]:
    """`NAME:PATH` -> (NAME, PATH); a local path (with a / before any colon) -> (None, arg)."""
    from ..detached.state import NAME_RE

    name, sep, path = arg.partition(":")
    if sep and NAME_RE.match(name):
        return name, path
    return None, arg


def cmd_cp(args: argparse.Namespace) -> int:
    from ..detached import client, state

    src_vm, src = split_vm_path(args.src)
    dst_vm, dst = split_vm_path(args.dst)
    if (src_vm is None) == (dst_vm is None):
        raise UsageError("cp copies between here and a VM: give VM:PATH as exactly one side")
    vms = vms_of(args)
    if dst_vm is not None:  # host -> VM
        d = state.find(vms, dst_vm)
        _need_running(d)
        client.copy_in(d, src, _guest_abs(dst))
        return 0
    d = state.find(vms, src_vm)  # VM -> host
    _need_running(d)
    if dst == "-":
        client.read_file_to(d, _guest_abs(src), sys.stdout.buffer)
        sys.stdout.flush()
    else:
        client.copy_out(d, _guest_abs(src), dst)
    return 0


def _guest_abs(path: str) -> str:
    if not path:
        raise UsageError("give a path after VM:")
    return path if path.startswith("/") else "/" + path


def _need_running(d) -> None:
    if not d.state_now().running:
        raise VMError(f"VM {d.name} is not running; files of stopped VMs are gone with them")


def cmd_ps(args: argparse.Namespace) -> int:
    import time

    from ..detached import state

    now = time.time()
    states = [s for s in state.list_states(vms_of(args)) if args.all or s.running]
    if args.quiet:
        for s in states:
            print(s.record.name)
        return 0
    rows = [("NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "MOUNTS")]
    if states:
        import shlex  # only to show commands: no VMs, no import
    for s in states:
        r = s.record
        command = shlex.join(r.command)
        if len(command) > 30:
            command = command[:29] + "…"
        image = r.image if len(r.image) <= 40 else "…" + r.image[-39:]
        rows.append((r.name, image, f'"{command}"',
                     f"{state.human_duration(now - r.created)} ago",
                     state.status_text(s, now),
                     ", ".join(r.ports) if s.running else "", _mounts_text(r.options)))
    print_table(rows)
    return 0


def _mounts_text(options: dict) -> str:
    """A detached VM's mounts for `ps`: SOURCE:TARGET[:ro] (tmpfs for a tmpfs)."""
    vm = options.get("vm") if isinstance(options, dict) else None
    mounts = vm.get("mounts") if isinstance(vm, dict) else None
    out = []
    for m in mounts if isinstance(mounts, list) else ():
        if isinstance(m, dict):
            text = f"{m.get('source') or 'tmpfs'}:{m.get('target')}"
            out.append(text + (":ro" if m.get("readonly") else ""))
    return ", ".join(out)


def cmd_logs(args: argparse.Namespace) -> int:
    import contextlib
    import time

    from ..detached import state
    from ..detached.logfile import rotated
    from ..detached.protocol import Decoder, Kind

    d = state.find(vms_of(args), args.vm)
    out = {Kind.STDOUT: sys.stdout.buffer, Kind.STDERR: sys.stderr.buffer}

    def emit(decoder: Decoder, chunk: bytes) -> None:
        for frame in decoder.feed(chunk):
            stream = out.get(frame.kind)
            if stream is not None:
                stream.write(frame.payload)
                stream.flush()

    # A decoder per file: frames never straddle two files (logfile.py).
    with contextlib.suppress(FileNotFoundError), open(rotated(d.log), "rb") as older:
        decoder = Decoder()
        while chunk := older.read(1 << 16):
            emit(decoder, chunk)
    try:
        f = open(d.log, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return 0
    try:
        decoder = Decoder()
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                emit(decoder, chunk)
                continue
            if not args.follow:
                break
            if _replaced(d.log, f):  # rotated: this file is complete, go on with the new one
                f.close()
                f = open(d.log, "rb")  # noqa: SIM115
                decoder = Decoder()
                continue
            if not d.alive():
                # The supervisor is gone: whatever it wrote is there now; read it and stop.
                if not (rest := f.read()):
                    break
                f.seek(-len(rest), os.SEEK_CUR)
                continue
            time.sleep(0.1)
    finally:
        f.close()
    return 0


def _replaced(path, f) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def cmd_stop(args: argparse.Namespace) -> int:
    from ..detached import client, state

    vms = vms_of(args)
    for name in args.vms:
        client.stop(state.find(vms, name), args.time)
        print(name)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..detached import client, state

    vms = vms_of(args)
    failed = 0
    for name in args.vms:
        try:
            d = state.find(vms, name)
            if d.alive():
                if not args.force:
                    raise VMError(f"VM {name} is running; stop it first or use `rm -f`")
                client.stop(d, 0)
            state.remove(d)
            print(name)
        except VMError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            failed = 1
    return failed


def cmd_inspect(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime

    from ..detached import state

    def iso(t: float | None) -> str | None:
        return datetime.fromtimestamp(t, UTC).isoformat() if t else None

    vms = vms_of(args)
    out = []
    for name in args.vms:
        s = state.find(vms, name).state_now()
        r = s.record
        info = r.as_dict()
        info.update(created=iso(r.created), started=iso(r.started), finished=iso(r.finished))
        info["state"] = {"status": s.status, "running": s.running, "dead": s.status == "dead",
                         "exit_code": r.exit_code, "error": r.error}
        vm = r.options.get("vm") if isinstance(r.options, dict) else None
        info["mounts"] = vm.get("mounts", []) if isinstance(vm, dict) else []
        out.append(info)
    print(json.dumps(out, indent=2))
    return 0
