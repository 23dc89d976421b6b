"""The replicated `Broadcaster`: many mesh API replicas fan events out as one (docs/scale-out.md).

Every replica talks to its own state proxy, and the proxies share one PostgreSQL, whose event
bus (`events` in the proxy's features: `POST /events`, `PUT ?publish=1`, `GET /events/watch`,
`GET /events/{key}?after=N`) carries each event to every replica with one `seq` for all.

- A status change is published by the store write itself (`ProxyStore.update` with `origin`
  set: one transaction, so a subscriber never sees an event that was not stored and a stored
  change always reaches the bus); the `Published` that `Mesh` then hands to `publish` already
  has its `seq`, and is only delivered here.
- A FLY event (no `seq` yet) goes to the bus first: a sender task posts every FLY event waiting
  at that moment in one `POST /events` (in `publish` order, one request at a time, so a key's
  events keep their order), each `publish` waits for it (503 when the proxy cannot take it:
  a sidecar's 204 means "on the bus"), and the sender delivers the batch here in seq order.
- A watch task holds `GET /events/watch` on a connection of its own (the pool does not stream)
  and delivers the events of the other replicas (`origin` is this process's random name) to
  the keys that have subscribers here. When the stream breaks or the proxy ends it (its LISTEN
  connection to PostgreSQL broke), it reconnects with backoff (0.1 s doubling to 2 s), logs
  once per outage and once on recovery, and then sends every subscriber back to the store
  (`Hub.resync_all`): what was published meanwhile is in the snapshot it re-reads and the
  replay it asks for, so no terminal status is missed.
- Local delivery is a `Hub` (same slow-client policy); `replay(key, after)` asks the proxy's
  buffer, which every replica shares, so a client may resume on any replica.

On the bus an event's key is the envelope's store key (`msg/{id}`, the key its status writes
publish under); here, as everywhere in the runtime, it is the envelope id.

Every replica receives every event (the watch is not filtered by key) and drops its own and
those of keys it has no subscriber for after reading only the line's key and origin
(`peek_bus_record`), without decoding the event.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final

import attrs
import h11
import trio

from mesh_proto import (
    MAX_EVENTS,
    BusEvent,
    Published,
    ServiceError,
    StoreProtocolError,
    envelope_key,
    event_bytes,
    loads,
    peek_bus_record,
)

from ._broadcast import BroadcastStatistics
from ._hub import Hub, HubSubscription
from ._proxy_store import ProxyStore

log = logging.getLogger("mesh_trio.bus")

# Backoff of the watch stream's reconnects.
RECONNECT_FIRST: Final = 0.1
RECONNECT_MAX: Final = 2.0
# The proxy sends a keepalive line at least every 15 s: a watch silent for longer is dead.
WATCH_IDLE: Final = 45.0
# Bounds of one `POST /events` (the proxy takes bodies up to 16 MiB).
BATCH_BYTES: Final = 4 * 1024 * 1024
_READ: Final = 65536
_KEY_PREFIX: Final = envelope_key("")
WATCH_TARGET: Final = "/events/watch"
WATCH_HEADERS: Final = [("host", "state-proxy"), ("accept", "application/x-ndjson")]
_WATCH_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


class WatchLost(Exception):
    """The watch stream answered something other than 200, or went silent."""


@attrs.frozen(kw_only=True)
class BusStatistics(BroadcastStatistics):
    """The local fan-out's counters plus the bus's: events `posted` by this replica (FLY),
    `relayed` from other replicas to local subscribers, and `reconnects` of the watch."""

    posted: int = 0
    relayed: int = 0
    reconnects: int = 0


@attrs.define(eq=False)
class _Outgoing:
    """A FLY event waiting for the sender, and what became of it."""

    key: str
    published: Published
    event: bytes
    done: trio.Event = attrs.field(factory=trio.Event)
    error: Exception | None = None


def new_origin() -> str:
    """A random name for this process on the bus (`mesh_proto.is_origin`)."""
    return "mesh-" + secrets.token_hex(8)


@attrs.define(eq=False)
class ProxyBroadcaster:
    """The `Broadcaster` across replicas (module comment). Made by `open_proxy_broadcaster`."""

    store: ProxyStore
    socket_path: str
    hub: Hub = attrs.field(factory=Hub)
    origin: str = attrs.field(factory=new_origin)
    _outgoing: list[_Outgoing] = attrs.field(factory=list)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _posted: int = 0
    _relayed: int = 0
    _reconnects: int = 0
    _bad_records: int = 0
    _warned_single: bool = False
    # The watch: up now; lost since `_lost_at`; whether that was logged as a warning (None:
    # never up yet, the first failures are logged at info level).
    _watching: bool = False
    _lost: bool = False
    _lost_at: float = 0.0
    _warned_lost: bool | None = None

    @property
    def _bus(self) -> bool:
        """False once the proxy is known to have no bus (then this replica is on its own)."""
        return self.store.features is None or self.store.has_events

    # --- the Broadcaster ------------------------------------------------------------------

    async def publish(self, key: str, published: Published) -> None:
        """Deliver here; first put it on the bus unless it is there already (a `seq`).

        Raises:
            ServiceError: the proxy could not take the event (nothing was delivered).
        """
        if published.seq is None and self._bus:
            await self._post(key, published)  # the sender delivers it, in seq order
            return
        await self.hub.publish(key, published)

    def subscribe(self, key: str) -> AbstractAsyncContextManager[HubSubscription]:
        return self.hub.subscribe(key)

    def subscribers(self, key: str) -> int:
        return self.hub.subscribers(key)

    async def replay(self, key: str, after: int) -> tuple[list[Published], bool]:
        """The buffered FLY events of `key` after seq `after` on the bus (shared by every
        replica), oldest first, and whether some were pruned (status changes are in the
        snapshot the stream reads).

        Raises:
            ServiceError: the proxy does not answer.
        """
        records, gap = await self.store.replay(envelope_key(key), after)
        replayed = []
        for record in records:
            published = self._decode(record)
            if published is None:
                gap = True
            elif published.is_fly:
                replayed.append(published)
        return replayed, gap

    def close(self) -> None:
        self.hub.close()

    def statistics(self) -> BusStatistics:
        local = self.hub.statistics()
        return BusStatistics(
            **attrs.asdict(local),
            posted=self._posted,
            relayed=self._relayed,
            reconnects=self._reconnects,
        )

    # --- sending --------------------------------------------------------------------------

    async def _post(self, key: str, published: Published) -> None:
        outgoing = _Outgoing(key, published, event_bytes(published))
        self._outgoing.append(outgoing)
        self._wakeup.set()
        await outgoing.done.wait()
        if outgoing.error is not None:
            raise outgoing.error

    def _batch(self) -> list[_Outgoing]:
        """The oldest waiting events that fit one request (at least one)."""
        size, count = 0, 0
        for outgoing in self._outgoing[:MAX_EVENTS]:
            size += len(outgoing.event) + len(outgoing.key) + 20
            if count and size > BATCH_BYTES:
                break
            count += 1
        batch, self._outgoing = self._outgoing[:count], self._outgoing[count:]
        return batch

    async def run_sender(self) -> None:
        """Post waiting FLY events, one request at a time, until cancelled."""
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._outgoing:
                    await self._send(self._batch())
        finally:
            for outgoing in self._outgoing:
                outgoing.error = ServiceError("mesh API shutting down: event not published")
                outgoing.done.set()

    async def _send(self, batch: list[_Outgoing]) -> None:
        try:
            events = [(envelope_key(o.key), o.event) for o in batch]
            seqs = await self.store.post_events(self.origin, events)
        except Exception as exc:  # handed to each publisher, who raises it
            for outgoing in batch:
                outgoing.error = exc
        else:
            # Delivered here, not by each woken publisher: local subscribers get them in seq
            # order, as the other replicas do (a stream drops a FLY event older than one sent).
            self._posted += len(batch)
            for outgoing, seq in zip(batch, seqs, strict=True):
                await self.hub.publish(outgoing.key, outgoing.published.with_seq(seq))
        finally:
            for outgoing in batch:
                outgoing.done.set()

    # --- watching -------------------------------------------------------------------------

    async def run_watch(self, first_attempt: trio.Event) -> None:
        """Hold the watch stream until cancelled, reconnecting with backoff (module comment).

        `first_attempt` is set once the first connect succeeded or failed, so that startup
        does not wait for a proxy that is down (the CLI has warned about that already: the
        first failures are logged at info level, a lost stream as a warning)."""
        delay = RECONNECT_FIRST
        while True:
            self._watching = False
            try:
                if self.store.features is None:
                    await self.store.ping()
                if not self.store.has_events:
                    self._single_replica()
                    return
                await self._watch_once(first_attempt)
                reason = "the state proxy ended it"
            except (*_WATCH_ERRORS, ServiceError, WatchLost) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                first_attempt.set()
            if self._watching:
                delay = RECONNECT_FIRST
            if not self._lost:
                self._lost = True
                self._lost_at = trio.current_time()
                if self._warned_lost is None:
                    log.info("event bus: no watch stream yet (%s); retrying", reason)
                    self._warned_lost = False
                elif self._watching:
                    log.warning("event bus: watch stream lost (%s); reconnecting", reason)
                    self._warned_lost = True
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def _opened(self, first_attempt: trio.Event) -> None:
        """The watch stream is up: every subscriber re-reads (it may have missed events)."""
        if self._warned_lost:
            seconds = trio.current_time() - self._lost_at
            log.info("event bus: watch stream restored after %.1f s", seconds)
        if self._lost and self._warned_lost is not None:
            self._reconnects += 1
        self._lost, self._warned_lost, self._watching = False, False, True
        self.hub.resync_all()
        first_attempt.set()

    async def _watch_once(self, first_attempt: trio.Event) -> None:
        """One watch stream, from connect to its end (returns when the proxy ended it)."""
        stream = await trio.open_unix_socket(self.socket_path)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            head = h11.Request(method="GET", target=WATCH_TARGET, headers=WATCH_HEADERS)
            await stream.send_all(conn.send(head) + (conn.send(h11.EndOfMessage()) or b""))
            rest = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.move_on_after(WATCH_IDLE) as idle:
                        conn.receive_data(await stream.receive_some(_READ))
                    if idle.cancelled_caught:
                        raise WatchLost(f"silent for {WATCH_IDLE:g} s")
                elif isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise WatchLost(f"GET {WATCH_TARGET} answered {event.status_code}")
                    self._opened(first_attempt)
                elif isinstance(event, h11.Data):
                    lines = (rest + bytes(event.data)).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        await self._receive(line)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return

    async def _receive(self, line: bytes) -> None:
        """Deliver one watch line: skip keepalives, our own events, and keys nobody here
        follows (by `peek_bus_record`, before decoding the line)."""
        if not line.strip():
            return
        try:
            peeked = peek_bus_record(line.decode())
        except UnicodeDecodeError:
            peeked = None  # decoded whole below, and refused there
        if peeked is not None:
            key, origin = peeked
            if origin == self.origin or not self.hub.subscribers(key.removeprefix(_KEY_PREFIX)):
                return
        try:
            record = BusEvent.from_json(loads(line, error=StoreProtocolError, what="bus record"))
        except StoreProtocolError as exc:
            self._bad(exc)
            return
        envelope_id = record.key.removeprefix(_KEY_PREFIX)
        if record.origin == self.origin or not self.hub.subscribers(envelope_id):
            return
        published = self._decode(record)
        if published is not None:
            self._relayed += 1
            await self.hub.publish(envelope_id, published)

    def _single_replica(self) -> None:
        if not self._warned_single:
            self._warned_single = True
            log.warning(SINGLE_REPLICA)

    def _decode(self, record: BusEvent) -> Published | None:
        try:
            return record.published()
        except StoreProtocolError as exc:
            self._bad(exc)
            return None

    def _bad(self, exc: Exception) -> None:
        self._bad_records += 1
        if self._bad_records == 1:
            log.warning("event bus: skipping records that are not ours (%s)", exc)


@asynccontextmanager
async def open_proxy_broadcaster(
    store: ProxyStore, socket_path: str, hub: Hub | None = None
) -> AsyncIterator[ProxyBroadcaster]:
    """The replicated broadcaster over `store`'s proxy, with its sender and watch tasks.

    Status updates of `store` publish with their writes from here on (`store.origin`). Entry
    waits for the first watch connect (or its failure), so that events published right after
    startup reach this replica.
    """
    bus = ProxyBroadcaster(store, socket_path, hub or Hub())
    store.origin = bus.origin
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.run_sender)
            first_attempt = trio.Event()
            nursery.start_soon(bus.run_watch, first_attempt)
            await first_attempt.wait()
            try:
                yield bus
            finally:
                bus.close()
                nursery.cancel_scope.cancel()
    finally:
        store.origin = None


SINGLE_REPLICA: Final = (
    "state proxy has no event bus: running single-replica; SSE streams see only events"
    " posted to this replica"
)
