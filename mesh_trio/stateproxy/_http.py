# A small HTTP/1.1 server: h11 state machines over trio streams, one task per connection.
#
# Each connection loops: read a request head, read its body (bounded by `max_body`), call the
# handler, write the whole response in one `send_all`, start the next cycle. h11 keeps any bytes
# that arrived beyond the current request, so pipelined requests are answered in order and a
# request split over many reads is reassembled; a client EOF between requests ends the
# connection quietly, an EOF or garbage mid-request gets a 400 if a reply can still be sent.
# A body over the limit is answered 413 as soon as it is known (from Content-Length, or while a
# chunked body streams in); the connection then ends with a bounded lingering close, since the
# rest of that body is never parsed.
#
# A response with a `stream` (the event bus's watch) is sent chunked instead: the head first,
# then whatever the stream writes, each write one chunk, then the terminating chunk when the
# stream returns; the connection may then serve its next request.
#
# Shutdown is a drain: `begin_drain` stops accepting, closes connections that are idle between
# requests, and lets each busy one finish its current request, answered with
# ``Connection: close``; `finished` is set when the last connection is gone. Whoever owns the
# server bounds the drain with a deadline and then cancels it.

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import attrs
import h11
import trio

from mesh_proto import error_body

logger = logging.getLogger("mesh_trio.stateproxy")

