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
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from mesh_proto import Published

from ._broadcast import BroadcastStatistics


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
                self.pending, self.pending_bytes = [], 0
                self.resync = True
                self._wakeup.set()
                return
        self.pending.append(published)
        self.pending_bytes += len(published.frame)
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

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()


@attrs.define(eq=False)
class Hub:
    """The in-process `Broadcaster` (see the module comment for the slow-client policy)."""

    limit: int = 1024
    max_bytes: int = 1 << 20
    closed: bool = False
    _subscribers: dict[str, set[HubSubscription]] = attrs.field(factory=dict)
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
        subs = self._subscribers.get(key)
        if not subs:
            return
        for sub in subs:
            was_resync = sub.resync
            sub.deliver(published)
            self._resyncs += sub.resync and not was_resync
        self._delivered += len(subs)

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
