"""The mesh operations: create, get, list, cancel, publish, stream.

Plain async functions over the store, the dispatcher and the broadcaster (`_broadcast.py`:
the in-process hub, or one that fans out across replicas) that know nothing of quart or
hypercorn, so any listener can drive them (the quart app of the external port, the lean ASGI app
of the internal port, the legacy routes of `mesh_compat`). Inputs are raw query strings and body
bytes; `mesh_proto` parses them and raises `ClientError`s; results are `mesh_proto` values.

FLY events cost no store round trip while the envelope is known to be live: `LiveCache`
remembers ids the store showed live for a few seconds, and forgets an id the moment a
terminal status passes through this process (so it is re-checked after it ends).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import trio

from mesh_proto import (
    CANCEL_EVENT,
    DEFAULT_IDEMPOTENCY_TTL,
    KEEPALIVE,
    Applied,
    Claim,
    ClaimDecision,
    CreateRequest,
    Envelope,
    FlyEvent,
    Gap,
    KeyReused,
    ListQuery,
    NotFound,
    Outcome,
    Published,
    Send,
    ServiceError,
    SseStream,
    Status,
    StatusEvent,
    catch_up_frame,
    claim_key,
    decide_claim,
    parse_event,
    parse_idempotency_key,
    parse_wait,
    queue_name,
    request_fingerprint,
    traceparent_for,
)

from ._broadcast import Broadcaster, Subscription
from ._metrics import MeshMetrics
from ._observability import Tracing, traceparent_of
from ._store import Store, never_waits
from .transports import ActorNotFound, Dispatcher, DispatchUnavailable

log = logging.getLogger("mesh_trio")

# How long a store answer that an envelope is live lets FLY events skip the store.
LIVE_TTL = 5.0
LIVE_MAX = 100_000
# Bounds of the create sequence once the client is gone (it finishes shielded from the
# client's disconnect, so a create never leaves a silent `pending` orphan).
CREATE_GRACE = 30.0
# How long a retry with an `Idempotency-Key` waits for the create that claimed the key to store
# its envelope (it polls the store: the claimer may be another replica).
IDEMPOTENCY_WAIT = 10.0
# How often per keepalive period `run_keepalives` wakes the open streams.
KEEPALIVE_TICKS = 4
# How long a stream's resync waits for an unavailable store before it ends.
RESYNC_PATIENCE = 10.0


def utcnow() -> datetime:
    return datetime.now(UTC)


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class EnvelopeIds:
    """Fresh envelope ids: random UUID4s in canonical form, as `str(uuid.uuid4())` gives.

    The randomness is the system's (`os.urandom`), drawn for 256 ids at a time: one
    `getrandom` call and one UUID object per create were a tenth of its CPU. A forked child
    drops what its parent drew, so two processes never hand out the same ids.
    """

    BATCH = 256

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._hex, self._at = "", 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(16 * self.BATCH).hex(), 0
        digits = self._hex[at : at + 32]
        self._at = at + 32
        # Version 4 in the 13th digit, the RFC 4122 variant in the top bits of the 17th.
        return (
            f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-"
            f"{_VARIANT[digits[16]]}{digits[17:20]}-{digits[20:]}"
        )


new_envelope_id = EnvelopeIds()


@attrs.define(eq=False)
class LiveCache:
    """Ids recently seen live, each valid until a deadline on the trio clock (LRU-bounded)."""

    ttl: float = LIVE_TTL
    max_size: int = LIVE_MAX
    _until: OrderedDict[str, float] = attrs.field(factory=OrderedDict)

    def is_live(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > trio.current_time()

    def mark(self, envelope: Envelope) -> None:
        if envelope.terminal:
            self._until.pop(envelope.id, None)
            return
        self._until[envelope.id] = trio.current_time() + self.ttl
        self._until.move_to_end(envelope.id)
        if len(self._until) > self.max_size:
            self._until.popitem(last=False)


def _as_published(envelope_id: str, published: Published, now: datetime) -> bytes:
    return published.frame


@attrs.frozen
class SseDialect:
    """How a stream encodes what the core lets through: the catch-up snapshot, each live event
    (given the envelope id and `now`), and the keepalive comment. The default encodes the
    contract's frames (docs/contract.md, "SSE"): the envelope as GET returns it, and the frames
    as published (encoded once for everyone). `resume` is the contract's stream itself: frames
    with ids, `retry:`, `Last-Event-ID` and replay (`mesh_proto.SseStream.encode`; the two
    encoders are then unused); another dialect's frames carry no ids and it cannot resume.
    """

    snapshot: Callable[[Envelope], bytes] = catch_up_frame
    live: Callable[[str, Published, datetime], bytes] = _as_published
    keepalive: bytes = KEEPALIVE
    resume: bool = False

    def encode(
        self, state: SseStream, envelope_id: str, sends: list[Send], clock: Callable[[], datetime]
    ) -> bytes:
        """The bytes of `sends` (`clock` gives `now` to `live`, read only when it is used)."""
        if self.resume:
            return state.encode(sends)
        now = clock()
        return b"".join(
            self.live(envelope_id, item, now)
            if isinstance(item, Published)
            else self.snapshot(item)
            for item, _, _ in sends
            if not isinstance(item, Gap)
        )


CONTRACT_DIALECT = SseDialect(resume=True)


@attrs.define(eq=False)
class Mesh:
    store: Store
    dispatcher: Dispatcher
    broadcaster: Broadcaster
    namespace: str = "default"
    gateway_url: str | None = None
    keepalive: float = 15.0
    tracing: bool = False
    # OpenTelemetry spans (`_observability.open_tracing`); None: no span work at all.
    otel: Tracing | None = None
    clock: Callable[[], datetime] = utcnow
    live: LiveCache = attrs.field(factory=LiveCache)
    # Prometheus metrics of this instance (`serve()` shares them with its apps and store).
    metrics: MeshMetrics = attrs.field(factory=MeshMetrics)
    # How long an `Idempotency-Key` is remembered (`ASYA_MESH_IDEMPOTENCY_TTL`), in seconds.
    idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL
    # The reconnect delay SSE streams advise (`ASYA_MESH_SSE_RETRY`), in seconds.
    sse_retry: float = 3.0
    # The subscriptions of the streams now open, for `run_keepalives`.
    _streams: set[Subscription] = attrs.field(factory=set, init=False)

    async def create(
        self,
        query: str | bytes,
        body: bytes,
        *,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Validate, store and dispatch a new envelope; returns its id.

        With tracing on, the envelope's headers get a W3C `traceparent` that joins the caller's
        trace (`traceparent`, the request's header) or starts one. With OpenTelemetry on
        (`otel`), the create is a `mesh.create` span (joining that trace), its dispatch a
        `mesh.dispatch` span, and the stamped `traceparent` is the create span's.

        With `idempotency_key` (the request's `Idempotency-Key` header) the key is claimed
        before anything is stored (see `_claim`): a retry of the same request returns the id of
        the first, dispatching nothing. The claim is released when the envelope could not be
        stored or the actor does not exist (a retry creates it anew), and kept when the
        dispatch failed (503, envelope `failed`): the message may have reached the broker, so a
        retry answers with the failed envelope rather than risk a second dispatch.

        Raises:
            ClientError: bad input (nothing stored); `NotFound("actor not found")` when the
                actor's queue does not exist (the record is removed); `KeyReused` (422) when
                the key was claimed by a different request.
            ServiceError: store or broker unavailable (a stored record is marked `failed`), or
                the create holding the same key did not store its envelope in time.
            IdempotencyUnsupported: the store cannot claim keys (501).
        """
        key = parse_idempotency_key(idempotency_key) if idempotency_key is not None else None
        request = CreateRequest.parse(query, body)
        envelope_id = new_envelope_id()
        claim = None
        if key is not None:
            namespace = request.namespace or self.namespace
            claim = (
                claim_key(key),
                Claim(
                    envelope_id=envelope_id,
                    fingerprint=request_fingerprint(request.actor, namespace, body),
                    expires_at=self.clock() + timedelta(seconds=self.idempotency_ttl),
                ),
            )
        if self.otel is None:
            stamped = traceparent_for(traceparent, os.urandom(24)) if self.tracing else None
            return await self._create(request, envelope_id, stamped, claim)
        with self.otel.span("mesh.create", envelope_id, traceparent=traceparent) as span:
            return await self._create(request, envelope_id, traceparent_of(span), claim)

    async def _claim(self, key: str, claim: Claim) -> str | None:
        """Claim `key`; None when this create owns it, else the id of the envelope of the
        same request, once that envelope is stored.

        Two creates racing for a key are decided by the store (one atomic claim wins); the
        loser polls until the winner's envelope exists, for at most `IDEMPOTENCY_WAIT`, and
        claims again on every round, so it takes over a key the winner released (its actor
        did not exist). Raises `KeyReused` or `ServiceError` (see `create`).
        """
        delay = 0.005
        with trio.move_on_after(IDEMPOTENCY_WAIT):
            while True:
                now = self.clock()
                stored = await self.store.claim(key, claim, now)
                decision = decide_claim(stored, claim.fingerprint, now)
                if decision is ClaimDecision.FRESH:
                    return None
                if decision is ClaimDecision.CONFLICT:
                    raise KeyReused()
                if decision is ClaimDecision.REPLAY:
                    assert stored is not None
                    if await self.store.get(stored.envelope_id) is not None:
                        return stored.envelope_id
                await trio.sleep(delay)  # EXPIRED too: a claimer with a clock behind ours
                delay = min(delay * 2, 0.1)
        raise ServiceError("the create holding this Idempotency-Key has not finished; retry")

    async def _create(
        self,
        request: CreateRequest,
        envelope_id: str,
        traceparent: str | None,
        claim: tuple[str, Claim] | None = None,
    ) -> str:
        envelope = Envelope.new(
            request,
            envelope_id=envelope_id,
            now=self.clock(),
            gateway_url=self.gateway_url,
            traceparent=traceparent,
        )
        queue = queue_name(request.namespace or self.namespace, request.actor)
        if claim is None and never_waits(self.store) and never_waits(self.dispatcher):
            # The embedded store and queue never wait: nothing can interrupt or stall the
            # sequence, so the scope below would guard nothing (and costs ~15 us per create).
            await self._store_and_dispatch(envelope, queue)
            return envelope.id
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CREATE_GRACE
            if claim is not None:
                replayed = await self._claim(*claim)
                if replayed is not None:
                    return replayed
            await self._store_and_dispatch(envelope, queue, claim)
        if scope.cancelled_caught:
            raise ServiceError("create did not finish in time")
        return envelope.id

    async def _store_and_dispatch(
        self, envelope: Envelope, queue: str, claim: tuple[str, Claim] | None = None
    ) -> None:
        try:
            await self.store.create(envelope)
        except Exception:
            if claim is not None:
                await self.store.release(claim[0])
            raise
        try:
            with self.metrics.dispatching():
                if self.otel is None:
                    await self.dispatcher.send(queue, envelope.wire_message())
                else:
                    with self.otel.span("mesh.dispatch", envelope.id) as span:
                        span.set_attribute("messaging.destination.name", queue)
                        await self.dispatcher.send(queue, envelope.wire_message())
        except ActorNotFound:
            await self.store.delete(envelope.id)
            if claim is not None:
                await self.store.release(claim[0])
            raise NotFound("actor not found") from None
        except DispatchUnavailable as exc:
            reason = f"dispatch to {queue} failed: {exc}"
            log.warning("envelope %s: %s", envelope.id, reason)
            await self.apply(envelope.id, StatusEvent(status=Status.FAILED, data={"error": reason}))
            raise ServiceError(f"queue unavailable: {exc}") from None
        self.live.mark(envelope)

    async def get(self, envelope_id: str) -> Envelope:
        envelope = await self.store.get(envelope_id)
        if envelope is None:
            raise NotFound("envelope not found")
        return envelope

    async def wait(self, envelope_id: str, query: str | bytes) -> Envelope:
        """`get` held until the envelope is terminal, for at most `wait=S` seconds (`parse_wait`;
        none: at once), then its state as it is. Shutdown ends the wait at once.

        Subscribes before reading, so a terminal event published in between is not missed.

        Raises:
            BadRequest: an invalid `wait`.
            NotFound: no such envelope (also when it is deleted meanwhile).
        """
        seconds = parse_wait(query)
        if not seconds:
            return await self.get(envelope_id)
        async with self.broadcaster.subscribe(envelope_id) as sub:
            envelope = await self.get(envelope_id)
            with trio.move_on_after(seconds):
                while not envelope.terminal and not sub.closed:
                    await sub.wait()
                    pending, resync = sub.take()
                    if resync or any(published.terminal for published in pending):
                        envelope = await self.get(envelope_id)
        # After a timeout (possibly in the middle of a read), the state as it is now.
        return envelope if envelope.terminal else await self.get(envelope_id)

    async def list(self, query: str | bytes) -> dict[str, Any]:
        """A page of the list; `next_cursor` is there when a next page is (`ListQuery`).

        Raises:
            BadRequest: invalid parameters.
        """
        params = ListQuery.parse(query)
        # One row more than the page tells whether another page follows.
        rows, total = await self.store.list(attrs.evolve(params, limit=params.limit + 1))
        reply: dict[str, Any] = {
            "messages": [e.to_json() for e in rows[: params.limit]],
            "total": total,
        }
        next_cursor = params.next_cursor(rows)
        if next_cursor is not None:
            reply["next_cursor"] = next_cursor
        return reply

    async def cancel(self, envelope_id: str) -> Outcome:
        """Cancel through the status rules (a terminal envelope is left as it is)."""
        return await self.apply(envelope_id, CANCEL_EVENT)

    async def publish(self, envelope_id: str, body: bytes) -> None:
        """A sidecar event: a status change (stored, then published) or a FLY event.

        Raises:
            ClientError: invalid body; `NotFound` for an unknown id.
        """
        event = parse_event(body)
        if isinstance(event, FlyEvent):
            await self.publish_fly(envelope_id, event.data)
        else:
            await self.apply(envelope_id, event)

    async def publish_fly(self, envelope_id: str, data: Any) -> None:
        if not self.live.is_live(envelope_id):
            self.live.mark(await self.get(envelope_id))
        await self.broadcaster.publish(envelope_id, Published.fly(data))

    async def apply(self, envelope_id: str, event: StatusEvent) -> Outcome:
        """Apply a status event (store, then publish what changed); `NotFound` for no such id.

        With OpenTelemetry on, a `mesh.status` span."""
        if self.otel is None:
            return await self._apply(envelope_id, event)
        with self.otel.span("mesh.status", envelope_id) as span:
            span.set_attribute("mesh.status", str(event.status))
            return await self._apply(envelope_id, event)

    async def _apply(self, envelope_id: str, event: StatusEvent) -> Outcome:
        outcome = await self.store.update(envelope_id, event, self.clock())
        if outcome is None:
            raise NotFound("envelope not found")
        if isinstance(outcome, Applied):
            self.live.mark(outcome.envelope)
            await self.broadcaster.publish(envelope_id, Published.status(outcome))
        return outcome

    async def run_keepalives(self) -> None:
        """Wake every open stream `KEEPALIVE_TICKS` times per `keepalive`, until cancelled, so
        that a silent one sends its `:keepalive` (between 1 and 1.25 keepalive periods after
        its last bytes). One timer for all streams: a timeout around every wait of every
        stream cost a sixth of the CPU of a streamed token. `serve()` runs it."""
        while True:
            await trio.sleep(self.keepalive / KEEPALIVE_TICKS)
            for sub in list(self._streams):
                sub.wake()

    async def stream(
        self,
        envelope_id: str,
        dialect: SseDialect | None = None,
        *,
        last_event_id: str | None = None,
    ) -> AsyncIterator[bytes]:
        """The SSE byte stream of one envelope (call `get` first for a 404 before any bytes).

        Subscribes before reading the snapshot, so nothing published in between is lost; ends
        after a terminal status, when the broadcaster closes (shutdown), or when the caller stops.
        The core's `SseStream` decides what passes (and, resuming from `last_event_id`, what
        to replay); `dialect` only encodes it (the legacy stream of `mesh_compat` is this loop
        with another dialect, which does not resume).
        """
        dialect = dialect or CONTRACT_DIALECT
        resume = dialect.resume
        state = SseStream(keepalive=self.keepalive, retry=self.sse_retry if resume else None)
        after = state.resume(last_event_id) if resume else None
        async with self.broadcaster.subscribe(envelope_id) as sub:
            envelope = await self.store.get(envelope_id)
            if envelope is None:
                return
            self.live.mark(envelope)
            replayed = await self._replay(envelope_id, after)
            yield dialect.encode(state, envelope_id, state.start(envelope, *replayed), self.clock)
            state.sent(trio.current_time())
            self._streams.add(sub)  # woken by `run_keepalives`: no timer per wait
            try:
                while not state.done:
                    await sub.wait()
                    pending, resync = sub.take()
                    if resync:
                        reread = await self._reread(envelope_id, state.seq if resume else None)
                        if reread is None:
                            return
                        envelope, replayed = reread
                        sends = state.resync(envelope, *replayed)
                        sends += state.passed(pending)
                    else:
                        sends = state.passed(pending)
                    chunk = dialect.encode(state, envelope_id, sends, self.clock) if sends else b""
                    if not chunk and state.keepalive_in(trio.current_time()) == 0:
                        chunk = dialect.keepalive
                    if chunk:
                        yield chunk
                        state.sent(trio.current_time())
                    if sub.closed:
                        return
            finally:
                self._streams.discard(sub)

    async def _reread(
        self, envelope_id: str, after: int | None
    ) -> tuple[Envelope, tuple[Sequence[Published], bool]] | None:
        """A resync's snapshot and replay (None: the envelope is gone). While the store is
        unavailable, asked again with backoff for up to `RESYNC_PATIENCE` seconds rather than
        ending the stream: what sends every stream back (a replicated broadcaster's watch that
        reconnected) is often an outage of the same database."""
        delay, give_up = 0.05, trio.current_time() + RESYNC_PATIENCE
        while True:
            try:
                envelope = await self.store.get(envelope_id)
                if envelope is None:
                    return None
                return envelope, await self._replay(envelope_id, after)
            except ServiceError:
                if trio.current_time() + delay > give_up:
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _replay(
        self, envelope_id: str, after: int | None
    ) -> tuple[Sequence[Published], bool]:
        """The broadcaster's replay after `after` (None: none asked for)."""
        if after is None:
            return (), False
        return await self.broadcaster.replay(envelope_id, after)

    async def ready(self) -> None:
        """Raises `ServiceError` (503) unless both the store and the queue transport answer."""
        await self.store.ping()
        try:
            await self.dispatcher.ping()
        except DispatchUnavailable as exc:
            raise ServiceError(f"queue unavailable: {exc}") from None
