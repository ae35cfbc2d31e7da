"""The VMM's jail: each QEMU in namespaces of its own, seeing only that VM's files.

QEMU is a very large program that parses guest-controlled device state. Run as it is, it
can read everything its user can (keys, tokens, other VMs' files) and write anywhere its
user can. In the jail (bubblewrap, through unprivileged user namespaces) it gets:

- a mount namespace whose root is an empty tmpfs holding only ``/usr`` (read-only: QEMU,
  its libraries and firmware), a minimal ``/dev`` and ``/proc``, a private ``/tmp``, and
  this VM's own files: kernel, initramfs and root filesystem read-only; its memory file,
  volume disks and writable shares read-write. Nothing else of the host exists there.
- new PID, IPC, UTS, cgroup and network namespaces (QEMU talks to the world only through
  the file descriptors it is given: agent, QMP, console, the passt socket);
- no capabilities, a new session (no terminal to inject input into), and death with the
  process that started it. Run by root, the jail needs no user namespace (and could not map
  root into one without CAP_SETFCAP, which QEMU's launch drops): QEMU then keeps only the
  four capabilities that let root's files be read and written as before (DAC_OVERRIDE,
  DAC_READ_SEARCH, FOWNER, CHOWN), none of the others (SYS_ADMIN, NET_ADMIN, SYS_PTRACE,
  SETUID, ...).

QEMU is PID 1 of its namespace (``--as-pid-1``): killing it ends the namespace, and the
bubblewrap process that waits for it exits with its status.

passt needs no jail of ours: it isolates itself the same way at start (a detached user,
mount, IPC and UTS namespace whose root is an empty directory, its own seccomp filter).

Where bubblewrap or unprivileged user namespaces are missing, `unavailable()` says why, and
the recipe runs QEMU without the jail after one notice line (`SUPERMACHINE_JAIL=required`
makes that an error; `=off` turns the jail off).
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineError

#: the jail's setting: "auto" (jail where possible), "required", or "off"
MODE_ENV = "SUPERMACHINE_JAIL"
MODES = ("auto", "required", "off")
#: what every jail shows of the host, read-only (Debian's /bin, /lib, ... are links into it)
SYSTEM = Path("/usr")
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")
LD_CACHE = Path("/etc/ld.so.cache")
_MAX_INFO = 4096
#: how long bubblewrap may take to start the program (it takes milliseconds)
START_TIMEOUT = 30.0
#: what root's QEMU keeps: access to files as root had it, nothing else
ROOT_CAPS = ("CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_CHOWN")


@dataclass(frozen=True)
class Jail:
    """What one QEMU may see besides the system: paths bound read-only, paths bound
    read-write, and device nodes."""

    readable: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    devices: tuple[Path, ...] = ()


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise EngineError(f"{MODE_ENV}={value[:32]!r}: use one of {', '.join(MODES)}")
    return value


def bwrap_binary() -> str | None:
    return os.environ.get("SUPERMACHINE_BWRAP") or shutil.which("bwrap")


@functools.cache
def unavailable() -> str | None:
    """Why QEMU cannot be jailed here (None: it can). Static checks only, no process
    started: the launch itself reports anything these miss."""
    if bwrap_binary() is None:
        return "bubblewrap (bwrap) is not installed (Debian: apt-get install bubblewrap)"
    if os.geteuid() == 0:
        return None  # root's jail needs no user namespace
    checks = (("/proc/sys/user/max_user_namespaces", "0", "user namespaces are disabled "
               "(user.max_user_namespaces = 0)"),
              ("/proc/sys/kernel/unprivileged_userns_clone", "0", "unprivileged user "
               "namespaces are disabled (kernel.unprivileged_userns_clone = 0)"),
              ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1", "AppArmor "
               "restricts unprivileged user namespaces"))
    for path, refused, why in checks:
        try:
            if Path(path).read_text().strip() == refused:
                return why
        except OSError:
            continue
    return None


def command(argv: list[str], jail: Jail, *, info_fd: int,
            env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run inside ``jail`` with ``env`` added to its environment (pure:
    unit-tested without starting anything). The jail writes its child's host PID as JSON to
    ``info_fd`` (`read_child_pid`)."""
    bwrap = bwrap_binary()
    if bwrap is None:
        raise EngineError(unavailable() or "bubblewrap is not installed")
    cmd = [bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--unshare-net", "--die-with-parent", "--as-pid-1", "--new-session",
           "--cap-drop", "ALL"]
    if os.geteuid() == 0:
        for cap in ROOT_CAPS:
            cmd += ["--cap-add", cap]
    else:
        cmd.insert(1, "--unshare-user")
    cmd += ["--ro-bind", str(SYSTEM), str(SYSTEM)]
    for name in SYSTEM_LINKS:
        if (SYSTEM / name).is_dir() and Path("/", name).is_symlink():
            cmd += ["--symlink", f"usr/{name}", f"/{name}"]
    if LD_CACHE.is_file():
        cmd += ["--ro-bind", str(LD_CACHE), str(LD_CACHE)]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    # The program by its real path: QEMU finds its modules next to where it believes it is
    # (a link elsewhere, e.g. a directory of links on PATH, would leave them behind).
    program = Path(os.path.realpath(argv[0]))
    argv = [str(program), *argv[1:]]
    readable = list(jail.readable)
    if SYSTEM not in program.parents:
        readable.append(program)  # e.g. SUPERMACHINE_QEMU pointing elsewhere
    for path in readable:
        cmd += ["--ro-bind", _checked(path), str(path)]
    for path in jail.writable:
        cmd += ["--bind", _checked(path), str(path)]
    for dev in jail.devices:
        cmd += ["--dev-bind", _checked(dev), str(dev)]
    for key, value in (env or {}).items():  # for the program only, not for bwrap
        cmd += ["--setenv", key, value]
    return [*cmd, "--chdir", "/", "--info-fd", str(info_fd), "--", *argv]


def _checked(path: Path) -> str:
    # bubblewrap parses its own arguments: a path is one argument whatever it holds, but it
    # must be absolute and exist (bwrap cannot bind what is not there)
    if not path.is_absolute():
        raise EngineError(f"the jail needs absolute paths, not {str(path)[:200]!r}")
    return str(path)


def read_child_pid(fd: int, timeout: float = START_TIMEOUT) -> int | None:
    """The jailed program's host PID from bubblewrap's info fd (closes ``fd``); None when
    bubblewrap exited before starting it (its error is on its stderr) or did not say within
    ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while len(data) < _MAX_INFO:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, _MAX_INFO)
            if not chunk:
                break
            data += chunk
            try:
                info = json.loads(data)
            except ValueError:
                continue  # not all of it yet
            pid = info.get("child-pid") if isinstance(info, dict) else None
            return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 \
                else None
    finally:
        os.close(fd)
    return None
