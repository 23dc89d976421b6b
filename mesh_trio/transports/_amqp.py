"""The RabbitMQ transport of the dispatch seam: AMQP 0-9-1 spoken from trio, without threads.

This module is the trio shell around the sans-IO protocol of `_amqp_proto.py`
(`ClientConnection`: the handshake, channels, publisher-confirm bookkeeping, returns, what a
lost connection does to in-flight publishes). pamqp is the frame codec only. The shell owns
what needs I/O or a clock:

- `_open_amqp` opens a `trio.SocketStream` (wrapped in a `trio.SSLStream` for `amqps://`) and
  drives the handshake to `Connected`, all within one `connect_timeout`.
- `_Connection` is one live connection. A writer task owns the send side: a publish queues its
  already-encoded frames in the protocol object (a synchronous step, so a publish is never half
  written and never interleaved with another one) and the writer flushes everything queued in
  one `send_all`; when it had nothing to write for half the negotiated heartbeat it sends a
  heartbeat. A reader task owns the receive side and hands the bytes to the protocol; silence
  from the broker for two heartbeats means the connection is dead. A send waits on a
  `trio.Event` of its own until its `Publication` is `Settled`, and parks while every channel
  is at capacity. The channels must open within `connect_timeout`, and so must a channel the
  broker closed and we reopen.
- `RabbitDispatcher` supervises connections in a nursery owned by `open_rabbitmq_dispatcher`:
  connect, run until the connection dies, back off (exponential, capped), connect again. It
  never waits for a broker on behalf of a caller: while there is no live connection `send`
  fails at once with `DispatchUnavailable`.

Failures map onto the two the HTTP contract knows. No queue behind the routing key (a return,
312 NO_ROUTE) is `ActorNotFound`. A nack, a connection lost or a channel closed before the
confirm, no confirm within `confirm_timeout`, an unreachable broker, a missing exchange: all
`DispatchUnavailable`, with the reason in its text. A publish is never written twice for one
`send`. Faults are logged once (logger `mesh_trio.amqp`), not once per failed send.
"""

from __future__ import annotations

import logging
import math
import platform
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import quote, unquote, urlsplit

import attrs
import trio
from pamqp import commands

from . import ActorNotFound, DispatchUnavailable
from ._amqp_proto import (
    Blocked,
    ChannelClosed,
    ChannelOpened,
    ClientConnection,
    Closed,
    Connected,
    ConnectionFault,
    Counters,
    Event,
    Publication,
    Ready,
    Settled,
    Tuning,
    Unblocked,
)

__all__ = [
    "AmqpUrl",
    "RabbitDispatcher",
    "RabbitStatistics",
    "actor_routing_key",
    "open_rabbitmq_dispatcher",
]

logger = logging.getLogger("mesh_trio.amqp")

_READ_SIZE = 65536
_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.frozen(kw_only=True)
class AmqpUrl:
    """Where and as whom to connect: a parsed `amqp://user:pass@host:port/vhost`.

    `amqps://` means TLS (default port 5671), the host name checked against the certificate.
    The vhost is the percent-decoded path without its leading slash (`/%2F` and an empty path
    both mean `/`); user and password are percent-decoded and default to `guest`. The password
    stays out of `repr` and of `display`, which is what logs and error texts show.
    """

    host: str
    port: int = 5672
    username: str = "guest"
    password: str = attrs.field(default="guest", repr=False)
    vhost: str = "/"
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> AmqpUrl:
        """Parse an AMQP URL.

        Raises:
            ValueError: not an `amqp://` or `amqps://` URL, a bad port or too long a vhost.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an amqp:// URL: {parts.scheme or '(no scheme)'}://...")
        tls = parts.scheme == "amqps"
        port = parts.port  # raises ValueError for a port out of range or not a number
        path = parts.path
        vhost = "/" if path in ("", "/") else unquote(path[1:])
        if len(vhost) > 127:
            raise ValueError("the vhost name is longer than AMQP allows (127)")
        return cls(
            host=parts.hostname or "localhost",
            port=port if port is not None else (5671 if tls else 5672),
            username=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=vhost,
            tls=tls,
        )

    @property
    def display(self) -> str:
        """The URL without the password, for logs and error messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        vhost = quote(self.vhost, safe="")
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{quote(self.username, safe='')}@{host}:{self.port}/{vhost}"


