"""One exception hierarchy for everything the library raises on purpose.

Messages are one line and say what to do; the CLI prints ``supermachine: <message>``
and exits non-zero, without a traceback unless ``--debug``.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error supermachine raises deliberately."""

    #: exit status the CLI uses for this error
    exit_code: int = 125  # docker uses 125 for "the run command itself failed"


class UsageError(Error):
    """Bad command-line or API arguments."""

    exit_code = 2


class ImageError(Error):
    """An image cannot be found, read or trusted (bad reference, corrupt archive, hostile layer)."""


class RegistryError(ImageError):
    """A registry refused or failed a request."""


class AuthError(RegistryError):
    """Credentials were missing or rejected."""


class DigestMismatch(ImageError):
    """Content did not hash to the digest that named it."""


class GuestError(Error):
    """The guest kernel, initramfs or init could not be prepared."""


class EngineError(Error):
    """The virtual machine monitor could not start or stopped unexpectedly."""


class AccelError(EngineError):
    """No usable accelerator, or the one asked for is not available."""


class AgentError(Error):
    """The host-guest channel failed: protocol violation, dead or silent guest."""


class ProtocolError(AgentError):
    """The peer sent a malformed, oversized or out-of-order frame."""


class VMError(Error):
    """A VM operation failed (not running, unknown name, ...)."""


class ExecTimeout(VMError):
    """A command ran past its timeout and was killed."""


class SnapshotError(Error):
    """A snapshot is missing, corrupt or does not match this machine."""


class MountError(Error):
    """A volume could not be mounted in the VM (not a VMError: the VM and its snapshot are
    fine, so a restore that fails this way must not fall back to a boot)."""
