"""The `supermachine` command: argument parsing and printing; the work is the public API's.

Imports of the heavy parts happen inside the command functions, so `supermachine --help`
and every command pay only for what they use (Python start-up counts in every figure).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .errors import Error

PROG = "supermachine"


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
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="accelerator (default: hardware KVM when usable, else TCG)")
    p.add_argument("--kernel", metavar="PATH", help="guest kernel to boot instead of the default")
    p.add_argument("--initrd", metavar="PATH", help="initramfs to use with --kernel")
    p.add_argument("--pull", choices=["always", "missing", "never"], default="missing",
                   help="pull a registry image before running (default: missing)")
    _add_registry_options(p)


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from a multi-platform image (default: this host's)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP / unverified TLS for this registry")
    p.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify registries with")
    p.add_argument("-q", "--quiet", action="store_true", help="no pull progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run OCI/Docker images as isolated microVMs.")
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
    return parser


# ---- commands ---------------------------------------------------------------------------

def _home(args: argparse.Namespace):
    from .home import Home

    return Home(os.path.abspath(args.home)) if args.home else Home.default()


def cmd_run(args: argparse.Namespace) -> int:
    from . import vm as vm_mod
    from .workload import parse_cpus, parse_memory

    stdin_piped = not os.isatty(0) if _fd_open(0) else False
    forward_stdin = args.interactive or stdin_piped
    machine = vm_mod.VM(
        args.image,
        memory=parse_memory(args.memory),
        cpus=parse_cpus(args.cpus),
        accel=args.accel,
        kernel=args.kernel,
        initrd=args.initrd,
        home=_home(args),
        verbose=args.verbose or args.debug,
        on_notice=_notice,
        pull=args.pull,
        platform=args.platform,
        registry_options=_registry_options(args),
    )
    with machine:
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
    from .images import store
    from .images.progress import human_size

    result = store.prune(_home(args))
    print(f"Deleted {result.blobs_removed} blobs, reclaimed {human_size(result.bytes_freed)}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from .images import auth

    if args.password_stdin:
        password = sys.stdin.read().rstrip("\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass

        password = getpass.getpass("Password: ")
    auth.login(args.registry, args.username, password,
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


def _raise_exit(signum: int, _frame: object) -> None:
    # Unwind through every `with` so the VM is torn down, then exit 128+N like a shell.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        return args.func(args)
    except Error as e:
        if args.debug:
            raise
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
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
