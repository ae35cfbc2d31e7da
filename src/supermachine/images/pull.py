"""Pull images from registries into the shared blob store, and open pulled images offline.

A pull: resolve the reference to a manifest (choosing a platform from an index), then store
it, fetch the config and download the missing layers side by side. Every blob is size- and
digest-checked before it is renamed into ``home.blobs``; downloads in progress live in
``.partial-<hex>`` files next to the store and are continued with Range requests by the
next pull. Last of all a ref record (reference -> manifest digest) is written, so a pulled
image is visible only once all of its blobs are in the store.

Pulls hold the store's shared lock; ``store.prune`` takes it exclusively, so a pull never
loses blobs to a concurrent garbage collection.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable

from ..errors import DigestMismatch, ImageError
from ..home import Home, file_lock
from . import store
from .manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    Descriptor,
    Manifest,
    parse_config,
    parse_index,
    parse_manifest,
    parse_platform,
    select_platform,
    sniff_media_type,
)
from .model import Image, Layer
from .progress import NullProgress, Progress
from .reference import Reference, parse_reference
from .registry import RegistryClient, TransientError, backoff
from .verify import verify_bytes

PullPolicy = str  # docker's --pull: "always", "missing" or "never" (no typing import)
ATTEMPTS = 3  # per blob; each retry resumes where the last one stopped
WRITE_CHUNK = 1 << 20


class _Cancelled(Exception):
    """Another download failed (or Ctrl-C): stop this one, keeping its partial file."""


def _not_present(ref: str) -> ImageError:
    return ImageError(f"image {ref} is not present locally; run `supermachine pull {ref}`")


# -- offline: open a pulled image from the store ------------------------------------------


def _read_verified(home: Home, digest: str, cap: int, what: str) -> bytes:
    path = home.blob_file(digest)
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise ImageError(
            f"{what} {digest} is missing from the store; pull the image again"
        ) from None
    if len(data) > cap:
        raise ImageError(f"{what} {digest} in the store is over {cap} bytes; pull it again")
    return verify_bytes(data, digest, None, f"{what} {digest} in the store")


def _image_from_store(
    home: Home, source: str, name: str, manifest_digest: str, manifest_type: str | None
) -> Image:
    data = _read_verified(home, manifest_digest, 4 << 20, "manifest")
    manifest = parse_manifest(data, sniff_media_type(data, manifest_type))
    config_bytes = _read_verified(home, manifest.config.digest, MAX_CONFIG_BYTES, "config")
    config, os_, arch = parse_config(config_bytes)
    layers = []
    for d in manifest.layers:
        path = home.blob_file(d.digest)
        if not _stored(path, d.size):
            raise ImageError(
                f"image {source} is incomplete locally; run `supermachine pull {source}`"
            )
        layers.append(Layer(d.digest, d.media_type, d.size, path))
    return Image(
        source=source,
        name=name,
        config_digest=manifest.config.digest,
        manifest_digest=manifest_digest,
        config=config,
        layers=tuple(layers),
        os=os_,
        architecture=arch,
    )


def _find_pulled(ref: str, home: Home, platform: str | None) -> Image | None:
    r = parse_reference(ref)
    entry = store.find_entry(home, r, platform)
    if entry is None:
        return None
    return _image_from_store(home, ref, r.familiar, entry.manifest_digest, entry.media_type)


def open_pulled(ref: str, home: Home, *, platform: str | None = None) -> Image:
    """The pulled image ``ref`` from the local store only (no network)."""
    image = _find_pulled(ref, home, platform)
    if image is None:
        raise _not_present(ref)
    return image


# -- online: pull -------------------------------------------------------------------------


def _stored(path: str, size: int) -> bool:
    """Whether the store holds a blob of ``size`` bytes at ``path``."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _store_bytes(home: Home, digest: str, data: bytes) -> None:
    """Put already-verified bytes into the store (idempotent)."""
    final = home.blob_file(digest)
    if _stored(final, len(data)):
        return
    from ..home import atomic_write_bytes

    try:
        atomic_write_bytes(final, data)
    except OSError as e:
        from ..home import disk_full_message

        raise ImageError(disk_full_message(e, final)) from e


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _Puller:
    """State of one pull: the client, the progress sink and the cancel flag for workers."""

    def __init__(
        self, home: Home, ref: Reference, client: RegistryClient, progress: Progress
    ) -> None:
        self.home = home
        self.ref = ref
        self.client = client
        self.progress = progress
        self.cancel = Flag()

    def resolve(self, platform: str | None) -> tuple[bytes, str, str, str | None, str]:
        """-> (manifest bytes, media type, manifest digest, index digest, platform string)."""
        repo = self.ref.repository
        data, media_type, digest = self.client.get_manifest(repo, self.ref.target)
        media_type = sniff_media_type(data, media_type or None)
        index_digest = None
        plat = ""
        if media_type in INDEX_TYPES:
            entries = parse_index(data, media_type)
            chosen: Descriptor = select_platform(entries, platform)
            _store_bytes(self.home, digest, data)
            index_digest = digest
            data, child_type, digest = self.client.get_manifest(repo, chosen.digest)
            if len(data) != chosen.size:
                raise DigestMismatch(
                    f"manifest {chosen.digest} is {len(data)} bytes, the index says {chosen.size}"
                )
            media_type = sniff_media_type(data, child_type or chosen.media_type)
            plat = str(chosen.platform) if chosen.platform else ""
        if media_type not in MANIFEST_TYPES:
            raise ImageError(f"unsupported manifest media type {media_type[:80]!r}")
        return data, media_type, digest, index_digest, plat

    def fetch_config(self, desc: Descriptor) -> bytes:
        if _stored(self.home.blob_file(desc.digest), desc.size):
            return _read_verified(self.home, desc.digest, MAX_CONFIG_BYTES, "config")
        data = self.client.get_blob(self.ref.repository, desc.digest, desc.size, MAX_CONFIG_BYTES)
        _store_bytes(self.home, desc.digest, data)
        return data

    # -- layers ---------------------------------------------------------------------------

    def fetch_layer(self, desc: Descriptor) -> None:
        final = self.home.blob_file(desc.digest)
        hexpart = desc.digest.partition(":")[2]
        if _stored(final, desc.size):
            self.progress.layer_done(desc.digest, desc.size, "Already exists")
            return
        # One downloader per blob across processes; the second waits, then finds it stored.
        with file_lock(os.path.join(store.lock_dir(self.home), f"blob-{hexpart}.lock")):
            if _stored(final, desc.size):
                self.progress.layer_done(desc.digest, desc.size, "Already exists")
                return
            partial = os.path.join(os.path.dirname(final), f".partial-{hexpart}")
            for attempt in range(ATTEMPTS):
                try:
                    self._download(desc, partial)
                    break
                except TransientError:
                    if attempt == ATTEMPTS - 1 or self.cancel.is_set():
                        raise
                    backoff(attempt)
            os.replace(partial, final)
        self.progress.layer_done(desc.digest, desc.size, "Pull complete")

    def _download(self, desc: Descriptor, partial: str) -> None:
        h = hashlib.sha256()
        offset = 0
        with contextlib.suppress(FileNotFoundError):
            have = os.stat(partial).st_size
            if have <= desc.size:
                with open(partial, "rb") as f:
                    while chunk := f.read(WRITE_CHUNK):
                        h.update(chunk)
                offset = have
        if offset == desc.size and offset:
            return self._finish(desc, partial, h, offset)
        resp = self.client.open_blob(self.ref.repository, desc.digest, offset)
        if resp.status == 200 and offset:
            h, offset = hashlib.sha256(), 0  # the registry ignored our Range: start over
        self.progress.layer_start(desc.digest, desc.size, offset)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            for chunk in resp.iter_chunks():
                if self.cancel.is_set():
                    resp.close(reuse=False)
                    raise _Cancelled
                if offset + len(chunk) > desc.size:
                    resp.close(reuse=False)
                    os.close(fd)
                    fd = -1
                    _remove(partial)
                    raise DigestMismatch(
                        f"blob {desc.digest} is larger than the {desc.size} bytes its manifest "
                        "says; the registry sent wrong content"
                    )
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                h.update(chunk)
                offset += len(chunk)
                self.progress.layer_advance(desc.digest, len(chunk))
            os.fsync(fd)
        except OSError as e:
            from ..home import disk_full_message

            raise ImageError(disk_full_message(e, partial)) from e
        finally:
            if fd >= 0:
                os.close(fd)
        if offset < desc.size:
            raise TransientError(
                f"download of blob {desc.digest} stopped at {offset} of {desc.size} bytes"
            )
        self._finish(desc, partial, h, offset)

    def _finish(self, desc: Descriptor, partial: str, h, size: int) -> None:
        got = "sha256:" + h.hexdigest()
        if got != desc.digest:
            # Nothing unverified is kept: a bad partial would poison every resume.
            _remove(partial)
            raise DigestMismatch(
                f"blob {desc.digest} from {self.ref.registry} hashes to {got}; "
                "the registry sent corrupt or tampered content"
            )

    def fetch_blobs(self, manifest_digest: str, manifest_bytes: bytes, manifest: Manifest,
                    max_concurrent: int) -> bytes:
        """Store the manifest, fetch the config (returned) and the layers the store lacks,
        side by side: the manifest's and config's fsyncs and the config's round trip overlap
        the layer downloads instead of preceding them."""
        layers = list({d.digest: d for d in manifest.layers}.values())
        for d in layers:
            self.progress.layer_add(d.digest, d.size)
        config: list[bytes] = []
        jobs = [lambda: _store_bytes(self.home, manifest_digest, manifest_bytes),
                lambda: config.append(self.fetch_config(manifest.config))]
        jobs += [lambda d=d: self.fetch_layer(d) for d in layers]
        run_jobs(jobs, max(1, max_concurrent), self.cancel)
        return config[0]


