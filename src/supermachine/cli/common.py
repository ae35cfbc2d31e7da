"""What every command group shares: the program name, the state home, one-line notices,
tables, and the registry options `run` and `pull` both take. Parsing and printing only."""

from __future__ import annotations

import os
import sys

from .options import Args, Opt

PROG = "supermachine"


def home_of(args: Args):
    from ..home import Home

    return Home(os.path.abspath(args.home)) if args.home else Home.default()


def vms_of(args: Args) -> str:
    """The detached VMs' directory (``Home.vms``) as a string, without building a Home:
    `ps`, `exec`, `stop` and the rest then never import pathlib."""
    from ..locations import VMS, home_root

    return os.path.join(os.path.abspath(args.home) if args.home else home_root(), VMS)


def notice(message: str) -> None:
    """One-line notices to the user (e.g. which accelerator), on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def report_exit(status) -> int:
    """A finished workload's exit code, after printing why it could not start, if so."""
    if status.error:
        print(f"{PROG}: {status.error}", file=sys.stderr)
    return status.exit_code


def print_table(rows: list[tuple[str, ...]], gap: str = "   ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(gap.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


REGISTRY_OPTIONS = (
    Opt("--platform", dest="platform", value=True, metavar="OS/ARCH[/VARIANT]",
        help="platform to pick from a multi-platform image (default: this host's)"),
    Opt("--insecure-registry", dest="insecure_registry", repeat=True, metavar="HOST[:PORT]",
        help="allow plain HTTP / unverified TLS for this registry"),
    Opt("--ca-file", dest="ca_file", value=True, metavar="PEM",
        help="CA bundle to verify registries with"),
    Opt("-q", "--quiet", dest="quiet", help="no pull progress output"),
)


def add_registry_options(p) -> None:  # an argparse parser
    for option in REGISTRY_OPTIONS:
        option.add_to(p)


def progress_of(args: Args):
    from ..images.progress import make_progress

    return make_progress(sys.stderr, quiet=args.quiet)
