"""The RabbitMQ transport of the dispatch seam: AMQP 0-9-1 spoken from trio, without threads.

How it works, bottom up:

- pamqp is the frame codec only (`pamqp.frame.marshal` / `unmarshal`, `pamqp.commands`);
  everything that moves bytes is ours. `_FrameParser` is sans-IO: bytes in, `(channel, frame)`
  pairs out. `_open_amqp` opens a `trio.SocketStream` (wrapped in a `trio.SSLStream` for
  `amqps://`) and runs the handshake (protocol header, Start/StartOk with PLAIN, Tune/TuneOk,
  Open/OpenOk) under one `connect_timeout`.
- `_Connection` is one live AMQP connection. A writer task owns the send side: callers append
  already-encoded frames to an outgoing list (a synchronous step, so a publish is never half
  written and never interleaved with another one) and the writer flushes the whole list in one
  `send_all`; when it had nothing to write for half the negotiated heartbeat it sends a heartbeat.
  A reader task owns the receive side, cuts frames and routes them; silence from the broker for
  two heartbeats means the connection is dead.
- The connection holds a small pool of channels, each in confirm mode (`Confirm.Select`). A
  publish takes the open channel with the fewest unconfirmed messages, gets the channel's next
  delivery tag, and waits for that tag's `Basic.Ack` (`multiple=True` settles every tag up to
  it). A channel holds at most `max_in_flight / channels` unconfirmed publishes; a send waits
  (parked) for room. Unroutable messages come back as `Basic.Return` (the message is published
  `mandatory`); RabbitMQ sends the return right before the ack of the same message, so the
  return is matched to the tag of the ack that follows it, and that send raises `ActorNotFound`.
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
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

import attrs
import trio
from pamqp import commands, common
from pamqp import exceptions as pamqp_exceptions
from pamqp import frame as pamqp_frame
from pamqp.base import Frame as MethodFrame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from . import ActorNotFound, DispatchError, DispatchUnavailable

__all__ = [
    "AmqpUrl",
    "RabbitDispatcher",
    "RabbitStatistics",
    "actor_routing_key",
    "open_rabbitmq_dispatcher",
]

logger = logging.getLogger("mesh_trio.amqp")

_FRAME_HEADER = struct.Struct(">BHI")
_FRAME_OVERHEAD = 8  # 7-byte header + frame-end octet
_OUR_FRAME_MAX = 131072  # RabbitMQ's default; bodies are cut into frames of at most this size
_LARGEST_FRAME = 1 << 24  # refuse to buffer a frame bigger than this from a confused peer
_READ_SIZE = 65536
_REPLY_SUCCESS = 200
_NO_ROUTE = 312
_NOT_FOUND = 404
_PUBLISH_FRAME_CACHE = 4096  # encoded Basic.Publish frames kept per connection
_PUBLISH_PROPERTIES = commands.Basic.Properties(content_type="application/json", delivery_mode=2)
# Replies of the synchronous channel methods we send.
_REPLIES: dict[type[MethodFrame], type[MethodFrame]] = {
    commands.Channel.Open: commands.Channel.OpenOk,
    commands.Confirm.Select: commands.Confirm.SelectOk,
}

_M = TypeVar("_M", bound=MethodFrame)
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
class _Counters:
    published: int = 0
    confirmed: int = 0
    returned: int = 0
    nacked: int = 0
    lost: int = 0
    timed_out: int = 0
    reconnects: int = 0


class _ConnectionFault(Exception):
    """A connection or handshake failed; `reason` says why in words an operator can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


