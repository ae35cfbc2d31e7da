"""Snapshot commands: `snapshot VM NAME` saves a running detached VM; `snapshots [rm]`."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import home_of, print_table, vms_of


def add_snapshot(sub) -> None:
    snap = sub.add_parser("snapshot", help="save a running detached VM as a named snapshot",
                          description="Save VM (as warmed up so far) as snapshot NAME; start "
                                      "VMs from it with `run snapshot:NAME`.")
    snap.add_argument("vm", metavar="VM")
    snap.add_argument("name", metavar="NAME")
    snap.set_defaults(func=cmd_snapshot)


def add_snapshots(sub) -> None:
    snaps = sub.add_parser("snapshots", help="list named snapshots (`snapshots rm NAME` removes)")
    snaps.add_argument("action", nargs="?", choices=["ls", "rm"], default="ls")
    snaps.add_argument("names", nargs="*", metavar="NAME")
    snaps.set_defaults(func=cmd_snapshots, logs_nothing=True)


#: this group's commands, in the order `--help` lists them: name -> adds its parser

def cmd_snapshot(args: argparse.Namespace) -> int:
    from ..detached import client, state
    from ..runtime.snapshot import check_name

    d = state.find(vms_of(args), args.vm)
    client.request_snapshot(d, check_name(args.name))
    print(args.name)
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    import time

    from ..images.progress import human_size
    from ..runtime import snapshot

    home = home_of(args)
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
    print_table(rows, gap="  ")
    return 0
