"""The create sequence (`Mesh.create`: store, then dispatch) once its caller is gone.

A create runs to its end even when its caller is cancelled (a client that disconnects must not
leave a stored `pending` envelope that no actor ever receives), within `CREATE_GRACE`: a store
or queue that hangs longer turns it into a 503. The embedded store and queue never wait, so
there the sequence needs no guard at all; a store or queue that waits gets the shielded,
bounded scope.
"""

from __future__ import annotations

import pytest
import trio

from mesh_proto import ServiceError
from mesh_trio._hub import Hub
from mesh_trio._mesh import CREATE_GRACE, Mesh
from mesh_trio._metrics import MeshMetrics, MeteredStore
from mesh_trio._store import MemoryStore, never_waits
from mesh_trio.transports import MemoryQueues

QUEUE = "asya-default-echo"


class WaitingQueues(MemoryQueues):
    """The in-process queues, but every send waits until `released` (a broker's confirm)."""

    never_waits = False

    def __init__(self) -> None:
        super().__init__()
        self.released = trio.Event()
        self.sending = trio.Event()

    async def send(self, queue: str, body: bytes) -> None:
        self.sending.set()
        await self.released.wait()
        await super().send(queue, body)


def mesh_on(queues: MemoryQueues) -> tuple[Mesh, MemoryStore]:
    store = MemoryStore()
    return Mesh(store=store, dispatcher=queues, broadcaster=Hub()), store


def test_only_the_embedded_store_and_queue_declare_they_never_wait() -> None:
    assert never_waits(MemoryStore()) and never_waits(MemoryQueues())
    assert never_waits(MeteredStore(MemoryStore(), MeshMetrics()))
    assert not never_waits(WaitingQueues())
    assert not never_waits(MeteredStore(object(), MeshMetrics()))  # type: ignore[arg-type]
    assert not never_waits(object())


async def test_embedded_create_completes_in_a_cancelled_caller() -> None:
    queues = MemoryQueues()
    mesh, store = mesh_on(queues)
    with trio.CancelScope() as scope:
        scope.cancel()
        envelope_id = await mesh.create(b"actor=echo", b'{"payload":1}')
    assert await store.get(envelope_id) is not None
    assert queues.pending(QUEUE) == 1


async def test_a_waiting_dispatch_finishes_after_its_caller_is_cancelled() -> None:
    queues = WaitingQueues()
    mesh, store = mesh_on(queues)
    created: list[str] = []

    async def create() -> None:
        created.append(await mesh.create(b"actor=echo", b'{"payload":1}'))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await queues.sending.wait()
            nursery.cancel_scope.cancel()  # the client is gone mid-dispatch
            queues.released.set()
    assert len(created) == 1
    assert await store.get(created[0]) is not None
    assert queues.pending(QUEUE) == 1


async def test_a_dispatch_that_hangs_past_the_grace_is_a_503(
    autojump_clock: trio.abc.Clock,
) -> None:
    queues = WaitingQueues()
    mesh, _ = mesh_on(queues)
    started = trio.current_time()
    with trio.fail_after(2 * CREATE_GRACE), pytest.raises(ServiceError, match="in time"):
        await mesh.create(b"actor=echo", b'{"payload":1}')
    assert trio.current_time() - started == pytest.approx(CREATE_GRACE)
    assert queues.pending(QUEUE) == 0
