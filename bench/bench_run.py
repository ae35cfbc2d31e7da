"""Issue 2: cold `supermachine run IMAGE true` against the floor of a bare QEMU boot.

What is measured (wall time, this machine, whatever accelerator `--accel auto` picks; the
header prints it):

* ours, three ways, each a whole process (fork to reaped exit), with the image's root
  filesystem and the guest assets already cached. Busybox and Debian+python.
  - cli restore: `supermachine run IMAGE true` when the image's automatic snapshot exists
    (what every run after the first does);
  - cli first run: the same with the snapshot removed first (boot, bake the snapshot,
    restore it);
  - cli boot: `supermachine run --no-snapshot IMAGE true` (cold boot, default network:
    a passt process and a NIC);
  - cli boot, no network: the same with `--network none`, the floor's set of devices.
* floor: the same qemu binary with our engine's command line (`build_command`, for a machine
  without a network) minus the agent channel (virtio-serial device, its port and chardev),
  the same kernel, command line and root disk, booting the same initramfs except that /init
  is a tiny static program that prints a marker on the console and calls
  reboot(RB_POWER_OFF). Popen to reaped exit.
  Ours and the floor alternate, so both see the same machine load.
* phases: where ours goes beyond the floor. Python start-up (`python -c pass`, and
  `supermachine --help`) as separate processes; then, in one fresh child process per
  repetition, the steps `VM` takes, timed one by one through the same internal functions
  (imports, open image, rootfs cache lookup, guest assets lookup, QEMU launch, boot until the
  agent's HELLO answer, exec of `true`, teardown).
* rootfs build: `ensure_rootfs` in a fresh store (busybox, Debian+python), and squashfs size.

Excluded: fetching the guest kernel (an install-time step), building the test images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import fmt_s, summary

MARKER = b"SM-FLOOR-MARKER"

# PID 1 of the floor guest: the least a guest can do that proves it reached userspace.
MARKER_C = r"""
#include <fcntl.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	static const char msg[] = "\nSM-FLOOR-MARKER\n";
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (fd < 0)
		fd = 1;
	write(fd, msg, sizeof(msg) - 1);
	reboot(RB_POWER_OFF);
	reboot(RB_HALT_SYSTEM);
	return 1;
}
"""


# ---------------------------------------------------------------------------- floor


def build_marker(workdir: Path) -> Path:
    """The marker init, static (the initramfs has no libc): musl-gcc, else cc -static."""
    src = workdir / "marker.c"
    src.write_text(MARKER_C)
    out = workdir / "marker-init"
    for cc in ("musl-gcc", "cc"):
        proc = subprocess.run([cc, "-static", "-Os", "-o", str(out), str(src)],
                              capture_output=True, check=False)
        if proc.returncode == 0:
            return out
    raise RuntimeError(f"cannot build the marker init: {proc.stderr.decode(errors='replace')}")


AGENT_ARGS = ("virtio-serial-device", "id=agent,", "virtserialport,")


def strip_agent_channel(cmd: list[str]) -> list[str]:
    """Our engine's command line without the agent's virtio-serial device, port and chardev."""
    out: list[str] = []
    i = 0
    while i < len(cmd):
        if cmd[i] in ("-device", "-chardev") and i + 1 < len(cmd) and any(
                a in cmd[i + 1] for a in AGENT_ARGS):
            i += 2
            continue
        out.append(cmd[i])
        i += 1
    if len(out) != len(cmd) - 6:
        raise RuntimeError("the engine's command line changed shape; update strip_agent_channel")
    return out


class Floor:
    """Boots the marker initramfs with the engine's command line, minus the agent channel."""

    def __init__(self, home: common.Home, rootfs: Path, workdir: Path) -> None:
        from supermachine.engine.base import MachineConfig
        from supermachine.engine.qemu import qemu_binary
        from supermachine.guest.assets import ensure_guest_assets

        marker = build_marker(workdir)
        # Same kernel, modules and layout as the real initramfs; only /init differs.
        assets = ensure_guest_assets(home, init=marker)
        self.config = MachineConfig(kernel=assets.kernel, initrd=assets.initrd,
                                    cmdline=assets.cmdline, rootfs=rootfs, memory_mib=512,
                                    cpus=1, accel=common.machine_accel())
        self.qemu = qemu_binary()

    def command(self, qmp_fd: int, console_fd: int) -> list[str]:
        from supermachine.engine.qemu import build_command

        # agent_fd is a placeholder: the agent chardev that would use it is removed.
        full = build_command(self.config, qemu=self.qemu, agent_fd=999, qmp_fd=qmp_fd,
                             console_fd=console_fd)
        return strip_agent_channel(full)

    def boot(self, timeout: float = 120) -> tuple[float, float]:
        """(seconds to the marker on the console, seconds to QEMU's reaped exit)."""
        qmp_host, qmp_guest = socket.socketpair()
        con_host, con_guest = socket.socketpair()
        try:
            cmd = self.command(qmp_guest.fileno(), con_guest.fileno())
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=con_guest.fileno(),
                                    stderr=con_guest.fileno(),
                                    pass_fds=[qmp_guest.fileno(), con_guest.fileno()])
            qmp_guest.close()
            con_guest.close()
            try:
                seen, console = self._read_console(con_host, t0, timeout)
                proc.wait(timeout=timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            t_exit = time.perf_counter() - t0
        finally:
            for s in (qmp_host, qmp_guest, con_host, con_guest):
                s.close()
        if seen is None:
            raise RuntimeError(f"floor VM never printed its marker: {console[-500:]!r}")
        return seen, t_exit

    @staticmethod
    def _read_console(sock: socket.socket, t0: float, timeout: float) -> tuple[float | None, bytes]:
        seen = None
        buf = b""
        sock.settimeout(timeout)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return seen, buf
            buf = (buf + chunk)[-4096:]
            if seen is None and MARKER in buf:
                seen = time.perf_counter() - t0


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
    from supermachine.workload import resolve
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
    marks["qemu --version probe"] = t() - t0
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
        work = resolve(entrypoint=cfg.entrypoint, cmd=cfg.cmd, env=cfg.env,
                       working_dir=cfg.working_dir, user=cfg.user, cmd_override=["true"],
                       caller_env={})
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
    import supermachine.vm as vm_mod
    marks["import"] = t() - t0
    split: list[tuple] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("prepared in"):
                split.append(record.args)

    logger = logging.getLogger("supermachine.vm")
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

MODES = ("cli restore", "cli first run", "cli boot", "cli boot, no network", "floor")


def one_rep(mode: str, image: Path, floor: Floor, warm: common.Home, bake: common.Home
            ) -> tuple[float, str]:
    """(seconds, what the CLI printed on stderr) for one run in ``mode``."""
    run = [common.CLI, "run"]
    if mode == "floor":
        return floor.boot()[1], ""
    if mode == "cli restore":  # the default path once the image has run here before
        argv, home = [*run, str(image), "true"], warm
    elif mode == "cli first run":  # no snapshot yet: boot, bake the snapshot, restore it
        shutil.rmtree(bake.root / "snapshots", ignore_errors=True)
        argv, home = [*run, str(image), "true"], bake
    elif mode == "cli boot":  # cold boot, default network (a passt process and a NIC)
        argv, home = [*run, "--no-snapshot", str(image), "true"], warm
    else:  # "cli boot, no network": cold boot with the floor's devices
        argv, home = [*run, "--no-snapshot", "--network", "none", str(image), "true"], warm
    t = common.run_timed(argv, env=common.home_env(home))
    return t.seconds, t.stderr.decode(errors="replace")


def compare(image: Path, floor: Floor, warm: common.Home, bake: common.Home, reps: int
            ) -> tuple[dict[str, list[float]], list[str]]:
    """All modes, interleaved rep by rep, so slow phases of the machine hit them all.

    Also returns the CLI's notices of snapshot restores that failed (and fell back to a
    boot): such a sample is kept, since a user would wait for it too, but reported.
    """
    common.run_timed([common.CLI, "run", str(image), "true"],
                     env=common.home_env(warm))  # bakes the warm home's snapshot if needed
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    failed: list[str] = []
    for _ in range(reps):
        for mode in MODES:
            seconds, err = one_rep(mode, image, floor, warm, bake)
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

    results: dict[str, Any] = {"machine": info, "reps": reps, "quick": args.quick}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sm-bench-floor-") as tmp, \
            common.fresh_home("bake") as bake:
        common.link_tree(warm.rootfs, bake.rootfs)  # first runs, but of cached root filesystems
        floor = Floor(warm, rootfs["busybox"], Path(tmp))
        results["floor_command"] = floor.command(qmp_fd=3, console_fd=4)
        for name, layout in images.items():
            # The floor attaches the same disk as ours (neither reads it before init runs).
            floor.config = dataclasses.replace(floor.config, rootfs=rootfs[name])
            runs, failed = compare(layout, floor, warm, bake, reps)
            if failed:
                print(f"warning: {name}: {len(failed)} snapshot restores failed and booted "
                      f"instead, e.g. {failed[0]}")
            s = {m: summary(v) for m, v in runs.items()}
            ratios = {m: s[m]["median"] / s["floor"]["median"] for m in MODES}
            results[name] = {"summary": s, "ratio_median_vs_floor": ratios,
                             "target_ratio": 1.3, "samples": runs,
                             "restore_failures": failed}
            for m in MODES:
                rows.append([name, m, fmt_s(s[m]["median"]), fmt_s(s[m]["p99"]),
                             f"{ratios[m]:.2f}x", "" if m == "floor" else
                             ("yes" if ratios[m] <= 1.3 else "NO")])
    common.print_table(
        f"run IMAGE true, whole process wall time ({reps} interleaved reps, accel "
        f"{info['accel']})", ["image", "mode", "p50", "p99", "/floor p50", "<=1.3x"], rows)
    print("modes: cli restore = `supermachine run IMAGE true` with the image's automatic "
          "snapshot present (the default path);\n  cli first run = the same with no snapshot "
          "yet (boot + bake + restore);\n  cli boot = `run --no-snapshot` (cold boot, default "
          "network: passt + NIC);\n  cli boot, no network = `run --no-snapshot --network none`"
          " (the floor's devices);\n  floor = bare QEMU, our command line minus the agent "
          "channel (no NIC), /init = marker + poweroff.")

    # Where the time goes.
    startup_reps = 5 if args.quick else 20
    py_pass = [common.run_timed([sys.executable, "-c", "pass"]).seconds
               for _ in range(startup_reps)]
    cli_help = [common.run_timed([common.CLI, "--help"]).seconds for _ in range(startup_reps)]
    phase_reps = 1 if args.quick else 5
    results["python_startup"] = summary(py_pass)
    results["cli_help"] = summary(cli_help)
    for label, mode, key in (("boot path, no snapshot, no network", "--phases-child",
                              "cli boot, no network"),
                             ("restore path", "--restore-phases-child", "cli restore")):
        phases, failures = measure_phases(mode, images["busybox"], warm, phase_reps)
        results[f"phases_busybox_{mode.strip('-')}"] = {k: summary(v) for k, v in phases.items()}
        if failures:
            results["restore_failures"] = failures
            print(f"\nwarning: {len(failures)} of {phase_reps} restores failed and booted "
                  f"instead: {failures[0]}")
        prow = [["python -c pass (venv)", fmt_s(summary(py_pass)["median"]), startup_reps],
                ["supermachine --help", fmt_s(summary(cli_help)["median"]), startup_reps]]
        accounted = summary(py_pass)["median"]
        for k, v in phases.items():
            med = summary(v)["median"]
            if not k.startswith("  "):  # indented rows split the row above them
                accounted += med
            prow.append([k, fmt_s(med), len(v)])
        prow.append(["sum (python start + phases)", fmt_s(accounted), ""])
        prow.append([f"whole process, {key} (from above)",
                     fmt_s(results["busybox"]["summary"][key]["median"]), reps])
        prow.append(["floor (from above)",
                     fmt_s(results["busybox"]["summary"]["floor"]["median"]), reps])
        common.print_table(f"phases of a busybox run, {label} (medians; a fresh process each)",
                           ["phase", "median", "n"], prow)

    build_rows = []
    results["rootfs_build"] = {}
    for name, layout in images.items():
        r = rootfs_build(layout)
        results["rootfs_build"][name] = r
        build_rows.append([name, fmt_s(r["seconds"]), f"{r['squashfs_bytes'] / 1e6:.1f} MB",
                           f"{r['layers_bytes'] / 1e6:.1f} MB"])
    common.print_table("rootfs build in a fresh store (1 rep each)",
                       ["image", "build", "squashfs size", "layers (compressed)"], build_rows)
    common.write_results("bench_run", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
