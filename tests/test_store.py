"""One suite for every `Store`: memory, SQLite file, and the state proxy over PostgreSQL
(`tests/stateproxy_fixtures.py`). A store must apply the status rules atomically, page and count
correctly, and find expired envelopes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from mesh_proto import (
    EXPIRE_EVENT,
    Applied,
    CreateRequest,
    Envelope,
    Ignored,
    ListQuery,
    Status,
    StatusEvent,
)
from mesh_trio import MemoryStore, Store
from mesh_trio._proxy_store import open_proxy_store
from mesh_trio._store import open_embedded_store
from mesh_trio.stateproxy import serve_state_proxy

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make(n: int, *, timeout: float = 0, actor: str = "worker") -> Envelope:
    request = CreateRequest(actor=actor, payload={"n": n}, timeout=timeout)
    return Envelope.new(
        request,
        envelope_id=f"00000000-0000-4000-8000-{n:012d}",
        now=T0 + timedelta(seconds=n),
        gateway_url="http://gw",
    )


@pytest.fixture(params=["memory", "sqlite", "proxy"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, nursery: trio.Nursery, short_dir: str
) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        async with open_embedded_store(f"sqlite:{tmp_path / 'mesh.sqlite3'}") as sqlite:
            yield sqlite
    else:
        pg_url = request.getfixturevalue("pg_url")  # a sync fixture: PostgreSQL is required
        path = os.path.join(short_dir, "proxy.sock")
        await nursery.start(partial(serve_state_proxy, path, pg_url))
        async with open_proxy_store(path) as proxy:
            yield proxy


async def test_create_get_delete(store: Store) -> None:
    envelope = make(1, timeout=5)
    await store.create(envelope)
    stored = await store.get(envelope.id)
    # The state proxy stamps created_at/updated_at itself: compare what the mesh API owns.
    assert stored is not None and stored.id == envelope.id
    assert stored.to_value() == envelope.to_value()
    assert await store.get(make(2).id) is None
    assert (await store.list(ListQuery(statuses=(Status.PENDING,), limit=10)))[1] == 1
    assert await store.delete(envelope.id) is True
    assert await store.delete(envelope.id) is False
    assert await store.get(envelope.id) is None
    assert await store.list(ListQuery(limit=10)) == ([], 0)
    assert await store.list(ListQuery(statuses=(Status.PENDING,), limit=10)) == ([], 0)


async def test_update_applies_rules(store: Store) -> None:
    envelope = make(1)
    await store.create(envelope)
    now = T0 + timedelta(minutes=1)
    outcome = await store.update(
        envelope.id, StatusEvent(status=Status.RUNNING, data={"a": 1}), now
    )
    assert isinstance(outcome, Applied)
    stored = await store.get(envelope.id)
    assert stored is not None and stored.status is Status.RUNNING
    assert stored.data["a"] == 1 and stored.data["payload"] == {"n": 1}
    assert stored.revision == 1
    stale = await store.update(envelope.id, StatusEvent(status=Status.PENDING), now)
    assert isinstance(stale, Ignored)
    done = await store.update(envelope.id, StatusEvent(status=Status.SUCCEEDED), now)
    assert isinstance(done, Applied) and done.terminal
    late = await store.update(envelope.id, StatusEvent(status=Status.FAILED), now)
    assert isinstance(late, Ignored)
    final = await store.get(envelope.id)
    assert final is not None and final.status is Status.SUCCEEDED and final.revision == 2
    assert await store.update(make(9).id, StatusEvent(status=Status.RUNNING), now) is None


async def test_list_newest_first_filter_and_total(store: Store) -> None:
    for n in range(1, 8):
        await store.create(make(n))
    await store.update(make(3).id, StatusEvent(status=Status.RUNNING), T0)
    page, total = await store.list(ListQuery(limit=3, offset=1))
    assert total == 7
    assert [e.id for e in page] == [make(n).id for n in (6, 5, 4)]
    running, total = await store.list(ListQuery(statuses=(Status.RUNNING,), limit=10))
    assert total == 1 and running[0].id == make(3).id
    empty, total = await store.list(ListQuery(statuses=(Status.CANCELED,), limit=10))
    assert (empty, total) == ([], 0)
    tail, total = await store.list(ListQuery(limit=10, offset=6))
    assert [e.id for e in tail] == [make(1).id] and total == 7


async def test_list_filters_and_cursor_pages(store: Store) -> None:
    for n in range(1, 10):
        await store.create(make(n, actor="a" if n % 2 else "b"))
    for n in (2, 3, 5):
        await store.update(make(n).id, StatusEvent(status=Status.RUNNING), T0)
    await store.update(make(4).id, StatusEvent(status=Status.PAUSED), T0)
    # Stored rows (the state proxy stamps its own created_at), newest first.
    everything, total = await store.list(ListQuery(limit=100))
    assert total == 9 and len(everything) == 9
    middle = everything[2].created_at, everything[6].created_at  # exclusive: 4 rows between
    queries = [
        ListQuery(actor="a"),
        ListQuery(statuses=(Status.PAUSED, Status.RUNNING)),
        ListQuery(actor="b", statuses=(Status.PAUSED, Status.RUNNING)),
        ListQuery(created_after=middle[1], created_before=middle[0]),
        ListQuery(actor="a", created_before=middle[0]),
        ListQuery(statuses=(Status.PENDING,), created_after=middle[1]),
    ]
    for query in queries:
        expected = [e.id for e in everything if query.matches(e)]
        page, total = await store.list(query)
        assert ([e.id for e in page], total) == (expected, len(expected)), query
        seen: list[str] = []
        paged = attrs.evolve(query, limit=2)
        while True:
            rows, total = await store.list(attrs.evolve(paged, limit=3))
            assert total == len(expected)
            seen.extend(e.id for e in rows[:2])
            token = paged.next_cursor(rows)
            if token is None:
                break
            paged = ListQuery.parse(f"cursor={token}&limit=2")
            paged = attrs.evolve(query, limit=2, cursor=paged.cursor)
        assert seen == expected, query


async def test_list_ties_by_id(store: Store) -> None:
    same = [
        Envelope.new(
            CreateRequest(actor="w"),
            envelope_id=f"00000000-0000-4000-8000-00000000000{i}",
            now=T0,
            gateway_url=None,
        )
        for i in (3, 1, 2)
    ]
    for envelope in same:
        await store.create(envelope)
    page, _ = await store.list(ListQuery(limit=10))
    assert len(page) == 3
    assert page == sorted(page, key=lambda e: (e.created_at, e.id), reverse=True)


async def test_expired(store: Store) -> None:
    soon, later, never, done = (
        make(1, timeout=10),
        make(2, timeout=1000),
        make(3),
        make(4, timeout=1),
    )
    for envelope in (soon, later, never, done):
        await store.create(envelope)
    await store.update(done.id, StatusEvent(status=Status.SUCCEEDED), T0)
    assert soon.deadline_at is not None
    at_deadline = await store.expired(soon.deadline_at, 10)  # "at or before now" expires
    assert [e.id for e in at_deadline] == [soon.id]
    now = T0 + timedelta(seconds=60)
    assert [e.id for e in await store.expired(now, 10)] == [soon.id]
    await store.update(soon.id, EXPIRE_EVENT, now)
    assert await store.expired(now, 10) == []
    assert len(await store.expired(T0 + timedelta(days=1), 10)) == 1


async def test_concurrent_terminal_writers_one_winner(store: Store) -> None:
    envelope = make(1)
    await store.create(envelope)
    winners: list[Status] = []

    async def write(status: Status) -> None:
        outcome = await store.update(envelope.id, StatusEvent(status=status), T0)
        if isinstance(outcome, Applied):
            winners.append(status)

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(write, (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)[i % 3])
    assert len(winners) == 1
    stored = await store.get(envelope.id)
    assert stored is not None and stored.status is winners[0]


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_sqlite_survives_restart(tmp_path: Path) -> None:
    path = f"sqlite:{tmp_path / 'mesh.sqlite3'}"
    async with open_embedded_store(path) as first:
        await first.create(make(1, timeout=5))
        await first.update(make(1).id, StatusEvent(status=Status.RUNNING, data={"x": 1}), T0)
    async with open_embedded_store(path) as second:
        stored = await second.get(make(1).id)
    assert stored is not None and stored.status is Status.RUNNING and stored.data["x"] == 1
