"""State of detached VMs under ``home.vms/<name>/``: names, records, liveness, listing.

Each VM directory (mode 0700: only its user may reach the socket) holds::

    state.json      the record (written atomically by the supervisor and the CLI)
    lock            flock-held by the supervisor for its whole life: free lock = dead
    sock            the supervisor's control socket (see control.py)
    log             the main workload's output as control.py STDOUT/STDERR frames
    supervisor.log  the supervisor's own stderr, for debugging

Liveness never trusts state.json alone: a supervisor that was SIGKILLed leaves a record that
says "running", but its lock is free, so it is reported dead and can be removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator

from ..errors import UsageError, VMError
from ..locations import lock_held
from ..record import Record

# Paths here are strings under the ``vms`` directory (``Home.vms``), with no pathlib (nor
# home.py, which builds on it): `ps` and the other commands on detached VMs import this
# module, and pathlib (urllib.parse, ipaddress, fnmatch) was a quarter of `ps`'s start-up.

NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z")
MAX_STATE = 1 << 20  # state.json is ours, but a corrupt one must not be read unbounded

STARTING, RUNNING, EXITED, DEAD = "starting", "running", "exited", "dead"

_ADJECTIVES = ("brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid",
               "merry", "nimble", "proud", "quiet", "swift", "tender", "vivid", "witty", "zen")
_NOUNS = ("ada", "babbage", "curie", "darwin", "euler", "fermi", "gauss", "hopper", "knuth",
          "lovelace", "noether", "pascal", "ritchie", "shannon", "turing", "wozniak")


class VMRecord(Record):
    """A detached VM's record, as state.json holds it: immutable (a changed copy comes from
    ``replace``)."""

    #: every field, in state.json's order; a field without a default must be given
    __slots__ = FIELDS = ("name", "id", "image", "command", "created", "status",
                          "supervisor_pid", "qemu_pid", "started", "finished", "exit_code",
                          "error", "memory_mib", "cpus", "ports", "options")
    DEFAULTS = {"status": STARTING, "supervisor_pid": None, "qemu_pid": None, "started": None,
                "finished": None, "exit_code": None, "error": None, "memory_mib": None,
                "cpus": None}
    FACTORIES = {"ports": list, "options": dict}  # a fresh value for each record
    __hash__ = None  # type: ignore[assignment]  (mutable lists inside)

    name: str
    id: str
    image: str
    command: list[str]
    created: float
    status: str
    supervisor_pid: int | None
    qemu_pid: int | None
    started: float | None
    finished: float | None
    exit_code: int | None
    error: str | None
    memory_mib: int | None
    cpus: int | None
    ports: list[str]  # published, "127.0.0.1:8080->80/tcp"
    options: dict[str, object]  # how to run the workload

    def to_json(self) -> bytes:
        import json  # here, not at the top: `ps` in a home without VMs never needs it

        return json.dumps(self.as_dict(), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VMRecord:
        import json

        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return cls(**{k: v for k, v in obj.items() if k in cls.FIELDS})


class VMState:
    """A record plus what the lock says about it right now."""

    __slots__ = ("record", "alive")

    def __init__(self, record: VMRecord, alive: bool) -> None:
        self.record = record
        self.alive = alive

    def __repr__(self) -> str:
        return f"VMState({self.record!r}, alive={self.alive})"

    @property
    def status(self) -> str:
        if self.alive:
            return self.record.status if self.record.status in (STARTING, RUNNING) else RUNNING
        return EXITED if self.record.status == EXITED else DEAD

    @property
    def running(self) -> bool:
        return self.status in (STARTING, RUNNING)


class VMDir:
    """Paths of one detached VM's state directory (strings)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)

    state = property(lambda self: os.path.join(self.path, "state.json"))
    lock = property(lambda self: os.path.join(self.path, "lock"))
    sock = property(lambda self: os.path.join(self.path, "sock"))
    log = property(lambda self: os.path.join(self.path, "log"))
    supervisor_log = property(lambda self: os.path.join(self.path, "supervisor.log"))

    def read(self) -> VMRecord:
        try:
            with open(self.state, "rb") as f:
                data = f.read(MAX_STATE + 1)
        except FileNotFoundError:
            raise VMError(f"no such VM: {self.name}") from None
        if len(data) > MAX_STATE:
            raise VMError(f"the state of VM {self.name} is corrupt; remove it with "
                          f"`supermachine rm {self.name}`")
        try:
            return VMRecord.from_json(data)
        except (ValueError, TypeError):
            raise VMError(f"the state of VM {self.name} is corrupt; remove it with "
                          f"`supermachine rm {self.name}`") from None

    def write(self, record: VMRecord) -> None:
        from pathlib import Path  # writers boot VMs: pathlib is loaded there anyway

        from ..home import atomic_write_bytes

        atomic_write_bytes(Path(self.state), record.to_json(), mode=0o600)

    def update(self, **changes: object) -> VMRecord:
        record = self.read().replace(**changes)
        self.write(record)
        return record

    def alive(self) -> bool:
        """True while a supervisor holds the lock (flock dies with its holder)."""
        return lock_held(self.lock, by_any=False)

    def state_now(self) -> VMState:
        return VMState(self.read(), self.alive())


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"invalid VM name {name!r}: use letters, digits and _.- "
                         "(starting with a letter or digit, at most 128 characters)")
    return name