def actor_routing_key(namespace: str) -> Callable[[str], str]:
    """A routing-key function for Asya's topic exchange: `asya-{namespace}-{actor}` -> `{actor}`.

    Asya sidecars bind their queue `asya-{namespace}-{actor}` to the exchange (`asya` by default)
    with the binding key `{actor}`. Pass the result as `routing_key=` to
    `open_rabbitmq_dispatcher` when publishing to that exchange. A queue name without the prefix
    is used as it is.
    """
    prefix = f"asya-{namespace}-"

    def routing_key(queue: str) -> str:
        if queue.startswith(prefix) and len(queue) > len(prefix):
            return queue[len(prefix) :]
        return queue

    return routing_key


def _queue_name_is_key(queue: str) -> str:
    return queue


@attrs.frozen(kw_only=True)
class RabbitStatistics:
    """Counters of a `RabbitDispatcher` since it was opened.

    `published` counts publishes written to the socket; each then ends as `confirmed`, `returned`
    (no queue: `ActorNotFound`), `nacked`, or `lost` (connection or channel closed before the
    confirm), or is still `in_flight`. `timed_out` counts sends that gave up waiting for their
    confirm (such a publish may still be confirmed later). `reconnects` counts connections made
    after the first one.
    """

    connected: bool
    published: int
    confirmed: int
    returned: int
    nacked: int
    lost: int
    timed_out: int
    in_flight: int
    reconnects: int


@attrs.define(eq=False)
class _FaultLog:
    """Logs a fault at WARNING the first time, repeats of the same fault at DEBUG."""

    _last: str | None = None

    def note(self, message: str) -> None:
        if message == self._last:
            logger.debug("%s", message)
        else:
            logger.warning("%s", message)
            self._last = message

    def clear(self) -> None:
        self._last = None


