"""The mesh API's one HTTP/1.1 client: a keep-alive connection pool on trio streams.

Used wherever the mesh API is the client: the state-proxy store (a Unix socket), the SQS
transport (TCP, or TLS for `https`), and the demo actors posting events to the internal port
(TCP), exactly as a sidecar does. (httpcore was measured in its place and cost 1.5-5 times the
CPU per state-proxy round trip: docs/performance.md.)

How a request goes: it waits for one of `size` slots, takes the most recently used idle
connection, or opens one. An idle connection is dropped instead of reused when it expired
(`keepalive_expiry`, below the peers' own keep-alive timeouts) or when its socket is readable:
a peer that closed an idle connection leaves an EOF to read, and a zero-timeout poll sees it
without reading. The whole request goes out in one `send_all` (its bytes written here: a
method, a target and headers the callers build); the reply is parsed by llhttp (`httptools`,
as in the lean listener), which costs a fraction of h11's per-event Python. A connection goes
back to the pool only after a complete reply that leaves it open (no `Connection: close`, no
bytes past the reply); on any error or cancellation it is closed.

The retry rule turns on one fact: whether the whole request was handed to the socket.

- Not whole (connecting failed, TLS failed, or the connection broke while the request was being
  written): the peer cannot have received the request complete, so it cannot have applied it.
  The request goes out once more on a fresh connection (the idle ones are dropped first: they
  most likely died with this one), writes included. If that fails too: `ConnectError`.
- Whole: the peer may have read it and applied it; a lost reply then cannot tell. Only a
  request the caller marks idempotent (by default GET and HEAD) goes out once more; any other
  fails with `ExchangeError`.
"""

from __future__ import annotations

import ssl
from typing import Any

import attrs
import httptools
import trio

__all__ = [
    "KEEPALIVE_EXPIRY",
    "ConnectError",
    "ExchangeError",
    "HttpPool",
    "HttpReply",
    "HttpStatistics",
]

# Idle connections are closed after this many seconds. The peers we keep connections to close
# idle ones themselves: hypercorn (the internal port) after `keep_alive_timeout`, 5 s by default.
# Dropping ours well before (2 s of margin, which covers a process stalled by CPU starvation
# between taking a connection and writing on it) means we never write on a connection the
# server is closing at that moment, a race the readability check before reuse cannot see.
KEEPALIVE_EXPIRY = 3.0

_SAFE = frozenset({"GET", "HEAD"})
_READ_SIZE = 65536
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class ConnectError(OSError):
    """The request did not reach the peer whole (connecting failed, or the connection broke
    while it was being written): the peer cannot have applied it, and it is safe to retry."""


class ExchangeError(OSError):
    """The exchange failed or timed out after the request may have reached the peer whole:
    it may have been applied."""


@attrs.frozen(kw_only=True)
class HttpReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@attrs.frozen(kw_only=True)
class HttpStatistics:
    """A snapshot of a pool's counters.

    Attributes:
        connections_opened: Connections opened so far.
        connections_open: Connections open now, in use or idle.
        connections_idle: Keep-alive connections waiting for a request now.
        requests: Requests sent (a retry counts again).
        retries: Requests sent a second time on a fresh connection.
    """

    connections_opened: int
    connections_open: int
    connections_idle: int
    requests: int
    retries: int


class _Failed(Exception):
    """One attempt broke off with `error`."""

    def __init__(self, error: ConnectError | ExchangeError) -> None:
        super().__init__(str(error))
        self.error = error


@attrs.define(eq=False)
class _Progress:
    """How far one request got: whether it was ever written whole."""

    written: bool = False


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    socket: trio.socket.SocketType
    idle_since: float = 0.0


class _TooBig(Exception):
    """The reply's body passed `max_reply` (raised from inside the parser)."""


