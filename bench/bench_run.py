"""Issue 2: cold `supermachine run IMAGE true` against the floor of a bare QEMU boot.

What is measured (wall time, this machine, whatever accelerator `--accel auto` picks; the
header prints it):

* ours: the CLI process `supermachine run IMAGE true`, fork to reaped exit, with the image's
  root filesystem and the guest assets already cached (warm home). Busybox and Debian+python.
* floor: the same qemu binary with our engine's command line (`build_command`) minus the
  agent channel (virtio-serial device, its port and chardev), the same kernel, command line
  and root disk, booting the same initramfs except that /init is a tiny static program that
  prints a marker on the console and calls reboot(RB_POWER_OFF). Popen to reaped exit.
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

import json
import os
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
    """Runs in a fresh interpreter: VM's boot steps timed one by one; prints JSON."""
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
    config = MachineConfig(kernel=assets.kernel, initrd=assets.initrd, cmdline=assets.cmdline,
                           rootfs=rootfs, memory_mib=512, cpus=1, accel=accel.name)
    t0 = t()
    machine = QemuEngine().launch(config)
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


def measure_phases(image: Path, home: common.Home, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    py = sys.executable
    for _ in range(reps):
        proc = common.run_timed([py, __file__, "--phases-child", str(image), str(home.root)])
        for k, v in json.loads(proc.stdout.decode().strip().splitlines()[-1]).items():
            out.setdefault(k, []).append(v)
    return out


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


def ours_vs_floor(image: Path, floor: Floor, home: common.Home, reps: int
                  ) -> dict[str, list[float]]:
    env = common.home_env(home)
    ours, floor_exit, floor_marker = [], [], []
    common.run_timed([common.CLI, "run", str(image), "true"], env=env)  # prime caches
    for _ in range(reps):
        ours.append(common.run_timed([common.CLI, "run", str(image), "true"], env=env).seconds)
        marker, total = floor.boot()
        floor_marker.append(marker)
        floor_exit.append(total)
    return {"ours": ours, "floor": floor_exit, "floor_marker": floor_marker}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--phases-child":
        phases_child(sys.argv[2], sys.argv[3])
        return 0
    args = common.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (2 if args.quick else 10)
    info = common.machine_info()
    common.print_header("bench_run", info, args.quick)

    from tests.fixtures import images as fx

    from supermachine.images import ensure_rootfs
    from supermachine.images.source import open_local, parse_source

    images = {"busybox": fx.busybox(), "python": fx.python()}
    home = common.warm_home()
    common.ensure_guest(home)
    rootfs = {}
    for name, layout in images.items():
        src = parse_source(str(layout))
        assert src is not None
        rootfs[name] = ensure_rootfs(open_local(src), home)

    results: dict[str, Any] = {"machine": info, "reps": reps, "quick": args.quick}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sm-bench-floor-") as tmp:
        floor = Floor(home, rootfs["busybox"], Path(tmp))
        results["floor_command"] = floor.command(qmp_fd=3, console_fd=4)
        for name, layout in images.items():
            # The floor boots the same disk as ours (it never mounts it, like ours before
            # HELLO it only has to be attached).
            floor.config = type(floor.config)(**{**floor.config.__dict__,
                                                 "rootfs": rootfs[name]})
            runs = ours_vs_floor(layout, floor, home, reps)
            s_ours, s_floor = summary(runs["ours"]), summary(runs["floor"])
            ratio = s_ours["median"] / s_floor["median"]
            results[name] = {"ours": s_ours, "floor": s_floor,
                             "floor_marker": summary(runs["floor_marker"]),
                             "ratio_median": ratio, "target_ratio": 1.3, "samples": runs}
            rows.append([name, fmt_s(s_ours["median"]), fmt_s(s_ours["p99"]),
                         fmt_s(s_floor["median"]), fmt_s(s_floor["p99"]),
                         fmt_s(summary(runs["floor_marker"])["median"]), f"{ratio:.2f}x",
                         "yes" if ratio <= 1.3 else "NO"])
    common.print_table(
        f"supermachine run IMAGE true vs bare-QEMU floor ({reps} alternating reps, "
        f"accel {info['accel']})",
        ["image", "ours p50", "ours p99", "floor p50", "floor p99", "floor marker p50",
         "ratio p50", "<=1.3x"], rows)

    # Where the time goes.
    startup_reps = 5 if args.quick else 20
    py_pass = [common.run_timed([sys.executable, "-c", "pass"]).seconds
               for _ in range(startup_reps)]
    cli_help = [common.run_timed([common.CLI, "--help"]).seconds for _ in range(startup_reps)]
    phase_reps = 1 if args.quick else 5
    phases = measure_phases(images["busybox"], home, phase_reps)
    results["phases_busybox"] = {k: summary(v) for k, v in phases.items()}
    results["python_startup"] = summary(py_pass)
    results["cli_help"] = summary(cli_help)
    ours_med = results["busybox"]["ours"]["median"]
    prow = [["python -c pass (venv)", fmt_s(summary(py_pass)["median"]), startup_reps],
            ["supermachine --help", fmt_s(summary(cli_help)["median"]), startup_reps]]
    accounted = summary(py_pass)["median"]
    for k, v in phases.items():
        med = summary(v)["median"]
        accounted += med
        prow.append([k, fmt_s(med), len(v)])
    prow.append(["sum (python start + phases)", fmt_s(accounted), ""])
    prow.append(["CLI run, busybox (from above)", fmt_s(ours_med), reps])
    prow.append(["floor: marker / exit", f"{fmt_s(results['busybox']['floor_marker']['median'])}"
                 f" / {fmt_s(results['busybox']['floor']['median'])}", reps])
    common.print_table("phases of a busybox run (medians; phases timed in a fresh process each)",
                       ["phase", "median", "n"], prow)

    build_rows = []
    results["rootfs_build"] = {}
    for name, layout in images.items():
        r = rootfs_build(layout)
        results["rootfs_build"][name] = r
        build_rows.append([name, fmt_s(r["seconds"]), f"{r['squashfs_bytes'] / 1e6:.1f} MB"])
    common.print_table("rootfs build in a fresh store (1 rep each)",
                       ["image", "build", "squashfs size"], build_rows)
    common.write_results("bench_run", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
