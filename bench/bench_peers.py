"""`supermachine run IMAGE echo x` beside what users would pick instead: runc and gVisor.

The peers that run on this machine (see /work/shared/DESIGN.md): podman with runc (plain
containers) and podman with gVisor (Debian's `runsc`, a user-space kernel). Kata and
Firecracker need hardware virtualization, which this PVM host cannot give a standard guest.

Setup (untimed): the busybox fixture (tests/fixtures/images.py) copied with skopeo into a
private podman store (its own --root, --runroot and --tmpdir in a temp directory, overlay
driver), so the peers run the very image supermachine runs and nothing outside the temp
directory changes (apart from CNI's network state while a default-network container runs).
Each command runs once, untimed, first (supermachine bakes the image's snapshot then; podman
warms its store).

Measured: whole-process wall time (fork to reaped exit) of each command, all interleaved rep
by rep with the order rotating each rep; the output must be exactly "x". Ratios are p50 over
runc's p50 without network (the lightest peer):

* supermachine, no network: `supermachine run --network none IMAGE echo x` (restore path);
* supermachine: `supermachine run IMAGE echo x` (restore path, default network: passt + NIC);
* runc, no network: `podman run --rm --runtime runc --network none IMAGE echo x`;
* runc: the same with podman's default network (CNI bridge here, as root);
* gVisor, no network: `podman --runtime-flag network=none run --rm --runtime runsc
  --network none IMAGE echo x`. This runsc (2022-12) fails to set up its own network stack
  in podman's network namespace here ("cannot run with network enabled in root network
  namespace"), so it needs its `--network=none` flag; `--ignore-cgroups` is added only if
  the probe shows it is needed. The flags used are recorded.
* gVisor with a network: probed; reported as unavailable with the probe's error if it fails.

podman needs `--ulimit nofile=1024:1024 --ulimit nproc=1024:1024` here: its defaults exceed
this machine's hard limits. crun fails on these hybrid cgroups, hence runc.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import tables
from common import summary

ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
TAG = "localhost/sm-bench/busybox:latest"
BASELINE = "runc, no network"


@contextlib.contextmanager
def podman_store(layout: Path) -> Iterator[list[str]]:
    """A private podman store holding ``layout`` as TAG; yields podman's global options."""
    root = Path(tempfile.mkdtemp(prefix="sm-bench-podman-", dir=common.SCRATCH))
    opts = ["--root", str(root / "root"), "--runroot", str(root / "run"),
            "--tmpdir", str(root / "tmp"), "--storage-driver", "overlay"]
    try:
        subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:latest",
                        f"containers-storage:[overlay@{root / 'root'}+{root / 'run'}]{TAG}"],
                       check=True, capture_output=True)
        yield opts
    finally:
        # The overlay driver bind-mounts its directory onto itself; it must go before the
        # files can.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(root) + "/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", mount], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def podman_argv(opts: list[str], runtime: str, runtime_flags: list[str], network: bool
                ) -> list[str]:
    flags = [f"--runtime-flag={f}" for f in runtime_flags]
    net = [] if network else ["--network", "none"]
    return ["podman", *opts, *flags, "run", "--rm", "--runtime", runtime, *net, *ULIMITS,
            TAG, "echo", "x"]


def attempt(argv: list[str], env: dict[str, str] | None = None) -> str | None:
    """None when ``argv`` prints exactly "x", else why not (its last line of stderr)."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]} is not installed"
    try:
        t = common.run_timed(argv, env=env, check=False, timeout=120)
    except subprocess.TimeoutExpired:
        return "timed out after 120 s"
    if t.returncode == 0 and t.stdout == b"x\n":
        return None
    # The cause is usually a line or two above podman's own summary; container ids and
    # pids differ every run and say nothing.
    text = re.sub(r"\b[0-9a-f]{64}\b", "ID", t.stderr.decode(errors="replace"))
    text = re.sub(r"/proc/\d+/", "/proc/PID/", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"exit {t.returncode}: " + (" / ".join(lines[-2:]) if lines else repr(t.stdout[-200:]))


def commands(image: Path, home: common.Home, opts: list[str]
             ) -> tuple[dict[str, tuple[list[str], dict[str, str] | None]], dict[str, str],
                        dict[str, Any]]:
    """The commands that work here, why the others do not, and how the peers were set up."""
    env = common.home_env(home)
    sm = [common.CLI, "run"]
    wanted: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "supermachine, no network": ([*sm, "--network", "none", str(image), "echo", "x"], env),
        "supermachine": ([*sm, str(image), "echo", "x"], env),
        BASELINE: (podman_argv(opts, "runc", [], network=False), None),
        "runc": (podman_argv(opts, "runc", [], network=True), None),
    }
    unavailable: dict[str, str] = {}
    setup: dict[str, Any] = {}
    for flags in (["network=none"], ["network=none", "ignore-cgroups"]):
        argv = podman_argv(opts, "runsc", flags, network=False)
        why = attempt(argv)
        if why is None:
            wanted["gVisor, no network"] = (argv, None)
            setup["runsc_flags"] = flags
            break
    else:
        unavailable["gVisor, no network"] = why or "unknown"
    why = attempt(podman_argv(opts, "runsc", [], network=True))
    if why is None:
        wanted["gVisor"] = (podman_argv(opts, "runsc", [], network=True), None)
    else:
        unavailable["gVisor"] = why
    usable = {}
    for name, (argv, cmd_env) in wanted.items():
        why = attempt(argv, cmd_env)  # also the untimed warm-up (and supermachine's bake)
        if why is None:
            usable[name] = (argv, cmd_env)
        else:
            unavailable[name] = why
    return usable, unavailable, setup


def versions() -> dict[str, str]:
    out = {}
    for tool, argv in (("podman", ["podman", "--version"]), ("runc", ["runc", "--version"]),
                       ("runsc", ["runsc", "--version"])):
        with contextlib.suppress(OSError):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[tool] = proc.stdout.splitlines()[0].strip() if proc.stdout else "unknown"
    return out


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (3 if args.quick else 20)
    info = common.machine_info()
    common.print_header("bench_peers", info, args.quick)

    from tests.fixtures import images as fx

    image = fx.busybox()
    home = common.warm_home()
    common.ensure_guest(home)
    with podman_store(image) as opts:
        usable, unavailable, setup = commands(image, home, opts)
        samples: dict[str, list[float]] = {k: [] for k in usable}
        names = list(usable)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                argv, env = usable[name]
                t = common.run_timed(argv, env=env)
                if t.stdout != b"x\n":
                    raise RuntimeError(f"{name} printed {t.stdout[-200:]!r}")
                samples[name].append(t.seconds)
    # Temp paths out of the recorded command lines: they differ every run.
    scrub = {str(image): "IMAGE", common.CLI: "supermachine",
             **{o: "STORE/" + Path(o).name for o in opts if o.startswith("/")}}
    s = {k: summary(v) for k, v in samples.items()}
    base = s.get(BASELINE)
    results = {
        "machine": info, "reps": reps, "image": "busybox fixture", "baseline": BASELINE,
        "versions": versions(), "setup": setup, "summary": s, "samples": samples,
        "ratio_median_vs_baseline": {k: v["median"] / base["median"] for k, v in s.items()}
        if base else {},
        "unavailable": unavailable,
        "commands": {k: [scrub.get(a, a) for a in v[0]] for k, v in usable.items()},
    }
    common.print_tables(tables.bench_peers(results))
    common.write_results("bench_peers", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
