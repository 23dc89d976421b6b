"""No lost updates: concurrent writes to one envelope, status or data, all land.

Through the state proxy on PostgreSQL the conditional update guards the stored revision
(`if_rev`), so 20 progress updates racing with distinct keys keep every key; with the guard
advertised, the mesh API caches live envelopes and a status event costs one proxy round trip in
the common case, while a stale copy (another replica wrote since) only costs a retry. Legacy
`/progress` reports racing each other never lower the stored `progress_percent`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs
import pytest
import trio

from mesh_proto import Applied, Envelope, Status, StatusEvent
from mesh_trio._proxy_store import ProxyStore, open_proxy_store
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import MeshClient, http, start_mesh

WRITERS = 20


def now() -> datetime:
    return datetime.now(UTC)


async def race_progress(mesh: MeshClient, envelope_id: str, writers: int = WRITERS) -> list[int]:
    statuses: list[int] = []

    async def post(i: int) -> None:
        statuses.append((await mesh.status(envelope_id, "running", {f"key{i}": i})).status)

    async with trio.open_nursery() as nursery:
        for i in range(writers):
            nursery.start_soon(post, i)
    return statuses


async def test_concurrent_progress_updates_keep_every_key(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    assert (await mesh.status(envelope_id, "running")).status == 204
    assert await race_progress(mesh, envelope_id) == [204] * WRITERS
    data = (await mesh.get(envelope_id))["data"]
    assert {key for key in data if key.startswith("key")} == {f"key{i}" for i in range(WRITERS)}


@attrs.define
class Counting:
    """A store and the number of requests its pool has sent so far (retries included)."""

    store: ProxyStore
    seen: int = 0

    def take(self) -> int:
        sent = self.store.pool.statistics().requests
        taken, self.seen = sent - self.seen, sent
        return taken


@pytest.fixture
async def two_replicas(proxy_socket: str) -> AsyncIterator[tuple[Counting, Counting]]:
    async with open_proxy_store(proxy_socket) as a, open_proxy_store(proxy_socket) as b:
        yield Counting(a), Counting(b)


def fresh() -> Envelope:
    t = now()
    return Envelope(
        id=os.urandom(8).hex(), status=Status.PENDING, created_at=t, updated_at=t, data={"a": 1}
    )


async def test_a_status_event_costs_one_round_trip(two_replicas: tuple[Counting, Counting]) -> None:
    a, _ = two_replicas
    envelope = fresh()
    await a.store.create(envelope)
    await a.store.update(envelope.id, StatusEvent(status=Status.RUNNING), now())
    a.take()  # the create, and the health check that told the proxy's features
    for i in range(5):
        event = StatusEvent(status=Status.RUNNING, data={f"k{i}": i})
        assert isinstance(await a.store.update(envelope.id, event, now()), Applied)
        assert a.take() == 1, "a guarded PUT from the cached envelope, no read"
    stored = await a.store.get(envelope.id)
    assert stored is not None and {f"k{i}" for i in range(5)} <= set(stored.data)


async def test_a_stale_cache_costs_a_retry_and_loses_nothing(
    two_replicas: tuple[Counting, Counting],
) -> None:
    a, b = two_replicas
    envelope = fresh()
    await a.store.create(envelope)
    for i in range(6):  # replicas take turns: each one's cached copy is always stale
        writer = (a, b)[i % 2]
        writer.take()
        event = StatusEvent(status=Status.RUNNING, data={f"k{i}": i})
        assert isinstance(await writer.store.update(envelope.id, event, now()), Applied)
        assert writer.take() <= 4  # (health,) PUT 409, GET, PUT
    final = await b.store.update(envelope.id, StatusEvent(status=Status.SUCCEEDED), now())
    assert isinstance(final, Applied) and final.envelope.revision == 7
    stored = await a.store.get(envelope.id)
    assert stored is not None and stored.status is Status.SUCCEEDED
    assert {f"k{i}" for i in range(6)} <= set(stored.data)
    assert b.store.cache.statistics().entries == 0, "a terminal envelope is not kept"


@pytest.fixture(params=["memory", "proxy"])
async def compat(request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: str) -> Any:
    env = {"ASYA_MESH_COMPAT": "1"}
    if request.param == "proxy":
        socket = os.path.join(short_dir, "proxy.sock")
        await nursery.start(partial(serve_state_proxy, socket, request.getfixturevalue("pg_url")))
        env["ASYA_STATEPROXY_SOCKET"] = socket
    return await start_mesh(nursery, **env)


async def test_racing_legacy_progress_never_lowers_the_percent(compat: MeshClient) -> None:
    envelope_id = await compat.create()
    hops = [f"a{i}" for i in range(WRITERS)]

    async def report(done: int) -> None:
        body = {
            "prev": hops[:done],
            "curr": hops[done],
            "next": hops[done + 1 :],
            "status": "processing",
        }
        reply = await http(compat.int_port, "POST", f"/mesh/{envelope_id}/progress", body)
        assert reply.status == 200, reply

    async with trio.open_nursery() as nursery:
        for done in range(WRITERS):
            nursery.start_soon(report, done)
    # (len(prev) + 0.5) / hops * 100 of the furthest report, whatever order they landed in.
    highest = round((WRITERS - 1 + 0.5) / WRITERS * 100, 6)
    assert (await compat.get(envelope_id))["data"]["progress_percent"] == highest
