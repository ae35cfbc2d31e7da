"""Issue 2: `supermachine run IMAGE true` against bare QEMU doing the same: boot or restore.

What is measured (wall time, this machine, whatever accelerator `--accel auto` picks; the
header prints it). Busybox and Debian+python; every mode a whole process (fork to reaped
exit); all modes interleaved rep by rep, their order rotating each rep, so slow phases of the
machine hit them all:

* restore path (the default once an image has run here), root filesystem and snapshot cached:
  - cli restore: `supermachine run IMAGE true` (default network: a passt process and a NIC);
  - cli restore, no network: `supermachine run --network none IMAGE true`;
  - restore floor: bare QEMU restoring the very snapshot `cli restore, no network` restores
    (same binary and command line, memory file mapped private, `-incoming defer`,
    x-ignore-shared), Popen to the guest running (QEMU's RESUME event), then SIGKILL and
    reap. See floors.py. Restore modes are compared with this floor.
* boot path, root filesystem cached:
  - cli boot: `supermachine run --no-snapshot IMAGE true` (default network);
  - cli boot, no network: the same with `--network none`, the boot floor's set of devices;
  - boot floor: bare QEMU, our command line minus the agent channel, same kernel, kernel
    command line, disk and initramfs modules, /init a static marker program that powers off.
    Boot modes are compared with this floor (target: ours <= 1.3x).
* cli first use: `supermachine run IMAGE true` in a fresh, empty home each rep (only the
  guest kernel and initramfs linked in, an install-time step): rootfs build, boot, snapshot
  bake, restore. Shown against the boot floor, for scale.
* cold / restore: cli boot over cli restore (and the same without network), reported
  separately from the floors.
* phases: where ours goes beyond the floors. Python start-up (`python -c pass`, and
  `supermachine --help`, interleaved) as separate processes; then, in one fresh child process
  per repetition, the steps `VM` takes, timed one by one through the same internal functions
  (imports, open image, rootfs cache lookup, guest assets lookup, QEMU launch, boot until the
  agent's HELLO answer, exec of `true`, teardown), and the restore path split likewise.
* rootfs build: `ensure_rootfs` in a fresh store (busybox, Debian+python), and squashfs size.

Excluded: fetching the guest kernel (an install-time step), building the test images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import tables
from common import summary
from floors import BootFloor, RestoreFloor

# ---------------------------------------------------------------------------- phases


def phases_child(image: str, home_root: str) -> None:
    """Runs in a fresh interpreter: the boot path's steps (no snapshot) timed one by one,
    through the same functions `VM` calls; prints JSON."""
    t = time.perf_counter
    marks: dict[str, float] = {}
    t0 = t()
    from supermachine.agent.client import AgentClient
    from supermachine.engine.accel import choose
    from supermachine.engine.base import MachineConfig
    from supermachine.engine.qemu import QemuEngine
    from supermachine.guest.assets import ensure_guest_assets
    from supermachine.home import Home
    from supermachine.images import ensure_rootfs
    from supermachine.images.source import open_local, parse_source
    from supermachine.spec import WorkloadSpec
    marks["import"] = t() - t0

    home = Home(Path(home_root))
    t0 = t()
    src = parse_source(image)
    assert src is not None, image
    img = open_local(src)
    marks["open image"] = t() - t0
    t0 = t()
    rootfs = ensure_rootfs(img, home)
    marks["rootfs cache lookup"] = t() - t0
    t0 = t()
    assets = ensure_guest_assets(home)
    accel = choose(None)
    marks["guest assets lookup"] = t() - t0
    engine = QemuEngine()
    t0 = t()
    engine.identity()  # VM puts it in the snapshot key (a stat of the QEMU binary)
    marks["engine identity (stat of QEMU)"] = t() - t0
    config = MachineConfig(kernel=assets.kernel, initrd=assets.initrd, cmdline=assets.cmdline,
                           rootfs=rootfs, memory_mib=512, cpus=1, accel=accel.name)
    t0 = t()
    machine = engine.launch(config)
    client = AgentClient(machine.agent)
    marks["qemu launch (Popen)"] = t() - t0
    try:
        t0 = t()
        client.hello(120, time_ns=time.time_ns(), entropy=os.urandom(64))
        marks["boot to HELLO"] = t() - t0
        cfg = img.config
        work = WorkloadSpec(cmd=("true",)).resolve(cfg)
        t0 = t()
        res = client.exec(list(work.argv), env=list(work.env), cwd=work.cwd, user=work.user)
        marks["exec true"] = t() - t0
        assert res.exit_code == 0, res
    finally:
        t0 = t()
        client.close()
        machine.kill()
        marks["teardown"] = t() - t0
    print(json.dumps(marks))


def restore_phases_child(image: str, home_root: str) -> None:
    """Runs in a fresh interpreter: a VM started from the image's automatic snapshot; VM's
    own debug line splits its start into preparation and restore."""
    import logging

    t = time.perf_counter
    marks: dict[str, float] = {}
    t0 = t()
    import supermachine.runtime.vm as vm_mod
    marks["import"] = t() - t0
    split: list[tuple] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("prepared in"):
                split.append(record.args)

    logger = logging.getLogger("supermachine.runtime.vm")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Grab())
    notices: list[str] = []
    t0 = t()
    vm = vm_mod.VM(image, home=home_root, on_notice=notices.append)
    vm.start()
    marks["VM.start total"] = t() - t0
    if vm.restored_from is None:
        vm.close()
        # A failed restore falls back to booting: report it (and why) instead of timing it.
        print(json.dumps({"restore_failed": notices}))
        return
    if split:
        prepared_ms, _how, started_ms = split[-1]
        marks["  prepare (image, rootfs, assets, snapshot lookup)"] = prepared_ms / 1000
        marks["  restore to HELLO"] = started_ms / 1000
    try:
        t0 = t()
        res = vm.exec(["true"])
        marks["exec true"] = t() - t0
        assert res.exit_code == 0, res
    finally:
        t0 = t()
        vm.close()
        marks["teardown"] = t() - t0
    print(json.dumps(marks))


def measure_phases(mode: str, image: Path, home: common.Home, reps: int
                   ) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Phase samples from ``reps`` fresh processes, and the notices of failed restores."""
    out: dict[str, list[float]] = {}
    failures: list[list[str]] = []
    for _ in range(reps):
        proc = common.run_timed([sys.executable, __file__, mode, str(image), str(home.root)])
        marks = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        if "restore_failed" in marks:
            failures.append(marks["restore_failed"])
            continue
        for k, v in marks.items():
            out.setdefault(k, []).append(v)
    return out, failures


# ---------------------------------------------------------------------------- rootfs


def rootfs_build(image: Path) -> dict[str, Any]:
    """ensure_rootfs in a fresh store: build seconds and squashfs bytes."""
    from supermachine.images import ensure_rootfs
    from supermachine.images.source import open_local, parse_source

    with common.fresh_home("rootfs") as home:
        src = parse_source(str(image))
        assert src is not None
        t0 = time.perf_counter()
        img = open_local(src)
        path = ensure_rootfs(img, home)
        elapsed = time.perf_counter() - t0
        return {"seconds": elapsed, "squashfs_bytes": path.stat().st_size,
                "layers_bytes": sum(layer.size for layer in img.layers)}


# ---------------------------------------------------------------------------- main

RESTORE_MODES = ("cli restore", "cli restore, no network")
BOOT_MODES = ("cli boot", "cli boot, no network")
MODES = (*RESTORE_MODES, "restore floor", *BOOT_MODES, "boot floor", "cli first use")
# Which floor each mode is compared with: like with like, a restore with a restore.
FLOOR_OF = {**dict.fromkeys(RESTORE_MODES, "restore floor"),
            **dict.fromkeys((*BOOT_MODES, "cli first use"), "boot floor"),
            "restore floor": "restore floor", "boot floor": "boot floor"}
BOOT_TARGET = 1.3  # issue 2: a cold run within 1.3x of bare QEMU booting


@dataclasses.dataclass
class Floors:
    boot: BootFloor
    restore: RestoreFloor
    restore_to_running: list[float] = dataclasses.field(default_factory=list)
    boot_to_marker: list[float] = dataclasses.field(default_factory=list)


def one_rep(mode: str, image: Path, floors: Floors, warm: common.Home) -> tuple[float, str]:
    """(seconds, what the CLI printed on stderr) for one run in ``mode``."""
    run = [common.CLI, "run"]
    if mode == "boot floor":
        marker, seconds = floors.boot.boot()
        floors.boot_to_marker.append(marker)
        return seconds, ""
    if mode == "restore floor":
        running, seconds = floors.restore.restore()
        floors.restore_to_running.append(running)
        return seconds, ""
    if mode == "cli first use":
        # A fresh, empty home every time: no blobs, rootfs or snapshot, only the kernel.
        with common.fresh_home("firstuse") as fresh:
            t = common.run_timed([*run, str(image), "true"], env=common.home_env(fresh))
        return t.seconds, t.stderr.decode(errors="replace")
    argv = {"cli restore": [*run, str(image), "true"],
            "cli restore, no network": [*run, "--network", "none", str(image), "true"],
            "cli boot": [*run, "--no-snapshot", str(image), "true"],
            "cli boot, no network": [*run, "--no-snapshot", "--network", "none", str(image),
                                     "true"]}[mode]
    t = common.run_timed(argv, env=common.home_env(warm))
    return t.seconds, t.stderr.decode(errors="replace")


def compare(image: Path, floors: Floors, warm: common.Home, reps: int
            ) -> tuple[dict[str, list[float]], list[str]]:
    """All modes, interleaved rep by rep (order rotating), so slow phases hit them all.

    Also returns the CLI's notices of snapshot restores that failed (and fell back to a
    boot): such a sample is kept, since a user would wait for it too, but reported.
    """
    for argv in ([str(image), "true"], ["--network", "none", str(image), "true"]):
        # Bakes the warm home's snapshots if needed; warms the page cache. Untimed.
        common.run_timed([common.CLI, "run", *argv], env=common.home_env(warm))
    floors.boot.boot()
    floors.restore.restore()
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    failed: list[str] = []
    for rep in range(reps):
        for mode in MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]:
            seconds, err = one_rep(mode, image, floors, warm)
            runs[mode].append(seconds)
            failed += [f"{mode}: {line}" for line in err.splitlines()
                       if "restoring the snapshot failed" in line]
    return runs, failed


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] in ("--phases-child", "--restore-phases-child"):
        child = phases_child if sys.argv[1] == "--phases-child" else restore_phases_child
        child(sys.argv[2], sys.argv[3])
        return 0
    args = common.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (2 if args.quick else 6)
    info = common.machine_info()
    common.print_header("bench_run", info, args.quick)

    from tests.fixtures import images as fx

    from supermachine.images import ensure_rootfs
    from supermachine.images.source import open_local, parse_source

    images = {"busybox": fx.busybox(), "python": fx.python()}
    warm = common.warm_home()
    common.ensure_guest(warm)
    rootfs = {}
    for name, layout in images.items():
        src = parse_source(str(layout))
        assert src is not None
        rootfs[name] = ensure_rootfs(open_local(src), warm)

    results: dict[str, Any] = {"machine": info, "reps": reps, "quick": args.quick,
                               "modes": list(MODES), "floor_of": FLOOR_OF,
                               "boot_target_ratio": BOOT_TARGET}
    with tempfile.TemporaryDirectory(prefix="sm-bench-floor-") as tmp:
        boot_floor = BootFloor(warm, rootfs["busybox"], Path(tmp))
        results["boot_floor_command"] = boot_floor.command(qmp_fd=3, console_fd=4)
        for name, layout in images.items():
            # The boot floor attaches the same disk as ours (neither reads it before init).
            boot_floor.config = dataclasses.replace(boot_floor.config, rootfs=rootfs[name])
            floors = Floors(boot_floor, RestoreFloor.from_vm(layout, warm))
            runs, failed = compare(layout, floors, warm, reps)
            if failed:
                print(f"warning: {name}: {len(failed)} snapshot restores failed and booted "
                      f"instead, e.g. {failed[0]}")
            s = {m: summary(v) for m, v in runs.items()}
            results[name] = {
                "summary": s, "samples": runs, "restore_failures": failed,
                "ratio_median_vs_floor": {m: s[m]["median"] / s[FLOOR_OF[m]]["median"]
                                          for m in MODES},
                "cold_over_restore": {
                    "cli boot / cli restore": s["cli boot"]["median"] / s["cli restore"]["median"],
                    "cli boot, no network / cli restore, no network":
                        s["cli boot, no network"]["median"]
                        / s["cli restore, no network"]["median"]},
                "restore_floor_to_running": summary(floors.restore_to_running),
                "boot_floor_to_marker": summary(floors.boot_to_marker),
                "restore_floor_command": floors.restore.command(5, 3, 4, 6)}

    # Where the time goes.
    startup_reps = 5 if args.quick else 20
    py_pass, cli_help = [], []
    for _ in range(startup_reps):  # interleaved: both see the same machine
        py_pass.append(common.run_timed([sys.executable, "-c", "pass"]).seconds)
        cli_help.append(common.run_timed([common.CLI, "--help"]).seconds)
    phase_reps = 1 if args.quick else 5
    results["python_startup"] = summary(py_pass)
    results["cli_help"] = summary(cli_help)
    for mode in ("--phases-child", "--restore-phases-child"):
        phases, failures = measure_phases(mode, images["busybox"], warm, phase_reps)
        results[f"phases_busybox_{mode.strip('-')}"] = {k: summary(v) for k, v in phases.items()}
        if failures:
            results["restore_failures"] = failures
            print(f"\nwarning: {len(failures)} of {phase_reps} restores failed and booted "
                  f"instead: {failures[0]}")
    results["rootfs_build"] = {name: rootfs_build(layout) for name, layout in images.items()}
    common.print_tables(tables.bench_run(results))
    common.write_results("bench_run", results, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
