"""Create → RabbitMQ, end to end: the mesh API with `ASYA_QUEUE_TRANSPORT=rabbitmq` against the
real broker on 127.0.0.1:5672 (through a cuttable TCP proxy for the fault tests)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from tests.amqp_helpers import RABBITMQ_URL, TcpProxy, open_admin, open_proxy, rabbit_env
from tests.harness import MeshClient, start_mesh

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A namespace of this test's own, with the queue of actor `worker` declared in it."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    async with open_admin() as admin:
        await admin.declare_queue(f"asya-{ns}-worker")
    yield ns
    async with open_admin() as admin:
        await admin.delete_queue(f"asya-{ns}-worker")


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with open_proxy(5672) as running:
        yield running


async def start(nursery: trio.Nursery, namespace: str, url: str = RABBITMQ_URL) -> MeshClient:
    return await start_mesh(nursery, **rabbit_env(url, namespace))


async def test_create_puts_the_wire_message_on_the_queue(
    nursery: trio.Nursery, namespace: str
) -> None:
    mesh = await start(nursery, namespace)
    envelope_id = await mesh.create(
        "worker", {"payload": {"q": 1}, "headers": {"h": "v"}, "timeout": 30}
    )
    envelope = await mesh.get(envelope_id)
    async with open_admin() as admin:
        (delivery,) = await admin.consume(f"asya-{namespace}-worker", 1)
    assert delivery.properties.delivery_mode == 2
    assert delivery.properties.content_type == "application/json"
    message = json.loads(delivery.body)
    assert set(message) == {"id", "route", "headers", "payload", "status"}
    assert message["id"] == envelope_id
    assert message["route"] == {"prev": [], "curr": "worker", "next": []}
    assert message["payload"] == {"q": 1}
    assert message["headers"] == {"h": "v", "x-asya-gateway-url": "http://mesh-api.test:8081"}
    status = message["status"]
    assert status["phase"] == "pending" and status["actor"] == "worker"
    assert (status["attempt"], status["max_attempts"]) == (1, 1)
    assert status["deadline_at"] == envelope["data"]["deadline_at"]
    assert status["created_at"].endswith("Z") and status["updated_at"].endswith("Z")


async def test_missing_queue_is_404_and_leaves_no_record(
    nursery: trio.Nursery, namespace: str
) -> None:
    mesh = await start(nursery, namespace)
    reply = await mesh.ext("POST", "?actor=nobody", {})
    assert reply.status == 404 and reply.json() == {"error": "actor not found"}
    other_ns = await mesh.ext("POST", "?actor=worker&namespace=elsewhere", {})
    assert other_ns.status == 404
    assert (await mesh.ext("GET", "")).json() == {"messages": [], "total": 0}


async def test_broker_lost_gives_503_and_failed_record_then_recovers(
    nursery: trio.Nursery, namespace: str, proxy: TcpProxy
) -> None:
    mesh = await start(nursery, namespace, f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    assert (await mesh.ext("POST", "?actor=worker", {})).status == 201
    proxy.cut()
    reply = await mesh.ext("POST", "?actor=worker", {})
    assert reply.status == 503 and "queue unavailable" in reply.json()["error"]
    failed = (await mesh.ext("GET", "?status=failed")).json()
    assert failed["total"] == 1
    assert "dispatch to" in failed["messages"][0]["data"]["error"]
    proxy.restore()
    with trio.fail_after(15):  # the transport reconnects with backoff by itself
        await mesh.bound.mesh.dispatcher.wait_connected()  # type: ignore[attr-defined]
    assert (await mesh.ext("POST", "?actor=worker", {})).status == 201
    async with open_admin() as admin:
        bodies = [json.loads(d.body)["id"] for d in await admin.drain(f"asya-{namespace}-worker")]
    listed = (await mesh.ext("GET", "?limit=1000")).json()["messages"]
    dispatched = {m["id"] for m in listed if m["status"] == "pending"}
    assert set(bodies) == dispatched
    assert len(bodies) == len(set(bodies))


async def test_thousand_concurrent_creates_thousand_messages(
    nursery: trio.Nursery, namespace: str
) -> None:
    mesh = await start(nursery, namespace)
    ids: list[str] = []

    async def create() -> None:
        ids.append(await mesh.create("worker"))

    limiter = trio.CapacityLimiter(100)

    async def bounded() -> None:
        async with limiter:
            await create()

    async with trio.open_nursery() as inner:
        for _ in range(1000):
            inner.start_soon(bounded)
    async with open_admin() as admin:
        messages = await admin.consume(f"asya-{namespace}-worker", 1000)
        extra = await admin.get(f"asya-{namespace}-worker")
    received = [json.loads(m.body)["id"] for m in messages]
    assert extra is None
    assert len(received) == 1000 and set(received) == set(ids)
