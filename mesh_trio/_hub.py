"""The hub: in-process fan-out of published frames to the SSE subscribers of each envelope.

The one-replica implementation of `Broadcaster` (`_broadcast.py`, which says why `publish` and
`subscribe` are async there). One hub serves both ports; `serve()` opens it and closes it on
shutdown. `publish` never blocks and never awaits (it is not a checkpoint): it appends the
frame (encoded once by `mesh_proto.Published`) to each subscriber's pending list and wakes it.
A woken subscriber takes everything pending at once, so the frames that queued up while it was
busy go out in one write.

Slow-client policy (each subscriber holds at most `limit` pending frames and `max_bytes` of
them):

1. when full, a new FLY frame is dropped for that subscriber (counted in `dropped_fly`);
2. when full and a status frame arrives, pending FLY frames are dropped first to make room;
3. when full of status frames only, the pending frames are discarded and the subscriber is
   marked `resync`: its stream re-reads the envelope and sends a fresh catch-up frame, so a
   status change (the terminal one included) is never lost, only folded into the snapshot.

Publishers are never slowed by a subscriber, and one slow client costs the others nothing.

Seqs and the replay buffer (for streams resuming with `Last-Event-ID`, and resyncs): `publish`
gives every event without one the next seq of a counter seeded from the wall clock in
microseconds (so seqs keep increasing across a restart, unless a process averaged more than a
million events a second; an event from the bus keeps its own seq), and keeps the FLY events of
each key, at most `buffer` of them and none older than `buffer_age` seconds. Trimming is lazy
and O(1) per publish: the key published to is cut to its count, and (at most every
`SWEEP_EVERY` seconds) keys whose newest event aged out are dropped from the oldest end, so
memory stays bounded also for envelopes nobody streams. Each key remembers the highest seq it
dropped, so `replay` can say "gap"; a dropped key leaves that watermark behind for a while
(`TRIM_MEMORY` times the age, at most `TRIMS_MAX` keys).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from mesh_proto import Published

from ._broadcast import BroadcastStatistics

# How long (in buffer ages) and for how many keys the watermark of a dropped key is kept.
TRIM_MEMORY: Final = 10
TRIMS_MAX: Final = 100_000
# How often (seconds, at most) a publish looks for keys that aged out.
SWEEP_EVERY: Final = 1.0


def _wall_seq() -> int:
    return time.time_ns() // 1000


@attrs.define(eq=False)
class _Buffer:
    """The buffered FLY events of one key (oldest first) and the highest seq dropped."""

    events: deque[tuple[int, float, Published]] = attrs.field(factory=deque)
    trimmed: int = 0

    def trim(self, count: int, before: float) -> None:
        events = self.events
        while events and (len(events) > count or events[0][1] < before):
            self.trimmed = events.popleft()[0]


@attrs.define(eq=False)
class HubSubscription:
    """One subscriber's pending frames (a `Subscription` of the hub)."""

    key: str
    limit: int
    max_bytes: int
    pending: list[Published] = attrs.field(factory=list)
    pending_bytes: int = 0
    resync: bool = False
    closed: bool = False
    dropped_fly: int = 0
    _wakeup: trio.Event = attrs.field(factory=trio.Event)

    def _full(self) -> bool:
        return len(self.pending) >= self.limit or self.pending_bytes >= self.max_bytes

    def deliver(self, published: Published) -> None:
        if self._full():
            if published.is_fly:
                self.dropped_fly += 1
                return
            kept = [p for p in self.pending if not p.is_fly]
            self.dropped_fly += len(self.pending) - len(kept)
            self.pending = kept
            self.pending_bytes = sum(len(p.frame) for p in kept)
            if self._full():
                self.force_resync()
                return
        self.pending.append(published)
        self.pending_bytes += len(published.frame)
        self._wakeup.set()

    def force_resync(self) -> None:
        """Discard what is pending and have the stream re-read the envelope (and replay)."""
        self.pending, self.pending_bytes, self.resync = [], 0, True
        self._wakeup.set()

    async def wait(self) -> None:
        """Wait until something is pending, a resync is due, or the hub closed."""
        await self._wakeup.wait()

    def take(self) -> tuple[list[Published], bool]:
        """Everything pending and whether a resync is due; resets both."""
        pending, resync = self.pending, self.resync
        self.pending, self.pending_bytes, self.resync = [], 0, False
        if not self.closed:
            self._wakeup = trio.Event()
        return pending, resync

    def wake(self) -> None:
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()


