"""`supermachine run`: its options become one `VMSpec` and one `WorkloadSpec` (`specs`), and
the VM runs attached (output streamed here), on a terminal (`-t`), or detached (`-d`)."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from .common import add_registry_options, home_of, notice, progress_of, report_exit
from .interrupts import INTERRUPTS


def add_run(sub) -> None:
    run = sub.add_parser("run", help="run a command in a new VM from an image",
                         description="Boot IMAGE in a fresh microVM and run its entrypoint "
                                     "and command (CMD replaces the image's Cmd).")
    add_run_options(run)
    run.add_argument("image", metavar="IMAGE",
                     help="OCI layout dir, oci-archive or docker-archive (oci:, oci-archive:, "
                          "docker-archive: prefixes accepted), registry reference, or "
                          "snapshot:NAME")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD ...")
    run.set_defaults(func=cmd_run)


#: this group's commands, in the order `--help` lists them: name -> adds its parser

def add_run_options(p: argparse.ArgumentParser) -> None:
    # Defaults are the spec's (spec.py): None here means "not given".
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an environment variable (KEY alone copies it from here)")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="read environment variables from FILE (docker's format: KEY=VALUE "
                        "lines, # comments; -e wins over it)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the VM")
    p.add_argument("--ulimit", action="append", default=[], metavar="NAME=SOFT[:HARD]",
                   help="a resource limit of the workload, as docker's (e.g. nofile=1024)")
    p.add_argument("-u", "--user", metavar="USER", help="user[:group] or uid[:gid] to run as")
    p.add_argument("--entrypoint", metavar="CMD", help="override the image's entrypoint")
    p.add_argument("-m", "--memory", help="guest memory (default 512M)")
    p.add_argument("--cpus", help="virtual CPUs (default 1)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="keep stdin open even when it is a terminal")
    p.add_argument("-t", "--tty", action="store_true",
                   help="give the command a terminal (raw mode here; use with -i)")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background and print the VM's name")
    p.add_argument("--name", metavar="NAME", help="name of a detached VM (default: generated)")
    p.add_argument("--rm", action="store_true",
                   help="remove the VM when it exits (attached VMs always are; with -d its "
                        "record goes too)")
    p.add_argument("--init", action="store_true",
                   help="accepted for docker compatibility: the VM's own init (PID 1) already "
                        "reaps zombies and forwards signals to the workload")
    p.add_argument("--log-max-size", metavar="SIZE",
                   help="a detached VM's output log is rotated at SIZE, keeping one older "
                        "file (default 64m)")
    p.add_argument("-v", "--volume", action="append", default=[],
                   metavar="HOST_PATH:GUEST_PATH[:ro|:rw]",
                   help="share a host directory or file into the VM (a missing host "
                        "directory is created)")
    p.add_argument("--mount", action="append", default=[],
                   metavar="type=bind|tmpfs,source=...,target=...[,readonly]",
                   help="docker's --mount: a bind mount (the source must exist) or a tmpfs "
                        "(tmpfs-size=N)")
    p.add_argument("--tmpfs", action="append", default=[], metavar="PATH[:size=N]",
                   help="mount a tmpfs at PATH")
    p.add_argument("--read-only", action="store_true",
                   help="make the image's root filesystem read-only (mounts stay writable)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                   help="accelerator (default: hardware KVM when usable, else TCG)")
    p.add_argument("--kernel", metavar="supermachine|debian|PATH",
                   help="guest kernel: the supermachine kernel (the default once `supermachine "
                        "kernel build` has run), Debian's cloud kernel, or a kernel file")
    p.add_argument("--initrd", metavar="PATH", help="initramfs to use with --kernel PATH")
    p.add_argument("--pull", choices=["always", "missing", "never"],
                   help="pull a registry image before running (default: missing)")
    p.add_argument("--no-snapshot", action="store_true",
                   help="boot cold instead of restoring the image's automatic snapshot")
    p.add_argument("--hostname", metavar="NAME",
                   help="the VM's hostname (default: localhost; a detached VM's name)")
    p.add_argument("--machine-id", metavar="ID|random",
                   help="write /etc/machine-id in the VM: 32 hex digits, or 'random' for a "
                        "fresh one (default: the image's own)")
    p.add_argument("-p", "--publish", action="append", default=[],
                   metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]",
                   help="publish a guest port on the host (127.0.0.1 unless HOSTIP is given; "
                        "HOSTPORT empty or 0: any free port)")
    p.add_argument("-P", "--publish-all", action="store_true",
                   help="publish the image's exposed ports on free host ports")
    p.add_argument("--network", choices=["user", "none"],
                   help="user: outbound access through passt (default); none: no interface")
    p.add_argument("--allow-host", action="append", default=[], metavar="CIDR|NAME",
                   help="allow outbound traffic only to these (repeatable; names are "
                        "resolved here at start); default: anywhere but this host")
    p.add_argument("--allow-host-loopback", action="store_true",
                   help="let the guest reach this host's 127.0.0.1 services at 10.0.2.2")
    p.add_argument("--no-service", action="store_true",
                   help="run in this process even when `supermachine serve` runs (also: "
                        "SUPERMACHINE_NO_SERVICE=1)")
    add_registry_options(p)


def specs(args: argparse.Namespace, *, cwd: str | None = None,
          environ: dict[str, str] | None = None, stdin_piped: bool | None = None):
    """The VM and the workload `run` asks for: the only place its options are read.

    ``cwd``, ``environ`` and ``stdin_piped`` are the caller's (this process's by default;
    the service's, for a `run` it was handed, are the CLI's that sent it)."""
    from ..spec import KERNEL_NAMES, VMSpec, WorkloadSpec, env_items, parse_ulimit

    cwd = cwd or os.getcwd()
    environ = os.environ if environ is None else environ

    def path(p: str | None) -> str | None:
        return p and os.path.abspath(os.path.join(cwd, os.path.expanduser(p)))

    given = {"memory": args.memory, "cpus": args.cpus, "accel": args.accel,
             "pull": args.pull, "network": args.network}
    vm = VMSpec.create(
        _image_arg(args.image, cwd),
        kernel=args.kernel if args.kernel in KERNEL_NAMES else path(args.kernel),
        initrd=path(args.initrd), platform=args.platform,
        insecure_registries=tuple(args.insecure_registry), ca_file=path(args.ca_file),
        snapshot=not args.no_snapshot, hostname=args.hostname, machine_id=args.machine_id,
        ports=args.publish, publish_all=args.publish_all, allow_hosts=tuple(args.allow_host),
        allow_host_loopback=args.allow_host_loopback, mounts=_mounts(args, cwd),
        read_only=args.read_only, **{k: v for k, v in given.items() if v is not None})
    if stdin_piped is None:
        from ..fdio import stdin_kind

        stdin_piped = stdin_kind() == "pipe"
    stdin = args.interactive or (not args.tty and stdin_piped)
    env = [item for p in args.env_file for item in _env_file(path(p), environ)]
    work = WorkloadSpec(
        entrypoint=None if args.entrypoint is None else (args.entrypoint,),
        cmd=tuple(args.cmd), env=(*env, *env_items(args.env, environ)), workdir=args.workdir,
        user=args.user, stdin=stdin, tty=args.tty,
        rlimits=tuple(parse_ulimit(u) for u in args.ulimit))
    return vm, work


def _check_detach_options(args: argparse.Namespace) -> None:
    if (args.name or args.log_max_size) and not args.detach:
        raise UsageError("--name and --log-max-size are for detached VMs: add -d")
    if args.name:
        from ..detached.state import validate_name

        validate_name(args.name)


def _log_cap(args: argparse.Namespace) -> int | None:
    """--log-max-size in bytes, if given."""
    if not args.log_max_size:
        return None
    from ..detached import logfile

    return logfile.parse_size(args.log_max_size)


def forwarded_run(req):
    """A `run` command line the service was handed (service/runclient.py sends it as a
    `RunArgsRequest`), read exactly as `cmd_run` reads its own: the `ForwardedRun`."""
    from ..service.core import ForwardedRun
    from .app import parse_run_argv

    args = parse_run_argv(req.argv)
    _check_detach_options(args)
    environ = dict(item.split("=", 1) for item in req.env if "=" in item)
    vm_spec, work = specs(args, cwd=req.cwd, environ=environ, stdin_piped=req.stdin == "pipe")
    if work.tty and req.stdin != "tty":
        raise UsageError("the input device is not a TTY; drop -t (use -i to pass stdin)")
    return ForwardedRun(vm_spec, work, args.detach, args.name, args.rm, _log_cap(args))


def cmd_run(args: argparse.Namespace) -> int:
    _check_detach_options(args)
    vm_spec, work = specs(args)
    if work.tty:
        from .. import terminal

        terminal.require_tty(0)  # before anything boots
    service = None if args.no_service else _service(args)
    if service is not None:
        return _run_in_service(service, args, vm_spec, work)
    if args.detach:
        from ..detached import logfile
        from ..detached.supervisor import launch

        print(launch(home_of(args), args.name, vm_spec, work,
                     verbose=args.verbose or args.debug,
                     log_max_bytes=_log_cap(args) or logfile.DEFAULT_MAX_BYTES,
                     remove=args.rm))
        return 0
    from ..runtime.vm import VM

    machine = VM(vm_spec, home=home_of(args), verbose=args.verbose or args.debug,
                 on_notice=notice, progress=progress_of(args))
    with INTERRUPTS.guarding(machine), machine:
        if not work.tty:
            return machine.run_workload(work, stdin_fd=0 if work.stdin else None)
        # `run -t`: the workload on a guest terminal, this terminal in raw mode
        with machine.start_workload(work, winsize=terminal.winsize(0)) as proc, \
                terminal.raw_mode(0):
            status = terminal.pump(proc, stdin_fd=0 if work.stdin else None, tty_fd=0)
    return report_exit(status)


def _service(args: argparse.Namespace):
    """The running service of this home, unless told not to use one."""
    from ..service import address

    if address.disabled():
        return None
    return address.find(home_of(args).root)


def _run_in_service(service, args: argparse.Namespace, vm_spec, work) -> int:
    """`run` through the service, its options parsed here (service/runclient.py)."""
    from ..detached.protocol import RunRequest, encode_request
    from ..service import runclient

    winsize = None
    if work.tty:
        from .. import terminal

        winsize = terminal.winsize(0)
    request = encode_request(RunRequest(
        vm=vm_spec.to_json(), workload=work.to_json(), detach=args.detach, name=args.name,
        remove=args.rm, log_max_bytes=_log_cap(args), winsize=winsize))
    return runclient.run_request(service.directory, request, tty=work.tty, stdin=work.stdin,
                                 detach=args.detach)


def _mounts(args: argparse.Namespace, cwd: str) -> tuple:
    """-v, --mount and --tmpfs as `Mount`s. As docker does, a missing host directory of
    -v is created (as this user), and --mount type=bind with a missing source is an error."""
    from ..spec import parse_mount_flag, parse_tmpfs, parse_volume

    volumes = [parse_volume(text, cwd) for text in args.volume]
    for m in volumes:
        if m.type == "bind" and not os.path.lexists(m.source):
            try:
                os.makedirs(m.source, 0o755)
            except OSError as e:
                raise UsageError(f"cannot create {m.source} for -v: {e.strerror}") from None
    return (*volumes, *(parse_mount_flag(text) for text in args.mount),
            *(parse_tmpfs(text) for text in args.tmpfs))


def _env_file(path: str, environ) -> tuple[str, ...]:
    from ..spec import MAX_ENV_FILE, parse_env_file

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENV_FILE + 1)
    except OSError as e:
        raise UsageError(f"--env-file {path}: {e.strerror}") from None
    return parse_env_file(data.decode("utf-8", "replace"), environ, f"--env-file {path}")


def _image_arg(image: str, cwd: str | None = None) -> str:
    """Local paths made absolute (a detached VM's supervisor runs from /)."""
    from ..images.source import parse_source

    src = parse_source(image, cwd)
    if src is None:
        return image
    path = os.path.abspath(src.path)
    if src.kind == "auto":
        return path
    return f"{src.kind}:{path}" + (f":{src.tag}" if src.tag else "")
