"""A small HTTP/1.1 client on h11 over any trio stream, with a bounded keep-alive pool.

Used where the mesh API is the client: the state-proxy store (a Unix socket), and the demo
actors posting events to the internal port (TCP), exactly as a sidecar does. A connection is
reused only after a complete, well-formed exchange; anything else closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio

log = logging.getLogger("mesh_trio.client")

Opener = Callable[[], Awaitable[trio.abc.Stream]]
_SAFE = frozenset({"GET", "HEAD"})


class ConnectError(OSError):
    """The peer could not be reached: the request was never sent."""


class ExchangeError(OSError):
    """The connection failed after the request may have been (partly) sent."""


@attrs.frozen(kw_only=True)
class HttpReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))

    async def exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> HttpReply:
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response: Any = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                raw = await self.stream.receive_some(65536)
                self.conn.receive_data(raw)
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return HttpReply(
                    status=response.status_code,
                    headers=list(response.headers),
                    body=b"".join(chunks),
                )
            elif isinstance(event, h11.ConnectionClosed):
                raise ExchangeError("connection closed before the reply ended")

    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


@attrs.define(eq=False)
class HttpPool:
    """Keep-alive connections to one peer, at most `size` at a time.

    Args:
        opener: opens a new stream to the peer (TCP or Unix socket).
        host: the `Host` header.
        timeout: bound of one whole request (connect, send, receive).
    """

    opener: Opener
    host: str = "localhost"
    size: int = 16
    timeout: float = 5.0
    _idle: list[_Connection] = attrs.field(factory=list)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.size)

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> HttpReply:
        """One request/response exchange.

        Raises:
            ConnectError: could not connect (nothing was sent; safe to retry).
            ExchangeError: failed or timed out after sending began (it may have been applied).
        """
        all_headers = [("host", self.host), ("content-length", str(len(body))), *headers]
        async with self._limiter:
            conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            with trio.move_on_after(self.timeout) as scope:
                if conn is None:
                    try:
                        conn = _Connection(await self.opener())
                    except OSError as exc:
                        raise ConnectError(str(exc) or type(exc).__name__) from None
                try:
                    reply = await conn.exchange(method, target, all_headers, body)
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    h11.ProtocolError,
                ) as exc:
                    await trio.aclose_forcefully(conn.stream)
                    # The other idle connections most likely died with this one (peer restart).
                    await self.aclose()
                    if not fresh and method in _SAFE and _stale_keepalive(conn):
                        # A read on a keep-alive connection the peer had closed: one retry on a
                        # fresh connection. Writes are never retried: it may have applied them.
                        return await self._retry_fresh(method, target, all_headers, body)
                    raise ExchangeError(str(exc) or type(exc).__name__) from None
            if scope.cancelled_caught:
                if conn is not None:
                    await trio.aclose_forcefully(conn.stream)
                if conn is None:
                    raise ConnectError(f"connect timed out after {self.timeout}s")
                raise ExchangeError(f"no reply within {self.timeout}s")
            if conn.reusable():
                self._idle.append(conn)
            else:
                await trio.aclose_forcefully(conn.stream)
            return reply

    async def _retry_fresh(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> HttpReply:
        try:
            conn = _Connection(await self.opener())
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from None
        try:
            reply = await conn.exchange(method, target, headers, body)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
        ) as exc:
            await trio.aclose_forcefully(conn.stream)
            raise ExchangeError(str(exc) or type(exc).__name__) from None
        if conn.reusable():
            self._idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)
        return reply

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


def _stale_keepalive(conn: _Connection) -> bool:
    """True when the reused connection failed before any byte of a reply arrived."""
    return conn.conn.their_state is h11.SEND_RESPONSE


def tcp_opener(host: str, port: int) -> Opener:
    async def open_stream() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return open_stream


def unix_opener(path: str) -> Opener:
    async def open_stream() -> trio.abc.Stream:
        return await trio.open_unix_socket(path)

    return open_stream
