"""The `Broadcaster` seam: what `Mesh` and `serve()` need from the fan-out of published frames.

`Mesh` publishes every status change and FLY event of an envelope under its id, and each SSE
stream subscribes to one id. Nothing in the runtime knows how frames get from one to the other:
it holds a `Broadcaster`. Today there is one implementation, the in-process `Hub` (`_hub.py`),
which is enough for a single replica. A second one will fan events out across replicas through
the state proxy (a long-lived watch stream that every replica reads), delivering to its local
subscribers with the same slow-client policy (most likely by wrapping a `Hub`).

Decisions, made for that second implementation and kept cheap for the first:

- `publish` is async. Sending to other replicas is a network call; an async `publish` lets it
  wait for the proxy to accept the frame and raise `ServiceError` when it cannot, so a sidecar's
  204 means "handed to the fan-out", and a lost FLY event is a 503 instead of a silent drop. It
  must never wait for a subscriber (a slow client slows nobody). The in-process `Hub.publish`
  never awaits anything: it is not a checkpoint, costs one coroutine call more than a plain
  call, and starts no task, so the internal port's throughput is unchanged.
- `subscribe` is an async context manager: a subscription must be in effect when `__aenter__`
  returns, because `Mesh.stream` subscribes before it reads the snapshot so that nothing
  published in between is lost. A replicated broadcaster that registers interest per key with
  the proxy awaits that registration there; the `Hub` enters without awaiting.
- A subscription is local (`Subscription`: `wait()`, `take()`, `wake()`, `closed`): frames reach it
  however they travelled, and `take()` says when a resync (re-read and fresh snapshot) is due,
  which is also how a replicated broadcaster reports frames it may have missed (a watch stream
  that reconnected).
- `close()` is synchronous and ends the local streams (shutdown, step 1). Resources with a
  lifetime (the watch stream's task, its connection) belong to the async context manager that
  opens the broadcaster (`_server.open_broadcaster`, which chooses the implementation from the
  configuration), entered by `serve()` after the store and left before it.
- `statistics()` returns a frozen `BroadcastStatistics` of the local fan-out; an implementation
  with more to count returns a subclass with extra fields.
- Seqs and replay: every event gets a `seq` at publish (`Published.seq`: kept when set, the
  bus's; else given by the broadcaster, increasing per key), and the broadcaster keeps a
  bounded buffer of each key's FLY events, so a stream resuming with `Last-Event-ID` (or
  resyncing) gets what it missed: `replay(key, after)`, with `gap` when some are lost. Status
  events need no buffer: the store's snapshot holds them.
- Order: frames of one key reach each subscriber in the order `publish` was called for it in
  this process; across replicas, in the order the watch stream carries them.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs

from mesh_proto import Published


@attrs.frozen(kw_only=True)
class BroadcastStatistics:
    """Counters of the local fan-out, since the broadcaster was opened.

    `envelopes` and `subscribers` are current; `published` counts `publish` calls, `delivered`
    frames handed to a subscriber, `dropped_fly` FLY frames a full subscriber did not get,
    `resyncs` subscribers sent back to the store for a fresh snapshot.
    """

    envelopes: int
    subscribers: int
    published: int
    delivered: int
    dropped_fly: int
    resyncs: int


class Subscription(Protocol):
    """One SSE stream's subscription to one key."""

    @property
    def closed(self) -> bool:
        """True once the broadcaster closed: send what `take()` returns, then end."""
        ...

    async def wait(self) -> None:
        """Return once something is pending, a resync is due, or the broadcaster closed."""
        ...

    def take(self) -> tuple[list[Published], bool]:
        """Everything pending (oldest first) and whether a resync is due; resets both."""
        ...

    def wake(self) -> None:
        """Make `wait()` return now, with or without something pending (how the streams'
        keepalive tick reaches a silent stream)."""
        ...


class Broadcaster(Protocol):
    """Fan-out of published frames to the subscribers of each key (see the module comment)."""

    async def publish(self, key: str, published: Published) -> None:
        """Hand `published` to every subscriber of `key`, never waiting for one.

        Raises:
            ServiceError: the frame could not be handed on (a replicated broadcaster whose
                proxy is unreachable); the in-process hub never raises.
        """
        ...

    def subscribe(self, key: str) -> AbstractAsyncContextManager[Subscription]:
        """A subscription to `key`, in effect from entry to exit (closed at once after
        `close()`)."""
        ...

    def subscribers(self, key: str) -> int:
        """How many subscriptions to `key` this process holds."""
        ...

    async def replay(self, key: str, after: int) -> tuple[list[Published], bool]:
        """The buffered FLY events of `key` with seq above `after`, oldest first, and whether
        some of them are lost (dropped from the buffer, or `after` is not a seq given yet)."""
        ...

    def close(self) -> None:
        """End every subscription (shutdown): each wakes, sends what is pending, and ends."""
        ...

    def statistics(self) -> BroadcastStatistics: ...