def _describe_os_error(exc: OSError) -> str:
    """The first underlying error of trio's "all attempts to connect ... failed"."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return str(cause.exceptions[0])
    return str(exc)


def _platform() -> str:
    return f"Python {platform.python_version()} / trio {trio.__version__}"


async def _open_amqp(
    url: AmqpUrl,
    *,
    heartbeat: int,
    connect_timeout: float,
    channels: int = 1,
    capacity: int = 1,
    exchange: str = "",
    counters: Counters | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[_Stream, ClientConnection, Tuning]:
    """Connect (TLS for `amqps://`) and run the AMQP handshake, all within `connect_timeout`.

    Returns the stream, the protocol (in `OPENING_CHANNELS`, the first `Channel.Open` queued
    unless `channels` is 0) and the negotiated tuning.

    Raises:
        ConnectionFault: the broker is unreachable, refused us, or did not finish in time.
    """
    proto = ClientConnection(
        username=url.username,
        password=url.password,
        vhost=url.vhost,
        heartbeat=heartbeat,
        channels=channels,
        capacity=capacity,
        exchange=exchange,
        platform=_platform(),
        counters=counters or Counters(),
    )
    stream: _Stream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(url.host, url.port)
            if url.tls:
                context = ssl_context or ssl.create_default_context()
                stream = trio.SSLStream(stream, context, server_hostname=url.host)
                await stream.do_handshake()
            tuning: Tuning | None = None
            while tuning is None:
                if proto.has_data:
                    await stream.send_all(proto.data_to_send())
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    raise ConnectionFault("RabbitMQ closed the connection during the handshake")
                for event in proto.receive_data(data):
                    if isinstance(event, Closed):
                        if proto.has_data:  # the CloseOk of a refusal
                            await stream.send_all(proto.data_to_send())
                        raise ConnectionFault(event.reason)
                    if isinstance(event, Connected):
                        tuning = event.tuning
            return stream, proto, tuning
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectionFault(
                f"no AMQP handshake within {connect_timeout:g}s (connect_timeout)"
            ) from None
        if isinstance(exc, OSError):
            raise ConnectionFault(f"TCP connect failed: {_describe_os_error(exc)}") from None
        if isinstance(exc, trio.BrokenResourceError):
            if isinstance(exc.__cause__, ssl.SSLError):
                raise ConnectionFault(f"TLS handshake failed: {exc.__cause__}") from None
            raise ConnectionFault(f"the connection broke during the handshake: {exc}") from None
        raise


@attrs.define(eq=False)
class _Connection:
    """One live AMQP connection: the trio side of a `ClientConnection`; see the module
    docstring."""

    stream: _Stream
    proto: ClientConnection
    tuning: Tuning
    url: AmqpUrl
    faults: _FaultLog
    rpc_timeout: float
    nursery: trio.Nursery | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)
    _ready: trio.Event = attrs.field(factory=trio.Event)
    _channels_changed: trio.Event = attrs.field(factory=trio.Event)
    _out_ready: trio.Event = attrs.field(factory=trio.Event)
    _room: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _waiters: dict[Publication, trio.Event] = attrs.field(factory=dict)

    @property
    def usable(self) -> bool:
        return self.proto.usable

    @property
    def close_reason(self) -> str | None:
        return self.proto.close_reason

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[], None]) -> None:
        """Run reader and writer, open the channels, call `on_ready`, return when dead."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                self._out_ready.set()  # the first Channel.Open
                with trio.move_on_after(self.rpc_timeout):
                    await self._ready.wait()
                if not self._ready.is_set():
                    self.die(f"channels not opened within {self.rpc_timeout:g}s")
                elif self.usable:
                    on_ready()
                await self.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.die("connection closed")
            await trio.aclose_forcefully(self.stream)

    def die(self, reason: str) -> None:
        """Mark the connection dead: fail every unconfirmed publish, wake every waiter."""
        self._handle(self.proto.connection_lost(reason))

    async def close(self, timeout: float) -> None:
        """Close politely (Connection.Close, wait for CloseOk) within `timeout`."""
        if not self.usable:
            return
        self._handle(self.proto.close())
        self._room.unpark_all()
        with trio.move_on_after(timeout):
            await self.closed.wait()
        self.die("closed by the mesh api")

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, queue: str, routing_key: str, body: bytes) -> Publication:
        """Queue one publish on the least busy channel (waiting for room) and return it; wait
        for its outcome with `settled(publication)`.

        Raises:
            DispatchUnavailable: the connection died or is closing, or the broker blocked us.
        """
        while True:
            publication = self.proto.publish(queue, routing_key, body)
            if publication is not None:
                break
            await self._room.park()
        self._out_ready.set()
        return publication

    async def settled(self, publication: Publication) -> None:
        """Wait until `publication` has its outcome."""
        if not publication.settled:
            done = self._waiters.get(publication)
            if done is None:
                done = self._waiters[publication] = trio.Event()
            await done.wait()

    def in_flight(self) -> int:
        return self.proto.in_flight()

    # -- the wire -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        heartbeat = self.tuning.heartbeat
        interval = heartbeat / 2 if heartbeat else math.inf
        proto = self.proto
        try:
            while True:
                with trio.move_on_after(interval):
                    await self._out_ready.wait()
                self._out_ready = trio.Event()
                if not proto.has_data:
                    proto.send_heartbeat()
                await self.stream.send_all(proto.data_to_send())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.die(f"cannot write to RabbitMQ: {exc or type(exc).__name__}")

    async def _read_loop(self) -> None:
        heartbeat = self.tuning.heartbeat
        silence = 2 * heartbeat if heartbeat else math.inf
        try:
            while True:
                data: bytes | bytearray | None = None
                with trio.move_on_after(silence):
                    data = await self.stream.receive_some(_READ_SIZE)
                if data is None:
                    self.die(f"no heartbeat from RabbitMQ for {silence:g}s")
                    return
                if not data:
                    self.die("RabbitMQ closed the TCP connection")
                    return
                self._handle(self.proto.receive_data(data))
                if self.closed.is_set():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.die(f"cannot read from RabbitMQ: {exc or type(exc).__name__}")

    def _handle(self, events: list[Event]) -> None:
        """Act on what the protocol said: wake senders, log faults, watch reopens."""
        for event in events:
            if isinstance(event, Settled):
                waiters = self._waiters
                for publication in event.publications:
                    done = waiters.pop(publication, None)
                    if done is not None:
                        done.set()
                self._room.unpark(count=len(event.publications))
            elif isinstance(event, ChannelOpened):
                self._room.unpark_all()
                self._channels_changed.set()
                self._channels_changed = trio.Event()
            elif isinstance(event, Ready):
                self._ready.set()
            elif isinstance(event, ChannelClosed):
                self.faults.note(f"{event.reason}; reopening the channel")
                if self.nursery is not None:
                    self.nursery.start_soon(self._watch_reopen, event.number)
            elif isinstance(event, Blocked):
                self.faults.note(
                    f"RabbitMQ blocked publishing on {self.url.display}: {event.reason}"
                )
            elif isinstance(event, Unblocked):
                logger.info("RabbitMQ unblocked publishing on %s", self.url.display)
                self.faults.clear()
            elif isinstance(event, Closed):
                self._room.unpark_all()
                self._ready.set()
                self._channels_changed.set()
                self.closed.set()
        if self.proto.has_data:
            self._out_ready.set()

    async def _watch_reopen(self, number: int) -> None:
        with trio.move_on_after(self.rpc_timeout):
            while not self.proto.channel_is_open(number):
                if not self.usable:
                    return
                await self._channels_changed.wait()
            return
        self.die(f"channel {number} not reopened within {self.rpc_timeout:g}s")


@attrs.define(eq=False)
class RabbitDispatcher:
    """Publishes wire messages to RabbitMQ with publisher confirms; see the module docstring.

    Made by `open_rabbitmq_dispatcher`, which owns its background tasks.
    """

    _url: AmqpUrl
    _exchange: str
    _routing_key: Callable[[str], str]
    _confirm_timeout: float
    _connect_timeout: float
    _close_timeout: float
    _heartbeat: int
    _channels: int
    _capacity: int
    _backoff_min: float
    _backoff_max: float
    _ssl_context: ssl.SSLContext | None
    _counters: Counters = attrs.field(factory=Counters)
    _faults: _FaultLog = attrs.field(factory=_FaultLog)
    _conn: _Connection | None = None
    _down_reason: str = "not connected yet"
    _ever_connected: bool = False
    _closing: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _first_attempt: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> AmqpUrl:
        """Where the dispatcher connects."""
        return self._url

    @property
    def exchange(self) -> str:
        """The exchange every message is published to (`""` is the default exchange)."""
        return self._exchange

    @property
    def connected(self) -> bool:
        """Whether a connection is up and its channels are open right now."""
        return self._conn is not None and self._conn.usable

    async def send(self, queue: str, body: bytes) -> None:
        """Publish `body` to the exchange with the routing key of `queue`, wait for the confirm.

        The message is persistent (`delivery_mode=2`), `application/json` and `mandatory`.
        Nothing is retried: once the publish was written, any failure is reported as it is.

        Raises:
            ActorNotFound: RabbitMQ returned the message as unroutable (no such queue or no
                binding for its routing key); nothing was enqueued.
            DispatchUnavailable: no live connection (fails at once, the dispatcher reconnects
                by itself), the broker nacked or blocked the message, the connection or
                channel closed before the confirm (e.g. the exchange does not exist), or no
                confirm within `confirm_timeout`.
        """
        conn = self._conn
        if conn is None or not conn.usable:
            raise DispatchUnavailable(
                f"RabbitMQ at {self._url.display} is unavailable: {self._down_reason}"
            )
        routing_key = self._routing_key(queue)
        if not routing_key or len(routing_key.encode()) > 255:
            raise ActorNotFound(f"{queue!r} cannot be a RabbitMQ queue name")
        publication: Publication | None = None
        with trio.move_on_after(self._confirm_timeout):
            publication = await conn.publish(queue, routing_key, body)
            self._counters.published += 1
            await conn.settled(publication)
        if publication is None:
            raise DispatchUnavailable(
                f"no free RabbitMQ channel within {self._confirm_timeout:g}s "
                f"({conn.in_flight()} publishes awaiting their confirm)"
            )
        if not publication.settled:
            self._counters.timed_out += 1
            self._faults.note(
                f"RabbitMQ sent no publisher confirm within {self._confirm_timeout:g}s"
            )
            raise DispatchUnavailable(
                f"no publisher confirm from RabbitMQ within {self._confirm_timeout:g}s; "
                "the message may or may not be enqueued"
            )
        if publication.error is not None:
            raise publication.error
        self._faults.clear()

    async def ping(self) -> None:
        """Raise `DispatchUnavailable` (with the last reason) unless a connection is up."""
        if not self.connected:
            raise DispatchUnavailable(
                f"RabbitMQ at {self._url.display} is unavailable: {self._down_reason}"
            )

    async def wait_connected(self) -> None:
        """Wait until a connection is up (bound it with a trio timeout)."""
        while not self.connected:
            await self._changed.wait()

    def statistics(self) -> RabbitStatistics:
        """The dispatcher's counters and connection state."""
        counters = self._counters
        conn = self._conn
        return RabbitStatistics(
            connected=self.connected,
            published=counters.published,
            confirmed=counters.confirmed,
            returned=counters.returned,
            nacked=counters.nacked,
            lost=counters.lost,
            timed_out=counters.timed_out,
            in_flight=conn.in_flight() if conn is not None else 0,
            reconnects=counters.reconnects,
        )

    # -- the supervisor ---------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _mark_up(self, conn: _Connection) -> None:
        self._conn = conn
        tuning = conn.tuning
        if self._ever_connected:
            self._counters.reconnects += 1
            logger.info("reconnected to RabbitMQ at %s", self._url.display)
        else:
            logger.info(
                "connected to RabbitMQ at %s (exchange %r, heartbeat %ds, frame_max %d)",
                self._url.display,
                self._exchange,
                tuning.heartbeat,
                tuning.frame_max,
            )
        self._ever_connected = True
        self._faults.clear()
        self._first_attempt.set()
        self._notify()

    def _mark_down(self, reason: str, *, was_up: bool) -> None:
        self._conn = None
        self._down_reason = reason
        if not self._closing:
            if was_up:
                self._faults.clear()
                self._faults.note(
                    f"RabbitMQ connection to {self._url.display} lost: {reason}; reconnecting"
                )
            else:
                self._faults.note(
                    f"cannot connect to RabbitMQ at {self._url.display}: {reason}; retrying"
                )
        self._first_attempt.set()
        self._notify()

    async def _supervise(self) -> None:
        delay = self._backoff_min
        while not self._closing:
            was_up = False

            def ready(conn: _Connection) -> None:
                nonlocal was_up
                was_up = True
                self._mark_up(conn)

            try:
                reason = await self._connect_and_run(ready)
            except Exception as exc:  # a bug of ours: log it, keep the service alive
                logger.exception("RabbitMQ connection task failed")
                reason = f"internal error: {exc!r}"
            if self._closing:
                break
            self._mark_down(reason, was_up=was_up)
            if was_up:
                delay = self._backoff_min
            await trio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _connect_and_run(self, ready: Callable[[_Connection], None]) -> str:
        """One connection from connect to death; returns why it ended (or never started)."""
        try:
            stream, proto, tuning = await _open_amqp(
                self._url,
                heartbeat=self._heartbeat,
                connect_timeout=self._connect_timeout,
                channels=self._channels,
                capacity=self._capacity,
                exchange=self._exchange,
                counters=self._counters,
                ssl_context=self._ssl_context,
            )
        except ConnectionFault as fault:
            return fault.reason
        conn = _Connection(
            stream=stream,
            proto=proto,
            tuning=tuning,
            url=self._url,
            faults=self._faults,
            rpc_timeout=self._connect_timeout,
        )
        try:
            await conn.run(lambda: ready(conn))
        finally:
            conn.die("connection closed")
        return conn.close_reason or "connection closed"

    async def _close(self) -> None:
        self._closing = True
        conn = self._conn
        if conn is not None:
            await conn.close(self._close_timeout)
        self._conn = None
        self._down_reason = "the dispatcher is closed"
        self._notify()