_READ_SIZE = 64 * 1024
_MAX_HEAD = 64 * 1024
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 64 * 1024 * 1024
# accept() errors that mean "out of resources now", not "the listener is broken".
_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@attrs.frozen(kw_only=True)
class Request:
    """A complete request: `target` is the raw request-target (path and query, undecoded)."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


#: A streamed body: called with a `write` that sends one chunk (``b""``: only the head, if not
#: sent yet); the response ends when it returns.
Stream = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


@attrs.frozen(kw_only=True)
class Response:
    """A response: `body`, or else `stream` sent chunked. A 204 carries no body and no
    Content-Type."""

    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    stream: Stream | None = None


Handler = Callable[[Request], Awaitable[Response]]


@attrs.frozen(kw_only=True)
class ServerStatistics:
    """A snapshot of an `HttpServer`: connections open, and how many are between requests."""

    connections: int
    idle: int


@attrs.define(eq=False)
class _Connection:
    stream: trio.SocketStream
    h11: h11.Connection
    idle: bool = False
    idle_scope: trio.CancelScope | None = None


@attrs.define(eq=False)
class HttpServer:
    """Serves `handler` on a listener, with keep-alive and a bounded request body."""

    handler: Handler
    max_body: int
    finished: trio.Event = attrs.field(factory=trio.Event, init=False)
    _connections: set[_Connection] = attrs.field(factory=set, init=False)
    _accepting: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _draining: bool = attrs.field(default=False, init=False)

    def statistics(self) -> ServerStatistics:
        """How many connections are open, and how many of them are between requests."""
        return ServerStatistics(
            connections=len(self._connections),
            idle=sum(1 for c in self._connections if c.idle),
        )

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until `begin_drain`, then wait for the open ones to finish.

        Closes `listener` when it stops accepting. Sets `finished` on the way out.
        """
        try:
            async with trio.open_nursery() as nursery:
                with self._accepting:
                    task_status.started()
                    async with listener:
                        await self._accept_loop(listener, nursery)
        finally:
            self.finished.set()

    def begin_drain(self) -> None:
        """Stop accepting, close idle connections, and close busy ones after their reply."""
        self._draining = True
        self._accepting.cancel()
        for conn in self._connections:
            if conn.idle and conn.idle_scope is not None:
                conn.idle_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_PAUSE_ERRNOS:
                    raise
                logger.info("accept failed (%s), pausing 100 ms", errno.errorcode[exc.errno])
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(stream, h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD))
        self._connections.add(conn)
        try:
            async with stream:
                await self._request_loop(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell it
        except Exception:
            logger.exception("connection handler failed")
        finally:
            self._connections.discard(conn)

    async def _request_loop(self, conn: _Connection) -> None:
        while not self._draining:
            try:
                event = await self._next_event(conn, waiting_for_request=True)
                if event is None or isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                body = await self._read_body(conn, event)
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, exc.error_status_hint, str(exc) or "bad request")
                return
            if body is None:
                limit = f"request body larger than {self.max_body} bytes"
                await self._refuse(conn, 413, limit)
                return
            request = Request(
                method=event.method, target=event.target, headers=tuple(event.headers), body=body
            )
            try:
                response = await self.handler(request)
            except Exception:
                logger.exception("handler failed for %s %r", event.method.decode(), event.target)
                response = Response(status=500, body=error_body("internal error"))
            await self._send(conn, response, head=event.method == b"HEAD", close=self._draining)
            if conn.h11.our_state is h11.MUST_CLOSE or self._draining:
                return
            conn.h11.start_next_cycle()

    async def _next_event(
        self, conn: _Connection, *, waiting_for_request: bool = False
    ) -> h11.Event | None:
        """The next h11 event, reading as needed; None when a drain closed an idle connection."""
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # h11.PAUSED cannot happen mid-cycle here
                return event
            idle = waiting_for_request and not conn.h11.trailing_data[0]
            if idle:
                # Only an idle connection (nothing of the next request received) may be closed
                # by a drain; a partly received request is read and answered.
                data = b""
                with trio.CancelScope() as scope:
                    conn.idle, conn.idle_scope = True, scope
                    if self._draining:
                        scope.cancel()
                    data = await conn.stream.receive_some(_READ_SIZE)
                conn.idle, conn.idle_scope = False, None
                if scope.cancelled_caught:
                    return None
            else:
                data = await conn.stream.receive_some(_READ_SIZE)
            conn.h11.receive_data(bytes(data))

    async def _read_body(self, conn: _Connection, request: h11.Request) -> bytes | None:
        """The request body, or None if it is larger than `max_body`."""
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self.max_body:
                return None
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.stream.send_all(
                conn.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    return None
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")

    async def _refuse(self, conn: _Connection, status: int, message: str) -> None:
        """Answer an unreadable request if a response can still be sent; the connection ends.

        The client may still be sending (a body over the limit): we stop writing and discard
        what it sends for a bounded time, so it can finish its write and read our answer
        instead of failing with a broken pipe ("lingering close").
        """
        if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = Response(status=status, body=error_body(message))
            await self._send(conn, response, head=False, close=True)
        with trio.move_on_after(_LINGER_SECONDS):
            await conn.stream.send_eof()
            discarded = 0
            while discarded < _LINGER_BYTES:
                data = await conn.stream.receive_some(_READ_SIZE)
                if not data:
                    break
                discarded += len(data)

    async def _send(
        self, conn: _Connection, response: Response, *, head: bool, close: bool
    ) -> None:
        headers = list(response.headers)
        stream = None if head else response.stream
        if response.status != 204:
            headers.append((b"content-type", response.content_type))
            if stream is None:  # else h11 frames it chunked
                headers.append((b"content-length", str(len(response.body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        reason = _REASONS.get(response.status, b"")
        out = conn.h11.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        assert out is not None
        if stream is not None:
            await self._send_stream(conn, out, stream)
            return
        if response.body and not head and response.status != 204:
            data = conn.h11.send(h11.Data(data=response.body))
            assert data is not None
            out += data
        end = conn.h11.send(h11.EndOfMessage())
        assert end is not None
        await conn.stream.send_all(out + end)

    async def _send_stream(self, conn: _Connection, head: bytes, stream: Stream) -> None:
        unsent = [head]

        async def write(data: bytes) -> None:
            out = conn.h11.send(h11.Data(data=data)) if data else b""
            assert out is not None
            if unsent:
                out = unsent.pop() + out
            if out:
                await conn.stream.send_all(out)

        await stream(write)
        end = conn.h11.send(h11.EndOfMessage())
        assert end is not None
        await conn.stream.send_all(b"".join(unsent) + end)
