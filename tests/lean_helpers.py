"""Helpers of the lean listener's tests: a tiny handler, a running server, a strict reader.

The reader parses responses itself (not with the server's llhttp) and refuses anything that is
not a well-formed HTTP/1.1 response, so a test that reads a reply also checks its framing.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from mesh_trio._lean import ListenerStats, Reply, Request, serve_lean

WAIT = 10.0
HOST = "127.0.0.1"

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([^\r\n]*)")


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded by WAIT) for a condition on server state that no event signals."""
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)


class Malformed(Exception):
    """The server sent bytes that are not a well-formed HTTP/1.1 response."""


@attrs.define(eq=False)
class Streams:
    """What the `/stream` route of `echo` does, so tests can see an iterator being closed."""

    opened: int = 0
    closed: int = 0
    closed_event: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)


class Chunks:
    """`count` SSE-like chunks, then (if `hold`) a wait for `streams.release`; counts acloses."""

    def __init__(self, streams: Streams, count: int, hold: bool) -> None:
        self.streams = streams
        self.left = count
        self.sent = 0
        self.hold = hold
        streams.opened += 1

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self.left:
            self.left -= 1
            self.sent += 1
            return b"data: %d\n\n" % (self.sent - 1)
        if self.hold:
            await self.streams.release.wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.streams.closed += 1
        self.streams.closed_event.set()


def make_echo(streams: Streams) -> Any:
    """The handler: `/stream?N` streams N chunks (`/hold?N` then waits for `streams.release`),
    `/fail` raises, `/empty` answers 204, anything else echoes method, path, query and body."""

    async def echo(request: Request) -> Reply:
        if request.path in ("/stream", "/hold"):
            count = int(request.query or b"3")
            stream = Chunks(streams, count, hold=request.path == "/hold")
            return Reply(200, [(b"content-type", b"text/event-stream")], stream=stream)
        if request.path == "/fail":
            raise RuntimeError("handler bug")
        if request.path == "/empty":
            return Reply(204)
        if request.path == "/sleep":
            await trio.sleep(float(request.query))
        body = json.dumps(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query.decode("latin-1"),
                "body": request.body.decode("latin-1"),
            }
        ).encode()
        return Reply(200, [(b"content-type", b"application/json")], body)

    return echo


@attrs.define(eq=False)
class Running:
    port: int
    stats: ListenerStats
    streams: Streams
    stop: trio.Event
    listeners: list[trio.SocketListener]
    clients: list[Client] = attrs.field(factory=list)

    async def connect(self) -> Client:
        """A raw connection, closed at the end of `running` if the test did not."""
        client = Client(await trio.open_tcp_stream(HOST, self.port))
        self.clients.append(client)
        return client


@asynccontextmanager
async def running(handler: Any = None, **settings: Any) -> AsyncIterator[Running]:
    """`serve_lean` on a free port of 127.0.0.1 until the block ends."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    streams = Streams()
    server = Running(
        listeners[0].socket.getsockname()[1], ListenerStats(), streams, trio.Event(), listeners
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_lean,
                handler or make_echo(streams),
                listeners,
                stats=server.stats,
                shutdown_trigger=server.stop.wait,
                **settings,
            )
        )
        try:
            yield server
        finally:
            for client in server.clients:
                await client.aclose()
            nursery.cancel_scope.cancel()


@attrs.frozen
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: list[bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw connection: the test writes exact bytes and reads strictly parsed responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > 1 << 20:
                raise Malformed("line too long")
            if not await self._more():
                raise EOFError("connection closed")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._more():
                raise Malformed("connection closed inside a body")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def response(self, *, head: bool = False) -> Response:
        """The next response (EOFError if the connection closed cleanly before one began)."""
        status_line = await self._line()
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise Malformed(f"bad status line {status_line!r}")
        status = int(match[1])
        headers = []
        try:
            while line := await self._line():
                header = _HEADER_LINE.fullmatch(line)
                if header is None:
                    raise Malformed(f"bad header line {line!r}")
                headers.append((header[1].lower(), header[2]))
        except EOFError:
            raise Malformed("connection closed inside a head") from None
        response = Response(status, headers, b"")
        if head or status in (100, 204, 304):
            return response
        length = response.header(b"content-length")
        if response.header(b"transfer-encoding") == b"chunked":
            chunks = []
            try:
                while size := int(await self._line(), 16):
                    chunks.append(await self._exactly(size))
                    if await self._exactly(2) != b"\r\n":
                        raise Malformed("chunk without CRLF")
                if await self._line() != b"":
                    raise Malformed("no CRLF after the last chunk")
            except EOFError:
                raise Malformed("connection closed inside a chunked body") from None
            return attrs.evolve(response, body=b"".join(chunks), chunks=chunks)
        if length is None:
            raise Malformed("no content-length")
        return attrs.evolve(response, body=await self._exactly(int(length)))

    async def closed(self) -> bool:
        """True once the server closes (after what is buffered); False if bytes arrive."""
        if self.buffer:
            return False
        try:
            return not await self._more()
        except trio.BrokenResourceError:
            return True

    async def aclose(self) -> None:
        await self.stream.aclose()


def request(method: str = "GET", target: str = "/", body: bytes = b"", headers: str = "") -> bytes:
    """One HTTP/1.1 request with Host and (for a body) Content-Length."""
    head = f"{method} {target} HTTP/1.1\r\nHost: test\r\n{headers}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def statuses_after(client: Client, data: bytes) -> list[int]:
    """Send `data`, then EOF; the status of every response until the server closes."""
    await client.send(data)
    await client.stream.send_eof()
    statuses = []
    while True:
        try:
            statuses.append((await client.response()).status)
        except EOFError:
            return statuses
