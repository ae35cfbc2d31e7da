"""A VM: an image booted in a microVM, with the agent channel to run commands in it.

`VM` composes the layers (image -> root filesystem -> guest assets -> engine -> agent) and
owns everything it starts, Trio-nursery style: leaving ``with``, an exception, Ctrl-C or
close() kills QEMU, stops the threads and closes every fd. The QEMU process also carries
PR_SET_PDEATHSIG, so even a SIGKILLed host process leaves no VM behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import bake as bake_mod
from . import snapshot as snapshot_mod
from .agent.client import AgentClient, ExecResult, ExitStatus, Process
from .agent.protocol import Stream
from .errors import AgentError, Error, SnapshotError, UsageError, VMError
from .home import Home
from .workload import (
    parse_cpus,
    parse_hostname,
    parse_machine_id,
    parse_memory,
    random_machine_id,
    resolve,
)

log = logging.getLogger(__name__)

__all__ = ["VM", "ExecResult", "ExitStatus", "Process"]

SNAPSHOT_PREFIX = "snapshot:"
DEFAULT_BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine can be slow; KVM takes <1 s


def _boot_failure_summary(console: str) -> str:
    """The most telling line of a failed boot's console output."""
    lines = [ln.strip() for ln in console.splitlines() if ln.strip()]
    for marker in ("sm-init: fatal", "Kernel panic", "qemu-system", "qemu:"):
        for line in reversed(lines):
            if marker in line:
                return line
    return lines[-1] if lines else "no console output"


