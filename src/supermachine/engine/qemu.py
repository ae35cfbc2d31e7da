"""QEMU `microvm` as the engine: command line, process lifetime, QMP control, snapshots.

The machine gets no files of its own: every channel is a socketpair end passed as an fd
(agent port, QMP, console), so nothing is left on disk if we die, and there is no race
between QEMU creating a socket and us connecting to it. The one exception is the network's
socket (see `QemuMachine._net_listener`), in a private directory removed with the machine.
QEMU runs in its own process group (the terminal's Ctrl-C reaches us, not it) with
PR_SET_PDEATHSIG=SIGKILL, so it dies with the thread that launched it even when this process
is SIGKILLed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import logging
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from ..errors import EngineError
from . import jail, net
from . import netns as netns_mod
from .base import Engine, Machine, MachineConfig
from .qmp import QMPClient

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
#: CAP_CHOWN is kept (9p's chown is a no-op in fsguard anyway); these go: CAP_FSETID,
#: CAP_LINUX_IMMUTABLE, CAP_MKNOD, CAP_SETFCAP
DROPPED_CAPS = (4, 9, 27, 31)
#: bump whenever build_command changes the machine's devices or options: snapshots made
#: with another layout must not be restored (the version is part of their fingerprint)
MACHINE_LAYOUT = 4
CONSOLE_KEEP = 64 * 1024  # bytes of console output kept for error messages


def qemu_binary() -> str:
    override = os.environ.get("SUPERMACHINE_QEMU")
    found = override or shutil.which("qemu-system-x86_64")
    if not found:
        raise EngineError("qemu-system-x86_64 not found; install it (Debian: apt-get install "
                          "qemu-system-x86) or set SUPERMACHINE_QEMU")
    return found


def jail_of(config: MachineConfig) -> jail.Jail:
    """What ``config``'s QEMU needs to see: its boot files and disks read-only, its memory
    file, writable shares and volume disks read-write, /dev/kvm for hardware acceleration."""
    readable = [config.kernel, config.initrd, config.rootfs]
    writable = []
    for share in config.shares:
        (readable if share.readonly else writable).append(share.path)
    if any(not share.readonly for share in config.shares) and config.fsguard is not None:
        readable.append(config.fsguard)
    for disk in config.disks:
        if disk.path is not None:
            (readable if disk.readonly else writable).append(disk.path)
    if config.memory_file is not None:
        # a bake's memory file is made by QEMU: its (private, staging) directory then
        mem = config.memory_file
        writable.append(mem if mem.exists() else mem.parent)
    devices = [Path("/dev/kvm")] if config.accel == "kvm" else []
    return jail.Jail(tuple(dict.fromkeys(readable)), tuple(dict.fromkeys(writable)),
                     tuple(devices))


#: kept in the monitors' environment: a label the test suite finds its own QEMU and passt
#: processes by (its leak checks); it holds no secret
TEST_SESSION_VAR = "SUPERMACHINE_TEST_SESSION"


def minimal_env() -> dict[str, str]:
    """The environment of the monitor processes (QEMU, passt): a PATH and nothing else."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if TEST_SESSION_VAR in os.environ:
        env[TEST_SESSION_VAR] = os.environ[TEST_SESSION_VAR][:64]
    return env


def passt_binary() -> str:
    found = os.environ.get("SUPERMACHINE_PASST") or shutil.which("passt")
    if not found:
        raise EngineError("passt not found; install it (Debian: apt-get install passt) or run "
                          "with --network none")
    return found


