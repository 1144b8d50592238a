"""A loopback TCP proxy in front of the test's PostgreSQL that can go silent the way a frozen or partitioned
server does: from the first client message of a chosen type on (after the start-up), it forwards nothing
more in either direction and closes nothing. The real server behind it answers everything else.

It reads the protocol's framing only (PostgreSQL's frontend messages: an untyped SSLRequest or
StartupMessage, then one type byte and a four-byte length), so it knows where each message starts."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SSL_REQUEST_CODE = 80877103


@dataclass
class SilentFromProxy:
    """Forward clients to the unix socket at `socket_path` until a client sends a message of type `silent_from`
    (b"P", a Parse, is asyncpg's first message of any statement after its start-up; None: never); from then
    on that connection hears nothing. `go_silent` silences every connection, open or to come, from the next
    message on. `held` counts messages held back."""

    socket_path: str
    silent_from: bytes | None
    held: int = 0
    _all_silent: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    dsn: str = ""  # the database of `in_front_of`'s DSN, through the proxy

    @classmethod
    async def in_front_of(cls, socket_dir: Path, dsn: str, silent_from: bytes | None) -> SilentFromProxy:
        """Started, in front of the server listening in `socket_dir`, `dsn`'s database through it."""
        (socket_path,) = await asyncio.to_thread(
            lambda: [p for p in socket_dir.glob(".s.PGSQL.*") if p.suffix != ".lock"]
        )
        proxy = cls(str(socket_path), silent_from)
        port = await proxy.start()
        database = urlsplit(dsn).path.lstrip("/")
        proxy.dsn = f"postgresql://postgres@127.0.0.1:{port}/{database}?sslmode=disable"
        return proxy

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_unix_connection(self.socket_path)
        self._writers += [client_out, server_out]
        silent = asyncio.Event()
        upstream = asyncio.create_task(self._client_to_server(client_in, server_out, silent))
        downstream = asyncio.create_task(self._server_to_client(server_in, client_out, silent))
        self._tasks |= {upstream, downstream}
        await asyncio.gather(upstream, downstream, return_exceptions=True)  # (ended by `close`)

    async def _client_to_server(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, silent: asyncio.Event
    ) -> None:
        started = False
        while not started:  # untyped: SSLRequest (answered by the server, 'N' here) then StartupMessage
            head = await source.readexactly(8)
            length, code = struct.unpack("!ii", head)
            sink.write(head + await source.readexactly(length - 8))
            started = code != SSL_REQUEST_CODE
        while True:
            kind = await source.readexactly(1)
            size = await source.readexactly(4)
            body = await source.readexactly(struct.unpack("!i", size)[0] - 4)
            if kind == self.silent_from or self._all_silent.is_set():
                self.held += 1
                silent.set()
                await asyncio.Event().wait()  # read no further: the client's bytes stay unanswered
            sink.write(kind + size + body)
            await sink.drain()

    def go_silent(self) -> None:
        self._all_silent.set()

    async def _server_to_client(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, silent: asyncio.Event
    ) -> None:
        while chunk := await source.read(65536):
            if silent.is_set() or self._all_silent.is_set():
                await asyncio.Event().wait()
            sink.write(chunk)
            await sink.drain()
        sink.close()  # the server ended it: so does the client's side (a goodbye waited out its bound)
