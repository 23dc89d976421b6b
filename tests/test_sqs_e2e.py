"""Create → SQS, end to end: the mesh API with `ASYA_QUEUE_TRANSPORT=sqs` against a local
SQS-compatible server (moto, on 127.0.0.1)."""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from mesh_trio.transports._sqs import open_sqs_dispatcher
from tests.harness import start_mesh
from tests.sqs_helpers import create_queue, moto_endpoint, receive_bodies


async def test_create_dispatches_to_the_actor_queue(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    namespace = f"t{uuid.uuid4().hex[:8]}"
    with moto_endpoint() as (endpoint, _stop):
        async with open_sqs_dispatcher("us-east-1", endpoint=endpoint) as admin:
            url = await create_queue(admin, f"asya-{namespace}-worker")
            mesh = await start_mesh(
                nursery,
                ASYA_QUEUE_TRANSPORT="sqs",
                ASYA_SQS_REGION="us-east-1",
                ASYA_SQS_ENDPOINT=endpoint,
                ASYA_NAMESPACE=namespace,
                ASYA_INTERNAL_URL="http://mesh-api.test:8081",
            )
            envelope_id = await mesh.create("worker", {"payload": {"q": 1}, "timeout": 60})
            (body,) = await receive_bodies(admin, url, 1)
            message = json.loads(body)
            assert message["id"] == envelope_id
            assert message["route"] == {"prev": [], "curr": "worker", "next": []}
            assert message["payload"] == {"q": 1}
            assert message["headers"]["x-asya-gateway-url"] == "http://mesh-api.test:8081"
            assert (
                message["status"]["deadline_at"]
                == (await mesh.get(envelope_id))["data"]["deadline_at"]
            )
            missing = await mesh.ext("POST", "?actor=nobody", {})
            assert missing.status == 404 and missing.json() == {"error": "actor not found"}
            listed = (await mesh.ext("GET", "")).json()
            assert [m["id"] for m in listed["messages"]] == [envelope_id]
