"""A real HTTP webhook receiver on 127.0.0.1 for alert tests: apprise's `json://` posts land here.

Plain asyncio streams, HTTP/1.1 with Content-Length bodies (what apprise's requests sends). `hang = True`
makes it accept connections and never answer (a dead receiver behind a live socket); `trickle` answers
one byte at a time, for ever (a receiver no socket timeout gives up on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Delivery:
    path: str
    payload: dict[str, Any]

    @property
    def text(self) -> str:
        return f"{self.payload.get('title', '')}\n{self.payload.get('message', '')}"


@dataclass
class WebhookReceiver:
    hang: bool = False
    fail_first: int = 0  # answer this many requests with HTTP 500 (not delivered), then 200
    trickle: float = 0.0  # > 0: answer a header one byte every `trickle` seconds, never ending it
    deliveries: list[Delivery] = field(default_factory=list)
    connections: int = 0
    requests: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _closing: bool = False

    async def start(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"json://127.0.0.1:{self.port}{path}"

    def matching(self, *words: str) -> list[Delivery]:
        return [d for d in self.deliveries if all(w in d.text for w in words)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                _method, path, _version = request_line.decode("latin-1").split(" ", 2)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                if self.hang:
                    await asyncio.Event().wait()  # never answers
                if self.trickle > 0:  # alive, and never done: each read of the client's gets a byte in time
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while True:
                        writer.write(b"a")
                        await writer.drain()
                        await asyncio.sleep(self.trickle)
                if self.requests <= self.fail_first:
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail")
                    await writer.drain()
                    continue
                self.deliveries.append(Delivery(path, json.loads(body or b"{}")))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Ended by `close`: returned, not cancelled (Python 3.11's stream server reads a handler's
            # outcome with `task.exception()`, which raises for a cancelled one: "Exception in callback").
            if not self._closing:
                raise
            return
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