class _FrameParser:
    """Cuts an AMQP byte stream into frames (sans-IO).

    `feed` takes whatever bytes arrived and returns every complete frame with its channel
    number; an incomplete tail waits for the next `feed`. Bytes that are not AMQP raise
    `_ConnectionFault`.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[int, pamqp_frame.FrameTypes]]:
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, pamqp_frame.FrameTypes]] = []
        position = 0
        available = len(buffer)
        while available - position >= _FRAME_OVERHEAD:
            if buffer.startswith(b"AMQP", position):
                # The broker answers an unsupported protocol header with its own, then closes.
                end = position + 8
            else:
                _, _, size = _FRAME_HEADER.unpack_from(buffer, position)
                if size > _LARGEST_FRAME:
                    raise _ConnectionFault(f"protocol error: frame of {size} bytes announced")
                end = position + _FRAME_OVERHEAD + size
                if end > available:
                    break
            try:
                _, channel, frame = pamqp_frame.unmarshal(bytes(buffer[position:end]))
            except pamqp_exceptions.UnmarshalingException as exc:
                raise _ConnectionFault(f"protocol error: {exc}") from None
            frames.append((channel, frame))
            position = end
        if position:
            del buffer[:position]
        return frames


@attrs.frozen(kw_only=True)
class _Tuning:
    channel_max: int
    frame_max: int
    heartbeat: int


def _client_properties() -> common.FieldTable:
    return {
        "product": "asya-mesh-api (mesh_trio)",
        "platform": f"Python {platform.python_version()} / trio {trio.__version__}",
        "connection_name": "asya-mesh-api",
        "capabilities": {
            "publisher_confirms": True,
            "basic.nack": True,
            "connection.blocked": True,
            "authentication_failure_close": True,
            "consumer_cancel_notify": True,
        },
    }


def _close_reason(frame: commands.Connection.Close | commands.Channel.Close) -> str:
    return f"{frame.reply_code} {frame.reply_text}"


def _describe_os_error(exc: OSError) -> str:
    """The first underlying error of trio's "all attempts to connect ... failed"."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return str(cause.exceptions[0])
    return str(exc)


def _negotiate(server: int, ours: int) -> int:
    """Pick the lower of two limits where 0 means "no limit"."""
    if server == 0:
        return ours
    if ours == 0:
        return server
    return min(server, ours)


async def _read_frame(
    stream: _Stream,
    parser: _FrameParser,
    backlog: deque[tuple[int, pamqp_frame.FrameTypes]],
) -> tuple[int, pamqp_frame.FrameTypes]:
    while not backlog:
        data = await stream.receive_some(_READ_SIZE)
        if not data:
            raise _ConnectionFault("RabbitMQ closed the connection during the handshake")
        backlog.extend(parser.feed(data))
    return backlog.popleft()


async def _expect_on_zero(
    stream: _Stream,
    parser: _FrameParser,
    backlog: deque[tuple[int, pamqp_frame.FrameTypes]],
    expected: type[_M],
    doing: str,
) -> _M:
    """Read handshake frames (channel 0) until `expected`; a `Connection.Close` is a fault."""
    while True:
        channel, frame = await _read_frame(stream, parser, backlog)
        if isinstance(frame, expected):
            return frame
        if isinstance(frame, Heartbeat):
            continue
        if isinstance(frame, commands.Connection.Close):
            await stream.send_all(pamqp_frame.marshal(commands.Connection.CloseOk(), 0))
            raise _ConnectionFault(f"RabbitMQ refused {doing}: {_close_reason(frame)}")
        if isinstance(frame, ProtocolHeader):
            version = f"{frame.major_version}-{frame.minor_version}-{frame.revision}"
            raise _ConnectionFault(f"RabbitMQ does not speak AMQP 0-9-1 (it offered {version})")
        raise _ConnectionFault(f"unexpected {frame.name} on channel {channel} while {doing}")


async def _open_amqp(
    url: AmqpUrl,
    *,
    heartbeat: int,
    connect_timeout: float,
    channels: int = 1,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[_Stream, _FrameParser, _Tuning]:
    """Connect (TLS for `amqps://`) and run the AMQP handshake, all within `connect_timeout`.

    Returns the stream, the parser (it may hold bytes already read) and the negotiated tuning.

    Raises:
        _ConnectionFault: the broker is unreachable, refused us, or did not finish in time.
    """
    stream: _Stream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(url.host, url.port)
            if url.tls:
                context = ssl_context or ssl.create_default_context()
                stream = trio.SSLStream(stream, context, server_hostname=url.host)
                await stream.do_handshake()
            parser = _FrameParser()
            backlog: deque[tuple[int, pamqp_frame.FrameTypes]] = deque()
            await stream.send_all(ProtocolHeader().marshal())
            start = await _expect_on_zero(
                stream, parser, backlog, commands.Connection.Start, "the connection"
            )
            mechanisms = start.mechanisms
            if isinstance(mechanisms, bytes):
                mechanisms = mechanisms.decode("utf-8", "replace")
            if "PLAIN" not in str(mechanisms).split():
                raise _ConnectionFault(f"RabbitMQ does not offer PLAIN login ({mechanisms})")
            start_ok = commands.Connection.StartOk(
                client_properties=_client_properties(),
                mechanism="PLAIN",
                response=f"\0{url.username}\0{url.password}",
            )
            await stream.send_all(pamqp_frame.marshal(start_ok, 0))
            tune = await _expect_on_zero(
                stream, parser, backlog, commands.Connection.Tune, f"the login of {url.username!r}"
            )
            tuning = _Tuning(
                channel_max=_negotiate(tune.channel_max, 65535),
                frame_max=_negotiate(tune.frame_max, _OUR_FRAME_MAX),
                heartbeat=0 if heartbeat == 0 else _negotiate(tune.heartbeat, heartbeat),
            )
            if tuning.channel_max < channels:
                raise _ConnectionFault(f"RabbitMQ allows only {tuning.channel_max} channels")
            tune_ok = commands.Connection.TuneOk(
                channel_max=tuning.channel_max,
                frame_max=tuning.frame_max,
                heartbeat=tuning.heartbeat,
            )
            await stream.send_all(
                pamqp_frame.marshal(tune_ok, 0)
                + pamqp_frame.marshal(commands.Connection.Open(virtual_host=url.vhost), 0)
            )
            await _expect_on_zero(
                stream, parser, backlog, commands.Connection.OpenOk, f"vhost {url.vhost!r}"
            )
            if backlog:
                raise _ConnectionFault("unexpected frames right after the handshake")
            return stream, parser, tuning
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise _ConnectionFault(
                f"no AMQP handshake within {connect_timeout:g}s (connect_timeout)"
            ) from None
        if isinstance(exc, OSError):
            raise _ConnectionFault(f"TCP connect failed: {_describe_os_error(exc)}") from None
        if isinstance(exc, trio.BrokenResourceError):
            if isinstance(exc.__cause__, ssl.SSLError):
                raise _ConnectionFault(f"TLS handshake failed: {exc.__cause__}") from None
            raise _ConnectionFault(f"the connection broke during the handshake: {exc}") from None
        raise


@attrs.define(eq=False)
class _Pending:
    """One publish waiting for its confirm. `error` stays None when the broker acked it."""

    queue: str
    routing_key: str
    done: trio.Event = attrs.field(factory=trio.Event)
    error: DispatchError | None = None

    def settle(self, error: DispatchError | None) -> None:
        self.error = error
        self.done.set()


@attrs.define(eq=False)
class _Rpc:
    """A synchronous channel method waiting for its reply (Channel.Open, Confirm.Select)."""

    expected: type[MethodFrame]
    done: trio.Event = attrs.field(factory=trio.Event)
    error: str | None = None


@attrs.define(eq=False)
class _Channel:
    """One confirm-mode channel: delivery tags handed out and not yet settled, in tag order."""

    number: int
    capacity: int
    is_open: bool = False
    next_tag: int = 1
    pending: dict[int, _Pending] = attrs.field(factory=dict)
    # Routing keys of `Basic.Return`s received whose ack has not arrived yet.
    returned: deque[str] = attrs.field(factory=deque)
    # A `Basic.Return` whose content (header + body frames) is still arriving; bytes left.
    return_key: str | None = None
    return_left: int = -1
    rpc: _Rpc | None = None


@attrs.define(eq=False)
class _Connection:
    """One live AMQP connection and its channels; see the module docstring."""

    stream: _Stream
    parser: _FrameParser
    tuning: _Tuning
    url: AmqpUrl
    exchange: str
    counters: _Counters
    faults: _FaultLog
    rpc_timeout: float
    channel_count: int
    capacity: int
    channels: dict[int, _Channel] = attrs.field(factory=dict)
    nursery: trio.Nursery | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)
    close_reason: str | None = None
    closing: bool = False
    blocked: str | None = None
    _out: list[bytes] = attrs.field(factory=list)
    _out_ready: trio.Event = attrs.field(factory=trio.Event)
    _room: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _publish_frames: dict[tuple[int, str], bytes] = attrs.field(factory=dict)

    @property
    def usable(self) -> bool:
        return self.close_reason is None and not self.closing

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[], None]) -> None:
        """Run reader and writer, open the channels, call `on_ready`, return when dead."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                try:
                    with trio.fail_after(self.rpc_timeout):
                        for number in range(1, self.channel_count + 1):
                            channel = _Channel(number=number, capacity=self.capacity)
                            self.channels[number] = channel
                            await self._open_channel(channel)
                except trio.TooSlowError:
                    self.die(f"channels not opened within {self.rpc_timeout:g}s")
                except _ConnectionFault as fault:
                    self.die(fault.reason)
                else:
                    on_ready()
                await self.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.die("connection closed")
            await trio.aclose_forcefully(self.stream)

    def die(self, reason: str) -> None:
        """Mark the connection dead: fail every unconfirmed publish and waiting RPC."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        for channel in self.channels.values():
            self._fail_channel(channel, f"RabbitMQ connection lost before the confirm: {reason}")
        self._room.unpark_all()
        self.closed.set()

    async def close(self, timeout: float) -> None:
        """Close politely (Connection.Close, wait for CloseOk) within `timeout`."""
        if not self.usable:
            return
        self.closing = True
        for channel in self.channels.values():
            self._fail_channel(channel, "the RabbitMQ dispatcher is closing")
        self._room.unpark_all()
        self._write(0, commands.Connection.Close(_REPLY_SUCCESS, "mesh api shutting down", 0, 0))
        with trio.move_on_after(timeout):
            await self.closed.wait()
        self.die("closed by the mesh api")

    # -- publishing -----------------------------------------------------------------------

    def _pick_channel(self) -> _Channel | None:
        best: _Channel | None = None
        for channel in self.channels.values():
            load = len(channel.pending)
            if (
                channel.is_open
                and load < channel.capacity
                and (best is None or load < len(best.pending))
            ):
                best = channel
        return best

    async def publish(self, queue: str, routing_key: str, body: bytes) -> _Pending:
        """Write one publish on the least busy channel (waiting for room) and return its
        pending confirm.

        Raises:
            DispatchUnavailable: the connection died or is closing, or the broker blocked us.
        """
        while True:
            if not self.usable:
                raise DispatchUnavailable(
                    f"RabbitMQ connection lost: {self.close_reason or 'the dispatcher is closing'}"
                )
            if self.blocked is not None:
                raise DispatchUnavailable(f"RabbitMQ blocked publishing: {self.blocked}")
            channel = self._pick_channel()
            if channel is not None:
                break
            await self._room.park()
        pending = _Pending(queue=queue, routing_key=routing_key)
        channel.pending[channel.next_tag] = pending
        channel.next_tag += 1
        number = channel.number
        out = self._out
        out.append(self._publish_frame(number, routing_key))
        out.append(
            pamqp_frame.marshal(
                ContentHeader(body_size=len(body), properties=_PUBLISH_PROPERTIES), number
            )
        )
        step = self.tuning.frame_max - _FRAME_OVERHEAD
        for start in range(0, len(body), step):
            out.append(pamqp_frame.marshal(ContentBody(body[start : start + step]), number))
        self._out_ready.set()
        return pending

    def _publish_frame(self, number: int, routing_key: str) -> bytes:
        # Encoding a Basic.Publish costs about as much as the rest of a send; actors are few.
        key = (number, routing_key)
        encoded = self._publish_frames.get(key)
        if encoded is None:
            if len(self._publish_frames) >= _PUBLISH_FRAME_CACHE:
                self._publish_frames.clear()
            method = commands.Basic.Publish(
                exchange=self.exchange, routing_key=routing_key, mandatory=True
            )
            encoded = self._publish_frames[key] = pamqp_frame.marshal(method, number)
        return encoded

    def in_flight(self) -> int:
        return sum(len(channel.pending) for channel in self.channels.values())

    # -- the wire -------------------------------------------------------------------------

    def _write(self, number: int, frame: pamqp_frame.FrameTypes) -> None:
        self._out.append(pamqp_frame.marshal(frame, number))
        self._out_ready.set()

    async def _write_loop(self) -> None:
        heartbeat = self.tuning.heartbeat
        interval = heartbeat / 2 if heartbeat else math.inf
        try:
            while True:
                with trio.move_on_after(interval):
                    await self._out_ready.wait()
                self._out_ready = trio.Event()
                if not self._out:
                    self._out.append(Heartbeat.marshal())
                data = b"".join(self._out)
                self._out.clear()
                await self.stream.send_all(data)
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
                for number, frame in self.parser.feed(data):
                    self._on_frame(number, frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.die(f"cannot read from RabbitMQ: {exc or type(exc).__name__}")
        except _ConnectionFault as fault:
            self.die(fault.reason)

    # -- incoming frames ------------------------------------------------------------------

    def _on_frame(self, number: int, frame: pamqp_frame.FrameTypes) -> None:
        if number == 0:
            self._on_connection_frame(frame)
            return
        channel = self.channels.get(number)
        if channel is None:
            logger.debug("ignoring %s on unknown channel %d", frame.name, number)
            return
        if isinstance(frame, commands.Basic.Ack):
            self._settle(channel, frame.delivery_tag, frame.multiple, nacked=False)
        elif isinstance(frame, commands.Basic.Nack):
            self._settle(channel, frame.delivery_tag, frame.multiple, nacked=True)
        elif isinstance(frame, commands.Basic.Return):
            channel.return_key = frame.routing_key or ""
            channel.return_left = -1
        elif isinstance(frame, ContentHeader):
            channel.return_left = frame.body_size
            self._maybe_end_return(channel)
        elif isinstance(frame, ContentBody):
            channel.return_left -= len(frame)
            self._maybe_end_return(channel)
        elif isinstance(frame, commands.Channel.Close):
            self._on_channel_close(channel, frame)
        elif isinstance(frame, commands.Channel.Flow):
            self._write(number, commands.Channel.FlowOk(active=frame.active))
        elif channel.rpc is not None and isinstance(frame, channel.rpc.expected):
            channel.rpc.done.set()
        else:
            logger.debug("ignoring %s on channel %d", frame.name, number)

    def _on_connection_frame(self, frame: pamqp_frame.FrameTypes) -> None:
        if isinstance(frame, Heartbeat):
            return
        if isinstance(frame, commands.Connection.Close):
            self._write(0, commands.Connection.CloseOk())
            self.die(f"RabbitMQ closed the connection: {_close_reason(frame)}")
        elif isinstance(frame, commands.Connection.CloseOk):
            self.die("closed by the mesh api")
        elif isinstance(frame, commands.Connection.Blocked):
            self.blocked = frame.reason or "resource alarm"
            self.faults.note(f"RabbitMQ blocked publishing on {self.url.display}: {self.blocked}")
        elif isinstance(frame, commands.Connection.Unblocked):
            self.blocked = None
            logger.info("RabbitMQ unblocked publishing on %s", self.url.display)
            self.faults.clear()
        else:
            logger.debug("ignoring %s on channel 0", frame.name)

    def _maybe_end_return(self, channel: _Channel) -> None:
        if channel.return_key is not None and channel.return_left == 0:
            channel.returned.append(channel.return_key)
            channel.return_key = None

    def _settle(self, channel: _Channel, tag: int, multiple: bool, *, nacked: bool) -> None:
        pending = channel.pending
        if multiple:
            tags = []
            for candidate in pending:  # insertion order is tag order
                if candidate > tag:
                    break
                tags.append(candidate)
        else:
            tags = [tag] if tag in pending else []
        returned_tag = None
        if channel.returned:
            # The return precedes the ack of the same message, whose tag the ack carries.
            key = channel.returned.popleft()
            if tag in pending and pending[tag].routing_key == key:
                returned_tag = tag
            else:
                returned_tag = next((t for t in tags if pending[t].routing_key == key), None)
        counters = self.counters
        for settled in tags:
            entry = pending.pop(settled)
            if settled == returned_tag:
                counters.returned += 1
                entry.settle(
                    ActorNotFound(
                        f"queue {entry.queue!r} does not exist: RabbitMQ returned the message "
                        f"as unroutable ({_NO_ROUTE} NO_ROUTE, exchange {self.exchange!r}, "
                        f"routing key {entry.routing_key!r})"
                    )
                )
            elif nacked:
                counters.nacked += 1
                entry.settle(
                    DispatchUnavailable(
                        f"RabbitMQ refused the message for {entry.queue!r} (basic.nack: "
                        "the queue rejects publishes or the broker failed to store it)"
                    )
                )
            else:
                counters.confirmed += 1
                entry.settle(None)
        if tags:
            self._room.unpark(count=len(tags))

    def _on_channel_close(self, channel: _Channel, frame: commands.Channel.Close) -> None:
        self._write(channel.number, commands.Channel.CloseOk())
        if frame.reply_code == _NOT_FOUND and "exchange" in frame.reply_text:
            reason = (
                f"exchange {self.exchange!r} not found on RabbitMQ vhost {self.url.vhost!r} "
                f"({_close_reason(frame)})"
            )
        else:
            reason = f"RabbitMQ closed channel {channel.number}: {_close_reason(frame)}"
        self.faults.note(f"{reason}; reopening the channel")
        self._fail_channel(channel, reason)
        replacement = _Channel(number=channel.number, capacity=channel.capacity)
        self.channels[channel.number] = replacement
        if self.usable and self.nursery is not None:
            self.nursery.start_soon(self._reopen_channel, replacement)

    def _fail_channel(self, channel: _Channel, reason: str) -> None:
        channel.is_open = False
        if channel.rpc is not None:
            channel.rpc.error = reason
            channel.rpc.done.set()
        if channel.pending:
            self.counters.lost += len(channel.pending)
            for entry in channel.pending.values():
                entry.settle(DispatchUnavailable(reason))
            channel.pending.clear()

    # -- channel setup ----------------------------------------------------------------------

    async def _rpc(self, channel: _Channel, method: MethodFrame) -> None:
        rpc = _Rpc(expected=_REPLIES[type(method)])
        channel.rpc = rpc
        self._write(channel.number, method)
        await rpc.done.wait()
        channel.rpc = None
        if rpc.error is not None:
            raise _ConnectionFault(rpc.error)
        if not self.usable:
            raise _ConnectionFault(self.close_reason or "the connection is closing")

    async def _open_channel(self, channel: _Channel) -> None:
        await self._rpc(channel, commands.Channel.Open())
        await self._rpc(channel, commands.Confirm.Select())
        channel.is_open = True
        self._room.unpark_all()

    async def _reopen_channel(self, channel: _Channel) -> None:
        try:
            with trio.fail_after(self.rpc_timeout):
                await self._open_channel(channel)
        except trio.TooSlowError:
            self.die(f"channel {channel.number} not reopened within {self.rpc_timeout:g}s")
        except _ConnectionFault as fault:
            self.die(f"cannot reopen channel {channel.number}: {fault.reason}")


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
    _counters: _Counters = attrs.field(factory=_Counters)
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
        pending: _Pending | None = None
        with trio.move_on_after(self._confirm_timeout):
            pending = await conn.publish(queue, routing_key, body)
            self._counters.published += 1
            await pending.done.wait()
        if pending is None:
            raise DispatchUnavailable(
                f"no free RabbitMQ channel within {self._confirm_timeout:g}s "
                f"({conn.in_flight()} publishes awaiting their confirm)"
            )
        if not pending.done.is_set():
            self._counters.timed_out += 1
            self._faults.note(
                f"RabbitMQ sent no publisher confirm within {self._confirm_timeout:g}s"
            )
            raise DispatchUnavailable(
                f"no publisher confirm from RabbitMQ within {self._confirm_timeout:g}s; "
                "the message may or may not be enqueued"
            )
        if pending.error is not None:
            raise pending.error
        self._faults.clear()

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
            stream, parser, tuning = await _open_amqp(
                self._url,
                heartbeat=self._heartbeat,
                connect_timeout=self._connect_timeout,
                channels=self._channels,
                ssl_context=self._ssl_context,
            )
        except _ConnectionFault as fault:
            return fault.reason
        conn = _Connection(
            stream=stream,
            parser=parser,
            tuning=tuning,
            url=self._url,
            exchange=self._exchange,
            counters=self._counters,
            faults=self._faults,
            rpc_timeout=self._connect_timeout,
            channel_count=self._channels,
            capacity=self._capacity,
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