def vm_dir(vms: str | os.PathLike[str], name: str) -> VMDir:
    """The VM ``name``'s directory under ``vms`` (``Home.vms``)."""
    return VMDir(os.path.join(vms, validate_name(name)))


def create(vms: str | os.PathLike[str], name: str | None) -> VMDir:
    """Reserve a name (given or generated): its directory is created exclusively."""
    if name is not None:
        d = vm_dir(vms, name)
        try:
            os.mkdir(d.path, 0o700)
        except FileExistsError:
            raise VMError(f"the name {name!r} is already in use by a VM; remove it with "
                          f"`supermachine rm {name}` or choose another --name") from None
        return d
    import secrets

    for attempt in range(100):
        candidate = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}"
        if attempt >= 20:
            candidate += f"_{secrets.token_hex(2)}"
        d = vm_dir(vms, candidate)
        try:
            os.mkdir(d.path, 0o700)
        except FileExistsError:
            continue
        return d
    raise VMError("cannot find a free VM name; give one with --name")


def new_id() -> str:
    import secrets

    return secrets.token_hex(32)


def find(vms: str | os.PathLike[str], name_or_id: str) -> VMDir:
    """A VM by name, or by a unique prefix of its id (as docker accepts)."""
    if NAME_RE.match(name_or_id) and os.path.isdir(os.path.join(vms, name_or_id)):
        return VMDir(os.path.join(vms, name_or_id))
    if re.fullmatch(r"[0-9a-f]{4,64}", name_or_id):
        matches = [s.record.name for s in list_states(vms)
                   if s.record.id.startswith(name_or_id)]
        if len(matches) == 1:
            return VMDir(os.path.join(vms, matches[0]))
        if len(matches) > 1:
            raise VMError(f"{name_or_id!r} matches several VMs; use a name")
    raise VMError(f"no such VM: {name_or_id} (see `supermachine ps -a`)")


def iter_dirs(vms: str | os.PathLike[str]) -> Iterator[VMDir]:
    """Every VM directory under ``vms``, by name (none when ``vms`` does not exist yet)."""
    try:
        entries = sorted(os.scandir(vms), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir() and NAME_RE.match(entry.name):
            yield VMDir(entry.path)


def list_states(vms: str | os.PathLike[str]) -> list[VMState]:
    """Every VM with a readable record, newest first; half-created ones are skipped."""
    states = []
    for d in iter_dirs(vms):
        try:
            states.append(d.state_now())
        except VMError:
            continue
    states.sort(key=lambda s: s.record.created, reverse=True)
    return states


def remove(d: VMDir) -> None:
    """Delete a stopped VM's directory. The lock is taken so a live supervisor is never cut."""
    try:
        fd = os.open(d.lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            _lock_or_fail(fd, d.name)
        try:
            import shutil

            shutil.rmtree(d.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise VMError(f"cannot remove {d.path}: {e.strerror}") from e
    finally:
        if fd is not None:
            os.close(fd)


def _lock_or_fail(fd: int, name: str) -> None:
    # A concurrent `ps` holds a shared lock for a moment; only a lasting holder is a supervisor.
    deadline = time.monotonic() + 0.5
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise VMError(f"VM {name} is running; stop it first or use `rm -f`") from None
            time.sleep(0.02)


# ---- display ----------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """docker's wording: "Less than a second", "3 minutes", "About an hour", "2 days"."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = round(s / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    days = s // 86400
    if days < 14:
        return f"{days} days"
    if days < 60:
        return f"{days // 7} weeks"
    if days < 730:
        return f"{days // 30} months"
    return f"{days // 365} years"


def status_text(state: VMState, now: float | None = None) -> str:
    now = time.time() if now is None else now
    r = state.record
    status = state.status
    if status == STARTING:
        return "Starting"
    if status == RUNNING:
        return f"Up {human_duration(now - (r.started or r.created))}"
    if status == DEAD:
        return "Dead (its supervisor was killed)"
    ago = human_duration(now - (r.finished or r.created))
    return f"Exited ({r.exit_code if r.exit_code is not None else -1}) {ago} ago"
