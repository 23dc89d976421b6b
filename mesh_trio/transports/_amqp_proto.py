"""AMQP 0-9-1 for a publishing client, sans-IO: bytes in, events and bytes out.

`ClientConnection` is the whole protocol side of the RabbitMQ transport, with no sockets, no
clock and no trio (the shell in `_amqp.py` owns those). The shell feeds it what the broker sent
(`receive_data(bytes) -> [events]`), calls `publish`, `close`, `send_heartbeat` and
`connection_lost`, and writes whatever `data_to_send()` returns. Timeouts are the shell's: a
connect that takes too long, a confirm that never comes, a silent broker.

States, in order (`state`):

    AWAIT_START --Start--> AWAIT_TUNE --Tune--> AWAIT_OPEN_OK --OpenOk--> OPENING_CHANNELS
        --every channel open--> OPEN --close()--> CLOSING --CloseOk--> CLOSED

Any state goes to CLOSED on a fault: the broker's `Connection.Close` (answered with CloseOk),
bytes that are not AMQP, a refused login or vhost, a broker allowing too few channels, a
channel that fails to open, or the shell's `connection_lost`. CLOSED is final and its reason
(`close_reason`) is what failed sends report; the last event of that step is `Closed(reason)`.

The handshake writes the protocol header, answers Start with PLAIN StartOk, picks the lower of
both sides' limits from Tune (0 meaning none), and opens the vhost. Then the channels open one
after another (`Channel.Open`, `Confirm.Select`), each in confirm mode.

Publisher confirms, per channel: a publish takes the open channel with the fewest unconfirmed
messages (below its `capacity`; none free: `publish` returns None and the shell waits for a
`Settled`), gets the channel's next delivery tag, and waits for `Basic.Ack` of that tag
(`multiple` settles every tag up to it; a tag we do not hold is ignored). `Basic.Nack` fails it
(`DispatchUnavailable`). Messages are `mandatory`: an unroutable one comes back as
`Basic.Return` (method, content header, body frames) carrying its routing key but no tag.
RabbitMQ sends a return before the confirm of the same message, though it may confirm earlier
tags in between; so each return waiting when an ack or nack arrives is matched to one of the
messages it settles (the one with the ack's own tag if its routing key matches, otherwise the
oldest settled message with that key), and one that matches none waits for a later ack. That
message fails with `ActorNotFound`. A channel the broker closes (a missing exchange: 404) fails
its own unconfirmed publishes with the broker's reason and is reopened under the same number
(`ChannelClosed`, later `ChannelOpened`); a connection lost or closed fails every unconfirmed
publish (`Settled`, counted as `lost`). No publish is ever written twice.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Final, TypeAlias

import attrs
from pamqp import commands, common
from pamqp import exceptions as pamqp_exceptions
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from . import ActorNotFound, DispatchError, DispatchUnavailable

_FRAME_HEADER: Final = struct.Struct(">BHI")
_BODY_SIZE: Final = struct.Struct(">Q")
_FRAME_END: Final = b"\xce"
_BODY_FRAME: Final = 3
FRAME_OVERHEAD: Final = 8  # 7-byte header + frame-end octet
OUR_FRAME_MAX: Final = 131072  # RabbitMQ's default; bodies are cut into frames of at most this
_LARGEST_FRAME: Final = 1 << 24  # refuse to buffer a frame bigger than this from a confused peer
_CHANNEL_MAX: Final = 65535
_REPLY_SUCCESS: Final = 200
NO_ROUTE: Final = 312
_NOT_FOUND: Final = 404
_PUBLISH_FRAME_CACHE: Final = 4096  # encoded Basic.Publish frames kept per connection
_PUBLISH_PROPERTIES: Final = commands.Basic.Properties(
    content_type="application/json", delivery_mode=2
)


class ConnectionFault(Exception):
    """Bytes that are not AMQP, or a connection that failed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameParser:
    """Cuts an AMQP byte stream into frames.

    `feed` takes whatever bytes arrived and returns every complete frame with its channel
    number; an incomplete tail waits for the next `feed`. Bytes that are not AMQP raise
    `ConnectionFault`.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[int, pamqp_frame.FrameTypes]]:
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, pamqp_frame.FrameTypes]] = []
        position = 0
        available = len(buffer)
        while available - position >= FRAME_OVERHEAD:
            if buffer.startswith(b"AMQP", position):
                # The broker answers an unsupported protocol header with its own, then closes.
                end = position + 8
            else:
                _, _, size = _FRAME_HEADER.unpack_from(buffer, position)
                if size > _LARGEST_FRAME:
                    raise ConnectionFault(f"protocol error: frame of {size} bytes announced")
                end = position + FRAME_OVERHEAD + size
                if end > available:
                    break
            try:
                _, channel, frame = pamqp_frame.unmarshal(bytes(buffer[position:end]))
            except pamqp_exceptions.UnmarshalingException as exc:
                raise ConnectionFault(f"protocol error: {exc}") from None
            frames.append((channel, frame))
            position = end
        if position:
            del buffer[:position]
        return frames


def negotiate(server: int, ours: int) -> int:
    """Pick the lower of two limits where 0 means "no limit"."""
    if server == 0:
        return ours
    if ours == 0:
        return server
    return min(server, ours)


def _close_reason(frame: commands.Connection.Close | commands.Channel.Close) -> str:
    return f"{frame.reply_code} {frame.reply_text}"


@attrs.frozen(kw_only=True)
class Tuning:
    """The limits both sides agreed on in Tune/TuneOk."""

    channel_max: int
    frame_max: int
    heartbeat: int


@attrs.define(eq=False)
class Counters:
    """Publish outcomes, shared by every connection of one dispatcher.

    The connection counts how publishes ended; `published`, `timed_out` and `reconnects` are
    the shell's to count.
    """

    published: int = 0
    confirmed: int = 0
    returned: int = 0
    nacked: int = 0
    lost: int = 0
    timed_out: int = 0
    reconnects: int = 0


@attrs.define(eq=False, slots=True)
class Publication:
    """One publish and its outcome: `settled`, then `error` None (acked) or why it failed."""

    queue: str
    routing_key: str
    channel: int
    tag: int
    settled: bool = False
    error: DispatchError | None = None

    def _settle(self, error: DispatchError | None) -> None:
        self.error = error
        self.settled = True


# -- events: what `receive_data` (and the other inputs) tell the shell -------------------------


@attrs.frozen
class Connected:
    """The handshake is done (Connection.OpenOk); the channels are being opened."""

    tuning: Tuning


@attrs.frozen
class Ready:
    """Every channel opened for the first time: the connection can take publishes."""


@attrs.frozen
class ChannelOpened:
    """Channel `number` is open and in confirm mode (first time or reopened)."""

    number: int


@attrs.frozen
class ChannelClosed:
    """The broker closed channel `number` (its publishes failed); it is being reopened."""

    number: int
    reason: str


@attrs.frozen
class Settled:
    """These publications got their outcome (ack, return, nack, or lost)."""

    publications: tuple[Publication, ...]


@attrs.frozen
class Blocked:
    """The broker blocked publishing (`Connection.Blocked`: a memory or disk alarm)."""

    reason: str


@attrs.frozen
class Unblocked:
    """The broker lifted its block (`Connection.Unblocked`)."""


@attrs.frozen
class Closed:
    """The connection is over; nothing more will be read or written on it. Always last."""

    reason: str


Event: TypeAlias = (
    Connected | Ready | ChannelOpened | ChannelClosed | Settled | Blocked | Unblocked | Closed
)


class ConnectionState(enum.Enum):
    AWAIT_START = "await start"
    AWAIT_TUNE = "await tune"
    AWAIT_OPEN_OK = "await open-ok"
    OPENING_CHANNELS = "opening channels"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ChannelState(enum.Enum):
    OPENING = "opening"  # Channel.Open sent
    SELECTING = "selecting"  # Confirm.Select sent
    OPEN = "open"


@attrs.define(eq=False)
class _Channel:
    """One confirm-mode channel: delivery tags handed out and not yet settled, in tag order."""

    number: int
    capacity: int
    state: ChannelState = ChannelState.OPENING
    next_tag: int = 1
    pending: dict[int, Publication] = attrs.field(factory=dict)
    # Routing keys of `Basic.Return`s received whose ack has not arrived yet.
    returned: deque[str] = attrs.field(factory=deque)
    # A `Basic.Return` whose content (header + body frames) is still arriving; bytes left.
    return_key: str | None = None
    return_left: int = -1


_HANDSHAKE: Final = {
    ConnectionState.AWAIT_START: commands.Connection.Start,
    ConnectionState.AWAIT_TUNE: commands.Connection.Tune,
    ConnectionState.AWAIT_OPEN_OK: commands.Connection.OpenOk,
}


@attrs.define(eq=False)
class ClientConnection:
    """The client side of one AMQP connection that publishes with confirms; see the module
    docstring.

    Args:
        username, password, vhost: the PLAIN login and the vhost to open.
        heartbeat: seconds to ask for (the lower of ours and the broker's wins; 0: none).
        channels: confirm-mode channels to open after the handshake (0: none, for a client
            that speaks on channels of its own after the handshake).
        capacity: unconfirmed publishes one channel may hold.
        exchange: where every publish goes (`""`: the default exchange).
        platform: the `platform` client property (e.g. the Python and trio versions).
        counters: where outcomes are counted (shared across reconnects).
    """

    username: str = attrs.field(kw_only=True)
    password: str = attrs.field(kw_only=True, repr=False)
    vhost: str = attrs.field(kw_only=True)
    heartbeat: int = attrs.field(kw_only=True)
    channels: int = attrs.field(kw_only=True)
    capacity: int = attrs.field(kw_only=True, default=1)
    exchange: str = attrs.field(kw_only=True, default="")
    platform: str = attrs.field(kw_only=True, default="Python")
    counters: Counters = attrs.field(kw_only=True, factory=Counters)
    state: ConnectionState = attrs.field(init=False, default=ConnectionState.AWAIT_START)
    tuning: Tuning | None = attrs.field(init=False, default=None)
    close_reason: str | None = attrs.field(init=False, default=None)
    blocked: str | None = attrs.field(init=False, default=None)
    _channels: dict[int, _Channel] = attrs.field(init=False, factory=dict)
    _parser: FrameParser = attrs.field(init=False, factory=FrameParser)
    _out: list[bytes] = attrs.field(init=False, factory=lambda: [ProtocolHeader().marshal()])
    _publish_frames: dict[tuple[int, str], bytes] = attrs.field(init=False, factory=dict)
    _header_frames: dict[int, tuple[bytes, bytes]] = attrs.field(init=False, factory=dict)

    @property
    def usable(self) -> bool:
        """Whether publishes may be offered (handshake done, not closing or closed)."""
        return self.state in (ConnectionState.OPENING_CHANNELS, ConnectionState.OPEN)

    @property
    def has_data(self) -> bool:
        """Whether `data_to_send` has bytes for the broker."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Take every byte queued for the broker, in order (the protocol header first)."""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def channel_is_open(self, number: int) -> bool:
        channel = self._channels.get(number)
        return channel is not None and channel.state is ChannelState.OPEN

    def in_flight(self) -> int:
        """Publishes written and not settled yet."""
        return sum(len(channel.pending) for channel in self._channels.values())

    # -- inputs --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Take bytes from the broker; returns what they meant, in order."""
        events: list[Event] = []
        if self.state is ConnectionState.CLOSED:
            return events
        try:
            frames = self._parser.feed(data)
        except ConnectionFault as fault:
            self._fail(fault.reason, events)
            return events
        for number, frame in frames:
            if self.state in _HANDSHAKE:
                self._on_handshake_frame(number, frame, events)
            elif number == 0:
                self._on_connection_frame(frame, events)
            else:
                channel = self._channels.get(number)
                if channel is not None:
                    self._on_channel_frame(channel, frame, events)
            if self.close_reason is not None:  # CLOSED
                break
        return events

    def publish(self, queue: str, routing_key: str, body: bytes) -> Publication | None:
        """Queue one persistent, mandatory JSON publish on the least busy open channel.

        Returns its `Publication` (settled later by a `Settled` event), or None when every open
        channel is at capacity (try again after a `Settled` or `ChannelOpened`).

        Raises:
            DispatchUnavailable: the connection is closed or closing, or the broker blocked
                publishing; nothing was queued.
        """
        if not self.usable:
            raise DispatchUnavailable(
                f"RabbitMQ connection lost: {self.close_reason or 'the dispatcher is closing'}"
            )
        if self.blocked is not None:
            raise DispatchUnavailable(f"RabbitMQ blocked publishing: {self.blocked}")
        best: _Channel | None = None
        for channel in self._channels.values():
            load = len(channel.pending)
            if (
                channel.state is ChannelState.OPEN
                and load < channel.capacity
                and (best is None or load < len(best.pending))
            ):
                best = channel
        if best is None:
            return None
        number = best.number
        publication = Publication(
            queue=queue, routing_key=routing_key, channel=number, tag=best.next_tag
        )
        best.pending[best.next_tag] = publication
        best.next_tag += 1
        out = self._out
        out.append(self._publish_frame(number, routing_key))
        head, tail = self._header_frame(number)
        out.append(head + _BODY_SIZE.pack(len(body)) + tail)
        assert self.tuning is not None  # usable implies tuned
        step = self.tuning.frame_max - FRAME_OVERHEAD
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            out.append(_FRAME_HEADER.pack(_BODY_FRAME, number, len(chunk)) + chunk + _FRAME_END)
        return publication

    def send_heartbeat(self) -> None:
        """Queue a heartbeat frame (the shell sends one after half the heartbeat of silence)."""
        self._out.append(Heartbeat.marshal())

    def close(self) -> list[Event]:
        """Start the polite close: fail unconfirmed publishes, queue `Connection.Close`.

        The connection is `Closed` when the broker's CloseOk arrives (or the shell gives up
        waiting and calls `connection_lost`). Nothing happens unless it is usable.
        """
        events: list[Event] = []
        if not self.usable:
            return events
        self.state = ConnectionState.CLOSING
        self._fail_all("the RabbitMQ dispatcher is closing", events)
        self._write(0, commands.Connection.Close(_REPLY_SUCCESS, "mesh api shutting down", 0, 0))
        return events

    def connection_lost(self, reason: str) -> list[Event]:
        """The transport is gone (or given up on): fail every unconfirmed publish, go CLOSED.

        A connection that is already closed keeps its first reason and returns no events.
        """
        events: list[Event] = []
        self._fail(reason, events)
        return events

    # -- the handshake -------------------------------------------------------------------------

    def _doing(self) -> str:
        if self.state is ConnectionState.AWAIT_START:
            return "the connection"
        if self.state is ConnectionState.AWAIT_TUNE:
            return f"the login of {self.username!r}"
        return f"vhost {self.vhost!r}"

    def _on_handshake_frame(
        self, number: int, frame: pamqp_frame.FrameTypes, events: list[Event]
    ) -> None:
        if isinstance(frame, _HANDSHAKE[self.state]):
            if isinstance(frame, commands.Connection.Start):
                self._on_start(frame, events)
            elif isinstance(frame, commands.Connection.Tune):
                self._on_tune(frame, events)
            else:
                self._on_open_ok(events)
        elif isinstance(frame, Heartbeat):
            pass
        elif isinstance(frame, commands.Connection.Close):
            self._write(0, commands.Connection.CloseOk())
            self._fail(f"RabbitMQ refused {self._doing()}: {_close_reason(frame)}", events)
        elif isinstance(frame, ProtocolHeader):
            version = f"{frame.major_version}-{frame.minor_version}-{frame.revision}"
            self._fail(f"RabbitMQ does not speak AMQP 0-9-1 (it offered {version})", events)
        else:
            self._fail(f"unexpected {frame.name} on channel {number} while {self._doing()}", events)

    def _on_start(self, start: commands.Connection.Start, events: list[Event]) -> None:
        mechanisms = start.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode("utf-8", "replace")
        if "PLAIN" not in str(mechanisms).split():
            self._fail(f"RabbitMQ does not offer PLAIN login ({mechanisms})", events)
            return
        properties: common.FieldTable = {
            "product": "asya-mesh-api (mesh_trio)",
            "platform": self.platform,
            "connection_name": "asya-mesh-api",
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
                "consumer_cancel_notify": True,
            },
        }
        start_ok = commands.Connection.StartOk(
            client_properties=properties,
            mechanism="PLAIN",
            response=f"\0{self.username}\0{self.password}",
        )
        self._write(0, start_ok)
        self.state = ConnectionState.AWAIT_TUNE

    def _on_tune(self, tune: commands.Connection.Tune, events: list[Event]) -> None:
        tuning = Tuning(
            channel_max=negotiate(tune.channel_max, _CHANNEL_MAX),
            frame_max=negotiate(tune.frame_max, OUR_FRAME_MAX),
            heartbeat=0 if self.heartbeat == 0 else negotiate(tune.heartbeat, self.heartbeat),
        )
        if tuning.channel_max < self.channels:
            self._fail(f"RabbitMQ allows only {tuning.channel_max} channels", events)
            return
        self.tuning = tuning
        tune_ok = commands.Connection.TuneOk(
            channel_max=tuning.channel_max, frame_max=tuning.frame_max, heartbeat=tuning.heartbeat
        )
        self._write(0, tune_ok)
        self._write(0, commands.Connection.Open(virtual_host=self.vhost))
        self.state = ConnectionState.AWAIT_OPEN_OK

    def _on_open_ok(self, events: list[Event]) -> None:
        assert self.tuning is not None
        self.state = ConnectionState.OPENING_CHANNELS
        events.append(Connected(self.tuning))
        self._open_next_channel(events)

    def _open_next_channel(self, events: list[Event]) -> None:
        number = len(self._channels) + 1
        if number > self.channels:
            self.state = ConnectionState.OPEN
            events.append(Ready())
            return
        self._open_channel(number)

    def _open_channel(self, number: int) -> None:
        self._channels[number] = _Channel(number=number, capacity=self.capacity)
        self._write(number, commands.Channel.Open())

    # -- a live connection ---------------------------------------------------------------------

    def _on_connection_frame(self, frame: pamqp_frame.FrameTypes, events: list[Event]) -> None:
        if isinstance(frame, commands.Connection.Close):
            self._write(0, commands.Connection.CloseOk())
            self._fail(f"RabbitMQ closed the connection: {_close_reason(frame)}", events)
        elif isinstance(frame, commands.Connection.CloseOk):
            self._fail("closed by the mesh api", events)
        elif isinstance(frame, commands.Connection.Blocked):
            self.blocked = frame.reason or "resource alarm"
            events.append(Blocked(self.blocked))
        elif isinstance(frame, commands.Connection.Unblocked):
            self.blocked = None
            events.append(Unblocked())
        # Heartbeats (and anything else on channel 0) need no answer.

    def _on_channel_frame(
        self, channel: _Channel, frame: pamqp_frame.FrameTypes, events: list[Event]
    ) -> None:
        if isinstance(frame, commands.Basic.Ack):
            self._settle(channel, frame.delivery_tag, frame.multiple, False, events)
        elif isinstance(frame, commands.Basic.Nack):
            self._settle(channel, frame.delivery_tag, frame.multiple, True, events)
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
            self._on_channel_close(channel, frame, events)
        elif isinstance(frame, commands.Channel.Flow):
            self._write(channel.number, commands.Channel.FlowOk(active=frame.active))
        elif isinstance(frame, commands.Channel.OpenOk) and channel.state is ChannelState.OPENING:
            channel.state = ChannelState.SELECTING
            self._write(channel.number, commands.Confirm.Select())
        elif (
            isinstance(frame, commands.Confirm.SelectOk) and channel.state is ChannelState.SELECTING
        ):
            channel.state = ChannelState.OPEN
            events.append(ChannelOpened(channel.number))
            if self.state is ConnectionState.OPENING_CHANNELS:
                self._open_next_channel(events)
        # Anything else (a reply we did not ask for) is ignored.

    def _maybe_end_return(self, channel: _Channel) -> None:
        if channel.return_key is not None and channel.return_left == 0:
            channel.returned.append(channel.return_key)
            channel.return_key = None

    def _settle(
        self, channel: _Channel, tag: int, multiple: bool, nacked: bool, events: list[Event]
    ) -> None:
        pending = channel.pending
        if multiple:
            tags = []
            for candidate in pending:  # insertion order is tag order
                if candidate > tag:
                    break
                tags.append(candidate)
        else:
            tags = [tag] if tag in pending else []
        returned: set[int] = set()
        waiting: deque[str] = deque()
        while channel.returned:
            key = channel.returned.popleft()
            if tag in pending and tag not in returned and pending[tag].routing_key == key:
                returned.add(tag)
                continue
            for candidate in tags:
                if candidate not in returned and pending[candidate].routing_key == key:
                    returned.add(candidate)
                    break
            else:
                waiting.append(key)
        counters = self.counters
        settled = []
        for number in tags:
            publication = pending.pop(number)
            if number in returned:
                counters.returned += 1
                publication._settle(
                    ActorNotFound(
                        f"queue {publication.queue!r} does not exist: RabbitMQ returned the "
                        f"message as unroutable ({NO_ROUTE} NO_ROUTE, exchange "
                        f"{self.exchange!r}, routing key {publication.routing_key!r})"
                    )
                )
            elif nacked:
                counters.nacked += 1
                publication._settle(
                    DispatchUnavailable(
                        f"RabbitMQ refused the message for {publication.queue!r} (basic.nack: "
                        "the queue rejects publishes or the broker failed to store it)"
                    )
                )
            else:
                counters.confirmed += 1
                publication._settle(None)
            settled.append(publication)
        # A return none of these matched belongs to a message a later ack settles (RabbitMQ
        # sends each return before its message's ack, but may ack earlier tags in between);
        # one whose key no unconfirmed message has can match nothing any more.
        if waiting:
            keys = {publication.routing_key for publication in pending.values()}
            channel.returned = deque(key for key in waiting if key in keys)
        if settled:
            events.append(Settled(tuple(settled)))

    def _on_channel_close(
        self, channel: _Channel, frame: commands.Channel.Close, events: list[Event]
    ) -> None:
        number = channel.number
        self._write(number, commands.Channel.CloseOk())
        if frame.reply_code == _NOT_FOUND and "exchange" in frame.reply_text:
            reason = (
                f"exchange {self.exchange!r} not found on RabbitMQ vhost {self.vhost!r} "
                f"({_close_reason(frame)})"
            )
        else:
            reason = f"RabbitMQ closed channel {number}: {_close_reason(frame)}"
        was_open = channel.state is ChannelState.OPEN
        self._fail_channel(channel, reason, events)
        del self._channels[number]
        if self.state is ConnectionState.OPENING_CHANNELS:
            self._fail(reason, events)
        elif not was_open and self.state is ConnectionState.OPEN:
            self._fail(f"cannot reopen channel {number}: {reason}", events)
        elif self.state is ConnectionState.OPEN:
            events.append(ChannelClosed(number, reason))
            self._open_channel(number)

    # -- failing -------------------------------------------------------------------------------

    def _fail_channel(self, channel: _Channel, reason: str, events: list[Event]) -> None:
        if channel.pending:
            failed = tuple(channel.pending.values())
            channel.pending.clear()
            self.counters.lost += len(failed)
            for publication in failed:
                publication._settle(DispatchUnavailable(reason))
            events.append(Settled(failed))

    def _fail_all(self, reason: str, events: list[Event]) -> None:
        for channel in self._channels.values():
            self._fail_channel(channel, reason, events)

    def _fail(self, reason: str, events: list[Event]) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        self.close_reason = reason
        self._fail_all(f"RabbitMQ connection lost before the confirm: {reason}", events)
        events.append(Closed(reason))

    def _write(self, number: int, frame: pamqp_frame.FrameTypes) -> None:
        self._out.append(pamqp_frame.marshal(frame, number))

    def _header_frame(self, number: int) -> tuple[bytes, bytes]:
        # The content header of a publish differs only in the body size (a fixed 8 bytes after
        # the frame header, class id and weight): pamqp encodes it once per channel, we splice.
        parts = self._header_frames.get(number)
        if parts is None:
            header = ContentHeader(body_size=0, properties=_PUBLISH_PROPERTIES)
            encoded = pamqp_frame.marshal(header, number)
            parts = self._header_frames[number] = (encoded[:11], encoded[19:])
        return parts

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
