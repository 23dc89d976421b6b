"""The lean listener: a trio HTTP/1.1 server that hands each request to a `Handler`.

A `Handler` gets a `Request` whose body has already been read (at most `max_body` bytes; the
listener answers 413 itself past that) and returns a `Reply`: a whole body, or a `stream` of
chunks (SSE) sent with chunked encoding until it ends. The listener adds `Content-Length` (or
`Transfer-Encoding: chunked`), `Connection` and `Date`; it owns HEAD (no body), keep-alive,
`Expect: 100-continue`, timeouts and the errors of HTTP itself (400, 408, 413, 431, 505), whose
bodies are JSON `{"error": ...}` like every other.

Why it exists: quart-trio on hypercorn spends most of a request's CPU in the stack (trio tasks,
h11, hypercorn's event objects), not in the mesh. Here each connection is ONE task and there is
no task per request: llhttp (through `httptools`) parses whatever one `receive_some` brought,
every complete pipelined request in it is handled in order with the handler awaited inline,
and their replies are joined into one `send_all`. Heads are built from pre-encoded bytes
(status lines cached per code, a `Date` header cached per second); nothing is a dict.

Stricter than llhttp alone, because a proxy in front may read a request differently (request
smuggling): a `Transfer-Encoding` other than exactly `chunked`, a Host-less HTTP/1.1 request and
a head past `MAX_HEAD` bytes are refused too. Every refusal answers and then closes the
connection, since what follows the bad bytes cannot be trusted to start a request.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Final
from urllib.parse import unquote_to_bytes

import attrs
import httptools
import trio

from mesh_proto import MAX_BODY

log = logging.getLogger("mesh_trio.http")

MAX_HEAD: Final = 64 * 1024
"""Bytes of request line and headers (431 past that); h11 and hypercorn allow 16 KiB."""
MAX_HEADERS: Final = 256
"""Header lines of one request (431 past that): bounds the work of empty or tiny headers."""
RECEIVE_SIZE: Final = 65536
MAX_TICK: Final = 0.5
"""Longest period of the reaper that enforces the timeouts (a quarter of the shortest timeout
when shorter): a timeout fires up to one tick late."""
LINGER_SECONDS: Final = 1.0
"""After a server-side close, how long unread client bytes are drained: closing a socket with
unread data sends RST, and the client may then lose the reply it has not read yet."""


@attrs.frozen(slots=True)
class Request:
    """One request, as parsed. Header names are lowercase bytes, values as sent."""

    method: str
    path: str
    query: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@attrs.frozen(slots=True)
class Reply:
    """A response: `status`, extra headers (lowercase names), and `body` or `stream`."""

    status: int
    headers: Sequence[tuple[bytes, bytes]] = ()
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Reply]]


@attrs.define(eq=False)
class ListenerStats:
    """Counters of one `serve_lean`, for tests and benchmarks (cheap integer increments)."""

    connections: int = 0
    open_connections: int = 0
    requests: int = 0
    sends: int = 0
    refused: int = 0
    handler_errors: int = 0


# ---------------------------------------------------------------------------------------------
# Pre-encoded bytes


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    """`HTTP/1.1 <status> <phrase>\\r\\n`, encoded once per status code."""
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


_date_second = -1
_date_line = b""


def _date_header() -> bytes:
    """`date: ...\\r\\n`, formatted at most once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        _date_second = now
    return _date_line


_CLOSE: Final = b"connection: close\r\n"
_KEEP_ALIVE: Final = b"connection: keep-alive\r\n"
_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_JSON: Final = b"content-type: application/json\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_METHODS: dict[bytes, str] = {}


def _error_body(message: str) -> bytes:
    # The messages are our own constants (no quotes or backslashes), so no json.dumps.
    return b'{"error":"' + message.encode() + b'"}'