@attrs.define(eq=False)
class Hub:
    """The in-process `Broadcaster` (see the module comment for the slow-client policy)."""

    limit: int = 1024
    max_bytes: int = 1 << 20
    # The replay buffer: FLY events kept per key, and for how long (seconds).
    buffer: int = 256
    buffer_age: float = 60.0
    closed: bool = False
    clock: Callable[[], float] = time.monotonic
    _subscribers: dict[str, set[HubSubscription]] = attrs.field(factory=dict)
    _seq: int = attrs.field(factory=_wall_seq)
    # Keys with buffered events, least recently published first; dropped keys' watermarks.
    _buffers: OrderedDict[str, _Buffer] = attrs.field(factory=OrderedDict)
    _trims: OrderedDict[str, tuple[int, float]] = attrs.field(factory=OrderedDict)
    _next_sweep: float = 0.0
    _published: int = 0
    _delivered: int = 0
    _dropped_fly: int = 0
    _resyncs: int = 0

    @asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[HubSubscription]:
        """A subscription to `key` for the duration of the block (closed at once if the hub is).

        Entering and leaving never await: the subscription is in effect on entry.
        """
        sub = HubSubscription(key, self.limit, self.max_bytes)
        if self.closed:
            sub.close()
        subs = self._subscribers.setdefault(key, set())
        subs.add(sub)
        try:
            yield sub
        finally:
            subs.discard(sub)
            if not subs and self._subscribers.get(key) is subs:
                del self._subscribers[key]
            self._dropped_fly += sub.dropped_fly

    def subscribers(self, key: str) -> int:
        return len(self._subscribers.get(key, ()))

    async def publish(self, key: str, published: Published) -> None:
        """Hand a frame to every subscriber of `key`; never awaits, never raises."""
        self._published += 1
        if published.seq is None:
            self._seq += 1
            published = published.with_seq(self._seq)
        elif published.seq > self._seq:
            self._seq = published.seq
        if published.is_fly:
            self._keep(key, published)
        subs = self._subscribers.get(key)
        if not subs:
            return
        for sub in subs:
            was_resync = sub.resync
            sub.deliver(published)
            self._resyncs += sub.resync and not was_resync
        self._delivered += len(subs)

    def _keep(self, key: str, published: Published) -> None:
        assert published.seq is not None
        now = self.clock()
        buffers = self._buffers
        buffer = buffers.get(key)
        if buffer is None:
            trimmed = self._trims.pop(key, None)
            buffer = buffers[key] = _Buffer(trimmed=trimmed[0] if trimmed else 0)
        else:
            buffers.move_to_end(key)
        events = buffer.events
        events.append((published.seq, now, published))
        if len(events) > self.buffer or events[0][1] < now - self.buffer_age:
            buffer.trim(self.buffer, now - self.buffer_age)
        if now >= self._next_sweep:
            self._next_sweep = now + min(SWEEP_EVERY, self.buffer_age)
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop the keys whose newest event aged out, and the oldest dropped keys' marks."""
        buffers, trims, before = self._buffers, self._trims, now - self.buffer_age
        while buffers:
            key, buffer = next(iter(buffers.items()))
            if buffer.events and buffer.events[-1][1] >= before:
                break
            del buffers[key]
            buffer.trim(0, now)
            trims[key] = (buffer.trimmed, now)
        forget = now - self.buffer_age * TRIM_MEMORY
        while trims and (len(trims) > TRIMS_MAX or next(iter(trims.values()))[1] < forget):
            trims.popitem(last=False)

    async def replay(self, key: str, after: int) -> tuple[list[Published], bool]:
        """The buffered FLY events of `key` with seq above `after` (oldest first), and whether
        some are lost: dropped from the buffer, or `after` is a seq not given yet."""
        if after > self._seq:
            return [], True
        buffer = self._buffers.get(key)
        if buffer is None:
            trimmed = self._trims.get(key)
            return [], trimmed is not None and trimmed[0] > after
        buffer.trim(self.buffer, self.clock() - self.buffer_age)
        events = [published for seq, _, published in buffer.events if seq > after]
        return events, buffer.trimmed > after

    def resync_all(self) -> None:
        """Send every current subscriber back to the store (and the replay buffer): what a
        replicated broadcaster does when its watch stream reconnected and may have lost events."""
        for subs in self._subscribers.values():
            for sub in subs:
                self._resyncs += not sub.resync
                sub.force_resync()

    def close(self) -> None:
        """End every stream (shutdown): subscribers wake, send what is pending, and finish."""
        self.closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.close()

    def statistics(self) -> BroadcastStatistics:
        live_drops = sum(s.dropped_fly for subs in self._subscribers.values() for s in subs)
        return BroadcastStatistics(
            envelopes=len(self._subscribers),
            subscribers=sum(len(s) for s in self._subscribers.values()),
            published=self._published,
            delivered=self._delivered,
            dropped_fly=self._dropped_fly + live_drops,
            resyncs=self._resyncs,
        )
