"""Network faults between a service and what it talks to, without a tool: a TCP proxy on loopback that
forwards bytes, and on command cuts every connection (and refuses new ones) or holds bytes in flight."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.suite import Suite, create_pg_database, drop_pg_database, require_postgres, start_suite


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`; `cut()` resets every connection and refuses new ones
    until `heal()`; `hold()` keeps connections open but stops forwarding (a hung peer)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._up = True
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self._up = False
        self._flowing.set()
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def hold(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._up = True
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for each in (writer, up_writer):
            self._writers.discard(each)
            with contextlib.suppress(Exception):
                each.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction; when its source closes, the other end is closed too (as a real peer's
        close would be seen)."""
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if not self._up:
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def suite_with_wallet_db_behind_proxy(
    data_dir: Path,
) -> AsyncIterator[tuple[Suite, TcpProxy]]:
    """The suite on PostgreSQL, the wallet reaching its database through a proxy a test can cut or
    hold (the database is the test's own; PostgreSQL itself stays up for everyone else)."""
    await require_postgres()
    name = f"coins_test_fault_{uuid.uuid4().hex[:12]}"
    url = await create_pg_database(name)
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = await TcpProxy(host, int(port)).start()
    proxied = url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/")
    suite = await start_suite(
        "postgres",
        data_dir,
        overrides={"wallet": {"database_url": proxied, "max_queue_seconds": 0.5}},
    )
    try:
        yield suite, proxy
    finally:
        proxy.heal()  # a test that failed while holding it must not hang the suite's stop
        await suite.stop()
        await proxy.close()
        await drop_pg_database(name)
