"""Deeply nested bodies over real sockets, with every store: a body nested exactly `MAX_DEPTH`
levels is created, read, listed, streamed and cancelled; one level more is a 400 and leaves
nothing stored or published. The deepest JSON then handled is the state proxy's list reply,
two levels deeper than the body.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any

import pytest
import trio

from mesh_proto import MAX_DEPTH
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import MeshClient, start_mesh


@pytest.fixture(params=["memory", "sqlite", "proxy"])
async def any_mesh(
    request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: str
) -> MeshClient:
    if request.param == "proxy":
        path = os.path.join(short_dir, "proxy.sock")
        pg_url = request.getfixturevalue("pg_url")
        await nursery.start(partial(serve_state_proxy, path, pg_url))
        return await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)
    if request.param == "sqlite":
        return await start_mesh(nursery, ASYA_MESH_STORE=f"sqlite:{short_dir}/mesh.db")
    return await start_mesh(nursery)


def nested(levels: int) -> Any:
    """`levels` levels of alternating objects and arrays around a string with brackets."""
    value: Any = "[{not nesting}]"
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


def create_body(levels: int) -> dict[str, Any]:
    return {"payload": nested(levels - 1), "timeout": 60}  # the body object is one level


def status_body(levels: int) -> dict[str, Any]:
    return {"type": "status", "status": "running", "data": {"deep": nested(levels - 2)}}


def fly_body(levels: int) -> dict[str, Any]:
    return {"type": "fly", "data": nested(levels - 1)}


async def total(mesh: MeshClient) -> int:
    reply = await mesh.ext("GET", "?limit=1000")
    assert reply.status == 200, reply
    return int(reply.json()["total"])


async def test_at_the_limit_everything_works(any_mesh: MeshClient) -> None:
    mesh = any_mesh
    reply = await mesh.ext("POST", "?actor=deep", create_body(MAX_DEPTH))
    assert reply.status == 201, reply
    envelope_id = reply.json()["id"]

    envelope = await mesh.get(envelope_id)
    assert envelope["data"]["payload"] == nested(MAX_DEPTH - 1)
    listed = (await mesh.ext("GET", "?limit=1000")).json()
    assert [m["data"]["payload"] for m in listed["messages"]] == [nested(MAX_DEPTH - 1)]

    stream = await mesh.sse(envelope_id)
    assert stream.status == 200
    events = await stream.wait_for(1)
    assert json.loads(events[0].data) == envelope

    reply = await mesh.int("POST", f"{envelope_id}/events", status_body(MAX_DEPTH))
    assert reply.status == 204, reply
    reply = await mesh.int("POST", f"{envelope_id}/events", fly_body(MAX_DEPTH))
    assert reply.status == 204, reply
    reply = await mesh.ext("DELETE", envelope_id)
    assert reply.status == 204, reply

    events = await stream.wait_end()
    assert [e.event for e in events] == ["status", "status", "fly", "status"]
    assert json.loads(events[1].data) == {"status": "running", "deep": nested(MAX_DEPTH - 2)}
    assert json.loads(events[2].data) == nested(MAX_DEPTH - 1)
    assert json.loads(events[3].data)["status"] == "canceled"

    stored = await mesh.get(envelope_id)
    assert stored["status"] == "canceled"
    assert stored["data"]["deep"] == nested(MAX_DEPTH - 2)
    assert stored["data"]["payload"] == nested(MAX_DEPTH - 1)
    listed = (await mesh.ext("GET", "?status=canceled")).json()
    assert [m["id"] for m in listed["messages"]] == [envelope_id]


async def test_one_over_the_limit_is_refused_and_nothing_is_stored(any_mesh: MeshClient) -> None:
    mesh = any_mesh
    reply = await mesh.ext("POST", "?actor=deep", create_body(MAX_DEPTH + 1))
    assert (reply.status, reply.json()) == (400, {"error": "body is nested deeper than 128 levels"})
    assert await total(mesh) == 0

    envelope_id = await mesh.create("deep")
    before = await mesh.get(envelope_id)
    stream = await mesh.sse(envelope_id)
    await stream.wait_for(1)
    for event in (status_body(MAX_DEPTH + 1), fly_body(MAX_DEPTH + 1)):
        reply = await mesh.int("POST", f"{envelope_id}/events", event)
        expected = {"error": "event is nested deeper than 128 levels"}
        assert (reply.status, reply.json()) == (400, expected)
    assert await mesh.get(envelope_id) == before
    assert await total(mesh) == 1

    # Nothing was published: the next frame the stream sees is the one posted after.
    assert (await mesh.fly(envelope_id, {"marker": 1})).status == 204
    assert (await mesh.ext("DELETE", envelope_id)).status == 204
    events = await stream.wait_end()
    assert [(e.event, json.loads(e.data).get("status")) for e in events[1:]] == [
        ("fly", None),
        ("status", "canceled"),
    ]
    assert json.loads(events[1].data) == {"marker": 1}
