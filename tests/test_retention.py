"""Retention (`ASYA_MESH_RETENTION`): terminal envelopes older than the cutoff are deleted in
bounded batches, never a live one nor a recent terminal one, with every store; through the
state proxy, sweeps of several replicas take turns without errors.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial

import attrs
import pytest
import trio

from mesh_proto import TERMINAL, Claim, Envelope, Status, claim_key
from mesh_trio import ConfigError, parse_duration
from mesh_trio._metrics import MeshMetrics
from mesh_trio._proxy_store import ProxyStore, open_proxy_store
from mesh_trio._retention import run_retention, sweep
from mesh_trio._store import PURGE, MemoryStore, SqliteStore
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import MeshClient, http, make_config, start_mesh

WAIT = 10.0
T0 = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)
Store = MemoryStore | SqliteStore | ProxyStore


def envelope(status: Status, at: datetime = T0) -> Envelope:
    return Envelope(id=os.urandom(8).hex(), status=status, created_at=at, updated_at=at, data={})


async def start_proxy(request: pytest.FixtureRequest, nursery: trio.Nursery, path: str) -> str:
    pg_url = request.getfixturevalue("pg_url")  # a sync fixture: PostgreSQL is required
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    return path


@pytest.fixture(params=["memory", "sqlite", "proxy"])
async def store(
    request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: str
) -> AsyncIterator[Store]:
    if request.param == "proxy":
        path = await start_proxy(request, nursery, os.path.join(short_dir, "proxy.sock"))
        async with open_proxy_store(path) as proxy:
            yield proxy
    elif request.param == "sqlite":
        sqlite = SqliteStore.open(os.path.join(short_dir, "mesh.db"))
        yield sqlite
        sqlite.close()
    else:
        yield MemoryStore()


async def stored(store: Store, item: Envelope) -> Envelope:
    """Create `item`; returns it as stored (the state proxy stamps `updated_at` itself)."""
    await store.create(item)
    read = await store.get(item.id)
    assert read is not None
    return read


async def test_purge_deletes_old_terminal_envelopes_only(store: Store) -> None:
    old_ended = [await stored(store, envelope(s)) for s in sorted(TERMINAL)]
    old_live = [await stored(store, envelope(s)) for s in (Status.PENDING, Status.RUNNING)]
    recent = await stored(store, envelope(Status.SUCCEEDED, T0 + timedelta(hours=1)))
    cutoff = recent.updated_at  # strictly before it: `recent` stays
    assert all(e.updated_at < cutoff for e in old_ended + old_live)

    assert await store.purge(cutoff, 500) == len(old_ended)
    assert [await store.get(e.id) for e in old_ended] == [None] * len(old_ended)
    assert [await store.get(e.id) for e in old_live] == old_live
    assert await store.get(recent.id) == recent
    assert await store.purge(cutoff, 500) == 0


async def test_purge_deletes_at_most_limit(store: Store) -> None:
    made = [await stored(store, envelope(Status.FAILED)) for _ in range(5)]
    cutoff = max(e.updated_at for e in made) + timedelta(seconds=1)
    assert await store.purge(cutoff, 2) == 2
    assert len([e for e in made if await store.get(e.id) is not None]) == 3
    assert await store.purge(cutoff, 10) == 3


@attrs.define
class Batches:
    """A store that records how many envelopes each purge deleted."""

    store: Store
    counts: list[int] = attrs.field(factory=list)

    async def purge(self, cutoff: datetime, limit: int) -> int:
        count = await self.store.purge(cutoff, limit)
        self.counts.append(count)
        return count


async def create_many(store: ProxyStore, count: int, status: Status = Status.SUCCEEDED) -> None:
    async def create(n: int) -> None:
        for _ in range(n):
            await store.create(envelope(status))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(create, count // 20)


async def test_a_sweep_deletes_in_bounded_batches(proxy_store: ProxyStore) -> None:
    await create_many(proxy_store, 1200)
    live = await stored(proxy_store, envelope(Status.RUNNING))
    batches = Batches(proxy_store)
    cutoff = datetime.now(UTC) + timedelta(hours=1)
    assert await sweep(batches, cutoff, batch=500) == 1200
    assert batches.counts == [500, 500, 200]
    assert await proxy_store.get(live.id) == live


async def test_expired_idempotency_claims_are_purged_through_the_proxy(
    proxy_store: ProxyStore,
) -> None:
    now = datetime.now(UTC)
    expired = Claim(envelope_id="a" * 16, fingerprint="f", expires_at=now - timedelta(seconds=1))
    live = Claim(envelope_id="b" * 16, fingerprint="f", expires_at=now + timedelta(hours=1))
    assert await proxy_store.claim(claim_key("old"), expired, now - timedelta(hours=1)) is None
    assert await proxy_store.claim(claim_key("new"), live, now) is None
    await proxy_store.create(envelope(Status.SUCCEEDED))  # not a claim: left alone
    assert await proxy_store.purge_claims(now, 500) == 1
    assert await proxy_store.claim(claim_key("new"), expired, now) == live
    assert await proxy_store.purge_claims(now, 500) == 0


@pytest.fixture
async def other_proxy(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> AsyncIterator[ProxyStore]:
    """A second state proxy on the same database: another replica's."""
    path = os.path.join(short_dir, "other.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    async with open_proxy_store(path) as store:
        yield store


async def test_sweeps_of_two_replicas_take_turns(
    proxy_store: ProxyStore, other_proxy: ProxyStore
) -> None:
    await create_many(proxy_store, 2000)
    cutoff = datetime.now(UTC) + timedelta(hours=1)
    deleted: list[int] = []

    async def replica(store: ProxyStore) -> None:
        for _ in range(3):
            deleted.append(await sweep(store, cutoff, batch=100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica, proxy_store)
        nursery.start_soon(replica, other_proxy)
    # A replica that finds the other's batch running deletes 0 and ends its sweep; whatever is
    # left goes in a later one.
    deleted.append(await sweep(proxy_store, cutoff, batch=1000))
    assert sum(deleted) == 2000
    assert await proxy_store.purge(cutoff, 1000) == 0


async def test_without_the_delete_feature_retention_is_off(
    proxy_store: ProxyStore, caplog: pytest.LogCaptureFixture
) -> None:
    proxy_store.features = frozenset({"if_rev"})  # what a proxy without `POST /delete` lists
    with trio.fail_after(WAIT):
        await run_retention(
            proxy_store,
            MeshMetrics(),
            retention=1.0,
            interval=0.01,
            clock=lambda: datetime.now(UTC),
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "retention is off: the state proxy does not offer POST /delete"
        " (ASYA_MESH_RETENTION needs mesh_trio's state proxy)"
    ]


@pytest.fixture(params=["memory", "sqlite", "proxy"])
async def retaining(
    request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: str
) -> MeshClient:
    """A mesh API that deletes terminal envelopes 0.3 s after their last update."""
    env = {"ASYA_MESH_RETENTION": "300ms", "ASYA_MESH_RETENTION_INTERVAL": "50ms"}
    if request.param == "proxy":
        path = os.path.join(short_dir, "proxy.sock")
        env["ASYA_STATEPROXY_SOCKET"] = await start_proxy(request, nursery, path)
    elif request.param == "sqlite":
        env["ASYA_MESH_STORE"] = "sqlite:" + os.path.join(short_dir, "mesh.db")
    return await start_mesh(nursery, **env)


async def test_the_server_sweeps_terminal_envelopes(retaining: MeshClient) -> None:
    ended = await retaining.create()
    live = await retaining.create()
    assert (await retaining.status(live, "running")).status == 204
    assert (await retaining.status(ended, "succeeded")).status == 204
    with trio.fail_after(WAIT):
        while (await retaining.ext("GET", ended)).status != 404:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert (await retaining.get(live))["status"] == "running"
    metrics = await http(retaining.int_port, "GET", "/metrics")
    assert b"asya_mesh_retention_deleted_total 1.0" in metrics.body


def test_retention_settings() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1d12h") == 36 * 3600
    assert make_config().retention is None
    assert make_config().retention_interval == 60.0
    assert make_config(ASYA_MESH_RETENTION="off").retention is None
    assert make_config(ASYA_MESH_RETENTION="0").retention is None
    assert make_config(ASYA_MESH_RETENTION="7d").retention == 7 * 86400
    with pytest.raises(ConfigError, match="ASYA_MESH_RETENTION"):
        make_config(ASYA_MESH_RETENTION="a week")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{}", "delete needs a limit"),
        (b'{"limit": 10001}', "delete needs a limit"),
        (b'{"limit": 5, "offset": 1}', "no offset"),
        (b'{"limit": 5, "count": true}', "no count"),
        (b'{"limit": "5"}', "limit must be"),
    ],
)
async def test_bad_deletes_are_refused(proxy_socket: str, body: bytes, why: str) -> None:
    async with open_proxy_store(proxy_socket) as store:
        reply = await store.pool.request("POST", "/delete", body=body)
    assert reply.status == 400
    assert why in bytes(reply.body).decode()


def test_the_sqlite_purge_uses_its_index(short_dir: str) -> None:
    path = os.path.join(short_dir, "mesh.db")
    SqliteStore.open(path).close()
    with sqlite3.connect(path) as db:
        plan = [row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {PURGE}", ("2026", 5))]
    assert any("USING INDEX envelopes_ended" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan
