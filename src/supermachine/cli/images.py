"""Image commands: pull, images, rmi, prune, login, logout."""

from __future__ import annotations

import sys

from .common import REGISTRY_OPTIONS, home_of, print_table, progress_of
from .options import Arg, Args, Command


def add_pull(sub) -> None:
    REGULAR["pull"].add_to(sub)


def add_images(sub) -> None:
    images = sub.add_parser("images", help="list pulled images")
    images.add_argument("--digests", action="store_true", help="show manifest digests")
    images.set_defaults(func=cmd_images, logs_nothing=True)


def add_rmi(sub) -> None:
    rmi = sub.add_parser("rmi", help="remove pulled images")
    rmi.add_argument("images", nargs="+", metavar="REF|DIGEST")
    rmi.set_defaults(func=cmd_rmi)


def add_prune(sub) -> None:
    prune = sub.add_parser("prune", help="delete blobs and root filesystems no image uses, "
                                         "and what older versions built")
    prune.set_defaults(func=cmd_prune)


def add_login(sub) -> None:
    login = sub.add_parser("login", help="save registry credentials (~/.docker/config.json)")
    login.add_argument("registry", metavar="REGISTRY")
    login.add_argument("-u", "--username", required=True)
    login.add_argument("-p", "--password", help="password (prefer --password-stdin)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]")
    login.add_argument("--ca-file", metavar="PEM")
    login.set_defaults(func=cmd_login)


def add_logout(sub) -> None:
    logout = sub.add_parser("logout", help="forget registry credentials")
    logout.add_argument("registry", metavar="REGISTRY")
    logout.set_defaults(func=cmd_logout)


def cmd_pull(args: Args) -> int:
    from ..images.pull import pull

    image = pull(args.image, home_of(args), platform=args.platform,
                 insecure_registries=tuple(args.insecure_registry), ca_file=args.ca_file,
                 progress=progress_of(args))
    print(image.manifest_digest or image.config_digest)
    return 0


#: this group's commands that dispatch.py parses without argparse (options.py)
REGULAR = {
    "pull": Command("pull", help="download an image from a registry",
                    options=REGISTRY_OPTIONS,
                    args=(Arg("image", metavar="REF",
                              help="e.g. alpine, ghcr.io/o/r:tag, host:5000/r@sha256:..."),),
                    func=cmd_pull, logs_nothing=True),
}


def cmd_images(args: Args) -> int:
    from ..images import store
    from ..images.progress import human_size

    rows = [("REFERENCE", "PLATFORM", "DIGEST" if args.digests else "IMAGE ID", "CREATED",
             "SIZE")]
    for info in store.list_images(home_of(args)):
        ident = info.manifest_digest if args.digests else info.config_digest[7:19]
        rows.append((info.name, info.platform, ident, (info.created or "-")[:19],
                     human_size(info.size)))
    print_table(rows, gap="  ")
    return 0


def cmd_rmi(args: Args) -> int:
    from ..images import store

    home = home_of(args)
    for ref in args.images:
        for removed in store.remove_image(home, ref):
            print(f"Untagged: {removed}")
    return 0


def cmd_prune(args: Args) -> int:
    from ..engine import default_engine
    from ..guest import kbuild
    from ..guest.kernel import prune_stale_layouts
    from ..images import store
    from ..images.progress import human_size
    from ..runtime.bake import bake_version
    from ..runtime.snapshot import prune_auto

    home = home_of(args)
    result = store.prune(home)
    snapshots = prune_auto(home, default_engine().identity(), bake_version())
    prune_stale_layouts(home)
    kbuild.prune(home)  # kernels built for other configs or toolchains
    print(f"Deleted {result.blobs_removed} blobs and {len(snapshots)} stale automatic "
          f"snapshots, reclaimed {human_size(result.bytes_freed)} of blobs")
    return 0


def cmd_login(args: Args) -> int:
    from ..images import registry

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


def cmd_logout(args: Args) -> int:
    from ..images import auth

    if auth.logout(args.registry):
        print(f"Removing login credentials for {args.registry}")
    else:
        print(f"Not logged in to {args.registry}")
    return 0
