"""A bounded tar reader: the stdlib parser with caps on the metadata it buffers in memory.

``tarfile`` reads PAX and GNU long-name headers whole into memory, sized by the (hostile)
header; one forged size would make it allocate gigabytes. ``BoundedTarInfo`` checks those
sizes before the stdlib reads them, refuses sparse members (no image tool writes them and
they complicate data accounting) and caps global PAX state.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO, Any

from ..errors import ImageError

MAX_EXT_HEADER = 1 << 20  # one PAX / GNU long name header (xattrs included)
MAX_GLOBAL_PAX_KEYS = 256

_EXT_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tarfile_: Any) -> Any:  # stdlib hook, see tarfile.TarInfo
        if self.type in _EXT_TYPES or self.type in _LONG_TYPES:
            if self.size > MAX_EXT_HEADER:
                raise ImageError(
                    f"tar extended header of {self.size} bytes (limit {MAX_EXT_HEADER}); "
                    "the archive is corrupt or hostile"
                )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ImageError(f"sparse tar member {self.name[:200]!r} is not supported")
        member = super()._proc_member(tarfile_)
        if len(tarfile_.pax_headers) > MAX_GLOBAL_PAX_KEYS:
            raise ImageError("too many global tar headers; the archive is corrupt or hostile")
        if member.sparse is not None:
            raise ImageError(f"sparse tar member {member.name[:200]!r} is not supported")
        return member


def open_stream(fileobj: IO[bytes]) -> tarfile.TarFile:
    """Iterate an uncompressed tar stream once, front to back (no seeking)."""
    try:
        return tarfile.open(
            fileobj=fileobj, mode="r|", tarinfo=BoundedTarInfo, errors="surrogateescape"
        )
    except tarfile.TarError as e:
        raise ImageError(f"not a valid tar stream ({e}); the layer is corrupt") from e


def open_file(path: Path) -> tarfile.TarFile:
    """Open an uncompressed tar file for random access (member offsets stay valid)."""
    try:
        return tarfile.open(path, mode="r:", tarinfo=BoundedTarInfo, errors="surrogateescape")
    except tarfile.TarError as e:
        raise ImageError(f"{path} is not a valid tar archive ({e})") from e
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from e
