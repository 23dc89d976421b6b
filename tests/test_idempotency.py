"""Idempotent create over real sockets: `Idempotency-Key` on `POST {prefix}/mesh/` with the
memory store and the state proxy (the `mesh` fixture), SQLite, two replicas on one proxy, and
the broker's answers (404 releases the key, 503 keeps it) through the real RabbitMQ."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import trio

from mesh_proto import REV_GUARD, Claim, claim_key
from mesh_trio._proxy_store import ProxyStore
from mesh_trio._store import MemoryStore, SqliteStore
from mesh_trio.stateproxy import serve_state_proxy
from mesh_trio.transports import MemoryQueues
from tests.amqp_helpers import RABBITMQ_URL, TcpProxy, open_admin, open_proxy, rabbit_env
from tests.harness import MeshClient, Reply, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners

QUEUE = "asya-default-worker"


async def create(mesh: MeshClient, key: str, body: Any = None, actor: str = "worker") -> Reply:
    return await mesh.ext(
        "POST",
        f"?actor={actor}",
        body if body is not None else {},
        headers={"Idempotency-Key": key},
    )


def pending(mesh: MeshClient, queue: str = QUEUE) -> int:
    dispatcher = mesh.bound.mesh.dispatcher
    assert isinstance(dispatcher, MemoryQueues)
    return dispatcher.pending(queue)


async def envelopes(mesh: MeshClient) -> list[dict[str, Any]]:
    reply = await mesh.ext("GET", "")
    assert reply.status == 200
    return list(reply.json()["messages"])


async def test_a_retry_returns_the_same_id_and_dispatches_once(mesh: MeshClient) -> None:
    first = await create(mesh, "order-1", {"payload": {"n": 1}})
    second = await create(mesh, "order-1", {"payload": {"n": 1}})
    assert first.status == second.status == 201
    assert first.json() == second.json()
    assert [e["id"] for e in await envelopes(mesh)] == [first.json()["id"]]
    assert pending(mesh) == 1


async def test_without_the_header_every_create_is_new(mesh: MeshClient) -> None:
    ids = {await mesh.create("worker", {"payload": 1}) for _ in range(2)}
    assert len(ids) == 2 and pending(mesh) == 2


async def test_concurrent_retries_get_one_id_and_one_dispatch(mesh: MeshClient) -> None:
    replies: list[Reply] = []

    async def attempt() -> None:
        replies.append(await create(mesh, "race", {"payload": "same"}))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(attempt)
    assert {r.status for r in replies} == {201}
    assert len({r.json()["id"] for r in replies}) == 1
    assert len(await envelopes(mesh)) == 1
    assert pending(mesh) == 1


async def test_the_same_key_with_another_request_is_422(mesh: MeshClient) -> None:
    first = await create(mesh, "k", {"payload": 1})
    assert first.status == 201
    for other in (
        await create(mesh, "k", {"payload": 2}),  # another body
        await create(mesh, "k", {"payload": 1}, actor="other"),  # another actor
        await mesh.ext(
            "POST", "?actor=worker", b'{"payload":1}', headers={"Idempotency-Key": "k"}
        ),  # the same JSON, other bytes: the body is compared exactly
    ):
        assert other.status == 422
        assert other.json() == {"error": "Idempotency-Key reused with a different request"}
    assert [e["id"] for e in await envelopes(mesh)] == [first.json()["id"]]
    assert pending(mesh) == 1 and pending(mesh, "asya-default-other") == 0


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "tab\there"], ids=repr)
async def test_a_bad_key_is_400_and_stores_nothing(mesh: MeshClient, key: str) -> None:
    reply = await mesh.ext("POST", "?actor=worker", {}, headers={"Idempotency-Key": key})
    assert reply.status == 400
    assert "Idempotency-Key" in reply.json()["error"]
    assert await envelopes(mesh) == [] and pending(mesh) == 0


async def test_every_visible_ascii_character_may_be_in_a_key(mesh: MeshClient) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F)) + "/../%2F"
    first, second = await create(mesh, key), await create(mesh, key)
    assert first.status == 201 and first.json() == second.json()
    assert (await create(mesh, "x" * 255)).status == 201
    assert pending(mesh) == 2


def skip_past_ttl(mesh: MeshClient, seconds: float = 2.0) -> None:
    """Move the mesh's clock (what claims are stamped and judged with) past a 1 s TTL."""
    clock = mesh.bound.mesh.clock
    mesh.bound.mesh.clock = lambda: clock() + timedelta(seconds=seconds)


async def test_a_key_may_be_reused_once_expired(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_IDEMPOTENCY_TTL="1s")
    first = await create(mesh, "k", {"payload": 1})
    assert (await create(mesh, "k", {"payload": 2})).status == 422  # not yet expired
    skip_past_ttl(mesh)
    second = await create(mesh, "k", {"payload": 2})
    assert first.status == second.status == 201
    assert first.json() != second.json()
    assert len(await envelopes(mesh)) == 2 and pending(mesh) == 2


async def test_sqlite_store(nursery: trio.Nursery, short_dir: str) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_STORE=f"sqlite:{short_dir}/mesh.db")
    replies = [await create(mesh, "k", {"payload": 1}) for _ in range(2)]
    assert replies[0].json() == replies[1].json()
    assert (await create(mesh, "k", {"payload": 2})).status == 422
    assert len(await envelopes(mesh)) == 1 and pending(mesh) == 1


async def test_sqlite_store_replaces_an_expired_claim(
    nursery: trio.Nursery, short_dir: str
) -> None:
    mesh = await start_mesh(
        nursery, ASYA_MESH_STORE=f"sqlite:{short_dir}/mesh.db", ASYA_MESH_IDEMPOTENCY_TTL="1s"
    )
    first = await create(mesh, "k")
    skip_past_ttl(mesh)
    second = await create(mesh, "k", {"payload": 2})
    assert second.status == 201 and first.json() != second.json()


