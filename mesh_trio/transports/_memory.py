"""The dispatch seam: how a new envelope reaches its actor's queue.

A `Dispatcher` puts one wire message (bytes built by `mesh_proto`) on a named queue
(`asya-{namespace}-{actor}`). Transports live beside this module: the in-process `memory`
queue here, RabbitMQ in `_amqp.py`, SQS in `_sqs.py`. Each is opened as an async context
manager so that its background tasks (readers, heartbeats, reconnects) live in a nursery the
caller owns, and nothing outlives the `serve()` that opened it.

`send` distinguishes the two failures the HTTP contract needs: the queue does not exist
(`ActorNotFound`, create answers 404 and removes the record) and the broker cannot take the
message now (`DispatchUnavailable`, create answers 503 and marks the record failed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import attrs
import trio


class DispatchError(Exception):
    """Base of the failures a transport reports from `send`."""


class ActorNotFound(DispatchError):
    """The actor's queue does not exist: nothing was enqueued."""


class DispatchUnavailable(DispatchError):
    """The broker could not take the message (down, connection lost, no confirm in time).

    The message may or may not have been enqueued; the caller treats the envelope as failed and
    never re-sends it for the same create.
    """


class Dispatcher(Protocol):
    async def send(self, queue: str, body: bytes) -> None:
        """Put `body` (a JSON wire message) on `queue`.

        Returns only once the transport holds the message durably (for RabbitMQ: the broker
        confirmed it). Raises `ActorNotFound` or `DispatchUnavailable`.
        """


@attrs.define(eq=False)
class MemoryQueues:
    """The in-process transport: any queue name is valid and is made on first use.

    Consumers (the demo actors, tests) read a queue with `receive(name)`. Each queue is an
    unbounded trio memory channel; an envelope that nobody consumes just waits, like a message
    on a real broker with no consumer.
    """

    _queues: dict[str, tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]] = (
        attrs.field(factory=dict)
    )
    sent: int = 0

    def _queue(
        self, name: str
    ) -> tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]:
        pair = self._queues.get(name)
        if pair is None:
            pair = trio.open_memory_channel[bytes](float("inf"))
            self._queues[name] = pair
        return pair

    async def send(self, queue: str, body: bytes) -> None:
        self._queue(queue)[0].send_nowait(body)
        self.sent += 1

    async def receive(self, queue: str) -> bytes:
        """Wait for and take the next message of `queue`."""
        return await self._queue(queue)[1].receive()

    def pending(self, queue: str) -> int:
        """How many messages wait on `queue`."""
        pair = self._queues.get(queue)
        return 0 if pair is None else pair[1].statistics().current_buffer_used


@asynccontextmanager
async def open_memory_dispatcher() -> AsyncIterator[MemoryQueues]:
    yield MemoryQueues()
