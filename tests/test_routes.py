"""Every route and error case of docs/contract.md over real sockets, with the store checked after
each client mistake (a 4xx changes nothing)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import trio

from tests.harness import MeshClient, http, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners

UNKNOWN = str(uuid.uuid4())


async def snapshot(mesh: MeshClient) -> Any:
    return (await mesh.ext("GET", "?limit=1000")).json()


async def test_create_returns_id_and_stores_pending(mesh: MeshClient) -> None:
    reply = await mesh.ext(
        "POST", "?actor=worker", {"payload": {"q": "hi"}, "headers": {"a": "b"}, "timeout": 3600.5}
    )  # a deadline far enough away that no stall of a loaded machine lets the backstop fail it
    assert reply.status == 201
    assert reply.headers["content-type"] == "application/json"
    envelope_id = reply.json()["id"]
    assert uuid.UUID(envelope_id).version == 4
    envelope = await mesh.get(envelope_id)
    assert envelope["id"] == envelope_id
    assert envelope["status"] == "pending"
    assert set(envelope) == {"id", "status", "created_at", "updated_at", "data"}
    data = envelope["data"]
    assert data["actor"] == "worker"
    assert data["payload"] == {"q": "hi"}
    assert data["headers"]["a"] == "b"
    assert data["headers"]["x-asya-gateway-url"] == f"http://127.0.0.1:{mesh.int_port}"
    assert data["deadline_at"].endswith("Z") and data["deadline_at"] > envelope["created_at"]


async def test_create_with_empty_body(mesh: MeshClient) -> None:
    reply = await http(mesh.ext_port, "POST", mesh.path("?actor=worker"), b"")
    assert reply.status == 201
    data = (await mesh.get(reply.json()["id"]))["data"]
    assert data["payload"] is None and "deadline_at" not in data


async def test_gateway_header_is_overwritten(mesh: MeshClient) -> None:
    envelope_id = await mesh.create(body={"headers": {"x-asya-gateway-url": "http://evil"}})
    headers = (await mesh.get(envelope_id))["data"]["headers"]
    assert headers["x-asya-gateway-url"] == f"http://127.0.0.1:{mesh.int_port}"


@pytest.mark.parametrize(
    ("query", "body", "message"),
    [
        ("", b"{}", "missing actor"),
        ("?actor=", b"{}", "missing actor"),
        ("?actor=a/b", b"{}", "invalid actor"),
        ("?actor=w&namespace=a%20b", b"{}", "invalid namespace"),
        ("?actor=w", b"{nope", "invalid JSON"),
        ("?actor=w", b"[1]", "must be a JSON object"),
        ("?actor=w", b'"x"', "must be a JSON object"),
        ("?actor=w", b'{"headers": []}', "headers"),
        ("?actor=w", b'{"timeout": -1}', "timeout"),
        ("?actor=w", b'{"timeout": "5"}', "timeout"),
        ("?actor=w", b'{"timeout": true}', "timeout"),
        ("?actor=w", b'{"timeout": NaN}', "invalid JSON"),
        ("?actor=w", b'{"route": null}', "route"),
        ("?actor=w", b'{"route_next": []}', "route_next"),
        ("?actor=w", b'{"next": ["a"]}', "next"),
    ],
)
async def test_create_rejects_bad_input(
    mesh: MeshClient, query: str, body: bytes, message: str
) -> None:
    before = await snapshot(mesh)
    reply = await http(mesh.ext_port, "POST", mesh.path(query), body)
    assert reply.status == 400
    assert reply.headers["content-type"] == "application/json"
    assert message in reply.json()["error"]
    assert await snapshot(mesh) == before


async def test_body_limit_content_length_and_chunked(mesh: MeshClient) -> None:
    big = b'{"payload": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    before = await snapshot(mesh)
    for chunked in (False, True):
        reply = await http(mesh.ext_port, "POST", mesh.path("?actor=w"), big, chunked=chunked)
        assert reply.status == 413, chunked
        assert "error" in reply.json()
    assert await snapshot(mesh) == before
    just_under = b'{"payload": "' + b"x" * (10 * 1024 * 1024 - 20) + b'"}'
    assert len(just_under) < 10 * 1024 * 1024
    reply = await http(mesh.ext_port, "POST", mesh.path("?actor=w"), just_under, chunked=True)
    assert reply.status == 201


async def test_internal_body_limit(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    big = b'{"type": "fly", "data": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    for chunked in (False, True):
        reply = await http(
            mesh.int_port, "POST", mesh.path(f"{envelope_id}/events"), big, chunked=chunked
        )
        assert reply.status == 413


async def test_get_unknown_and_malformed_ids(mesh: MeshClient) -> None:
    for rest in (UNKNOWN, "not-a-uuid", UNKNOWN.upper()):
        reply = await mesh.ext("GET", rest)
        assert reply.status == 404
        assert reply.json() == {"error": "envelope not found"}


async def test_unknown_path_and_wrong_method(mesh: MeshClient) -> None:
    reply = await http(mesh.ext_port, "GET", "/nowhere")
    assert reply.status == 404 and reply.json() == {"error": "not found"}
    reply = await mesh.ext("PUT", "")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, POST"
    reply = await mesh.ext("POST", UNKNOWN)
    assert reply.status == 405
    assert reply.headers["allow"] == "DELETE, GET"
    reply = await mesh.int("GET", f"{UNKNOWN}/events")
    assert reply.status == 405 and reply.headers["allow"] == "POST"


async def test_internal_port_serves_only_its_routes(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    assert (await mesh.int("GET", "")).status == 404
    assert (await mesh.int("POST", "?actor=w", {})).status == 404
    assert (await mesh.int("DELETE", envelope_id)).status == 405
    heartbeat = await mesh.int("GET", envelope_id)
    assert heartbeat.status == 200 and heartbeat.json() == await mesh.get(envelope_id)
    assert (await mesh.ext("POST", f"{envelope_id}/events", {"type": "fly"})).status == 405


async def test_health_and_ready_on_both_ports(mesh: MeshClient) -> None:
    for port in (mesh.ext_port, mesh.int_port):
        for path in ("/health", "/ready"):
            reply = await http(port, "GET", path)
            assert reply.status == 200, (port, path)


async def test_list_sorted_paged_and_filtered(mesh: MeshClient) -> None:
    ids = [await mesh.create() for _ in range(5)]
    await mesh.status(ids[1], "running")
    await mesh.status(ids[2], "succeeded")
    page = (await mesh.ext("GET", "?limit=2&offset=1")).json()
    assert page["total"] == 5
    assert [m["id"] for m in page["messages"]] == [ids[3], ids[2]]
    everything = (await mesh.ext("GET", "")).json()
    assert [m["id"] for m in everything["messages"]] == ids[::-1]
    running = (await mesh.ext("GET", "?status=running")).json()
    assert running["total"] == 1 and running["messages"][0]["id"] == ids[1]
    assert (await mesh.ext("GET", "?status=canceled")).json() == {"messages": [], "total": 0}
    beyond = (await mesh.ext("GET", "?offset=10")).json()
    assert beyond == {"messages": [], "total": 5}


@pytest.mark.parametrize(
    "query",
    [
        "?status=Running",
        "?status=done",
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?offset=-1",
        "?offset=1.5",
        "?limit=",
    ],
)
async def test_list_rejects_bad_query(mesh: MeshClient, query: str) -> None:
    reply = await mesh.ext("GET", query)
    assert reply.status == 400
    assert "error" in reply.json()


async def test_cancel(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    assert (await mesh.ext("DELETE", envelope_id)).status == 204
    assert (await mesh.get(envelope_id))["status"] == "canceled"
    assert (await mesh.ext("DELETE", envelope_id)).status == 204
    done = await mesh.create()
    await mesh.status(done, "succeeded", {"result": 1})
    assert (await mesh.ext("DELETE", done)).status == 204
    assert (await mesh.get(done))["status"] == "succeeded"
    assert (await mesh.ext("DELETE", UNKNOWN)).status == 404


async def test_status_events_follow_the_rules(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    assert (await mesh.status(envelope_id, "received", {"prev": [], "next": ["b"]})).status == 204
    envelope = await mesh.get(envelope_id)
    assert envelope["status"] == "running"
    assert envelope["data"]["progress_percent"] == 50
    assert (await mesh.status(envelope_id, "running", {"step": 2})).status == 204
    assert (await mesh.get(envelope_id))["data"]["step"] == 2
    assert (await mesh.status(envelope_id, "pending", {"stale": True})).status == 204
    envelope = await mesh.get(envelope_id)
    assert envelope["status"] == "running" and "stale" not in envelope["data"]
    await mesh.status(envelope_id, "succeeded", {"result": "ok", "progress": 1.0})
    await mesh.status(envelope_id, "failed", {"error": "late"})
    envelope = await mesh.get(envelope_id)
    assert envelope["status"] == "succeeded"
    assert envelope["data"]["progress_percent"] == 100
    assert "error" not in envelope["data"]


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b'{"type": "other"}',
        b'{"type": "status", "status": "done"}',
        b'{"type": "status", "status": "Running"}',
        b'{"type": "status", "status": "running", "data": [1]}',
        b'{"type": "status"}',
    ],
)
async def test_bad_events_change_nothing(mesh: MeshClient, body: bytes) -> None:
    envelope_id = await mesh.create()
    before = await mesh.get(envelope_id)
    reply = await http(mesh.int_port, "POST", mesh.path(f"{envelope_id}/events"), body)
    assert reply.status == 400
    assert "error" in reply.json()
    assert await mesh.get(envelope_id) == before


async def test_events_for_unknown_ids(mesh: MeshClient) -> None:
    assert (await mesh.status(UNKNOWN, "running")).status == 404
    assert (await mesh.fly(UNKNOWN, {"token": "x"})).status == 404
    reply = await http(mesh.int_port, "POST", mesh.path("junk/events"), {"type": "fly"})
    assert reply.status == 404


async def test_fly_any_json_and_status_without_data(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    for data in ({"t": 1}, [1, 2], "text", 3, None):
        assert (await mesh.fly(envelope_id, data)).status == 204
    assert (await mesh.status(envelope_id, "running")).status == 204
    assert (await mesh.get(envelope_id))["status"] == "running"


async def test_empty_prefix(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_API_PREFIX="")
    assert mesh.prefix == ""
    reply = await http(mesh.ext_port, "POST", "/mesh/?actor=w", b"{}")
    assert reply.status == 201
    envelope_id = reply.json()["id"]
    assert (await http(mesh.ext_port, "GET", f"/mesh/{envelope_id}")).status == 200
    assert (
        await http(
            mesh.int_port,
            "POST",
            f"/mesh/{envelope_id}/events",
            {"type": "status", "status": "running"},
        )
    ).status == 204
    assert (await http(mesh.ext_port, "GET", f"/api/v1/mesh/{envelope_id}")).status == 404


async def test_cors(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_CORS_ORIGINS="http://dash.example")
    origin = {"Origin": "http://dash.example"}
    preflight = await mesh.ext(
        "OPTIONS",
        "?actor=w",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-origin"] == "http://dash.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    created = await mesh.ext("POST", "?actor=w", {}, headers=origin)
    assert created.headers["access-control-allow-origin"] == "http://dash.example"
    other = await mesh.ext("POST", "?actor=w", {}, headers={"Origin": "http://evil"})
    assert "access-control-allow-origin" not in other.headers
    stream = await mesh.sse(created.json()["id"])
    await stream.aclose()


async def test_error_bodies_are_json(mesh: MeshClient) -> None:
    reply = await mesh.ext("GET", "?limit=abc")
    assert json.loads(reply.body) == {"error": "limit must be an integer"}


async def test_tracing_stamps_traceparent(nursery: trio.Nursery) -> None:
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    plain = await start_mesh(nursery)
    envelope_id = (await plain.ext("POST", "?actor=w", {}, headers={"traceparent": caller})).json()
    assert "traceparent" not in (await plain.get(envelope_id["id"]))["data"]["headers"]
    traced = await start_mesh(nursery, ASYA_MESH_TRACING="1")
    joined = (await traced.ext("POST", "?actor=w", {}, headers={"traceparent": caller})).json()
    header = (await traced.get(joined["id"]))["data"]["headers"]["traceparent"]
    assert header.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and header.endswith("-01")
    assert header != caller
    fresh = await traced.create()
    started = (await traced.get(fresh))["data"]["headers"]["traceparent"]
    assert started.startswith("00-") and "4bf92f" not in started