@asynccontextmanager
async def open_rabbitmq_dispatcher(
    url: str,
    exchange: str,
    *,
    confirm_timeout: float = 5.0,
    connect_timeout: float = 5.0,
    close_timeout: float = 1.0,
    heartbeat: int = 60,
    channels: int = 4,
    max_in_flight: int = 1024,
    routing_key: Callable[[str], str] | None = None,
    reconnect_backoff: tuple[float, float] = (0.1, 5.0),
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[RabbitDispatcher]:
    """Open a RabbitMQ dispatcher whose connection lives in a nursery owned by this block.

    Entering waits for the first connection attempt only (at most `connect_timeout`); an
    unreachable broker does not fail the block: `send` raises `DispatchUnavailable` until the
    background task reconnects. Leaving closes the connection politely within `close_timeout`.

    Args:
        url: `amqp://user:pass@host:port/vhost` (percent-encoded vhost, default `/`), or
            `amqps://...` for TLS.
        exchange: the exchange to publish to; `""` is RabbitMQ's default exchange, which routes
            by queue name to every queue. It is never declared here: a missing exchange makes
            sends fail with `DispatchUnavailable` naming it.
        confirm_timeout: how long one `send` may take, waiting for a channel plus the confirm.
        connect_timeout: bound of one connection attempt (TCP, handshake, opening channels).
        close_timeout: bound of the polite close on exit.
        heartbeat: heartbeat interval to ask for, in seconds (the lower of ours and the
            broker's is used; 0 turns heartbeats off).
        channels: how many confirm-mode channels the connection keeps.
        max_in_flight: unconfirmed publishes allowed at once, shared out over the channels;
            further sends wait for room.
        routing_key: maps a queue name to the routing key; the default is the queue name
            itself (right for the default exchange, or an exchange whose bindings use the queue
            names). Use `actor_routing_key(namespace)` for Asya's topic exchange.
        reconnect_backoff: first and longest pause between connection attempts, in seconds.
        ssl_context: TLS settings for `amqps://` URLs (default: the system's trusted CAs,
            host name checked).

    Raises:
        ValueError: a malformed URL, exchange name or setting.
    """
    parsed = AmqpUrl.parse(url)
    commands.Basic.Publish(exchange=exchange)  # validates the exchange name
    if channels < 1 or max_in_flight < 1:
        raise ValueError("channels and max_in_flight must be at least 1")
    if not 0 < reconnect_backoff[0] <= reconnect_backoff[1]:
        raise ValueError("reconnect_backoff must be (first, longest) with 0 < first <= longest")
    if confirm_timeout <= 0 or connect_timeout <= 0 or close_timeout < 0:
        raise ValueError("timeouts must be positive")
    if not 0 <= heartbeat <= 65535:
        raise ValueError("heartbeat must be between 0 and 65535 seconds")
    dispatcher = RabbitDispatcher(
        url=parsed,
        exchange=exchange,
        routing_key=routing_key or _queue_name_is_key,
        confirm_timeout=confirm_timeout,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        heartbeat=heartbeat,
        channels=channels,
        capacity=max(1, max_in_flight // channels),
        backoff_min=reconnect_backoff[0],
        backoff_max=reconnect_backoff[1],
        ssl_context=ssl_context,
    )
    # The body's exception is held and re-raised after the nursery, so that it reaches the
    # caller as itself rather than wrapped in an ExceptionGroup (the background task never
    # raises: it logs and reconnects).
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher._supervise)
        try:
            await dispatcher._first_attempt.wait()
            yield dispatcher
        except BaseException as exc:
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await dispatcher._close()
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
