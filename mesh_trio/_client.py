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
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
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
    _closed: bool = False
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
        if self._closed:
            raise ConnectError("connection pool closed")
        async with self._limiter:
            with trio.move_on_after(self.timeout) as scope:
                if self._idle:
                    conn = self._idle.pop()
                    try:
                        return await self._exchange(conn, method, target, all_headers, body)
                    except ExchangeError:
                        # The other idle connections most likely died with this one.
                        await self._drop_idle()
                        if not (method in _SAFE and _stale_keepalive(conn)):
                            raise
                        # A read on a keep-alive connection the peer had closed: retry once on
                        # a fresh one. Writes are never retried: the peer may have applied them.
                try:
                    conn = _Connection(await self.opener())
                except OSError as exc:
                    raise ConnectError(str(exc) or type(exc).__name__) from None
                return await self._exchange(conn, method, target, all_headers, body)
            assert scope.cancelled_caught
            raise ExchangeError(f"no reply within {self.timeout}s")

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> HttpReply:
        """Run one exchange on `conn`; keep it if reusable, else (and on any failure) close it."""
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
        except BaseException:
            await trio.aclose_forcefully(conn.stream)
            raise
        if conn.reusable() and not self._closed:
            self._idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)
        return reply

    async def aclose(self) -> None:
        """Close the idle connections, and every busy one as it finishes; refuse new requests."""
        self._closed = True
        await self._drop_idle()

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        # Shielded: in an already-cancelled caller, the first close would otherwise raise
        # Cancelled and leave the rest open. Forceful closes do not block.
        with trio.CancelScope(shield=True):
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
