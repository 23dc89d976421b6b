"""The state-proxy store: `Store` over HTTP/1.1 on a Unix socket (docs/stateproxy.md).

Every operation is a `mesh_proto` procedure (a generator of `StoreRequest`s) driven here over
a keep-alive connection pool, so status updates get the core's conditional-update guarantee:
read, decide with the status table, `PUT ?if_status=<read status>&if_rev=<read revision>`,
re-read on 409.

When the proxy's health reply lists the revision guard (ours does; the Go proxy does not), the
store keeps the last envelope it wrote or read of each live envelope (`EnvelopeCache`, bounded by
count and bytes) and hands it to the update as `known`: a status event then costs one round trip
(the guarded PUT) instead of two. A stale entry (another replica wrote since) only costs a 409
and a read. Without the guard nothing is cached, since `if_status` alone could not catch a stale
copy's lost merge. The features are learned on the first update and on every ping (`/ready`).

When the proxy has the event bus (`EVENTS`) and a replicated broadcaster is attached (it sets
`origin`, `_bus.py`), a status update is written and published in one transaction
(`update_status(..., publish=origin)`): the `Applied` carries the event's `seq`, which tells the
broadcaster the event is already on the bus. `post_events` and `replay` are the bus's other two
requests (`POST /events`, `GET /events/{key}?after=N`); the watch stream is the broadcaster's own.

When the proxy lists `WRITES` as well, the guarded PUTs of concurrent updates go through the
`WriteBatcher`: whatever is waiting when a sender is free goes as one `POST /writes`, whose
results are each update's own reply (docs/stateproxy.md, "Batched writes").

Faults map to `ServiceError` (503 to the client) within the pool's timeout: the socket missing
or the proxy down, a reply cut short, a 5xx from the proxy. A write whose request may have
reached the proxy is never re-sent.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TypeVar

import attrs
import trio

from mesh_proto import (
    CLAIM_PREFIX,
    COLUMN_BOUNDS,
    DELETE_QUERY,
    EVENTS,
    IF_ABSENT,
    REV_GUARD,
    WRITES,
    Applied,
    BusEvent,
    Claim,
    Envelope,
    IdempotencyUnsupported,
    ListQuery,
    Outcome,
    ServiceError,
    StatusEvent,
    StoreReply,
    StoreRequest,
    Unsupported,
    check_delete,
    check_health,
    claim_envelope,
    create_envelope,
    delete_query_request,
    delete_request,
    dumps,
    envelope_key,
    events_request,
    expired_request,
    format_time,
    get_request,
    health_request,
    list_envelopes,
    purge_request,
    read_deleted,
    read_envelope,
    read_replay,
    read_rows,
    read_seqs,
    read_writes,
    replay_request,
    update_status,
    writes_request,
)

from ._client import ConnectError, ExchangeError, HttpPool

T = TypeVar("T")

log = logging.getLogger("mesh_trio")

# Defaults of the envelope cache: enough for the live envelopes of a busy replica, bounded in
# bytes because a payload may be up to the 10 MiB body limit.
CACHE_ENTRIES = 10_000
CACHE_BYTES = 64 * 1024 * 1024


@attrs.frozen(kw_only=True)
class CacheStatistics:
    entries: int
    bytes: int
    hits: int
    misses: int


@attrs.define(eq=False)
class EnvelopeCache:
    """The last known version of live envelopes, least recently used first out.

    Each entry is charged the size of the stored value it came from (the body last sent or
    received), so the cache holds at most `max_bytes` of envelopes; one larger than an eighth of
    that is not kept at all. Terminal envelopes are dropped: nothing writes them again.
    """

    max_entries: int = CACHE_ENTRIES
    max_bytes: int = CACHE_BYTES
    _entries: OrderedDict[str, tuple[Envelope, int]] = attrs.field(factory=OrderedDict)
    _bytes: int = 0
    _hits: int = 0
    _misses: int = 0

    def get(self, envelope_id: str) -> Envelope | None:
        entry = self._entries.get(envelope_id)
        if entry is None:
            self._misses += 1
            return None
        self._hits += 1
        self._entries.move_to_end(envelope_id)
        return entry[0]

    def put(self, envelope: Envelope, size: int) -> None:
        self.discard(envelope.id)
        if envelope.terminal or size > self.max_bytes // 8:
            return
        self._entries[envelope.id] = (envelope, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped

    def discard(self, envelope_id: str) -> None:
        entry = self._entries.pop(envelope_id, None)
        if entry is not None:
            self._bytes -= entry[1]

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            entries=len(self._entries), bytes=self._bytes, hits=self._hits, misses=self._misses
        )


@attrs.define(eq=False)
class _Pending:
    request: StoreRequest
    done: trio.Event = attrs.field(factory=trio.Event)
    sent: bool = False  # taken by a sender: it is the sender's now
    reply: StoreReply | None = None
    error: Exception | None = None


@attrs.define(eq=False)
class WriteBatcher:
    """Group commit over the socket: the PUTs of concurrent status updates go to the proxy
    together, as one `POST /writes` (`WRITES`), each answered as it would have been alone.

    `senders` tasks each take every PUT waiting (up to `max_writes`, `max_bytes`) and send them,
    so an idle mesh sends a lone PUT at once, and a busy one sends a batch per round trip
    instead of a request per event. A caller cancelled before its PUT went out takes it back;
    once sent, the batch is the sender's, not the caller's: cancelling one caller never cuts
    the others' request short.
    """

    send: Callable[[StoreRequest], Awaitable[StoreReply]]
    senders: int = 4
    max_writes: int = 128
    max_bytes: int = 1024 * 1024
    _waiting: deque[_Pending] = attrs.field(factory=deque)
    _idle: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    batches: int = 0

    async def put(self, request: StoreRequest) -> StoreReply:
        job = _Pending(request)
        self._waiting.append(job)
        self._idle.unpark()
        try:
            await job.done.wait()
        finally:
            if not job.sent:  # cancelled while it waited: never sent
                self._waiting.remove(job)
        if job.error is not None:
            raise job.error
        assert job.reply is not None
        return job.reply

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.senders):
                nursery.start_soon(self._sender)
            task_status.started()

    async def _sender(self) -> None:
        while True:
            while not self._waiting:
                await self._idle.park()
            batch: list[_Pending] = []
            size = 0
            while self._waiting and len(batch) < self.max_writes:
                size += len(self._waiting[0].request.body)
                if batch and size > self.max_bytes:
                    break
                job = self._waiting.popleft()
                job.sent = True
                batch.append(job)
            await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                replies = [await self.send(batch[0].request)]
            else:
                self.batches += 1
                reply = await self.send(writes_request([job.request for job in batch]))
                replies = read_writes(reply, len(batch))
        except Exception as exc:  # each caller raises it as its own
            for job in batch:
                job.error = copy.copy(exc)
        else:
            for job, reply in zip(batch, replies, strict=True):
                job.reply = reply
        finally:
            for job in batch:
                if job.reply is None and job.error is None:  # the store is closing
                    job.error = ServiceError("state proxy request cut short: shutting down")
                job.done.set()


@attrs.define(eq=False)
class ProxyStore:
    pool: HttpPool
    cache: EnvelopeCache = attrs.field(factory=EnvelopeCache)
    # What the proxy's health reply listed; None until it has answered one.
    features: frozenset[str] | None = None
    # This replica's name on the event bus, set by the broadcaster that uses it (`_bus.py`):
    # status updates then publish their events with their writes.
    origin: str | None = None
    # Sends the PUTs of concurrent status updates together when the proxy has `WRITES`.
    batcher: WriteBatcher | None = None
    _warned_idempotency: bool = False

    async def _send(self, request: StoreRequest, *, headers: bool = False) -> StoreReply:
        try:
            reply = await self.pool.request(
                request.method, request.target, body=request.body, headers=request.headers
            )
        except ConnectError as exc:
            raise ServiceError(f"state proxy unreachable: {exc}") from None
        except ExchangeError as exc:
            raise ServiceError(f"state proxy request failed: {exc}") from None
        if headers:  # only where a reader needs them (the health reply's features)
            named = tuple((bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                          for k, v in reply.headers)  # fmt: skip
            return StoreReply(status=reply.status, body=reply.body, headers=named)
        return StoreReply(status=reply.status, body=reply.body)

    async def _drive(
        self, procedure: Generator[StoreRequest, StoreReply, T], *, batch: bool = False
    ) -> tuple[T, StoreRequest]:
        """Run a procedure; returns its result and the last request it made. With `batch`,
        its PUTs go through the `batcher` (if any, and the proxy has `WRITES`)."""
        batcher = self.batcher if batch and self.features and WRITES in self.features else None
        request = next(procedure)
        while True:
            if batcher is not None and request.method == "PUT":
                reply = await batcher.put(request)
            else:
                reply = await self._send(request)
            try:
                next_request = procedure.send(reply)
            except StopIteration as done:
                return done.value, request
            request = next_request

    @property
    def _caching(self) -> bool:
        return self.features is not None and REV_GUARD in self.features

    @property
    def has_events(self) -> bool:
        """Whether the proxy's last health reply listed the event bus (`EVENTS`)."""
        return self.features is not None and EVENTS in self.features

    async def post_events(self, origin: str, events: Sequence[tuple[str, bytes]]) -> list[int]:
        """Publish `(key, event JSON)` pairs in one `POST /events`; their seqs, in order.

        Raises:
            ServiceError: the proxy cannot take them (unreachable, or PostgreSQL down: 503).
        """
        return read_seqs(await self._send(events_request(origin, events)), len(events))

    async def replay(self, key: str, after: int) -> tuple[list[BusEvent], bool]:
        """The buffered events of `key` after seq `after`, oldest first, and whether some
        were pruned meanwhile (a gap)."""
        return read_replay(await self._send(replay_request(key, after)))

    async def ping(self) -> None:
        self.features = check_health(await self._send(health_request(), headers=True))

    async def create(self, envelope: Envelope) -> None:
        _, put = await self._drive(create_envelope(envelope))
        if self._caching:
            self.cache.put(envelope, len(put.body))

    async def get(self, envelope_id: str) -> Envelope | None:
        reply = await self._send(get_request(envelope_key(envelope_id)))
        envelope = read_envelope(envelope_id, reply)
        if envelope is None:
            self.cache.discard(envelope_id)
        elif self._caching:
            self.cache.put(envelope, len(reply.body))
        return envelope

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        if self.features is None:
            await self.ping()
        known = self.cache.get(envelope_id) if self._caching else None
        publish = self.origin if self.has_events else None
        procedure = update_status(envelope_id, event, now, known=known, publish=publish)
        outcome, last = await self._drive(procedure, batch=True)
        if outcome is None:
            self.cache.discard(envelope_id)
        elif self._caching:
            # The last request was the PUT that stored `outcome.envelope`, or (Ignored) the GET
            # that read it; either way the cache is charged about the value's size.
            size = len(last.body) if isinstance(outcome, Applied) else 0
            self.cache.put(outcome.envelope, size or len(dumps(outcome.envelope.to_value())))
        return outcome

    async def delete(self, envelope_id: str) -> bool:
        self.cache.discard(envelope_id)
        return check_delete(await self._send(delete_request(envelope_key(envelope_id))))

    async def list(self, query: ListQuery) -> tuple[Sequence[Envelope], int]:
        """A page of `query`. Time bounds and cursors filter on row columns, which a proxy
        without `COLUMN_BOUNDS` (the Go one) would misread: 501 there instead of a wrong page."""
        if query.created_after or query.created_before or query.cursor:
            if self.features is None:
                await self.ping()
            if self.features is None or COLUMN_BOUNDS not in self.features:
                raise Unsupported(
                    "created_after, created_before and cursor need a state proxy with"
                    " column filters (asya-state-proxy)"
                )
        result, _ = await self._drive(list_envelopes(query))
        return result

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        envelopes, _ = read_rows(await self._send(expired_request(now, limit)))
        return envelopes

    async def purges(self) -> bool:
        """Whether the proxy offers `POST /delete` (`DELETE_QUERY`); asks it once if unknown.

        Raises:
            ServiceError: the proxy does not answer.
        """
        if self.features is None:
            await self.ping()
        return self.features is not None and DELETE_QUERY in self.features

    async def purge(self, cutoff: datetime, limit: int) -> int:
        """Delete up to `limit` terminal envelopes last updated before `cutoff`, in one
        statement of the proxy; 0 while another replica's purge holds the turn."""
        return read_deleted(await self._send(purge_request(cutoff, limit)))

    async def purge_claims(self, now: datetime, limit: int) -> int:
        """Delete up to `limit` idempotency claims expired at `now` (`expires_at`, fixed-width
        RFC 3339 text, compares as a string)."""
        expired = {"expires_at": {"$lte": format_time(now)}}
        request = delete_query_request(prefix=CLAIM_PREFIX, filter=expired, limit=limit)
        return read_deleted(await self._send(request))

    async def claim(self, key: str, claim: Claim, now: datetime) -> Claim | None:
        """The claim through `IF_ABSENT`; a proxy without it (the Go one would take
        ``if_absent=1`` for a plain PUT and overwrite a claim) refuses idempotency: 501, and
        one warning per process."""
        if self.features is None:
            await self.ping()
        if self.features is None or IF_ABSENT not in self.features:
            if not self._warned_idempotency:
                self._warned_idempotency = True
                log.warning(
                    "the state proxy does not advertise %s: creates with Idempotency-Key are"
                    " answered 501",
                    IF_ABSENT,
                )
            raise IdempotencyUnsupported(
                "Idempotency-Key needs a state proxy with create-if-absent writes (if_absent)"
            )
        stored, _ = await self._drive(claim_envelope(key, claim, now))
        return stored

    async def release(self, key: str) -> None:
        check_delete(await self._send(delete_request(key)))


@asynccontextmanager
async def open_proxy_store(
    socket_path: str, *, timeout: float = 5.0, connections: int = 32
) -> AsyncIterator[ProxyStore]:
    pool = HttpPool.unix(socket_path, host="state-proxy", size=connections, timeout=timeout)
    store = ProxyStore(pool)
    store.batcher = WriteBatcher(store._send)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.batcher.run)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        await pool.aclose()
