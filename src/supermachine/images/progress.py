"""Pull progress: per layer and total bytes and rate.

On a terminal the block of lines is redrawn in place (ANSI cursor-up, at most 10 times a
second); elsewhere (CI logs, pipes) each layer gets one line when it finishes; quiet prints
nothing. Downloads call in from several threads, so every method takes the lock.
"""

from __future__ import annotations

import _thread
import io
import sys
import time
from collections.abc import Callable

from ..record import Record

REDRAW_INTERVAL_S = 0.1


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def short_id(digest: str) -> str:
    return digest.partition(":")[2][:12] or digest[:12]


class Progress:
    """The sink a pull reports to. This base class ignores everything (quiet mode)."""

    def layer_add(self, digest: str, size: int) -> None:
        """A layer the pull needs (before anything is known about whether it is stored)."""

    def layer_start(self, digest: str, size: int, offset: int) -> None:
        """A download (or a retry) starts; ``offset`` bytes were already on disk."""

    def layer_advance(self, digest: str, n: int) -> None:
        """``n`` more bytes of the layer arrived."""

    def layer_done(self, digest: str, size: int, status: str) -> None:
        """The layer is in the store: ``status`` is "Pull complete" or "Already exists"."""

    def message(self, text: str) -> None:
        """A line for the user (resolved digest, final result)."""

    def close(self) -> None:
        """The pull is over (success or failure): finish the display."""


NullProgress = Progress


class _Layer(Record):
    __slots__ = ("size", "done", "fetched", "started", "status")
    DEFAULTS = {"done": 0, "fetched": 0, "started": None, "status": "Waiting"}
    FROZEN = False

    size: int
    done: int
    fetched: int  # bytes transferred in this process, for the rate
    started: float | None
    status: str


class _Tracker(Progress):
    """Shared bookkeeping for the two visible displays."""

    def __init__(self, stream: io.TextIOBase, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = stream
        self._clock = clock
        self._lock = _thread.allocate_lock()  # threading's Lock, without its import
        self._layers: dict[str, _Layer] = {}
        self._t0: float | None = None

    def layer_add(self, digest: str, size: int) -> None:
        with self._lock:
            self._layers.setdefault(digest, _Layer(size))
            self._changed(force=True)

    def layer_start(self, digest: str, size: int, offset: int) -> None:
        with self._lock:
            layer = self._layers.setdefault(digest, _Layer(size))
            layer.done = offset
            layer.status = "Downloading" if not offset else "Resuming"
            now = self._clock()
            if layer.started is None:
                layer.started = now
            if self._t0 is None:
                self._t0 = now
            self._changed(force=True)

    def layer_advance(self, digest: str, n: int) -> None:
        with self._lock:
            layer = self._layers.get(digest)
            if layer is None:
                return
            layer.done += n
            layer.fetched += n
            layer.status = "Downloading"
            self._changed(force=False)

    def layer_done(self, digest: str, size: int, status: str) -> None:
        with self._lock:
            layer = self._layers.setdefault(digest, _Layer(size))
            layer.done = layer.size = size
            layer.status = status
            self._finished(digest, layer)
            self._changed(force=True)

    def _rate(self, fetched: int, since: float | None) -> str:
        if since is None or fetched == 0:
            return ""
        elapsed = max(self._clock() - since, 1e-3)
        return f"{human_size(fetched / elapsed)}/s"

    def _layer_line(self, digest: str, layer: _Layer) -> str:
        parts = [f"{short_id(digest)}: {layer.status}"]
        if layer.status in ("Downloading", "Resuming"):
            parts.append(f"{human_size(layer.done)} / {human_size(layer.size)}")
            rate = self._rate(layer.fetched, layer.started)
            if rate:
                parts.append(rate)
        elif layer.status != "Waiting":
            parts.append(f"({human_size(layer.size)})")
        return "  ".join(parts)

    def _total_line(self) -> str:
        done = sum(ly.done for ly in self._layers.values())
        size = sum(ly.size for ly in self._layers.values())
        fetched = sum(ly.fetched for ly in self._layers.values())
        line = f"Total: {human_size(done)} / {human_size(size)}"
        rate = self._rate(fetched, self._t0)
        return f"{line}  {rate}" if rate else line

    def _changed(self, force: bool) -> None:
        pass

    def _finished(self, digest: str, layer: _Layer) -> None:
        pass


class LineProgress(_Tracker):
    """Not a terminal: one line per finished layer, then the total."""

    def _finished(self, digest: str, layer: _Layer) -> None:
        self._out.write(self._layer_line(digest, layer) + "\n")
        self._out.flush()

    def message(self, text: str) -> None:
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            if self._t0 is not None:
                self._out.write(self._total_line() + "\n")
                self._out.flush()


class TerminalProgress(_Tracker):
    """A terminal: the layer lines and a total line, redrawn in place."""

    def __init__(self, stream: io.TextIOBase, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(stream, clock)
        self._drawn = 0  # lines of the block currently on screen
        self._last = float("-inf")

    def _changed(self, force: bool) -> None:
        now = self._clock()
        if not force and now - self._last < REDRAW_INTERVAL_S:
            return
        self._last = now
        self._draw()

    def _draw(self) -> None:
        import shutil  # here: `pull -q` never draws (start-up)

        width = max(shutil.get_terminal_size((80, 24)).columns - 1, 20)
        lines = [self._layer_line(d, ly) for d, ly in self._layers.items()]
        lines.append(self._total_line())
        buf = [f"\x1b[{self._drawn}A"] if self._drawn else []
        buf += [f"\r\x1b[2K{line[:width]}\n" for line in lines]
        self._out.write("".join(buf))
        self._out.flush()
        self._drawn = len(lines)

    def message(self, text: str) -> None:
        with self._lock:
            # Print above the block: clear it, write the line, redraw below.
            if self._drawn:
                self._out.write(f"\x1b[{self._drawn}A\x1b[J")
                self._drawn = 0
            self._out.write(text + "\n")
            if self._layers:
                self._draw()
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            if self._layers:
                self._draw()


def make_progress(stream: io.TextIOBase | None = None, *, quiet: bool = False) -> Progress:
    """The right display for ``stream`` (default stderr): redrawn on a TTY, lines otherwise."""
    if quiet:
        return NullProgress()
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return TerminalProgress(stream)
    return LineProgress(stream)
