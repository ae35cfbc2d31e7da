"""The asyncio API: the same surface as the synchronous one, in-process or against the
service.

    async with supermachine.aio.VM(image) as vm:          # in this process
        result = await vm.exec(["echo", "hi"])

    client = await supermachine.aio.connect()              # through `supermachine serve`
    async with await client.create(image) as sandbox:
        async with sandbox.spawn(["sh", "-c", "..."]) as proc:
            async for stream, data in proc:
                ...

There is one implementation under both APIs: every method here runs its synchronous
counterpart (`VM`, `service.client.Sandbox`) on a worker thread, so the two cannot drift
apart, and the event loop never blocks on a VM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

__all__ = ["VM", "Sandbox", "Client", "Process", "connect"]

_END = object()


class Process:
    """A running process with streaming output: ``async for stream, data in proc``
    (stream 1 stdout, 2 stderr), then ``await proc.wait()``."""

    def __init__(self, sync: Any) -> None:
        self._sync = sync
        self._iter = iter(sync)

    async def __aenter__(self) -> Process:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[tuple[int, bytes]]:
        while True:
            item = await asyncio.to_thread(next, self._iter, _END)
            if item is _END:
                return
            stream, data = item
            yield int(stream), data

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._sync.write, data)

    async def close_stdin(self) -> None:
        await asyncio.to_thread(self._sync.close_stdin)

    async def resize(self, rows: int, cols: int) -> None:
        await asyncio.to_thread(self._sync.resize, rows, cols)

    async def signal(self, signo: int) -> None:
        await asyncio.to_thread(self._sync.signal, signo)

    async def wait(self) -> Any:
        """The exit status (``exit_code``, ``error``) once the process has ended."""
        return await asyncio.to_thread(self._sync.wait)

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)


class _Machine:
    """What a VM and a service sandbox both offer, over their synchronous object."""

    _sync: Any

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(lambda: self._sync.exec(
            argv, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout))

    async def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | None = None, stdin: bool = False,
                    tty: bool = False, winsize: tuple[int, int] | None = None) -> Process:
        return Process(await asyncio.to_thread(lambda: self._sync.spawn(
            argv, env=env, cwd=cwd, user=user, stdin=stdin, tty=tty, winsize=winsize)))

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self._sync.read_file, path)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await asyncio.to_thread(lambda: self._sync.write_file(path, data, mode=mode))

    async def expose(self, guest_port: int, host_port: int = 0, proto: str = "tcp",
                     host_ip: str = "127.0.0.1") -> int:
        return await asyncio.to_thread(self._sync.expose, guest_port, host_port, proto,
                                       host_ip)

    async def snapshot(self, name: str) -> Any:
        return await asyncio.to_thread(self._sync.snapshot, name)

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)


class VM(_Machine):
    """`supermachine.VM` for asyncio: the same arguments; started on ``async with`` (or
    ``await vm.start()``), destroyed on leaving it (or ``await vm.close()``)."""

    def __init__(self, image: Any, **options: Any) -> None:
        from .runtime.vm import VM as SyncVM

        self._sync = SyncVM(image, **options)

    @property
    def sync(self) -> Any:
        """The underlying `supermachine.VM`."""
        return self._sync

    async def start(self) -> VM:
        try:
            await asyncio.to_thread(self._sync.start)
        except asyncio.CancelledError:
            self._sync.kill_now()
            raise
        return self

    async def __aenter__(self) -> VM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Sandbox(_Machine):
    """A sandbox in the service (see `Client.create`)."""

    def __init__(self, sync: Any) -> None:
        self._sync = sync
        self.name: str = sync.name

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """The service's API for asyncio (see `supermachine.connect` for the synchronous one)."""

    def __init__(self, sync: Any) -> None:
        self._sync = sync

    async def create(self, image: str, **options: Any) -> Sandbox:
        return Sandbox(await asyncio.to_thread(lambda: self._sync.create(image, **options)))

    async def sandboxes(self) -> list[Sandbox]:
        return [Sandbox(s) for s in await asyncio.to_thread(self._sync.sandboxes)]

    async def health(self) -> dict:
        return await asyncio.to_thread(self._sync.health)

    async def pools(self) -> list[dict]:
        return await asyncio.to_thread(self._sync.pools)

    async def create_pool(self, image: str, size: int = 2, **options: Any) -> dict:
        return await asyncio.to_thread(lambda: self._sync.create_pool(image, size, **options))

    async def delete_pool(self, pool_id: str) -> None:
        await asyncio.to_thread(self._sync.delete_pool, pool_id)


async def connect(target: str | None = None, *, token: str | None = None) -> Client:
    """A client of the running service: ``target`` as `supermachine.connect` takes it."""
    from .service.client import connect as sync_connect

    return Client(sync_connect(target, token=token))