class _Reply:
    """The parser callbacks of one reply (`httptools.HttpResponseParser`), and what it read."""

    def __init__(self, max_reply: int | None, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.max_reply = max_reply
        self.head_only = head_only  # a reply to HEAD: no body whatever its headers say
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.framed = False  # Content-Length or chunked: the body does not run to EOF
        self.complete = False
        self.reusable = False

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Extra  # bytes after the reply: stop there, the connection cannot be trusted

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head_only and self.status >= 200:
            self.complete = True
            raise _HeadDone  # stop here: the connection is not reused after a HEAD

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.max_reply is not None and self.size > self.max_reply:
            raise _TooBig
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # 100 Continue and the like: the reply is still to come
            self.status, self.headers, self.body, self.size, self.framed = 0, [], [], 0, False
            return
        self.complete = True
        self.reusable = self.parser.should_keep_alive()


class _HeadDone(Exception):
    """A HEAD reply's head is all there is."""


class _Extra(Exception):
    """Bytes past the end of the reply."""


@attrs.define(eq=False)
class HttpPool:
    """Keep-alive HTTP/1.1 connections to one peer, at most `size` at a time.

    `HttpPool.tcp` and `HttpPool.unix` build the plain-HTTP ones.

    Args:
        scheme: `http` or `https`.
        host: Where to connect (ignored with `uds`) and, with `port`, the `Host` header.
        port: The TCP port; None for the scheme's default (also left out of `Host`).
        uds: A Unix socket path to connect to instead of TCP.
        ssl_context: TLS settings for `https` (default: the system's trust store).
        size: Connections open at most; further requests wait for one.
        timeout: Bound of one whole request, waiting for a connection and the retry included;
            None for no bound (the caller has its own).
        keepalive_expiry: Seconds an idle connection is kept (see `KEEPALIVE_EXPIRY`).
        max_reply: Largest reply body accepted, in bytes; None for no limit.
    """

    scheme: str
    host: str
    port: int | None = None
    uds: str | None = None
    ssl_context: ssl.SSLContext | None = None
    size: int = 16
    timeout: float | None = 5.0
    keepalive_expiry: float = KEEPALIVE_EXPIRY
    max_reply: int | None = None
    _where: str = attrs.field(init=False)
    _host_header: str = attrs.field(init=False)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _idle: list[_Connection] = attrs.field(init=False, factory=list)
    _busy: set[_Connection] = attrs.field(init=False, factory=set)
    _closed: bool = attrs.field(init=False, default=False)
    _opened: int = attrs.field(init=False, default=0)
    _requests: int = attrs.field(init=False, default=0)
    _retries: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {self.scheme!r}: http or https")
        if self.scheme == "https" and self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self._limiter = trio.CapacityLimiter(self.size)
        name = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        self._host_header = name if self.port in (None, default_port) else f"{name}:{self.port}"
        self._where = self.uds if self.uds is not None else f"{name}:{self.port or default_port}"

    @classmethod
    def tcp(cls, host: str, port: int, **options: Any) -> HttpPool:
        """Plain HTTP over TCP to `host:port`."""
        return cls("http", host, port, **options)

    @classmethod
    def unix(cls, path: str, *, host: str = "localhost", **options: Any) -> HttpPool:
        """Plain HTTP over the Unix socket `path`; `host` is the `Host` header."""
        return cls("http", host, uds=path, **options)

    def statistics(self) -> HttpStatistics:
        """Return a snapshot of the counters."""
        return HttpStatistics(
            connections_opened=self._opened,
            connections_open=len(self._idle) + len(self._busy),
            connections_idle=len(self._idle),
            requests=self._requests,
            retries=self._retries,
        )

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        idempotent: bool | None = None,
    ) -> HttpReply:
        """One request/response exchange (retried once where the rule above allows).

        Args:
            method: The HTTP method.
            target: The request target (path and query), already percent-encoded.
            body: The request body (`Content-Length` is added).
            headers: Further headers; `Host` is added unless given.
            idempotent: True when sending it twice does no harm, so it is retried once even
                after it was written whole; default True for GET and HEAD only.

        Raises:
            ConnectError: The request did not reach the peer whole, also on the retry (peer
                down, socket missing, TLS refused, connection broke while writing), or the
                pool is closed. Nothing was applied; safe to retry.
            ExchangeError: Failed or timed out after the request may have been written whole,
                or the reply was malformed or too large. It may have been applied.
        """
        if self._closed:
            raise ConnectError("the HTTP client is closed")
        retry_written = method in _SAFE if idempotent is None else idempotent
        all_headers = [*headers, ("content-length", str(len(body)))]
        if not any(name.lower() == "host" for name, _ in headers):
            all_headers.insert(0, ("host", self._host_header))
        progress = _Progress()
        with trio.move_on_after(self.timeout if self.timeout is not None else float("inf")):
            async with self._limiter:
                try:
                    return await self._attempt(method, target, all_headers, body, progress)
                except _Failed as failed:
                    if progress.written and not retry_written:
                        raise failed.error from None
                    first = failed.error
                self._drop_idle()
                self._retries += 1
                try:
                    return await self._attempt(method, target, all_headers, body, progress)
                except _Failed as failed:
                    raise failed.error from first
        kind = ExchangeError if progress.written else ConnectError
        raise kind(f"no reply from {self._where} within {self.timeout:g}s")

    async def _attempt(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        progress: _Progress,
    ) -> HttpReply:
        conn = self._take_idle()
        if conn is None:
            conn = await self._connect()
        self._busy.add(conn)
        try:
            self._requests += 1
            exchanged = await self._exchange(conn, method, target, headers, body, progress)
        except BaseException:
            # Errors, cancellation, timeouts: where the reply stands is unknown, and a late
            # reply must never be read as the next request's.
            self._busy.discard(conn)
            await trio.aclose_forcefully(conn.stream)
            raise
        self._busy.discard(conn)
        reply, reusable = exchanged
        if reusable and not self._closed:
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)
        return reply

    def _take_idle(self) -> _Connection | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.keepalive_expiry and not conn.socket.is_readable():
                return conn
            conn.socket.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            stream: trio.abc.Stream
            if self.uds is not None:
                stream = await trio.open_unix_socket(self.uds)
            else:
                stream = await trio.open_tcp_stream(self.host, self.port or 80)
                if self.ssl_context is not None:
                    stream = trio.SSLStream(
                        stream, self.ssl_context, server_hostname=self.host, https_compatible=True
                    )
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
        except (OSError, trio.BrokenResourceError) as exc:
            error = ConnectError(f"cannot connect to {self._where}: {describe(exc)}")
            raise _Failed(error) from exc
        self._opened += 1
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        assert isinstance(transport, trio.SocketStream)
        return _Connection(stream=stream, socket=transport.socket)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        progress: _Progress,
    ) -> tuple[HttpReply, bool]:
        """The reply, and whether the connection may serve another request."""
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        data = f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode() + body
        try:
            await conn.stream.send_all(data)
        except _IO_ERRORS as exc:
            error = ConnectError(
                f"connection to {self._where} broke while sending: {describe(exc)}"
            )
            raise _Failed(error) from exc
        progress.written = True
        reply = _Reply(self.max_reply, head_only=method == "HEAD")
        try:
            while not reply.complete:
                received = await conn.stream.receive_some(_READ_SIZE)
                if not received:
                    if reply.status and not reply.framed:
                        break  # a body delimited by the end of the connection
                    raise ExchangeError("server closed the connection before its reply ended")
                try:
                    reply.parser.feed_data(received)
                except httptools.HttpParserError as exc:
                    cause = exc.__context__
                    if isinstance(cause, _TooBig):
                        too_big = ExchangeError(
                            f"reply from {self._where} larger than {self.max_reply} bytes"
                        )
                        raise _Failed(too_big) from None
                    if not isinstance(cause, _HeadDone | _Extra) and not reply.complete:
                        raise ExchangeError(f"malformed reply: {exc}") from None
                    reply.reusable = False
        except (*_IO_ERRORS, ExchangeError) as exc:
            lost = ExchangeError(
                f"connection to {self._where} lost after the request was sent: {describe(exc)}"
            )
            raise _Failed(lost) from exc
        return (
            HttpReply(status=reply.status, headers=reply.headers, body=b"".join(reply.body)),
            reply.complete and reply.reusable,
        )

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.socket.close()

    async def aclose(self) -> None:
        """Refuse new requests and close the idle connections; busy ones close when their
        exchange ends."""
        self._closed = True
        self._drop_idle()


def describe(exc: BaseException) -> str:
    """Name the root of an I/O error, e.g. `ConnectionRefusedError: [Errno 111] ...`.

    trio wraps TLS and socket errors in `BrokenResourceError`, and a failed connect carries the
    error of each address tried in an exception group. The first root says what went wrong.
    """
    while True:
        if exc.__cause__ is not None:
            exc = exc.__cause__
        elif isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        else:
            break
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
