"""The floors our VMs are compared against: bare QEMU doing the least a boot or a restore can.

Both floors run the same QEMU binary with the command line our engine builds
(`supermachine.engine.qemu.build_command`), so a ratio against them is what supermachine adds
on top of QEMU itself, not a comparison with another machine:

* `BootFloor`: a cold boot. Our command line minus the agent channel, the same kernel,
  kernel command line, disk and initramfs (same modules) except that /init is a tiny static
  program that prints a marker on the console and powers off. Popen to reaped exit.
* `RestoreFloor`: a restore. The exact `MachineConfig` one of our restored VMs was launched
  with (so the same snapshot files, the memory file mapped private, `-incoming defer`), and
  the same QMP steps the engine takes (`x-ignore-shared`, then `migrate-incoming` on the
  state file's fd), until QEMU reports the guest running (its RESUME event); then SIGKILL.
  Popen to reaped exit. Nothing answers the guest's agent: the floor stops where our restore
  starts waiting for the agent's HELLO.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import common

MARKER = b"SM-FLOOR-MARKER"

# PID 1 of the boot floor's guest: the least a guest can do that proves it reached userspace.
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


class BootFloor:
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
    def _read_console(sock: socket.socket, t0: float, timeout: float
                      ) -> tuple[float | None, bytes]:
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


class _RawQMP:
    """Just enough QMP for the floor: commands in order, and every event remembered.

    The package's QMPClient drops events while waiting for replies; the floor needs the
    RESUME event, which may arrive at any point after `migrate-incoming`.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + timeout
        self.buf = b""
        self.events: list[str] = []

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QEMU closed its QMP socket (it exited)")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        if "event" in msg:
            self.events.append(msg["event"])
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._message()
            if "error" in reply:
                raise RuntimeError(f"QEMU refused {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def greet(self) -> None:
        if "QMP" not in self._message():
            raise RuntimeError("no QMP greeting")
        self.execute("qmp_capabilities")

    def wait_event(self, name: str) -> None:
        while name not in self.events:
            self._message()


class RestoreFloor:
    """Bare QEMU restoring one of our snapshots with our command line, to the guest running."""

    def __init__(self, config: Any) -> None:
        """``config``: the MachineConfig a restored VM of ours was launched with (no network:
        a networked one needs our passt attached before the state may load)."""
        from supermachine.engine.qemu import qemu_binary

        if config.incoming_state is None or config.memory_file is None:
            raise ValueError("the restore floor needs a restored VM's machine config")
        if config.network is not None and config.network.enabled:
            raise ValueError("the restore floor restores network-less snapshots only")
        self.config = config
        self.qemu = qemu_binary()

    @classmethod
    def from_vm(cls, image: Path | str, home: common.Home, **vm_options: Any) -> RestoreFloor:
        """The floor for the automatic snapshot ``VM(image, network="none", ...)`` restores
        (baked here first if it is missing)."""
        import supermachine as sm

        for _ in range(2):  # the first start bakes the snapshot when it is missing
            vm = sm.VM(image, home=home, network="none", **vm_options).start()
            try:
                if vm.restored_from is not None:
                    return cls(vm._machine.config)  # internal: exactly what the engine ran
            finally:
                vm.close()
        raise RuntimeError(f"{image}: the VM booted twice instead of restoring its snapshot")

    def command(self, agent_fd: int, qmp_fd: int, console_fd: int, state_fd: int) -> list[str]:
        from supermachine.engine.qemu import build_command

        return build_command(self.config, qemu=self.qemu, agent_fd=agent_fd, qmp_fd=qmp_fd,
                             console_fd=console_fd, state_fd=state_fd)

    def restore(self, timeout: float = 60) -> tuple[float, float]:
        """(seconds to the guest running, seconds to QEMU's reaped exit after SIGKILL)."""
        pairs = [socket.socketpair() for _ in range(3)]  # agent, QMP, console
        (agent_host, agent_guest), (qmp_host, qmp_guest), (con_host, con_guest) = pairs
        state = open(self.config.incoming_state, "rb")  # noqa: SIM115 (closed below)
        proc = None
        try:
            fds = [agent_guest.fileno(), qmp_guest.fileno(), con_guest.fileno(), state.fileno()]
            cmd = self.command(*fds)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=con_guest.fileno(),
                                    stderr=con_guest.fileno(), pass_fds=fds)
            for s in (agent_guest, qmp_guest, con_guest):
                s.close()
            state.close()
            qmp = _RawQMP(qmp_host, timeout)
            try:
                qmp.greet()
                qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": True}]})
                qmp.execute("migrate-incoming", {"uri": f"fd:{fds[3]}"})
                qmp.wait_event("RESUME")
            except (OSError, RuntimeError) as e:
                con_host.setblocking(False)
                try:
                    tail = con_host.recv(65536)
                except OSError:
                    tail = b""
                raise RuntimeError(f"restore floor failed: {e}; console: {tail[-500:]!r}") \
                    from None
            t_running = time.perf_counter() - t0
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            t_exit = time.perf_counter() - t0
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            state.close()
            for a, b in pairs:
                a.close()
                b.close()
        return t_running, t_exit