class Flag:
    """A flag set once and polled (threading.Event's ``set``/``is_set``, for a flag no one
    waits on), without threading's import: ~1.5 ms of a small pull."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def run_jobs(jobs: list[Callable[[], object]], workers: int, cancel: Flag) -> None:
    """Run ``jobs`` on up to ``workers`` threads, the calling one among them; every thread
    started here has finished its work before this returns. The first failure sets
    ``cancel`` (the other jobs stop at their next chunk) and is raised once all have
    stopped; a signal's SystemExit or KeyboardInterrupt comes first.

    Plain ``_thread`` threads, each releasing a lock as its last act, which this waits for
    (a join): concurrent.futures imports logging (~15 ms of a small pull) and threading
    ~1.5 ms. Signals are delivered to the calling thread only, as with threading."""
    pending = list(reversed(jobs))
    lock = _thread.allocate_lock()
    failures: list[BaseException] = []

    def work() -> None:
        while not cancel.is_set():
            with lock:
                if not pending:
                    return
                job = pending.pop()
            try:
                job()
            except BaseException as e:  # raised below, once every job has stopped
                with lock:
                    failures.append(e)
                cancel.set()

    def helper(done) -> None:
        try:
            work()
        finally:
            done.release()

    running = []
    try:
        for _ in range(min(workers, len(jobs)) - 1):
            done = _thread.allocate_lock()
            done.acquire()
            _thread.start_new_thread(helper, (done,))
            running.append(done)
        work()
    except BaseException:
        cancel.set()  # a signal cut the calling thread's loop: the helpers stop too
        raise
    finally:
        for done in running:
            done.acquire()
    if failures:
        first = next((e for e in failures if not isinstance(e, Exception)), None) or \
            next((e for e in failures if not isinstance(e, _Cancelled)), failures[0])
        raise first


def pull(
    ref: str,
    home: Home,
    *,
    platform: str | None = None,
    insecure_registries: tuple[str, ...] | list[str] = (),
    ca_file: str | None = None,
    progress: Progress | None = None,
    max_concurrent: int = 4,
) -> Image:
    """Download ``ref`` (and the layers it lacks) into the store; returns the pulled Image."""
    r = parse_reference(ref)
    if platform is not None:
        parse_platform(platform)  # reject a malformed --platform before any network I/O
    progress = progress or NullProgress()
    client = RegistryClient(r.registry, insecure_registries=insecure_registries, ca_file=ca_file)
    puller = _Puller(home, r, client, progress)
    try:
        with store.pull_guard(home):
            data, media_type, manifest_digest, index_digest, plat = puller.resolve(platform)
            progress.message(f"{r.familiar}: resolved to {manifest_digest}")
            manifest = parse_manifest(data, media_type)
            config_bytes = puller.fetch_blobs(manifest_digest, data, manifest, max_concurrent)
            _config, os_, arch = parse_config(config_bytes)
            if not plat:
                plat = f"{os_}/{arch}"
                if platform is not None and not parse_platform(plat).matches(
                    parse_platform(platform)
                ):
                    raise ImageError(
                        f"image {ref} is {plat}, not {platform}; pick an image for that platform"
                    )
            size = len(data) + manifest.config.size + sum(d.size for d in manifest.layers)
            store.record_pull(
                home,
                r,
                store.RefEntry(
                    platform=plat,
                    manifest_digest=manifest_digest,
                    media_type=media_type,
                    index_digest=index_digest,
                    config_digest=manifest.config.digest,
                    size=size,
                    # datetime's isoformat(timespec="seconds") in UTC, without datetime
                    pulled=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                    created=store.config_created(config_bytes),
                ),
            )
            progress.message(f"{r.familiar}: pulled {manifest_digest}")
    finally:
        client.close()
        progress.close()
    return _image_from_store(home, ref, r.familiar, manifest_digest, media_type)


def ensure_image(
    ref: str,
    home: Home,
    policy: PullPolicy = "missing",
    *,
    platform: str | None = None,
    insecure_registries: tuple[str, ...] | list[str] = (),
    ca_file: str | None = None,
    progress: Progress | None = None,
    max_concurrent: int = 4,
) -> Image:
    """docker's --pull: ``always`` pulls, ``missing`` pulls only if absent, ``never`` doesn't."""
    if policy not in ("always", "missing", "never"):
        raise ImageError(f"unknown pull policy {policy!r}; use always, missing or never")
    if policy != "always":
        image = _find_pulled(ref, home, platform)
        if image is not None:
            return image
        if policy == "never":
            raise _not_present(ref)
    return pull(
        ref,
        home,
        platform=platform,
        insecure_registries=insecure_registries,
        ca_file=ca_file,
        progress=progress,
        max_concurrent=max_concurrent,
    )


__all__ = ["PullPolicy", "ensure_image", "open_pulled", "pull"]
