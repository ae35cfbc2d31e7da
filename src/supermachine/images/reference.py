"""Image references as docker writes them, parsed and normalised.

Grammar (docker/distribution's ``reference`` package, which every registry tool follows)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component ( "/" path-component )*
    domain     := host [ ":" port ]       host: dot-separated labels, or "[ipv6]"
    path-comp  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex digits

The first component is a registry host only if it contains "." or ":", is "localhost", or
has an upper-case letter (as docker decides); otherwise the registry is docker.io, whose
single-component names get the ``library/`` prefix. No tag and no digest means ``latest``.
"""

from __future__ import annotations

import re

from ..errors import ImageError
from ..record import Record

DEFAULT_REGISTRY = "docker.io"
# docker.io is a name, not a server: its API lives on this host.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"
NAME_MAX = 255  # whole repository name including the registry, as docker limits it
REFERENCE_MAX = 512  # whole reference string; anything longer is not worth parsing

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# "latest", "3.20", "python:3.12-slim", "ghcr.io/o/r@sha256:..." - a cheap pre-check the CLI
# uses to tell a reference from a local path; parse_reference is the real judge.
_LOOKS_LIKE = re.compile(r"[A-Za-z0-9[][A-Za-z0-9._:/@\[\]-]*")

_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


class Reference(Record):
    """A normalised reference: ``registry/repository[:tag][@digest]``."""

    __slots__ = ("registry", "repository", "tag", "digest")

    registry: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    repository: str  # "library/alpine"
    tag: str | None  # None only when a digest is given without a tag
    digest: str | None  # "sha256:<hex>" or None

    @property
    def api_host(self) -> str:
        """host[:port] that serves the registry API."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def familiar(self) -> str:
        """The short form docker prints: ``alpine:3.20``, ``ghcr.io/o/r:tag``."""
        s = str(self)
        if self.registry == DEFAULT_REGISTRY:
            s = s.removeprefix(f"{DEFAULT_REGISTRY}/").removeprefix("library/")
        return s


def _bad(s: str, why: str) -> ImageError:
    shown = s if len(s) <= 80 else s[:77] + "..."
    return ImageError(f"invalid image reference {shown!r}: {why}")


def _split_domain(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return None, name


def parse_reference(s: str) -> Reference:
    """Parse and normalise a docker-style reference; ImageError says what is wrong."""
    if not isinstance(s, str) or not s:
        raise ImageError("empty image reference; give a name such as `alpine` or `ghcr.io/o/r:tag`")
    if len(s) > REFERENCE_MAX:
        raise _bad(s, f"longer than {REFERENCE_MAX} characters")
    if any(c.isspace() for c in s) or not s.isascii():
        raise _bad(s, "contains whitespace or non-ASCII characters")

    rest, at, digest = s.partition("@")
    if at:
        if not _DIGEST.fullmatch(digest):
            raise _bad(s, "digest must be sha256: followed by 64 lowercase hex digits")
    else:
        digest = ""

    # A ":" after the last "/" starts the tag; one before it belongs to a host:port.
    tag = ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _bad(s, "tag must be 1-128 of [A-Za-z0-9_.-], not starting with . or -")

    domain, path = _split_domain(rest)
    if domain is not None and not _DOMAIN.fullmatch(domain):
        raise _bad(s, f"registry host {domain!r} is not a valid host[:port]")
    if domain is not None and ":" in domain and not domain.startswith("["):
        port = int(domain.rsplit(":", 1)[1])
        if not 0 < port < 65536:
            raise _bad(s, f"port {port} out of range")
    if not path:
        raise _bad(s, "missing repository name")
    for comp in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(comp):
            if comp.lower() != comp and _PATH_COMPONENT.fullmatch(comp.lower()):
                raise _bad(s, "repository name must be lowercase")
            raise _bad(s, f"bad path component {comp!r} (use a-z, 0-9 and . _ - separators)")

    registry = (domain or DEFAULT_REGISTRY).lower()
    if registry in _DOCKER_HUB_ALIASES:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > NAME_MAX:
        raise _bad(s, f"repository name longer than {NAME_MAX} characters")
    return Reference(
        registry=registry,
        repository=path,
        tag=tag or (None if digest else DEFAULT_TAG),
        digest=digest or None,
    )


def looks_like_reference(s: str) -> bool:
    """True if ``s`` parses as a reference (cheap; no network, no filesystem)."""
    if not _LOOKS_LIKE.fullmatch(s or ""):
        return False
    try:
        parse_reference(s)
    except ImageError:
        return False
    return True
