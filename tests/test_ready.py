"""`/ready` reflects the queue transport as well as the store: a mesh API whose broker refuses
its login, or whose SQS endpoint is gone, answers 503 naming why, on both ports, while `/health`
stays 200; it answers 200 again once the transport is back."""

from __future__ import annotations

import pytest
import trio

from tests.amqp_helpers import RABBITMQ_URL, open_proxy, rabbit_env
from tests.harness import MeshClient, http, start_mesh
from tests.sqs_helpers import moto_endpoint


async def ready(mesh: MeshClient) -> list[tuple[int, str]]:
    replies = [await http(port, "GET", "/ready") for port in (mesh.ext_port, mesh.int_port)]
    return [(r.status, r.json().get("error", "")) for r in replies]


async def wait_ready(mesh: MeshClient, status: int) -> list[tuple[int, str]]:
    """Poll `/ready` until both ports answer `status` (bounded)."""
    with trio.fail_after(15):
        while True:
            answers = await ready(mesh)
            if all(code == status for code, _ in answers):
                return answers
            await trio.sleep(0.05)


@pytest.mark.rabbitmq
async def test_ready_is_503_while_the_broker_refuses_the_login(nursery: trio.Nursery) -> None:
    wrong = RABBITMQ_URL.replace("guest:guest@", "guest:wrong-password@")
    assert wrong != RABBITMQ_URL
    mesh = await start_mesh(nursery, **rabbit_env(wrong))
    for status, error in await wait_ready(mesh, 503):
        assert status == 503 and "queue unavailable: RabbitMQ" in error
    assert (await http(mesh.ext_port, "GET", "/health")).status == 200


@pytest.mark.rabbitmq
async def test_ready_follows_the_broker_connection(nursery: trio.Nursery) -> None:
    async with open_proxy(5672) as proxy:
        host, port = "127.0.0.1", proxy.port
        mesh = await start_mesh(
            nursery, **rabbit_env(RABBITMQ_URL.replace("127.0.0.1:5672", f"{host}:{port}"))
        )
        await wait_ready(mesh, 200)
        proxy.cut()
        await wait_ready(mesh, 503)
        proxy.restore()
        await wait_ready(mesh, 200)


async def test_ready_is_503_once_the_sqs_endpoint_is_gone(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with moto_endpoint() as (endpoint, stop):
        mesh = await start_mesh(
            nursery,
            ASYA_QUEUE_TRANSPORT="sqs",
            ASYA_SQS_REGION="us-east-1",
            ASYA_SQS_ENDPOINT=endpoint,
            ASYA_INTERNAL_URL="http://mesh-api.test:8081",
        )
        assert await ready(mesh) == [(200, ""), (200, "")]
        stop()
        for _, error in await wait_ready(mesh, 503):
            assert error.startswith("queue unavailable: SQS ListQueues")
