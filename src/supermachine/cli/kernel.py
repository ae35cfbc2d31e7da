"""`kernel build` builds the supermachine guest kernel from Debian's source (install.sh runs
it); `kernel` alone says which kernel VMs boot and where it is."""

from __future__ import annotations

import argparse

from .common import PROG, home_of


def add_kernel(sub) -> None:
    k = sub.add_parser(
        "kernel", help="show the guest kernel; `kernel build` builds the supermachine kernel",
        description="Without an action: which kernel VMs boot. `build`: build the supermachine "
                    "kernel from Debian's linux-source package (minutes; install.sh runs it; "
                    "needs gcc, make, flex, bison, bc, libelf-dev). `prune`: remove kernels "
                    "built for other configs or toolchains.")
    k.add_argument("action", nargs="?", choices=["show", "build", "prune"], default="show")
    k.add_argument("--force", action="store_true", help="build: rebuild even if built")
    k.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="build: parallel compile jobs (default: one per CPU)")
    k.set_defaults(func=cmd_kernel, logs_nothing=True)



def cmd_kernel(args: argparse.Namespace) -> int:
    from ..guest import kbuild

    home = home_of(args)
    if args.action == "build":
        built = kbuild.build(home, force=args.force, jobs=args.jobs,
                             progress=lambda line: print(f"{PROG}: kernel: {line}", flush=True))
        rec = built.record
        print(f"{kbuild.NAME} kernel {built.version}: {built.path} "
              f"(built in {rec.get('wall_s', 0):.0f} s)")
        return 0
    if args.action == "prune":
        for path in kbuild.prune(home):
            print(f"removed {path}")
        return 0
    built = kbuild.built_kernel(home)
    if built is None:
        print(f"default kernel: Debian's cloud kernel ({kbuild.NAME} kernel not built; "
              f"`{PROG} kernel build` builds it)")
    else:
        rec = built.record
        src = rec.get("source", {})
        print(f"default kernel: {kbuild.NAME} {built.version}\n  file: {built.path}\n"
              f"  source: {src.get('package')} {src.get('version')}\n"
              f"  toolchain: {rec.get('toolchain')}\n"
              f"  built in {rec.get('wall_s')} s with {rec.get('jobs')} jobs, "
              f"{rec.get('disk_peak_bytes', 0) >> 20} MiB of disk at peak")
    return 0
