"""`volume create|ls|inspect|rm|prune`: named volumes (runtime/volume_store.py)."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import home_of, print_table


def add_volume(sub) -> None:
    vol = sub.add_parser("volume", help="manage named volumes (create, ls, inspect, rm, prune)",
                         description="Named volumes persist across VMs; `run -v NAME:/path` "
                                     "also creates one on first use and fills it with what "
                                     "the image has at /path.")
    actions = vol.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a volume")
    create.add_argument("--size", metavar="SIZE",
                        help="cap the volume at SIZE (e.g. 512m, 10g): it is then an ext4 disk "
                             "image, and a guest that fills it gets ENOSPC (default: no cap, "
                             "a host directory)")
    create.add_argument("name", metavar="NAME")
    actions.add_parser("ls", help="list volumes")
    inspect = actions.add_parser("inspect", help="show volumes as JSON")
    inspect.add_argument("names", nargs="+", metavar="NAME")
    rm = actions.add_parser("rm", help="remove volumes (not while a VM uses them)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    prune = actions.add_parser("prune", help="remove every volume no VM is using")
    prune.add_argument("-f", "--force", action="store_true", help="do it (without -f: list "
                       "what would be removed)")
    vol.set_defaults(func=cmd_volume, logs_nothing=True)



def cmd_volume(args: argparse.Namespace) -> int:
    from ..runtime import volume_store as store

    home = home_of(args)
    if args.action == "create":
        from ..spec import parse_size_bytes

        size = None if args.size is None else parse_size_bytes(args.size)
        print(store.create(home, store.check_name(args.name), size=size).name)
    elif args.action == "ls":
        import time

        from ..images.progress import human_size

        rows = [("NAME", "SIZE", "CREATED", "IN USE")]
        for v in store.list_all(home):
            created = time.strftime("%Y-%m-%d %H:%M:%S",
                                    time.localtime(v.record.get("created", 0)))
            size = "-" if v.size is None else human_size(v.size)
            rows.append((v.name, size, created, "yes" if v.in_use() else ""))
        print_table(rows)
    elif args.action == "inspect":
        import json

        out = []
        for name in args.names:
            v = store.get(home, name)
            if v is None:
                raise UsageError(f"no such volume: {name}")
            rec = v.record
            disk = v.size is not None
            out.append({"Name": v.name, "Driver": "ext4-image" if disk else "directory",
                        "Mountpoint": str(v.disk if disk else v.data), "Size": v.size,
                        "CreatedAt": rec.get("created"), "Populated": v.populated,
                        "InUse": v.in_use()})
        print(json.dumps(out, indent=2))
    elif args.action == "rm":
        for name in args.names:
            store.remove(home, name)
            print(name)
    else:  # prune
        unused = [v for v in store.list_all(home) if not v.in_use()]
        if not args.force:
            for v in unused:
                print(v.name)
            raise UsageError(f"{len(unused)} volume(s) would be removed; run "
                             "`volume prune -f` to remove them")
        for v in unused:
            store.remove(home, v.name)
            print(v.name)
    return 0