class VM:
    """A microVM running an OCI image.

    ``image`` is anything `supermachine run` accepts (an OCI layout directory, an oci- or
    docker-archive, prefixed references). The VM boots on `start()` (or entering ``with``)
    and is destroyed on `close()`; writes to its root filesystem vanish with it.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        memory: str | int = "512M",
        cpus: int | str = 1,
        accel: str | None = None,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        home: Home | str | os.PathLike[str] | None = None,
        verbose: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        on_notice: Callable[[str], None] | None = None,
        pull: str = "missing",
        platform: str | None = None,
        registry_options: Mapping[str, object] | None = None,
        snapshot: bool = True,
        hostname: str | None = None,
        machine_id: str | bool | None = None,
        network: str = "user",
        ports: Mapping[int | str, int] | Sequence[str | int] | None = None,
        publish_all: bool = False,
        allow_hosts: Sequence[str] = (),
        allow_host_loopback: bool = False,
    ) -> None:
        self._image_ref = os.fspath(image)
        self.memory_mib = parse_memory(memory)
        self.cpus = parse_cpus(cpus)
        self._accel_request = accel
        self._kernel = Path(kernel) if kernel is not None else None
        self._initrd = Path(initrd) if initrd is not None else None
        if (self._kernel is None) != (self._initrd is None):
            raise UsageError("--kernel and --initrd go together: give both or neither")
        self.home = home if isinstance(home, Home) else Home(Path(home)) if home else \
            Home.default()
        self._verbose = verbose
        self._boot_timeout = boot_timeout
        self._notice = on_notice or (lambda msg: log.info("%s", msg))
        self._pull = pull
        self._platform = platform
        self._registry_options = dict(registry_options or {})
        self._use_snapshot = snapshot
        self._hostname = parse_hostname(hostname)
        self._machine_id = parse_machine_id(machine_id)
        from .engine import net

        # Validated now, so bad specs fail before anything is pulled or booted.
        self._forwards = list(net.parse_ports(ports))
        self._publish_all = publish_all
        for item in allow_hosts:
            net.parse_allow_host(item)
        self._network = net.Network(mode=network, allow_host_loopback=allow_host_loopback,
                                    allow_hosts=tuple(allow_hosts))
        if publish_all and not self._network.enabled:
            raise UsageError("network 'none' has no interface: it cannot publish ports")
        #: published ports, host side resolved (no 0 ports) once the VM runs
        self.ports: tuple[net.PortForward, ...] = ()
        #: name of the snapshot this VM was restored from (None when it booted)
        self.restored_from: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._client: AgentClient | None = None
        self._machine = None
        #: every machine this VM launched (the bake's too), for `kill_now`
        self._launched: list = []
        self.image = None
        self.accel = None

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> VM:
        if self._stack is not None:
            raise VMError("the VM is already started")
        stack = contextlib.ExitStack()
        self._stack = stack
        try:
            self._boot(stack)
        except BaseException:
            self.close()
            raise
        return self

    def _boot(self, stack: contextlib.ExitStack) -> None:
        from .engine import default_engine, net
        from .engine.accel import choose
        from .engine.base import MachineConfig
        from .guest.assets import ensure_guest_assets
        from .images import ensure_rootfs

        t0 = time.monotonic()
        named = None
        if self._image_ref.startswith(SNAPSHOT_PREFIX):
            named = snapshot_mod.open_named(self.home, self._image_ref[len(SNAPSHOT_PREFIX):])
            self._image_ref = named.meta["image_source"]
            self.memory_mib = named.inputs["memory_mib"]
            self.cpus = named.inputs["cpus"]
            saved = named.inputs.get("network")
            if isinstance(saved, list) and saved and saved[0] in net.MODES and \
                    saved[0] != self._network.mode:
                # The NIC is part of the saved machine, like its memory size.
                self._network = net.Network(mode=saved[0], ports=self._network.ports,
                                            allow_hosts=self._network.allow_hosts,
                                            allow_host_loopback=self._network.allow_host_loopback)
        self.image = self._open_image()
        rootfs = ensure_rootfs(self.image, self.home)
        assets = ensure_guest_assets(self.home, kernel=self._kernel, initrd=self._initrd)
        self.accel = choose(self._accel_request)
        if not self.accel.hardware:
            self._notice(self.accel.reason)
        self._engine = default_engine()
        self._config = MachineConfig(
            kernel=assets.kernel, initrd=assets.initrd, cmdline=assets.cmdline,
            rootfs=rootfs, memory_mib=self.memory_mib, cpus=self.cpus,
            accel=self.accel.name, verbose=self._verbose, **self._network_config(),
        )
        inputs = {
            "format": snapshot_mod.FORMAT, "guest": assets.fingerprint,
            "image": self.image.config_digest,
            "rootfs": {k: v for k, v in snapshot_mod.file_identity(rootfs).items()
                       if k in ("ino", "size", "mtime_ns")},
            "memory_mib": self.memory_mib, "cpus": self.cpus, "accel": self.accel.name,
            "engine": self._engine.identity(),
            # The NIC is a device of the saved machine; forwards and allow-lists are not
            # (each launch starts its own passt), so restored VMs can publish any ports.
            "network": [self._network.mode,
                        *net.guest_cmdline(self._network)],
        }
        self._snapshot_inputs = inputs
        t1 = time.monotonic()
        snap = None
        if named is not None:
            changed = named.mismatch(inputs)
            if changed:
                raise SnapshotError(
                    f"snapshot {named.name} no longer matches this machine (changed: "
                    f"{', '.join(changed)}); make it again from a running VM")
            snap = named
        elif self._use_snapshot:
            snap = self._auto_snapshot(inputs)
        if snap is not None:
            try:
                self._start_machine(stack, snapshot=snap)
                self.restored_from = snap.name
            except VMError as e:
                if named is not None:
                    raise
                self._notice(f"restoring the snapshot failed ({e}); booting instead")
                stack.close()
                snapshot_mod.discard_auto(self.home, snap)  # the next VM bakes a fresh one
                snap = None
        if snap is None:
            self._start_machine(stack)
        log.debug("prepared in %.0f ms, %s in %.0f ms", (t1 - t0) * 1000,
                  "restored" if snap else "booted", (time.monotonic() - t1) * 1000)

    def _network_config(self) -> dict[str, object]:
        """MachineConfig's network fields: host ports checked free or picked, the egress
        guard built and its policy resolved, all before anything boots."""
        from .engine import net, netguard

        if not self._network.enabled:
            return {"network": self._network}
        forwards = list(self._forwards)
        if self._publish_all:
            forwards += net.parse_exposed(self.image.config.exposed_ports)
        claimed = self._engine.claim_host_ports(tuple(forwards))
        network = dataclasses.replace(self._network, ports=claimed)
        self.ports = network.ports
        return {"network": network, "netguard": netguard.ensure_netguard(self.home.guest),
                "netguard_policy": netguard.policy(network)}

    def _unpublished(self):
        """This VM's network without its forwards: for helper machines (snapshot bakes) that
        must not take the published ports."""
        net = self._config.network
        return dataclasses.replace(net, ports=()) if net is not None else None

    def expose(self, guest_port: int, host_port: int = 0, proto: str = "tcp",
               host_ip: str = "127.0.0.1") -> int:
        """Publish ``guest_port`` on ``host_ip:host_port`` (0: any free port); returns the host
        port, or 0 before `start()` when it is to be picked then (see `ports`).

        On a running VM this restarts its passt (which takes forwards only when it starts):
        connections through the VM's network that are open at that moment are cut.
        """
        from .engine import net

        if not self._network.enabled:
            raise UsageError("network 'none' has no interface: it cannot publish ports")
        forward = net.parse_port_spec(f"{host_ip}:{host_port}:{guest_port}/{proto}")
        if self._stack is None:
            self._forwards = list(net.check_forwards([*self._forwards, forward]))
            return host_port
        machine = self._machine
        if machine is None or not self.running:
            raise VMError("the VM is not running")
        (claimed,) = self._engine.claim_host_ports((forward,))
        ports = net.check_forwards([*self.ports, claimed])
        machine.set_forwards(ports)
        self.ports = ports
        return claimed.host_port

    def _auto_snapshot(self, inputs: dict) -> snapshot_mod.Snapshot | None:
        """The automatic snapshot for this VM's configuration, baked by a first boot."""
        def bake(mem: Path, state: Path) -> None:
            bake_mod.bake_auto(self._launch, self._config, self.image.config,
                               self.memory_mib, mem, state)

        try:
            snap, baked = snapshot_mod.ensure_auto(
                self.home, {**inputs, "bake": bake_mod.bake_version()}, bake,
                on_invalid=self._notice, extra={"rootfs_path": str(self._config.rootfs)})
        except SnapshotError as e:
            self._notice(f"{e}; booting without a snapshot")
            return None
        if baked:
            log.info("baked snapshot %s", snap.path)
        return snap

    def _launch(self, config, *, personal: bool = True):
        """Start a machine and wait for its guest agent's HELLO; failures name the cause.

        ``personal`` applies this VM's hostname and machine id; a bake leaves them out, so
        the shared snapshot keeps the boot's defaults for VMs that ask for neither."""
        machine = self._engine.launch(config)
        self._launched.append(machine)
        try:
            client = AgentClient(machine.agent)
        except BaseException:
            machine.kill()
            raise
        try:
            machine_id = random_machine_id() if self._machine_id is True else self._machine_id
            client.hello(self._boot_timeout, time_ns=time.time_ns(), entropy=os.urandom(64),
                         hostname=self._hostname if personal else None,
                         machine_id=machine_id if personal else None)
        except BaseException as e:
            status = machine.wait(timeout=0.5) if isinstance(e, AgentError) else None
            client.close()
            machine.kill()
            if not isinstance(e, AgentError):
                raise
            if status is None:
                raise VMError(f"the VM did not become ready: {e}") from None
            summary = _boot_failure_summary(machine.console_tail())
            what = "restore" if config.incoming_state else "boot"
            raise VMError(f"the VM failed to {what}: {summary}") from None
        return machine, client

    def _start_machine(self, stack: contextlib.ExitStack,
                       snapshot: snapshot_mod.Snapshot | None = None) -> None:
        config = self._config
        if snapshot is not None:
            config = dataclasses.replace(config, memory_file=snapshot.mem, memory_shared=False,
                                         incoming_state=snapshot.state)
        machine, client = self._launch(config)
        self._machine, self._client = machine, client
        stack.callback(machine.kill)
        stack.callback(client.close)
        threading.Thread(target=self._watch, args=(machine, client), name="vm-watch",
                         daemon=True).start()

    def _open_image(self):
        """A local layout/archive as it is; a registry reference per the pull policy."""
        from .images.source import open_local, parse_source

        src = parse_source(self._image_ref)
        if src is not None:
            return open_local(src, platform=self._platform)
        from .images.pull import ensure_image

        return ensure_image(self._image_ref, self.home, self._pull, platform=self._platform,
                            **self._registry_options)

    @staticmethod
    def _watch(machine, client: AgentClient) -> None:
        # Wake every waiter promptly when QEMU goes away instead of letting them time out.
        status = machine.wait()
        client.fail(f"the VM exited unexpectedly (QEMU exit status {status})")

    def close(self) -> None:
        """Destroy the VM and release everything it holds. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._client = None
        self._launched = []

    def kill_now(self) -> bool:
        """Kill this VM's QEMU processes (a bake's included) and return at once, taking no
        lock: safe inside a signal handler. Calls waiting on the VM then fail and unwind
        through `close()` in their own thread. True if a machine was running."""
        return any([m.kill_now() for m in tuple(self._launched)])

    def snapshot(self, name: str) -> snapshot_mod.Snapshot:
        """Save this running VM (as warmed up so far) as snapshot ``name``.

        `VM("snapshot:NAME")` and `supermachine run snapshot:NAME` then start from it. The VM
        keeps running; processes of its own continue, and in restored copies every channel
        that was open now is gone (their processes are killed on restore). Copies keep this
        VM's hostname and /etc/machine-id unless they ask for their own.
        """
        machine = self._machine
        if machine is None or not self.running:
            raise VMError("the VM is not running")
        snapshot_mod.check_name(name)

        def bake(mem: Path, state: Path) -> None:
            # RAM of a running VM is not in a shared file: save a full stream, load it into
            # a paused copy whose RAM *is* a shared file, and save that copy's device state.
            stream = mem.with_name("stream")
            machine.save_full(stream)
            config = dataclasses.replace(self._config, memory_file=mem, memory_shared=True,
                                         incoming_state=stream, incoming_full=True,
                                         network=self._unpublished())
            copy = self._engine.launch(config)
            try:
                copy.wait_incoming(120)
                # The stream carries the source's paused run state; run the copy so the
                # state saved from it says "running" and restored VMs start on their own.
                copy.resume()
                copy.save_state(state)
            finally:
                copy.kill()
                stream.unlink(missing_ok=True)

        inputs = {**self._snapshot_inputs}
        return snapshot_mod.create_named(self.home, name, inputs, bake,
                                         {"image_source": self._image_ref})

    @property
    def pid(self) -> int | None:
        """The VM's QEMU process id while it runs (for ps/inspect), else None."""
        return self._machine.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._machine is not None and self._machine.poll() is None and \
            self._client is not None

    def _agent(self) -> AgentClient:
        if self._client is None:
            raise VMError("the VM is not running; start it first (or use `with VM(...)`)")
        return self._client

    # ---- commands ---------------------------------------------------------------------------

    def _defaults(self, env, cwd, user) -> tuple[list[str], str, str | None]:
        cfg = self.image.config
        merged = resolve(entrypoint=(), cmd=("true",), env=cfg.env, working_dir=cfg.working_dir,
                         user=cfg.user, env_overrides=_env_items(env), caller_env={})
        return list(merged.env), cwd or merged.cwd, user or merged.user

    def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | Sequence[str] | None = None,
             cwd: str | None = None, user: str | None = None, stdin: bytes | None = None,
             timeout: float | None = None) -> ExecResult:
        """Run ``argv`` to completion; ``env`` adds to the image's Env, like `docker exec`."""
        full_env, cwd, user = self._defaults(env, cwd, user)
        return self._agent().exec(list(argv), env=full_env, cwd=cwd, user=user, stdin=stdin,
                                  timeout=timeout)

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | Sequence[str] | None = None,
              cwd: str | None = None, user: str | None = None, stdin: bool = False,
              tty: bool = False, winsize: tuple[int, int] | None = None) -> Process:
        """Start ``argv`` and return a streaming `Process` handle."""
        full_env, cwd, user = self._defaults(env, cwd, user)
        return self._agent().spawn(list(argv), env=full_env, cwd=cwd, user=user, stdin=stdin,
                                   tty=tty, winsize=winsize)

    def read_file(self, path: str, *, max_size: int = 1 << 30) -> bytes:
        return self._agent().read_file(path, max_size=max_size)

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644,
                   user: str | None = None) -> None:
        self._agent().write_file(path, data, mode=mode, user=user)

    def read_file_to(self, path: str, fileobj, *, max_size: int | None = None) -> int:
        """Stream a VM file into ``fileobj`` (anything with write()); returns the byte count."""
        return self._agent().read_file_to(path, fileobj, max_size=max_size)

    def write_file_from(self, path: str, fileobj, *, mode: int = 0o644,
                        user: str | None = None) -> None:
        """Create/replace a VM file with what ``fileobj.read()`` yields until it returns b""."""
        self._agent().write_file_from(path, fileobj, mode=mode, user=user)

    def copy_in(self, src: str | os.PathLike[str], dst: str) -> None:
        """Copy a host file into the VM (mode preserved)."""
        with open(src, "rb") as f:
            self._agent().write_file_from(dst, f, mode=os.fstat(f.fileno()).st_mode & 0o7777)

    def copy_out(self, src: str, dst: str | os.PathLike[str]) -> None:
        """Copy a VM file to the host (written atomically)."""
        from .home import atomic_path

        with atomic_path(Path(dst)) as tmp, open(tmp, "wb") as f:
            self._agent().read_file_to(src, f)

    def run_workload(self, *, cmd: Sequence[str] | None = None, entrypoint: str | None = None,
                     env: Sequence[str] = (), workdir: str | None = None,
                     user: str | None = None, stdin_fd: int | None = None,
                     stdout_fd: int = 1, stderr_fd: int = 2) -> int:
        """Run the image's Entrypoint + Cmd (docker overrides applied), streaming its output
        to ``stdout_fd``/``stderr_fd`` as it comes and its input from ``stdin_fd``.

        Returns the workload's exit status (128+N when killed by signal N; 127/126 when it
        cannot start, after printing why on ``stderr_fd``).
        """
        cfg = self.image.config
        work = resolve(entrypoint=cfg.entrypoint, cmd=cfg.cmd, env=cfg.env,
                       working_dir=cfg.working_dir, user=cfg.user,
                       entrypoint_override=entrypoint, cmd_override=cmd, env_overrides=env,
                       workdir_override=workdir, user_override=user, caller_env=os.environ)
        proc = self._agent().spawn(list(work.argv), env=list(work.env), cwd=work.cwd,
                                   user=work.user, stdin=stdin_fd is not None)
        with proc:
            if stdin_fd is not None:
                threading.Thread(target=_pump_stdin, args=(stdin_fd, proc), name="vm-stdin",
                                 daemon=True).start()
            out = {Stream.STDOUT: stdout_fd, Stream.STDERR: stderr_fd}
            for stream, data in proc:
                _write_all(out.get(stream, stdout_fd), data)
            status = proc.wait()
        if status.error:
            _write_all(stderr_fd, f"supermachine: {status.error}\n".encode())
        return status.exit_code


def _env_items(env: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    if env is None:
        return []
    if isinstance(env, Mapping):
        return [f"{k}={v}" for k, v in env.items()]
    return list(env)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pump_stdin(fd: int, proc: Process) -> None:
    """Copy host stdin into the workload until EOF; the workload ending stops it quietly."""
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            proc.write(data)
        proc.close_stdin()
    except (Error, OSError):
        return

