"""Volumes (issue 12): file I/O through a host directory (virtio-9p), a named volume (9p) and
a size-capped named volume (an ext4 image on virtio-blk) against the VM's own overlay, a
tmpfs in the VM and the host itself, and what mounts cost a restore.

In one run, on one warm home (busybox image, snapshot baked), everything interleaved:

- sequential write (with fsync) then read (warm caches) of 64 MiB (`dd`, 1 MiB blocks), MB/s;
- 10,000 small files created then listed with their metadata (`ls -l`), files/s;
- `tar x` of a ~54 MB tree (the host's /usr/lib/python3.11, 1.4k files), seconds;
  each on: a bind mount, a named volume, a sized named volume, the VM's root overlay (tmpfs
  upper), a tmpfs mount, and the host directly (the same commands with the host's busybox:
  the floor);
- restore -> first exec result with two host directories mounted against none (target
  ratio <= 1.15): the mounts are made after the restore, one agent round trip each; and
  with one sized volume (its disk is re-probed in the guest before the mount);
- closing a VM with a sized volume mounted read-write (the guest syncs and powers off)
  against closing one without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tables  # noqa: E402
from common import (  # noqa: E402 (path set up above)
    SCRATCH,
    machine_info,
    parse_args,
    print_header,
    print_tables,
    summary,
    warm_home,
    write_results,
)
from tests.fixtures import images as fx  # noqa: E402

import supermachine as sm  # noqa: E402

TARGET_RATIO = 1.15
MEMORY = "512M"
SEQ_MIB = 64
SMALL_FILES = 10_000
TREE = Path("/usr/lib/python3.11")
PLACES = ("bind mount (9p)", "named volume (9p)", "sized volume (ext4 disk)",
          "VM root overlay", "VM tmpfs", "host")
WHERE = {"bind mount (9p)": "/bind", "named volume (9p)": "/named",
         "sized volume (ext4 disk)": "/disk", "VM root overlay": "/root", "VM tmpfs": "/tmpfs"}
DISK_SIZE = 512 << 20

# One script for every place: DIR is where the work happens; prints three timings (seconds).
SCRIPT = r"""
set -e
D="$1"; T="$2"; BB="$3"
now() { read -r up _ < /proc/uptime; echo "$up"; }  # 10 ms steps; busybox date has no %N
rm -rf "$D/w"; mkdir -p "$D/w"; cd "$D/w"
a=$(now); $BB dd if=/dev/zero of=seq bs=1M count={mib} conv=fsync 2>/dev/null; b=$(now)
$BB sync
c=$(now); $BB dd if=seq of=/dev/null bs=1M 2>/dev/null; d=$(now)
rm -f seq; mkdir small; cd small
e=$(now); i=0; while [ $i -lt {files} ]; do : > f$i; i=$((i+1)); done
$BB ls -l > /dev/null; f=$(now); cd ..; rm -rf small
g=$(now); $BB tar xf "$T"; h=$(now)
cd /; rm -rf "$D/w"
echo "$a $b $c $d $e $f $g $h"
""".replace("{mib}", str(SEQ_MIB)).replace("{files}", str(SMALL_FILES))


def parse(line: str) -> dict[str, float]:
    a, b, c, d, e, f, g, h = (float(x) for x in line.split())
    return {"write_mbps": SEQ_MIB * 1.048576 / (b - a), "read_mbps": SEQ_MIB * 1.048576 / (d - c),
            "small_files_per_s": SMALL_FILES / (f - e), "tar_x_s": h - g}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    reps = args.reps or (1 if args.quick else 3)
    restore_reps = 5 if args.quick else 20
    info = machine_info()
    print_header("bench_volumes", info, args.quick)
    home = warm_home()
    image = fx.busybox()
    work = Path(tempfile.mkdtemp(prefix="sm-bench-volumes-", dir=SCRATCH))
    from supermachine.runtime import volume_store

    suffix = os.urandom(3).hex()
    named, sized = f"bench-named-{suffix}", f"bench-sized-{suffix}"
    volume_store.create(home, named)
    volume_store.create(home, sized, size=DISK_SIZE)
    try:
        share, other, host_dir = work / "share", work / "other", work / "host"
        for d in (share, other, host_dir):
            d.mkdir()
        tarball = work / "tree.tar"
        subprocess.run(["tar", "cf", str(tarball), "-C", str(TREE.parent), TREE.name],
                       check=True)
        shutil.copy(tarball, share / "tree.tar")
        samples: dict[str, list[dict[str, float]]] = {p: [] for p in PLACES}
        with sm.VM(image, home=home, memory=MEMORY, network="none",
                   volumes=[f"{share}:/bind", f"{named}:/named", f"{sized}:/disk"],
                   tmpfs=["/tmpfs"]) as vm:
            vm.write_file("/script.sh", SCRIPT.encode(), mode=0o755)
            vm.exec(["cp", "/bind/tree.tar", "/tree.tar"])
            for rep in range(reps):
                for place in PLACES:
                    if place == "host":
                        out = subprocess.run(["sh", "-c", SCRIPT, "sh", str(host_dir),
                                              str(tarball), "busybox"], check=True,
                                             capture_output=True, text=True).stdout
                    else:
                        r = vm.exec(["sh", "/script.sh", WHERE[place], "/tree.tar",
                                     "busybox"])
                        assert r.exit_code == 0, r
                        out = r.stdout.decode()
                    samples[place].append(parse(out.strip().splitlines()[-1]))
                print(f"rep {rep + 1}/{reps} done", flush=True)

        def start_exec(mounts: list[str]) -> tuple[float, float]:
            """(restore -> first exec result, close) in seconds."""
            t0 = time.perf_counter()
            with sm.VM(image, home=home, memory=MEMORY, network="none", volumes=mounts) as v:
                assert v.restored_from
                assert v.exec(["sh", "-c", "echo x > /tmp/x"]).exit_code == 0
                t1 = time.perf_counter()
            return t1 - t0, time.perf_counter() - t1

        variants = {"no_mounts": [], "two_host_directories": [f"{share}:/a", f"{other}:/b"],
                    "one_sized_volume": [f"{sized}:/d"]}
        for mounts in variants.values():
            start_exec(mounts)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for rep in range(restore_reps):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for which in order:
                runs[which].append(start_exec(variants[which]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for name in (named, sized):
            volume_store.remove(home, name)

    io = {p: {k: summary([s[k] for s in samples[p]]) for k in samples[p][0]} for p in PLACES}
    restore = {k: summary([start for start, _ in v]) for k, v in runs.items()}
    close = {k: summary([end for _, end in v]) for k, v in runs.items()}
    results = {
        "machine": info, "reps": reps, "image": "busybox", "memory": MEMORY,
        "seq_mib": SEQ_MIB, "small_files": SMALL_FILES, "tree": str(TREE), "io": io,
        "restore_to_first_exec": restore,
        "ratio_two_mounts_over_none": restore["two_host_directories"]["median"]
        / restore["no_mounts"]["median"],
        "target_ratio": TARGET_RATIO, "close": close, "disk_size": DISK_SIZE,
        "samples": {"io": samples, "restore": runs},
    }
    print_tables(tables.bench_volumes(results))
    write_results("bench_volumes", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
