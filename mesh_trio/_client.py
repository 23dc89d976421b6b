"""The mesh API's one HTTP/1.1 client: httpcore's connection pool behind a small adapter.

Used wherever the mesh API is the client: the state-proxy store (a Unix socket), the SQS
transport (TCP, or TLS for `https`), and the demo actors posting events to the internal port
(TCP), exactly as a sidecar does.

httpcore (trio backend) owns the connections: at most `size` at once, a connection reused only
after a complete exchange, and an idle one dropped when it expired (`keepalive_expiry`) or when
its socket is readable before reuse (a peer that closed an idle connection leaves an EOF to
read). A cancelled or failed exchange closes its connection. This module adds what httpcore
leaves to its caller: the bound of a whole request, one retry where it is safe, counters, and
our two exceptions.

The retry rule. httpcore's `trace` extension reports each stage of an attempt; the one that
matters is whether the whole request was handed to the socket (`send_request_body` complete).

- Not whole (connecting failed, TLS failed, or the connection broke while the request was being
  written): the peer cannot have received the request complete, so it cannot have applied it.
  The request goes out once more on a fresh connection (the idle ones are dropped first: they
  most likely died with this one), writes included. If that fails too: `ConnectError`.
- Whole: the peer may have read it and applied it; a lost reply then cannot tell. Only a
  request the caller marks idempotent (by default GET and HEAD) goes out once more; any other
  fails with `ExchangeError`.

Write errors alone would not do: httpcore swallows a failed write and goes on to read, because
a server may answer before it read everything, so every failure surfaces as a read error; the
trace is what still says how far the request got.
"""

from __future__ import annotations

import ssl
from typing import Any

import attrs
import httpcore
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
# Dropping ours a second earlier means we never write on a connection the server is closing at
# that moment, a race the readability check before reuse cannot see.
KEEPALIVE_EXPIRY = 4.0

_SAFE = frozenset({"GET", "HEAD"})
# httpcore's trace events, `<logger>.<stage>.<started|complete|failed>`.
_WRITTEN = "http11.send_request_body.complete"
_CONNECTED = frozenset(
    {"connection.connect_tcp.complete", "connection.connect_unix_socket.complete"}
)
_FAILURES = (httpcore.NetworkError, httpcore.RemoteProtocolError)


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


@attrs.define(eq=False)
class _Attempt:
    """How far one attempt got, as httpcore's trace reports it."""

    pool: HttpPool
    written: bool = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == _WRITTEN:
            self.written = True
        elif event in _CONNECTED:
            self.pool._opened += 1


class _Body:
    """A request body for httpcore: one chunk. Not an async generator (what httpcore makes of
    bytes), which a failed write would leave unfinished for the garbage collector to warn about."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if not self._data:
            raise StopAsyncIteration
        data, self._data = self._data, b""
        return data


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
    _pool: httpcore.AsyncConnectionPool = attrs.field(init=False)
    _where: str = attrs.field(init=False)
    _host_header: bytes = attrs.field(init=False)
    _closed: bool = attrs.field(init=False, default=False)
    _opened: int = attrs.field(init=False, default=0)
    _requests: int = attrs.field(init=False, default=0)
    _retries: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {self.scheme!r}: http or https")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=self.ssl_context,
            max_connections=self.size,
            keepalive_expiry=self.keepalive_expiry,
            uds=self.uds,
            network_backend=httpcore.TrioBackend(),
        )
        name = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        host_header = name if self.port in (None, default_port) else f"{name}:{self.port}"
        self._host_header = host_header.encode("ascii")
        port = self.port or default_port
        self._where = self.uds if self.uds is not None else f"{name}:{port}"

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
        connections = [c for c in self._pool.connections if not c.is_closed()]
        return HttpStatistics(
            connections_opened=self._opened,
            connections_open=len(connections),
            connections_idle=sum(1 for c in connections if c.is_idle()),
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
        all_headers: list[tuple[bytes | str, bytes | str]] = [
            (b"Content-Length", b"%d" % len(body)),
            *headers,
        ]
        if not any(name.lower() == "host" for name, _ in headers):
            all_headers.insert(0, (b"Host", self._host_header))
        url = httpcore.URL(scheme=self.scheme, host=self.host, port=self.port, target=target)
        attempt = _Attempt(self)
        with trio.move_on_after(self.timeout if self.timeout is not None else float("inf")):
            try:
                return await self._send(method, url, all_headers, body, attempt)
            except (ConnectError, ExchangeError) as failed:
                if attempt.written and not retry_written:
                    raise
                error = failed
            await self._drop_idle()
            self._retries += 1
            attempt = _Attempt(self)
            try:
                return await self._send(method, url, all_headers, body, attempt)
            except (ConnectError, ExchangeError) as failed:
                raise failed from error
        kind = ExchangeError if attempt.written else ConnectError
        raise kind(f"no reply from {self._where} within {self.timeout:g}s")

    async def _send(
        self,
        method: str,
        url: httpcore.URL,
        headers: list[tuple[bytes | str, bytes | str]],
        body: bytes,
        attempt: _Attempt,
    ) -> HttpReply:
        self._requests += 1
        request = httpcore.Request(
            method, url, headers=headers, content=_Body(body), extensions={"trace": attempt.trace}
        )
        try:
            response = await self._pool.handle_async_request(request)
            try:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_stream():
                    size += len(chunk)
                    if self.max_reply is not None and size > self.max_reply:
                        raise ExchangeError(
                            f"reply from {self._where} larger than {self.max_reply} bytes"
                        )
                    chunks.append(chunk)
            finally:
                await response.aclose()
        except _FAILURES as exc:
            if attempt.written:
                raise ExchangeError(
                    f"connection to {self._where} lost after the request was sent: {describe(exc)}"
                ) from exc
            raise ConnectError(f"cannot connect to {self._where}: {describe(exc)}") from exc
        return HttpReply(status=response.status, headers=response.headers, body=b"".join(chunks))

    async def _drop_idle(self) -> None:
        # Shielded: in an already-cancelled caller, the first close would otherwise raise
        # Cancelled and leave the rest open.
        with trio.CancelScope(shield=True):
            for connection in self._pool.connections:
                if connection.is_idle() and not connection.is_closed():
                    await connection.aclose()

    async def aclose(self) -> None:
        """Refuse new requests and close every connection (a request still in flight on one
        fails with `ExchangeError`)."""
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._pool.aclose()


def describe(exc: BaseException) -> str:
    """Name the root of an I/O error, e.g. `ConnectionRefusedError: [Errno 111] ...`.

    httpcore wraps the original error as its first argument and re-raises without the cause;
    trio wraps TLS and socket errors in `BrokenResourceError`, and a failed connect carries the
    error of each address tried in an exception group. The first root says what went wrong.
    """
    while True:
        if exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        elif isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        else:
            break
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
