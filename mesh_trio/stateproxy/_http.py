# A small HTTP/1.1 server over trio streams, one task per connection; requests are parsed by
# llhttp (`httptools`, as in the mesh API's lean listener: it cost about a third of h11's CPU per
# request here) and responses written from pre-encoded pieces.
#
# Each connection loops: read, let the parser take the bytes (every complete request in them is
# queued, so pipelined requests are answered in order and a request split over many reads is
# reassembled), call the handler for each queued request, write each whole response in one
# `send_all`. A client EOF between requests ends the connection quietly, an EOF or garbage
# mid-request gets a 400 if a reply can still be sent.
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
import httptools
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


class _Refused(Exception):
    """A request the server answers with `status` and then closes the connection after."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Connection:
    """One client connection: the parser's callbacks queue its complete requests."""

    def __init__(self, stream: trio.SocketStream, max_body: int) -> None:
        self.stream = stream
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.ready: list[tuple[Request, bool, bool]] = []  # request, keep-alive, HTTP/1.1
        self.idle = False
        self.idle_scope: trio.CancelScope | None = None
        self.in_message = False
        self.expect_continue = False
        self.refused: _Refused | None = None
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0

    def _refuse(self, status: int, message: str) -> None:
        self.refused = _Refused(status, message)
        raise self.refused

    def on_message_begin(self) -> None:
        self.in_message = True
        self._target, self._headers, self._head_size = b"", [], 0
        self._body, self._body_size = [], 0

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._head_size += len(url)
        if self._head_size > _MAX_HEAD:
            self._refuse(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > _MAX_HEAD:
            self._refuse(431, "request head too large")

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name == b"content-length" and int(value) > self.max_body:
                self._refuse(413, f"request body larger than {self.max_body} bytes")
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = self.parser.get_http_version() == "1.1"

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body:
            self._refuse(413, f"request body larger than {self.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = self.expect_continue = False
        parser = self.parser
        request = Request(
            method=parser.get_method(),
            target=self._target,
            headers=tuple(self._headers),
            body=b"".join(self._body),
        )
        self.ready.append((request, parser.should_keep_alive(), parser.get_http_version() == "1.1"))


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
        conn = _Connection(stream, self.max_body)
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
        refusal: _Refused | None = None  # bytes that cannot be parsed: answered in turn
        while True:
            while conn.ready:
                request, keep_alive, http11 = conn.ready.pop(0)
                try:
                    response = await self.handler(request)
                except Exception:
                    logger.exception(
                        "handler failed for %s %r", request.method.decode(), request.target
                    )
                    response = Response(status=500, body=error_body("internal error"))
                close = self._draining or not keep_alive
                head = request.method == b"HEAD"
                await self._send(conn, response, head=head, close=close, chunked=http11)
                if close:
                    return
            if refusal is not None:
                await self._refuse(conn, refusal.status, refusal.message)
                return
            if self._draining and not conn.in_message:
                return
            if conn.expect_continue and conn.in_message:  # after the replies before it
                conn.expect_continue = False
                await conn.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            data = await self._receive(conn)
            if data is None:
                return  # a drain closed the idle connection
            if not data:
                if conn.in_message:
                    await self._refuse(conn, 400, "incomplete request")
                return
            try:
                conn.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                refusal = _Refused(400, "protocol upgrades are not supported")
            except httptools.HttpParserError as exc:
                refusal = conn.refused or _Refused(400, f"malformed request: {exc}")

    async def _receive(self, conn: _Connection) -> bytes | None:
        """The next bytes (b"" at EOF); None when a drain closed an idle connection."""
        if conn.in_message or conn.ready:
            return bytes(await conn.stream.receive_some(_READ_SIZE))
        # Only an idle connection (nothing of the next request received) may be closed by a
        # drain; a partly received request is read and answered.
        data = None
        with trio.CancelScope() as scope:
            conn.idle, conn.idle_scope = True, scope
            if self._draining:
                scope.cancel()
            data = bytes(await conn.stream.receive_some(_READ_SIZE))
        conn.idle, conn.idle_scope = False, None
        return data

    async def _refuse(self, conn: _Connection, status: int, message: str) -> None:
        """Answer an unreadable request (nothing of its answer is sent yet: requests are
        answered in turn); the connection ends.

        The client may still be sending (a body over the limit): we stop writing and discard
        what it sends for a bounded time, so it can finish its write and read our answer
        instead of failing with a broken pipe ("lingering close").
        """
        response = Response(status=status, body=error_body(message))
        await self._send(conn, response, head=False, close=True, chunked=False)
        with trio.move_on_after(_LINGER_SECONDS):
            await conn.stream.send_eof()
            discarded = 0
            while discarded < _LINGER_BYTES:
                data = await conn.stream.receive_some(_READ_SIZE)
                if not data:
                    break
                discarded += len(data)

    async def _send(
        self, conn: _Connection, response: Response, *, head: bool, close: bool, chunked: bool
    ) -> None:
        stream = None if head else response.stream
        reason = _REASONS.get(response.status, b"")
        out = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
        out += [name + b": " + value + b"\r\n" for name, value in response.headers]
        if response.status != 204:
            out.append(b"content-type: " + response.content_type + b"\r\n")
            if stream is None:
                out.append(b"content-length: %d\r\n" % len(response.body))
            elif chunked:
                out.append(b"transfer-encoding: chunked\r\n")
        if close or (stream is not None and not chunked):  # an HTTP/1.0 stream ends at EOF
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        if stream is not None:
            await self._send_stream(conn, b"".join(out), stream, chunked=chunked)
            return
        if not head and response.status != 204:
            out.append(response.body)
        await conn.stream.send_all(b"".join(out))

    async def _send_stream(
        self, conn: _Connection, head: bytes, stream: Stream, *, chunked: bool
    ) -> None:
        unsent = [head]

        async def write(data: bytes) -> None:
            out = (b"%x\r\n%b\r\n" % (len(data), data) if chunked else data) if data else b""
            if unsent:
                out = unsent.pop() + out
            if out:
                await conn.stream.send_all(out)

        await stream(write)
        await conn.stream.send_all(b"".join(unsent) + (b"0\r\n\r\n" if chunked else b""))