async def test_two_replicas_on_one_state_proxy_agree(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    replicas = [await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path) for _ in range(2)]
    replies: list[Reply] = []

    async def attempt(mesh: MeshClient) -> None:
        replies.append(await create(mesh, "shared", {"payload": "x"}))

    async with trio.open_nursery() as racing:
        for i in range(10):
            racing.start_soon(attempt, replicas[i % 2])
    assert {r.status for r in replies} == {201}
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum(pending(m) for m in replicas) == 1
    assert len(await envelopes(replicas[0])) == 1


async def test_proxy_replaces_an_expired_claim(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path, ASYA_MESH_IDEMPOTENCY_TTL="1s")
    first = await create(mesh, "k")
    skip_past_ttl(mesh)
    second = await create(mesh, "k", {"payload": 2})  # replaces the expired claim
    skip_past_ttl(mesh, 4.0)
    third = await create(mesh, "k", {"payload": 3})  # replaces it again (its revision is 1)
    assert (await create(mesh, "k", {"payload": 3})).json() == third.json()
    assert [r.status for r in (second, third)] == [201, 201]
    assert len({r.json()["id"] for r in (first, second, third)}) == 3


# The broker's answers, through the real RabbitMQ.


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    async with open_admin() as admin:
        await admin.delete_queue(f"asya-{ns}-worker")


async def start_amqp(nursery: trio.Nursery, namespace: str, url: str = RABBITMQ_URL) -> MeshClient:
    return await start_mesh(nursery, **rabbit_env(url, namespace))


@pytest.mark.rabbitmq
async def test_actor_not_found_releases_the_key(nursery: trio.Nursery, namespace: str) -> None:
    mesh = await start_amqp(nursery, namespace)
    missing = await create(mesh, "k", {"payload": 1})
    assert missing.status == 404 and missing.json() == {"error": "actor not found"}
    async with open_admin() as admin:
        await admin.declare_queue(f"asya-{namespace}-worker")
    retried = await create(mesh, "k", {"payload": 1})
    assert retried.status == 201
    async with open_admin() as admin:
        (delivery,) = await admin.consume(f"asya-{namespace}-worker", 1)
    assert json.loads(delivery.body)["id"] == retried.json()["id"]
    assert (await create(mesh, "k", {"payload": 1})).json() == retried.json()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with open_proxy(5672) as running:
        yield running


@pytest.mark.rabbitmq
async def test_a_failed_dispatch_keeps_the_key(
    nursery: trio.Nursery, namespace: str, proxy: TcpProxy
) -> None:
    async with open_admin() as admin:
        await admin.declare_queue(f"asya-{namespace}-worker")
    mesh = await start_amqp(nursery, namespace, f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    proxy.cut()
    failed = await create(mesh, "k", {"payload": 1})
    assert failed.status == 503
    proxy.restore()
    retried = await create(mesh, "k", {"payload": 1})
    assert retried.status == 201
    envelope = (await mesh.ext("GET", retried.json()["id"])).json()
    assert envelope["status"] == "failed" and "dispatch to" in envelope["data"]["error"]
    assert len(await envelopes(mesh)) == 1


async def test_a_proxy_without_if_absent_refuses_keys_with_501(
    nursery: trio.Nursery, pg_url: str, short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)
    store = mesh.bound.mesh.store
    while not isinstance(store, ProxyStore):  # under the metrics (and tracing) wrappers
        store = store.inner if hasattr(store, "inner") else store.store  # type: ignore[attr-defined]
    store.features = frozenset({REV_GUARD})  # what the Go proxy would list: no if_absent
    for _ in range(2):
        reply = await create(mesh, "k")
        assert reply.status == 501 and "if_absent" in reply.json()["error"]
    assert await envelopes(mesh) == []
    warnings = [r for r in caplog.records if "Idempotency-Key" in r.getMessage()]
    assert len(warnings) == 1
    assert (await mesh.ext("POST", "?actor=worker", {})).status == 201  # without a key: as ever


# Expired claims do not pile up in the embedded stores: each new claim drops up to 8 of them.

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def claim_at(n: int, expires_at: datetime) -> Claim:
    return Claim(envelope_id=f"e{n}", fingerprint="f", expires_at=expires_at)


async def test_memory_store_drops_expired_claims() -> None:
    store = MemoryStore()
    for n in range(20):
        assert await store.claim(claim_key(str(n)), claim_at(n, T0), T0 - timedelta(1)) is None
    live = claim_at(99, T0 + timedelta(days=1))
    assert await store.claim(claim_key("a"), live, T0) is None
    assert len(store._claims) == 20 - 8 + 1
    for n in range(3):
        await store.claim(claim_key(f"b{n}"), live, T0)
    assert len(store._claims) == 4  # the last 12 expired ones went with the next two claims
    assert await store.claim(claim_key("a"), claim_at(1, T0), T0) == live


async def test_sqlite_store_drops_expired_claims(short_dir: str) -> None:
    store = SqliteStore.open(f"{short_dir}/claims.db")
    try:
        for n in range(20):
            await store.claim(claim_key(str(n)), claim_at(n, T0), T0 - timedelta(1))
        live = claim_at(99, T0 + timedelta(days=1))
        assert await store.claim(claim_key("a"), live, T0) is None

        def count() -> int:
            return int(store._db.execute("SELECT count(*) FROM claims").fetchone()[0])

        assert count() == 20 - 8 + 1
        assert await store.purge_claims(T0, 100) == 12
        assert count() == 1
        assert await store.claim(claim_key("a"), claim_at(1, T0), T0) == live
    finally:
        store.close()