def build_command(config: MachineConfig, *, qemu: str, agent_fd: int, qmp_fd: int,
                  console_fd: int, state_fd: int | None = None,
                  net_fd: int | None = None, tap_fd: int | None = None) -> list[str]:
    """The QEMU command line for ``config`` (pure: unit-tested without starting anything).

    ``net_fd``: a listening unix socket QEMU accepts this VM's passt on (networked configs);
    QEMU listens again when passt goes, which is how forwards change at run time.
    ``tap_fd``: instead, a tap device in another network namespace (engine/tap.py).
    """
    machine = ["microvm", "x-option-roms=off", "isa-serial=on", "rtc=on", "pit=off", "pic=off"]
    mem = f"{config.memory_mib}M"
    # Always a named backend: the RAM block is then called "mem" in every VM, booted or
    # restored, so the state of any VM loads into a file-backed copy (named snapshots).
    machine.append("memory-backend=mem")
    cmd = [
        qemu,
        "-M", ",".join(machine),
        "-accel", "kvm" if config.accel == "kvm" else "tcg",
        "-cpu", "host" if config.accel == "kvm" else "max",
        "-m", mem,
        "-smp", str(config.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        # QEMU's own seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec,
        # no scheduler/affinity changes. It also sets no_new_privs.
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", " ".join((*config.cmdline, *net.guest_cmdline(config.network or
                                                                   net.Network("none")))),
        "-chardev", f"socket,id=con,fd={console_fd}",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
        "-drive", f"id=root,file={config.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,fd={agent_fd}",
        "-device", "virtserialport,chardev=agent,name=sm.agent",
        "-device", "virtio-rng-device",
    ]
    if config.network is not None and config.network.enabled:
        if tap_fd is not None:
            netdev = f"tap,id=net0,fd={tap_fd},vhost=off"
        elif net_fd is not None:
            netdev = f"stream,id=net0,server=on,addr.type=fd,addr.str={net_fd}"
        else:
            raise ValueError("a networked machine needs its passt socket's or tap's fd")
        # The same MAC everywhere: each VM has a network of its own, and a snapshot's guest
        # keeps the MAC it booted with (on a tap, the guest takes the veth's at HELLO).
        cmd += ["-netdev", netdev,
                "-device", f"virtio-net-device,netdev=net0,mac={net.GUEST_MAC}"]
    for i, share in enumerate(config.shares):
        # security_model=none: files are created as this user, with the guest's modes; what
        # else a root guest could do to the host through it, fsguard.c refuses.
        if share.model not in ("none", "mapped-xattr"):
            raise ValueError(f"unknown 9p security model {share.model!r}")
        cmd += ["-fsdev", f"local,id=fs{i},path={_qemu_opt(str(share.path))},"
                          f"security_model={share.model},"
                          f"readonly={'on' if share.readonly else 'off'}",
                "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={share.tag}"]
    for i, disk in enumerate(config.disks):
        # The empty slot is writable: a restored device must offer every feature the bake's
        # guest accepted, and a writable one offers all a read-only one does but "RO".
        backing = ("driver=null-co,size=0,read-zeroes=on" if disk.path is None else
                   f"format=raw,file={_qemu_opt(str(disk.path))}")
        readonly = "on" if disk.path is not None and disk.readonly else "off"
        # The image's size is the volume's cap: QEMU refuses I/O beyond it.
        cmd += ["-drive", f"id=disk{i},if=none,{backing},readonly={readonly},discard=unmap",
                "-device", f"virtio-blk-device,drive=disk{i},serial={disk.serial}"]
    if config.memory_file is not None:
        share = "on" if config.memory_shared else "off"
        cmd += ["-object", f"memory-backend-file,id=mem,size={mem},"
                           f"mem-path={config.memory_file},share={share}"]
    else:
        cmd += ["-object", f"memory-backend-ram,id=mem,size={mem}"]
    if config.incoming_state is not None:
        if state_fd is None:
            raise ValueError("restoring needs the state file's fd")
        # "defer": x-ignore-shared must be enabled (over QMP) before the state is read;
        # QEMU 7.2 does not expose migration capabilities as -global properties.
        cmd += ["-incoming", "defer"]
    return cmd


def _qemu_opt(value: str) -> str:
    """A value inside a QEMU ``-opt key=value,...`` list: commas are doubled."""
    return value.replace(",", ",,")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


#: open files a monitor process may hold (QEMU needs a few dozen; passt a few hundred)
MAX_OPEN_FILES = 4096


def _passt_setup(parent: int, netns: str | None) -> None:
    _child_setup(parent)
    if netns is not None:  # passt's network is that namespace's
        try:
            netns_mod.enter_path(netns)
        except OSError:
            os._exit(125)  # Popen would otherwise run passt in the wrong namespace


def _child_setup(parent: int) -> None:
    # Runs in the forked child before exec: die with the launching thread, and keep the
    # terminal's signals (Ctrl-C) away from QEMU: the VM owner decides when it stops.
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        # The launcher was killed between fork and prctl: no signal will ever come.
        os._exit(1)
    os.setpgid(0, 0)
    # Parse guest-controlled state with as little as possible: no privileges gained through
    # exec (setuid binaries, file capabilities), no core files (a dump would hold guest
    # memory), a bounded number of open files.
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # Run as root, a process keeps setuid bits on files it writes (CAP_FSETID) and may make
    # device nodes (CAP_MKNOD): neither may reach a shared directory. An ordinary user has no
    # capabilities to drop (the call fails with EPERM, and that is fine).
    for cap in DROPPED_CAPS:
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, cap))


def claim_host_ports(forwards: tuple[net.PortForward, ...]) -> tuple[net.PortForward, ...]:
    """Check every fixed host port is free and pick free ones for host port 0, before boot.

    passt binds them itself (it cannot report a port it picked), so a port taken between
    this check and passt's start is the one race left; passt then skips that port.
    """
    import dataclasses

    out = []
    for f in forwards:
        kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                # Same as passt's listening socket: a port in TIME_WAIT is not "in use".
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((f.host_ip, f.host_port))
            except OSError as e:
                what = f"{f.host_ip}:{f.host_port}/{f.proto}"
                if e.errno == errno.EADDRINUSE:
                    raise EngineError(f"host port {what} is already in use; publish on another "
                                      f"port (-p OTHER:{f.guest_port})") from None
                raise EngineError(f"cannot publish on {what}: {e.strerror}") from None
            out.append(dataclasses.replace(f, host_port=s.getsockname()[1]))
    return net.check_forwards(out)


class _Launcher:
    """One long-lived thread that forks every QEMU started from a non-main thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process:
    a VM started from a short-lived worker thread (a pool refill, an executor task) would die
    with that thread. Forking from a thread that lives as long as the process avoids that.
    """

    def __init__(self) -> None:
        import queue

        self._requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="vm-launcher", daemon=True).start()

    def _serve(self) -> None:
        while True:
            func, done, box = self._requests.get()
            try:
                box.append((True, func()))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            done.set()

    def call(self, func):
        done, box = threading.Event(), []
        self._requests.put((func, done, box))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


@functools.cache
def _launcher() -> _Launcher:
    return _Launcher()


def _spawn(func):
    if threading.current_thread() is threading.main_thread():
        return func()
    return _launcher().call(func)


class _Console:
    """Drains the guest console (and QEMU's stderr) so QEMU never blocks writing it."""

    def __init__(self, sock: socket.socket, echo: bool):
        self._sock = sock
        self._echo = echo
        self._tail: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vm-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            if self._echo:
                os.write(2, chunk)
            with self._lock:
                self._tail.append(chunk)
                self._size += len(chunk)
                while self._size > CONSOLE_KEEP and len(self._tail) > 1:
                    self._size -= len(self._tail.popleft())

    def tail(self) -> str:
        self._thread.join(timeout=0.2)
        with self._lock:
            data = b"".join(self._tail)
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        """End the drain (called once QEMU is gone): its thread ends with it."""
        self._thread.join(timeout=1.0)  # QEMU's end is the socket's EOF: the rest is read
        if self._thread.is_alive():  # someone else still holds QEMU's end: stop reading
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._thread.join()
        self._sock.close()


NET_DIR_PREFIX = "supermachine-net-"