class _Refused(Exception):
    """A request the listener answers itself with `status` and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# Read readiness


# Without epoll (not Linux), connections wait with trio's `wait_readable`.
EPOLL = hasattr(select, "epoll")
_HANGUP: Final = (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if EPOLL else 0


class _Readiness:
    """Which connections have bytes to read, from one edge-triggered epoll set of our own.

    Trio's `wait_readable` arms a one-shot registration in trio's epoll each time a task waits
    (an `epoll_ctl` call and a few objects): once per request on a keep-alive connection. Here a
    socket is registered once, for its lifetime, and one task (`run`) waits on the whole set and
    wakes the connections that have something: each request then costs only its `recv` and
    `send`. A connection is `readable` from an edge until a read that did not fill the buffer
    (the socket had no more then; any byte arriving later is a new edge), or for good once the
    client has closed or reset (the end came with the last bytes, and no edge follows it).
    """

    def __init__(self) -> None:
        self._epoll = select.epoll() if EPOLL else None
        self._connections: dict[int, _Connection] = {}

    @property
    def own(self) -> bool:
        """Whether connections wait here (else with trio's `wait_readable`)."""
        return self._epoll is not None

    def add(self, connection: _Connection) -> None:
        if self._epoll is None:
            return
        fd = connection.sock.fileno()
        self._connections[fd] = connection
        # Registered with bytes already waiting, the socket reports an edge at once.
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def discard(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if self._epoll is not None and self._connections.get(fd) is connection:
            del self._connections[fd]
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    async def run(self) -> None:
        """Wake connections as their sockets turn readable, until cancelled."""
        epoll, connections = self._epoll, self._connections
        if epoll is None:
            return
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, flags in epoll.poll(0):
                connection = connections.get(fd)
                if connection is not None:
                    connection.readable = True
                    if flags & _HANGUP:
                        connection.hangup = True
                    task = connection.reader
                    if task is not None:
                        connection.reader = None
                        trio.lowlevel.reschedule(task)

    def close(self) -> None:
        """Once `run` and every connection are done."""
        if self._epoll is not None:
            self._epoll.close()


# ---------------------------------------------------------------------------------------------
# One connection


@attrs.define(eq=False)
class _Server:
    """What the connections of one `serve_lean` share."""

    handler: Handler
    max_body: int
    keepalive_timeout: float
    header_timeout: float
    max_requests: int | None
    stats: ListenerStats
    # Headers of the replies the listener writes itself (given their status), or None.
    error_headers: Callable[[int], Sequence[tuple[bytes, bytes]]] | None = None
    connections: set[_Connection] = attrs.field(factory=set)
    draining: bool = False
    readiness: _Readiness = attrs.field(factory=_Readiness)

    def drain(self) -> None:
        """From now on every reply closes its connection; connections waiting idle close now."""
        self.draining = True
        for connection in self.connections:
            if connection.idle:
                connection.scope.cancel()

    async def reap(self) -> None:
        """Cancel the connections whose client is past its deadline. One timer for all of
        them, because a cancel scope around every read costs more than the rest of a 204's
        Python; a connection only publishes its deadline (a float) when it starts to wait."""
        tick = max(0.01, min(MAX_TICK, self.keepalive_timeout / 4, self.header_timeout / 4))
        while True:
            await trio.sleep(tick)
            now = time.monotonic()
            for connection in self.connections:
                if connection.deadline <= now:
                    connection.expired = True
                    connection.scope.cancel()

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        # The connection drives the socket itself (non-blocking calls, trio's wait_readable /
        # wait_writable): trio's SocketStream costs a conflict detector and a try-sync
        # context per call, a third of a small request's CPU.
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        connection = _Connection(self, sock)
        self.connections.add(connection)
        self.readiness.add(connection)
        self.stats.connections += 1
        self.stats.open_connections += 1
        try:
            await connection.run()
        except OSError:
            pass  # the client went away (reset, broken pipe): nothing to answer or log
        except Exception:
            log.exception("lean listener: connection failed")
        finally:
            self.connections.discard(connection)
            self.readiness.discard(connection)
            self.stats.open_connections -= 1
            trio.lowlevel.notify_closing(sock)
            sock.close()


class _Connection:
    """The parser callbacks fill the state of the message being parsed; `run` serves."""

    def __init__(self, server: _Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.parser = httptools.HttpRequestParser(self)
        self.ready: list[tuple[Request, bool, bool]] = []  # request, keep-alive, HTTP/1.0
        self.refused: _Refused | None = None
        self.served = 0
        # Waiting for the client: `idle` between requests (drain closes it), `deadline`
        # (time.monotonic) after which the reaper cancels `scope` and sets `expired`.
        self.idle = True
        self.deadline = math.inf
        self.expired = False
        self.scope = trio.CancelScope()
        # Read readiness (`_Readiness`): bytes may be waiting; the task parked until they are.
        self.readable = False
        self.hangup = False
        self.reader: trio.lowlevel.Task | None = None
        # The message being parsed.
        self.in_message = False
        self.message_deadline = math.inf
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.expect_continue = False

    # -- parser callbacks (synchronous, called from inside feed_data) --------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self.message_deadline = time.monotonic() + self.server.header_timeout
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.body = []
        self.body_size = 0
        self.expect_continue = False

    # (The head's size is counted inline: these run for every header of every request.)
    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            self._refuse(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name.lower(), value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            self._refuse(431, "request head too large")
        if len(headers) > MAX_HEADERS:
            self._refuse(431, "too many request headers")

    def _refuse(self, status: int, message: str) -> None:
        self.refused = _Refused(status, message)
        raise self.refused

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._refuse(505, "HTTP version not supported")
        length: bytes | None = None
        chunked = False
        host = False
        for name, value in self.headers:
            if name == b"content-length":
                length = value  # llhttp refuses duplicates, non-digits and CL with TE
            elif name == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    self._refuse(400, "unsupported transfer-encoding")
                chunked = True
            elif name == b"host":
                host = True
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                self.expect_continue = version == "1.1"
        if not host and version == "1.1":
            self._refuse(400, "missing host header")
        if length is not None and int(length) > self.server.max_body:
            self._refuse(413, "request body too large")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            self._refuse(413, "request body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.expect_continue = False
        parser = self.parser
        method = _METHODS.get(raw_method := parser.get_method())
        if method is None:
            method = _METHODS.setdefault(raw_method, raw_method.decode("ascii"))
        try:
            path, query = _split_target(self.url)
        except _Refused as exc:
            self.refused = exc
            raise
        body = b"".join(self.body) if self.body else b""
        request = Request(method, path, query, self.headers, body)
        self.ready.append((request, parser.should_keep_alive(), parser.get_http_version() == "1.0"))

    # -- serving -------------------------------------------------------------------------------

    async def run(self) -> None:
        with self.scope:
            await self._serve()
        if self.expired and self.in_message:
            self._send_now(self._error(408, "request timeout"))
        await self._close()

    async def _serve(self) -> None:
        """Serve requests until the connection is to close (then return) or the client left."""
        server = self.server
        idle_deadline = time.monotonic() + server.keepalive_timeout
        while True:
            if self.in_message:
                self.deadline = self.message_deadline
            elif server.draining:
                return
            else:
                self.deadline = idle_deadline
                self.idle = True
            await self._wait_readable()
            self.deadline = math.inf
            self.idle = False
            if self.scope.cancel_called:
                return  # cancelled while the wake-up was on its way: as if it came late
            data = self._recv()
            if data is None:
                continue
            if not data:
                raise ConnectionResetError  # the client closed: nothing left to answer
            upgrade = False
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                upgrade = True  # not supported: what follows the request is not HTTP
            except httptools.HttpParserError as exc:
                if self.refused is None:
                    self.refused = _Refused(400, _parse_error(exc))
            out: list[bytes] = []
            keep = await self._handle_ready(out)
            if keep and self.refused is not None:
                server.stats.refused += 1
                out.append(self._error(self.refused.status, self.refused.message))
                keep = False
            elif keep and upgrade:
                keep = False
            elif keep and self.expect_continue and not self.body_size:
                out.append(_CONTINUE)
                self.expect_continue = False
            if out:
                server.stats.sends += 1
                await self._send(b"".join(out) if len(out) > 1 else out[0])
            if not keep:
                return
            if out:
                idle_deadline = time.monotonic() + server.keepalive_timeout

    def _send_now(self, data: bytes) -> None:
        """What of `data` the socket takes without waiting (a last word before closing)."""
        with contextlib.suppress(OSError):
            self.sock.send(data)

    async def _send(self, data: bytes) -> None:
        """All of `data`; no checkpoint when the socket takes it at once (the common case):
        every loop of `_serve` waits for readability, which is the connection's checkpoint."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            # A client that takes nothing for header_timeout is cut, like one that sends
            # nothing: otherwise it could hold the connection and its reply forever.
            self.deadline = time.monotonic() + self.server.header_timeout
            await trio.lowlevel.wait_writable(sock)
            self.deadline = math.inf
            with contextlib.suppress(BlockingIOError):
                view = view[sock.send(view) :]

    async def _wait_readable(self) -> None:
        """Return (a checkpoint) once the socket may have bytes to read (`_Readiness`)."""
        if self.readable:
            await trio.lowlevel.checkpoint()
            return
        if not self.server.readiness.own:
            await trio.lowlevel.wait_readable(self.sock)
            return
        self.reader = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_wait)

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        self.reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _recv(self) -> bytes | None:
        """What the socket has now (b"" at EOF; None: nothing yet), keeping `readable` true
        only while more may be waiting (`_Readiness`)."""
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            self.readable = False
            return None
        if len(data) < RECEIVE_SIZE:
            self.readable = self.hangup
        return data

    async def _receive(self) -> bytes:
        while True:
            await self._wait_readable()
            data = self._recv()
            if data is not None:
                return data

    async def _handle_ready(self, out: list[bytes]) -> bool:
        """Handle the parsed requests in order, their replies appended to `out`; False once
        the connection must close after `out` (a stream reply has been sent already)."""
        if not self.ready:
            return True
        ready = self.ready
        self.ready = []
        server = self.server
        for request, keep_alive, http10 in ready:
            self.served += 1
            server.stats.requests += 1
            head = request.method == "HEAD"
            mark = len(out)
            try:
                reply = await server.handler(request)
                if not 200 <= reply.status <= 599:
                    raise ValueError(f"reply status {reply.status} is not a final status")
                keep = (
                    keep_alive
                    and not server.draining  # decided after the handler: draining may have begun
                    and (server.max_requests is None or self.served < server.max_requests)
                )
                # Encoding is the handler's fault too if its reply is not bytes.
                if reply.stream is None:
                    self._encode(out, reply, keep=keep, http10=http10, head=head)
                else:
                    self._encode_stream_head(out, reply, http10=http10)
            except Exception:
                del out[mark:]
                log.exception(
                    "lean listener: handler failed on %s %s", request.method, request.path
                )
                server.stats.handler_errors += 1
                out.append(self._error(500, "internal server error"))
                return False
            if reply.stream is not None:
                await self._send_stream(b"".join(out), reply.stream, head=head, chunked=not http10)
                out.clear()
                return False
            if not keep:
                return False
        return True

    def _encode(
        self, out: list[bytes], reply: Reply, *, keep: bool, http10: bool, head: bool
    ) -> None:
        out.append(_status_line(reply.status))
        out.append(_date_header())
        for name, value in reply.headers:
            out.append(name + b": " + value + b"\r\n")
        if not keep:
            out.append(_CLOSE)
        elif http10:
            out.append(_KEEP_ALIVE)
        if reply.status in _NO_BODY_STATUSES:
            out.append(b"\r\n")
            return
        body = reply.body
        if head:
            out.append(b"content-length: %d\r\n\r\n" % len(body))
        else:
            # %b (not a separate piece) refuses a body that is not bytes before anything is sent.
            out.append(b"content-length: %d\r\n\r\n%b" % (len(body), body))

    def _error(self, status: int, message: str) -> bytes:
        body = _error_body(message)
        extra = self.server.error_headers
        return b"".join(
            (
                _status_line(status),
                _date_header(),
                *(
                    name + b": " + value + b"\r\n"
                    for name, value in (extra(status) if extra else ())
                ),
                _JSON,
                _CLOSE,
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            )
        )

    def _encode_stream_head(self, out: list[bytes], reply: Reply, *, http10: bool) -> None:
        out.append(_status_line(reply.status))
        out.append(_date_header())
        for name, value in reply.headers:
            out.append(name + b": " + value + b"\r\n")
        out.append(_CLOSE + b"\r\n" if http10 else _CHUNKED + _CLOSE + b"\r\n")

    async def _send_stream(
        self, pending: bytes, iterator: AsyncIterator[bytes], *, head: bool, chunked: bool
    ) -> None:
        """Send `pending` (ending with the stream's head), then every chunk as it comes, until
        the stream ends or the client goes away; the stream's iterator is closed either way."""
        try:
            if head:
                await self._send(pending)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_eof, nursery.cancel_scope)
                await self._pump(pending, iterator, chunked=chunked)
                nursery.cancel_scope.cancel()
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(LINGER_SECONDS):
                    try:
                        await aclose()
                    except Exception:
                        log.exception("lean listener: closing a stream reply failed")

    async def _pump(self, pending: bytes, iterator: AsyncIterator[bytes], *, chunked: bool) -> None:
        send_all = self._send
        try:
            await send_all(pending)
            async for chunk in iterator:
                if chunk:
                    await send_all(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                await send_all(_LAST_CHUNK)
        except OSError:
            pass  # the client went away mid-stream
        except Exception:
            # No terminating chunk: the client sees a truncated stream, not a complete one.
            log.exception("lean listener: stream reply failed")
            self.server.stats.handler_errors += 1

    async def _watch_eof(self, scope: trio.CancelScope) -> None:
        """While a stream is sent, read (and drop) what the client sends: EOF means it left."""
        try:
            while await self._receive():
                pass
        except OSError:
            pass
        scope.cancel()

    async def _close(self) -> None:
        """Half-close, then drain the client's unread bytes for a moment, so the replies
        already sent reach it before the socket closes (an RST could discard them)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            with trio.move_on_after(LINGER_SECONDS):
                while await self._receive():
                    pass
        except OSError:
            pass


def _split_target(target: bytes) -> tuple[str, bytes]:
    """Path (percent-decoded UTF-8, like ASGI's `path`) and raw query of a request target."""
    if not target.startswith(b"/"):
        if target == b"*":
            return "*", b""
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise _Refused(400, "invalid request target") from None
        if url.path is None or not url.path.startswith(b"/"):
            raise _Refused(400, "invalid request target")
        raw_path, query = url.path, url.query or b""
    else:
        raw_path, _, query = target.partition(b"?")
    if b"%" in raw_path:
        raw_path = unquote_to_bytes(raw_path)
    try:
        return raw_path.decode(), query
    except UnicodeDecodeError:
        raise _Refused(400, "request path is not UTF-8") from None


def _parse_error(exc: httptools.HttpParserError) -> str:
    # llhttp's reason, without characters that would need JSON escaping.
    reason = "".join(c for c in str(exc) if c.isalnum() or c in " -:,.") or "bad request"
    return "malformed request: " + reason


# ---------------------------------------------------------------------------------------------
# The server


async def _accept(listener: trio.SocketListener, nursery: trio.Nursery, server: _Server) -> None:
    failing = False
    while True:
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return
        except OSError as exc:
            # Out of file descriptors or memory: wait for connections to close, like
            # trio.serve_listeners does; logged once per run of failures.
            if not failing:
                log.error("lean listener: accept failed (%s), retrying until it succeeds", exc)
            failing = True
            await trio.sleep(0.1)
            continue
        failing = False
        nursery.start_soon(server.serve_connection, stream)


async def serve_lean(
    handler: Handler,
    listeners: Sequence[trio.SocketListener],
    *,
    max_body: int = MAX_BODY,
    keepalive_timeout: float = 5.0,
    header_timeout: float = 10.0,
    max_requests: int | None = None,
    graceful_timeout: float = 5.0,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    stats: ListenerStats | None = None,
    error_headers: Callable[[int], Sequence[tuple[bytes, bytes]]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on `listeners` until cancelled or until `shutdown_trigger` returns.

    The replies the listener writes itself (400, 408, 413, 431, 505, and 500 when the handler
    failed) get the headers `error_headers(status)` returns, if given.

    Shutdown: the listeners close, idle connections close, requests in flight get
    `graceful_timeout` to finish (their replies carry `connection: close`, streams run until
    their iterator ends), then whatever is left is cancelled.
    """
    server = _Server(
        handler,
        max_body,
        keepalive_timeout,
        header_timeout,
        max_requests,
        stats if stats is not None else ListenerStats(),
        error_headers,
    )
    with contextlib.closing(server.readiness):  # once every task using it is done
        async with trio.open_nursery() as timers:
            timers.start_soon(server.reap)
            timers.start_soon(server.readiness.run)
            async with trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(_accept, listener, connections, server)
                        task_status.started()
                        if shutdown_trigger is None:
                            await trio.sleep_forever()
                        await shutdown_trigger()
                        accepting.cancel_scope.cancel()
                finally:
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                server.drain()
                connections.cancel_scope.deadline = trio.current_time() + graceful_timeout
            timers.cancel_scope.cancel()
