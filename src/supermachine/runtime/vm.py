"""A VM: a machine built from a `VMSpec`, running, with the agent channel to use it.

`VM` is the running handle. What the machine is made of comes from the build recipe
(builder.py); whether it boots or restores depends only on where its state comes from: a
named snapshot, the automatic snapshot of its configuration (baked by bake.py on first
use), or nothing (a cold boot).

A VM owns everything it starts, Trio-nursery style: leaving ``with``, an exception, Ctrl-C
or close() kills QEMU, joins its threads and closes every fd. The QEMU process also carries
PR_SET_PDEATHSIG, so even a SIGKILLed host process leaves no VM behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..agent.client import AgentClient, ExecResult, ExitStatus, Process
from ..agent.protocol import Stream
from ..errors import AgentError, Error, MountError, SnapshotError, UsageError, VMError
from ..fdio import write_all
from ..home import Home
from ..spec import VMSpec, WorkloadSpec, env_items, random_machine_id
from . import bake as bake_mod
from . import builder, volume_store, volumes
from . import snapshot as snapshot_mod
from .threads import ThreadGroup

log = logging.getLogger(__name__)

__all__ = ["VM", "ExecResult", "ExitStatus", "Process"]

DEFAULT_BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine can be slow; KVM takes <1 s
#: how long a VM with a read-write volume disk gets to write back and power off when closed
SYNC_PATIENCE = 10.0


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
    docker-archive, a registry reference, ``snapshot:NAME``), or a ready `VMSpec`. The other
    keyword arguments are the spec's (see `VMSpec.create`: ``memory="1G"``, ``cpus``,
    ``network``, ``ports``, ``hostname``, ``machine_id``, ``snapshot``, ``pull``, ...).
    The VM boots on `start()` (or entering ``with``) and is destroyed on `close()`; writes
    to its root filesystem vanish with it.
    """

    def __init__(self, image: str | os.PathLike[str] | VMSpec, *,
                 home: Home | str | os.PathLike[str] | None = None, verbose: bool = False,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
                 on_notice: Callable[[str], None] | None = None, progress: Any = None,
                 **spec: Any) -> None:
        if isinstance(image, VMSpec):
            if spec:
                raise UsageError("give either a VMSpec or spec keywords, not both")
            self.spec = image
        else:  # validated now, so a bad spec fails before anything is pulled or booted
            self.spec = VMSpec.create(image, **spec)
        self.home = home if isinstance(home, Home) else Home(Path(home)) if home else \
            Home.default()
        self._verbose = verbose
        self._boot_timeout = boot_timeout
        self._notice = on_notice or (lambda msg: log.info("%s", msg))
        self._progress = progress
        #: the build recipe, once started
        self.recipe: builder.Recipe | None = None
        #: published ports, host side resolved (no 0 ports) once the VM runs
        self.ports: tuple = ()
        #: name of the snapshot this VM was restored from (None when it booted)
        self.restored_from: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._client: AgentClient | None = None
        self._machine: Any = None
        #: every machine this VM launched (the bake's too), for `kill_now`
        self._launched: list[Any] = []
        self._launching = False  # a machine is being launched (not in _launched yet)
        self._cancelled = False  # kill_now was called: launch nothing more
        self._threads = ThreadGroup("vm")

    # ---- what it is ---------------------------------------------------------------------------

    @property
    def image(self) -> Any:
        """The image (config and layers) once started, else None."""
        return self.recipe.image if self.recipe else None

    @property
    def accel(self) -> Any:
        return self.recipe.accel if self.recipe else None

    @property
    def memory_mib(self) -> int:
        return (self.recipe.spec if self.recipe else self.spec).memory_mib

    @property
    def cpus(self) -> int:
        return (self.recipe.spec if self.recipe else self.spec).cpus

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
            self._start(stack)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, stack: contextlib.ExitStack) -> None:
        t0 = time.monotonic()
        recipe = self.recipe = builder.prepare(self.spec, self.home, verbose=self._verbose,
                                               notice=self._notice, progress=self._progress)
        for nv in recipe.volumes.named:  # held while this VM runs: one writer at a time
            who = f"VM {recipe.spec.hostname or 'pid ' + str(os.getpid())}"
            stack.callback(os.close, volume_store.acquire(nv.volume, readonly=nv.readonly,
                                                          holder=who))
        # Copy-up only into volumes still unfilled now that this VM holds them.
        recipe = self.recipe = dataclasses.replace(
            recipe, volumes=volumes.settle_copy_up(recipe.volumes))
        if recipe.volumes.files:  # single host files: linked into directories of this VM's
            tmp = volumes.staging_dir(self.home)
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            shares = volumes.stage_files(recipe.volumes, tmp)
            recipe = self.recipe = dataclasses.replace(
                recipe, config=dataclasses.replace(recipe.config, shares=shares))
        self.ports = recipe.ports
        snap = recipe.named
        if snap is None and recipe.spec.snapshot:
            snap = self._auto_snapshot(recipe)
        t1 = time.monotonic()
        # The machine lives on a stack of its own: a failed restore tears down that attempt,
        # not the volume locks and staged files above, which the boot then uses.
        attempt = stack.enter_context(contextlib.ExitStack())
        if snap is not None:
            try:
                self._run_machine(attempt, recipe.restore(snap))
                self.restored_from = snap.name
            except VMError as e:
                if recipe.named is not None or self._cancelled:
                    raise
                self._notice(f"restoring the snapshot failed ({e}); booting instead")
                attempt.close()
                snapshot_mod.discard_auto(self.home, snap)  # the next VM bakes a fresh one
                snap = None
        if snap is None:
            self._run_machine(attempt, recipe.config)
        log.debug("prepared in %.0f ms, %s in %.0f ms", (t1 - t0) * 1000,
                  "restored" if snap else "booted", (time.monotonic() - t1) * 1000)

    def expose(self, guest_port: int, host_port: int = 0, proto: str = "tcp",
               host_ip: str = "127.0.0.1") -> int:
        """Publish ``guest_port`` on ``host_ip:host_port`` (0: any free port); returns the host
        port, or 0 before `start()` when it is to be picked then (see `ports`).

        On a running VM this restarts its passt (which takes forwards only when it starts):
        connections through the VM's network that are open at that moment are cut.
        """
        if self.spec.network == "none":
            raise UsageError("network 'none' has no interface: it cannot publish ports")
        spec_text = f"{host_ip}:{host_port}:{guest_port}/{proto}"
        if self._stack is None:
            self.spec = self.spec.replace(ports=(*self.spec.ports, spec_text))
            return host_port
        machine, recipe = self._machine, self.recipe
        if machine is None or recipe is None or not self.running:
            raise VMError("the VM is not running")
        from ..engine import net

        (claimed,) = recipe.engine.claim_host_ports((net.parse_port_spec(spec_text),))
        ports = net.check_forwards([*self.ports, claimed])
        machine.set_forwards(ports)
        self.ports = ports
        return claimed.host_port

    def _auto_snapshot(self, recipe: builder.Recipe) -> snapshot_mod.Snapshot | None:
        """The automatic snapshot for this VM's configuration, baked by a first boot."""
        def bake(mem: Path, state: Path) -> None:
            bake_mod.bake_auto(self._launch, recipe.unpublished(), self.default_workload(),
                               recipe.spec.memory_mib, mem, state)

        key = dataclasses.replace(recipe.key, bake=bake_mod.bake_version())
        try:
            snap, baked = snapshot_mod.ensure_auto(
                self.home, key.inputs(), bake, on_invalid=self._notice,
                extra={"rootfs_path": str(recipe.config.rootfs)})
        except SnapshotError as e:
            self._notice(f"{e}; booting without a snapshot")
            return None
        if baked:
            log.info("baked snapshot %s", snap.path)
        return snap

    def _launch(self, config, *, personal: bool = True):
        """Start a machine and wait for its guest agent's HELLO; failures name the cause.

        ``personal`` applies this VM's hostname, machine id and mounts; a bake leaves them
        out, so the shared snapshot keeps the boot's defaults for VMs that ask for neither
        (and holds no mounted share, which QEMU could not save)."""
        if self._cancelled:
            raise VMError("the VM was interrupted")
        self._launching = True
        try:
            machine = self.recipe.engine.launch(config)
            self._launched.append(machine)
        finally:
            self._launching = False
        if self._cancelled:  # interrupted while it launched (kill_now found nothing to kill)
            machine.kill()
            raise VMError("the VM was interrupted")
        try:
            client = AgentClient(machine.agent)
        except BaseException:
            machine.kill()
            raise
        spec = self.recipe.spec
        try:
            machine_id = random_machine_id() if spec.machine_id is True else spec.machine_id
            client.hello(self._boot_timeout, time_ns=time.time_ns(), entropy=os.urandom(64),
                         hostname=spec.hostname if personal else None,
                         machine_id=machine_id if personal else None,
                         network=machine.guest_network if personal else None)
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
        if personal:
            try:
                t0 = time.monotonic()
                client.write_files([(c.path, c.data, c.mode)
                                    for c in self.recipe.volumes.copies])
                client.mount([(m.source, m.target, m.fstype, m.data, m.flags)
                              for m in self.recipe.volumes.mounts])
                if self.recipe.volumes.mounts:
                    log.debug("mounts in %.0f ms", (time.monotonic() - t0) * 1000)
                for nv in self.recipe.volumes.named:  # the image's files are in it now
                    if not nv.readonly and not nv.volume.populated:
                        nv.volume.mark_populated()
            except BaseException as e:
                client.close()
                machine.kill()
                if isinstance(e, Error):
                    raise MountError(f"cannot mount in the VM: {e}") from None
                raise
        return machine, client

    def _run_machine(self, stack: contextlib.ExitStack, config) -> None:
        machine, client = self._launch(config)
        self._machine, self._client = machine, client
        stack.callback(self._threads.join)  # runs last: the machine is dead by then
        stack.callback(machine.kill)
        stack.callback(client.close)
        if self.recipe is not None and self.recipe.volumes.writes_disks:
            stack.callback(self._power_off, machine, client)
        self._threads.start(self._watch, machine, client, name="watch")

    @staticmethod
    def _watch(machine, client: AgentClient) -> None:
        # Wake every waiter promptly when QEMU goes away instead of letting them time out.
        status = machine.wait()
        client.fail(f"the VM exited unexpectedly (QEMU exit status {status})")

    @staticmethod
    def _power_off(machine, client: AgentClient) -> None:
        """Let the guest write back what it cached for its volumes' disks (ext4) and power
        off; killed anyway after SYNC_PATIENCE (a killed guest's volume is consistent, through
        its journal, but misses its last writes). Ctrl-C skips this (`kill_now`)."""
        if machine.wait(timeout=0) is not None:
            return
        with contextlib.suppress(AgentError):
            client.shutdown()
            machine.wait(timeout=SYNC_PATIENCE)

    def close(self) -> None:
        """Destroy the VM and release everything it holds. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._client = None
        self._launched = []

    def pause(self) -> None:
        """Freeze the VM's vCPUs (its memory and devices stay as they are) until `resume`."""
        self._running_machine().pause()

    def resume(self) -> None:
        self._running_machine().resume()

    def _running_machine(self):
        if self._machine is None or not self.running:
            raise VMError("the VM is not running")
        return self._machine

    def kill_now(self) -> bool:
        """Kill this VM's QEMU processes (a bake's included), launch no more, and return at
        once, taking no lock: safe inside a signal handler. Calls waiting on the VM then fail
        and unwind through `close()`. True if the VM will unwind by itself that way (a
        machine was running or being launched); False while it has not got that far
        (pulling, building its root filesystem), when the caller must unwind it."""
        self._cancelled = True
        killed = any([m.kill_now() for m in tuple(self._launched)])
        return killed or self._launching

    def snapshot(self, name: str) -> snapshot_mod.Snapshot:
        """Save this running VM (as warmed up so far) as snapshot ``name``.

        `VM("snapshot:NAME")` and `supermachine run snapshot:NAME` then start from it. The VM
        keeps running; processes of its own continue, and in restored copies every channel
        that was open now is gone (their processes are killed on restore). Copies keep this
        VM's hostname and /etc/machine-id unless they ask for their own.
        """
        machine, recipe = self._machine, self.recipe
        if machine is None or recipe is None or not self.running:
            raise VMError("the VM is not running")
        snapshot_mod.check_name(name)
        if recipe.volumes.uses_host_storage:
            raise SnapshotError("a VM with host directories or volumes mounted cannot be "
                                "saved as a snapshot (QEMU cannot save a mounted 9p share, "
                                "and the snapshot would not hold their files); snapshot a VM "
                                "without -v/--mount and mount them when you run it")
        def bake(mem: Path, state: Path) -> None:
            # RAM of a running VM is not in a shared file: save a full stream, load it into
            # a paused copy whose RAM *is* a shared file, and save that copy's device state.
            stream = mem.with_name("stream")
            machine.save_full(stream)
            config = dataclasses.replace(recipe.unpublished(), memory_file=mem,
                                         memory_shared=True, incoming_state=stream,
                                         incoming_full=True)
            copy = recipe.engine.launch(config)
            try:
                copy.wait_incoming(120)
                # The stream carries the source's paused run state; run the copy so the
                # state saved from it says "running" and restored VMs start on their own.
                copy.resume()
                copy.save_state(state)
            finally:
                copy.kill()
                stream.unlink(missing_ok=True)

        return snapshot_mod.create_named(self.home, name, recipe.key.inputs(), bake,
                                         {"image_source": recipe.image_source})

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

    def workload(self, spec: WorkloadSpec) -> Any:
        """``spec`` resolved against this VM's image config (docker's rules, spec.py)."""
        if self.recipe is None:
            raise VMError("the VM is not started; start it first (or use `with VM(...)`)")
        return spec.resolve(self.recipe.image.config)

    def default_workload(self) -> Any:
        """The image's own Entrypoint + Cmd, or None when it has neither."""
        try:
            return self.workload(WorkloadSpec())
        except UsageError:
            return None

    def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | Sequence[str] | None = None,
             cwd: str | None = None, user: str | None = None, stdin: bytes | None = None,
             timeout: float | None = None) -> ExecResult:
        """Run ``argv`` to completion; ``env`` adds to the image's Env, like `docker exec`."""
        work = self.workload(WorkloadSpec.command(argv, env=env_items(env), workdir=cwd,
                                                  user=user))
        return self._agent().exec(list(work.argv), env=list(work.env), cwd=work.cwd,
                                  user=work.user, stdin=stdin, timeout=timeout)

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | Sequence[str] | None = None,
              cwd: str | None = None, user: str | None = None, stdin: bool = False,
              tty: bool = False, winsize: tuple[int, int] | None = None,
              rlimits: Sequence[tuple[str, int, int]] = ()) -> Process:
        """Start ``argv`` and return a streaming `Process` handle. ``rlimits``: ``(name,
        soft, hard)`` with docker's --ulimit names (`spec.RLIMITS`)."""
        return self.start_workload(WorkloadSpec.command(
            argv, env=env_items(env), workdir=cwd, user=user, stdin=stdin, tty=tty,
            rlimits=tuple(rlimits)), winsize=winsize)

    def start_workload(self, spec: WorkloadSpec,
                       winsize: tuple[int, int] | None = None) -> Process:
        """Start the workload ``spec`` describes (the image's Entrypoint + Cmd with its
        overrides) and return its streaming `Process` handle."""
        work = self.workload(spec)
        return self._agent().spawn(list(work.argv), env=list(work.env), cwd=work.cwd,
                                   user=work.user, stdin=spec.stdin, tty=spec.tty,
                                   winsize=winsize, rlimits=spec.rlimit_numbers)

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
        from ..home import atomic_path

        with atomic_path(Path(dst)) as tmp, open(tmp, "wb") as f:
            self._agent().read_file_to(src, f)

    def run_workload(self, spec: WorkloadSpec | None = None, *, stdin_fd: int | None = None,
                     stdout_fd: int = 1, stderr_fd: int = 2) -> int:
        """Run the workload ``spec`` describes, streaming its output to ``stdout_fd`` and
        ``stderr_fd`` as it comes and its input from ``stdin_fd`` (None: no input).

        Returns the workload's exit status (128+N when killed by signal N; 127/126 when it
        cannot start, after printing why on ``stderr_fd``).
        """
        spec = dataclasses.replace(spec or WorkloadSpec(), stdin=stdin_fd is not None, tty=False)
        with self.start_workload(spec) as proc, ThreadGroup("workload") as threads:
            if stdin_fd is not None:
                stop = threads.stop_event()
                threads.start(_pump_stdin, stdin_fd, proc, stop, name="stdin")
            out = {Stream.STDOUT: stdout_fd, Stream.STDERR: stderr_fd}
            for stream, data in proc:
                write_all(out.get(stream, stdout_fd), data)
            status = proc.wait()
        if status.error:
            write_all(stderr_fd, f"supermachine: {status.error}\n".encode())
        return status.exit_code


def _pump_stdin(fd: int, proc: Process, stop: Any) -> None:
    """Copy host stdin into the workload until EOF, the workload's end or ``stop``."""
    import selectors

    try:
        # poll, not epoll: stdin may be a regular file, which epoll refuses
        with selectors.PollSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.register(stop.fileno(), selectors.EVENT_READ)
            while True:
                ready = {key.fd for key, _ in sel.select()}
                if stop.fileno() in ready:
                    return
                data = os.read(fd, 65536)
                if not data:
                    break
                proc.write(data)
        proc.close_stdin()
    except (Error, OSError):
        return
