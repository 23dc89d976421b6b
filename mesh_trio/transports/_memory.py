"""The `memory` transport: in-process queues, for the demo actors, tests and trying things out.

Any queue name is valid and is made on first use; nothing survives the process.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import trio


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
    # No call but `receive` ever suspends, and the mesh API only sends
    # (`mesh_trio._store.never_waits`).
    never_waits: ClassVar[bool] = True

    def _queue(
        self, name: str
    ) -> tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]:
        pair = self._queues.get(name)
        if pair is None:
            pair = trio.open_memory_channel[bytes](float("inf"))
            self._queues[name] = pair
        return pair

    async def ping(self) -> None:
        """Always ready: the queues are in this process."""

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