def _sweep_net_dirs(tmp: str) -> None:
    """Remove network socket directories of processes that died without cleaning up
    (SIGKILL): their name carries the owner's pid."""
    try:
        entries = os.listdir(tmp)
    except OSError:
        return
    for name in entries:
        if not name.startswith(NET_DIR_PREFIX):
            continue
        pid = name[len(NET_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(tmp, name)
        try:
            if os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


class QemuMachine(Machine):
    def __init__(self, config: MachineConfig, qemu: str):
        self.config = config
        agent_host, agent_guest = socket.socketpair()
        qmp_host, qmp_guest = socket.socketpair()
        con_host, con_guest = socket.socketpair()
        passed = [agent_guest, qmp_guest, con_guest]
        state_fd = None
        state_file = None
        self._passt: subprocess.Popen | None = None
        self._net_dir: str | None = None
        # A jailed QEMU runs under bubblewrap: its own PID (and a pidfd, so that a signal
        # never reaches a reused pid) differ from the process we started.
        self._qemu_pid: int | None = None
        self._pidfd: int | None = None
        self.network = config.network
        #: how the guest must set up eth0 at HELLO (a tap in another namespace), else None
        self.guest_network: str | None = None
        tap_fd = None
        try:
            net_fd = None
            if config.network is not None and config.network.netns is not None:
                from . import tap

                link = tap.open_link(config.network.netns)
                tap_fd = link.fd
                self.guest_network = link.guest_setup
            elif config.network is not None and config.network.enabled:
                listener = self._net_listener()
                passed.append(listener)
                net_fd = listener.fileno()
            if config.incoming_state is not None:
                state_file = open(config.incoming_state, "rb")  # noqa: SIM115 (closed below)
                state_fd = state_file.fileno()
            cmd = build_command(config, qemu=qemu, agent_fd=agent_guest.fileno(),
                                qmp_fd=qmp_guest.fileno(), console_fd=con_guest.fileno(),
                                state_fd=state_fd, net_fd=net_fd, tap_fd=tap_fd)
            log.debug("qemu command: %s", shlex.join(cmd))
            fds = [s.fileno() for s in passed] + [fd for fd in (state_fd, tap_fd)
                                                  if fd is not None]
            # Only what QEMU needs: no credentials, proxies or tokens of the caller's leak
            # into the process that parses guest-controlled state.
            env = minimal_env()
            preload: dict[str, str] = {}
            if any(not share.readonly for share in config.shares):
                # Only a writable share lets the guest create anything on the host.
                guard = str(config.fsguard or "")
                # ld.so splits LD_PRELOAD at spaces and colons and skips what it cannot load:
                # such a path would leave QEMU unguarded, silently.
                if not guard or any(c in guard for c in " :\t\n"):
                    raise EngineError(f"the share guard's path {guard!r} is missing or has a "
                                      "space or colon; use a home (SUPERMACHINE_HOME) "
                                      "without them")
                preload["LD_PRELOAD"] = guard
            info_r = info_w = None
            if config.jail:
                info_r, info_w = os.pipe()
                fds.append(info_w)
                cmd = jail.command(cmd, jail_of(config), info_fd=info_w, env=preload)
                log.debug("jailed: %s", shlex.join(cmd))
            else:
                env.update(preload)
            try:
                self._proc = _spawn(lambda: subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=con_guest.fileno(), env=env,
                    stderr=con_guest.fileno(), pass_fds=fds,
                    preexec_fn=functools.partial(_child_setup, os.getpid()),
                ))
            except OSError as e:
                raise EngineError(f"cannot start {cmd[0]}: {e.strerror}") from e
            finally:
                if info_w is not None:
                    os.close(info_w)
            if info_r is not None:
                self._jailed_pid(info_r, con_host)
            if net_fd is not None:
                self._start_passt(config.network)
        except BaseException:
            for s in (agent_host, qmp_host, con_host):
                s.close()
            self._stop_passt()
            if getattr(self, "_proc", None) is not None:
                self._signal_kill()
                self._proc.wait()
            self._close_pidfd()
            self._remove_net_dir()
            raise
        finally:
            for s in passed:
                s.close()
            if state_file is not None:
                state_file.close()
            if tap_fd is not None:  # QEMU holds it; the tap goes when QEMU does
                os.close(tap_fd)
        self.agent = agent_host
        self._console = _Console(con_host, echo=config.verbose)
        self._qmp = QMPClient(qmp_host)
        self._closed = False
        if state_fd is not None:
            self._start_incoming(state_fd)

    @staticmethod
    def _wait_net_connected(qmp: QMPClient, timeout: float) -> None:
        """Wait until QEMU has accepted passt. QEMU 7.2 crashes (SIGSEGV, ~1 restore in 10
        measured) when a restored virtio-net sends (the post-migration announce) through a
        listening stream netdev that has no connection yet."""
        deadline = time.monotonic() + timeout
        while True:
            info = qmp.execute("human-monitor-command", {"command-line": "info network"})
            if isinstance(info, str) and "type=stream,unix:" in info:
                return
            if time.monotonic() > deadline:
                raise EngineError("QEMU did not take the VM's network connection; see "
                                  "--debug output")
            time.sleep(0.002)

    def _net_listener(self) -> socket.socket:
        """The socket QEMU accepts passt on, bound in a private (0700) directory: only this
        user can connect a network to the VM. Our copy is closed once QEMU holds it."""
        import tempfile

        _sweep_net_dirs(tempfile.gettempdir())
        self._net_dir = tempfile.mkdtemp(prefix=f"{NET_DIR_PREFIX}{os.getpid()}-")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.path.join(self._net_dir, "sock"))
            listener.listen(1)
        except OSError:
            listener.close()
            raise
        return listener

    def _remove_net_dir(self) -> None:
        path, self._net_dir = self._net_dir, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def set_forwards(self, forwards: tuple[net.PortForward, ...]) -> None:
        """Publish exactly ``forwards`` (host ports resolved) from now on.

        passt takes its forwards at start, so this starts a new passt and QEMU accepts it
        once the old one is gone: connections through the VM's network (published or
        outbound) that are open now are cut, and the guest is offline for a moment.
        """
        import dataclasses

        if self.network is not None and self.network.netns is not None:
            raise EngineError("this VM is on its engine's network namespace: the engine "
                              "publishes its ports")
        if self.network is None or not self.network.enabled or self._net_dir is None:
            raise EngineError("this VM has no network; start it with network='user'")
        network = dataclasses.replace(self.network, ports=net.check_forwards(forwards))
        # Queue our connection before the old passt goes, so nothing else is ever next in
        # line for QEMU's accept; the new passt starts once the old one released its ports.
        conn = self._net_connect()
        self._stop_passt()
        self._start_passt(network, conn)
        self.network = network

    def _net_connect(self) -> socket.socket:
        """A connection to QEMU's network socket, queued until QEMU accepts it."""
        assert self._net_dir is not None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(os.path.join(self._net_dir, "sock"))
        except OSError as e:
            conn.close()
            raise EngineError(f"cannot connect the VM's network: {e.strerror}") from e
        return conn

    def _start_passt(self, network: net.Network, conn: socket.socket | None = None) -> None:
        """Start this VM's passt, connected to QEMU's network socket.

        passt runs in its own process (as nobody when started by root), dies with the
        launching thread like QEMU, and quits by itself when QEMU closes the socket.
        """
        if self.config.netguard is None or not self.config.netguard_policy:
            raise EngineError("a networked machine needs its network guard; this is a bug")
        # Only what passt needs: no proxies or locale of ours leak into it.
        env = {**minimal_env(), "LD_PRELOAD": str(self.config.netguard),
               "SM_NETGUARD": self.config.netguard_policy}
        ours = conn if conn is not None else self._net_connect()
        try:
            cmd = net.passt_command(network, passt=passt_binary(), fd=ours.fileno())
            log.debug("passt command: SM_NETGUARD=%s %s", env["SM_NETGUARD"], shlex.join(cmd))
            try:
                self._passt = _spawn(lambda: subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                    stderr=None if self.config.verbose else subprocess.DEVNULL,
                    pass_fds=[ours.fileno()],
                    preexec_fn=functools.partial(_passt_setup, os.getpid(), network.netns)))
            except OSError as e:
                raise EngineError(f"cannot start passt: {e.strerror}") from e
        finally:
            ours.close()

    def _stop_passt(self) -> None:
        proc, self._passt = self._passt, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def _start_incoming(self, state_fd: int) -> None:
        """Load the saved state; the guest runs as soon as it is in (autostart)."""
        try:
            qmp = self._control()
            if not self.config.incoming_full:
                qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": True}]})
            if self._net_dir is not None:
                self._wait_net_connected(qmp, 10.0)
            # The fd number was inherited by QEMU at exec time (pass_fds).
            qmp.execute("migrate-incoming", {"uri": f"fd:{state_fd}"})
        except BaseException:
            self.kill()
            raise

    def _jailed_pid(self, info_r: int, con_host: socket.socket) -> None:
        pid = jail.read_child_pid(info_r)
        if pid is None:  # bubblewrap gave up before starting QEMU; it said why on stderr
            if self._proc.poll() is None:  # or it hangs: it goes
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            con_host.settimeout(0.5)
            try:
                said = con_host.recv(4096).decode(errors="replace").strip()
            except OSError:
                said = ""
            why = said.splitlines()[-1] if said else f"exit status {self._proc.returncode}"
            raise EngineError(f"cannot start QEMU in its jail: {why} (set {jail.MODE_ENV}=off "
                              "to run it without)")
        self._qemu_pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone: its exit status tells the rest
            self._pidfd = None

    def _signal_kill(self) -> bool:
        """SIGKILL to QEMU itself (jailed: the jail then exits with it). Signal-safe."""
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:  # not jailed (or its QEMU gone before we could hold it): the jail's end
                os.kill(self._proc.pid, signal.SIGKILL)
        except OSError:  # gone; or (a signal racing kill()) the pidfd closed meanwhile
            return False
        return True

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    @property
    def pid(self) -> int:
        return self._qemu_pid if self._qemu_pid is not None else self._proc.pid

    def kill_now(self) -> bool:
        # returncode is set once the process is reaped: after that its pid may be reused.
        if self._proc.returncode is not None:
            return False
        return self._signal_kill()

    def _control(self) -> QMPClient:
        self._qmp.handshake()
        return self._qmp

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def poll(self) -> int | None:
        return self._proc.poll()

    def console_tail(self) -> str:
        return self._console.tail()

    def pause(self) -> None:
        self._control().execute("stop")

    def resume(self) -> None:
        self._control().execute("cont")

    def _migrate_to(self, path: Path, *, ignore_shared: bool) -> None:
        qmp = self._control()
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": ignore_shared}]})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.execute("getfd", {"fdname": "snapshot"}, fd=fd)
        finally:
            os.close(fd)
        qmp.execute("migrate", {"uri": "fd:snapshot"})
        self._wait_migration("saving the VM state", 120)

    def _wait_migration(self, what: str, timeout: float) -> None:
        qmp = self._control()
        deadline = time.monotonic() + timeout
        while True:
            status = qmp.execute("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise EngineError(f"{what} failed ({status}); see --debug output")
            if time.monotonic() > deadline:
                raise EngineError(f"{what} did not finish within {timeout:g} s")
            time.sleep(0.002)  # device state alone is ~100 KB: a few polls at most

    def save_state(self, path: Path) -> None:
        # No pause first: migration stops the guest itself at completion, and the restored
        # copy then starts running on its own (the saved run state is "running").
        self._migrate_to(path, ignore_shared=True)

    def save_full(self, path: Path) -> None:
        # Paused for the whole save: a live (iterative) migration of a running guest
        # sometimes produced a stream that failed to load ("Invalid argument").
        qmp = self._control()
        qmp.execute("stop")
        try:
            self._migrate_to(path, ignore_shared=False)
        finally:
            qmp.execute("cont")

    def wait_incoming(self, timeout: float) -> None:
        try:
            self._wait_migration("loading the VM state", timeout)
        except EngineError as e:
            if self.wait(0.5) is None:
                raise
            lines = [ln for ln in self.console_tail().splitlines() if ln.strip()]
            raise EngineError(f"QEMU exited while loading the VM state: "
                              f"{lines[-1] if lines else e}") from None

    def kill(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc.poll() is None:
            self._signal_kill()
        self._proc.wait()
        self._close_pidfd()
        self._stop_passt()
        self._remove_net_dir()
        for closer in (self.agent.close, self._qmp.close, self._console.close):
            try:
                closer()
            except OSError:
                pass


class QemuEngine(Engine):
    name = "qemu"

    def __init__(self) -> None:
        self._qemu = qemu_binary()

    def launch(self, config: MachineConfig) -> Machine:
        return QemuMachine(config, self._qemu)

    def claim_host_ports(self, forwards: tuple[net.PortForward, ...]
                         ) -> tuple[net.PortForward, ...]:
        return claim_host_ports(forwards)

    def version(self) -> str:
        """QEMU's own version line (runs ``qemu --version``: for display, not the hot path)."""
        out = subprocess.run([self._qemu, "--version"], capture_output=True, text=True,
                             check=False).stdout
        return out.splitlines()[0].strip() if out else "unknown"

    def identity(self) -> str:
        # The binary's identity, not its --version output: as exact (an upgrade replaces the
        # file) and a stat() instead of starting QEMU (~15 ms) on every VM start.
        path = os.path.realpath(self._qemu)
        st = os.stat(path)
        return f"{path} {st.st_size} {st.st_mtime_ns}; microvm layout {MACHINE_LAYOUT}"
