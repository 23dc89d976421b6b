"""The legacy gateway routes over real sockets (`ASYA_MESH_COMPAT=1`, docs/compat.md).

Every legacy route, legacy and new clients mixed on one envelope, bad bodies (400 and nothing
stored), the FLY limit, the deprecation headers, the overlap rule with `ASYA_MESH_API_PREFIX=""`,
and that every non-legacy request is answered exactly as without compat. Waits are on
conditions, each bounded (`tests.harness.WAIT`).
"""

from __future__ import annotations

import json
import os
import uuid
from functools import partial
from typing import Any

import pytest
import trio

from mesh_compat import FLY_LIMIT, snapshot_frame
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import WAIT, MeshClient, Reply, SseClient, http, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners

COMPAT = {"ASYA_MESH_COMPAT": "1"}


@pytest.fixture(params=["memory", "proxy"])
async def compat(
    request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: str
) -> MeshClient:
    """Compat on, once with the embedded store and once through the state proxy."""
    if request.param == "proxy":
        socket = os.path.join(short_dir, "proxy.sock")
        await nursery.start(partial(serve_state_proxy, socket, request.getfixturevalue("pg_url")))
        return await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=socket, **COMPAT)
    return await start_mesh(nursery, **COMPAT)


@pytest.fixture
async def bare(nursery: trio.Nursery) -> MeshClient:
    """Compat on and no prefix: the new routes live at `/mesh/...` too."""
    return await start_mesh(nursery, ASYA_MESH_API_PREFIX="", **COMPAT)


async def sidecar(mesh: MeshClient, envelope_id: str, route: str, body: Any) -> Reply:
    """A legacy sidecar request on the internal port (bare `/mesh` path)."""
    return await http(mesh.int_port, "POST", f"/mesh/{envelope_id}/{route}", body)


async def client(mesh: MeshClient, method: str, path: str) -> Reply:
    """A legacy client request on the external port (bare `/mesh` path)."""
    return await http(mesh.ext_port, method, path)


async def legacy_sse(mesh: MeshClient, envelope_id: str) -> SseClient:
    return await mesh.sse(envelope_id, path=f"/mesh/{envelope_id}/stream")


def progress(state: str, prev: list[str], curr: str, nxt: list[str], **extra: Any) -> Any:
    return {"prev": prev, "curr": curr, "next": nxt, "status": state, **extra}


def assert_deprecated(reply: Reply | SseClient, successor: str) -> None:
    assert reply.headers["deprecation"] == "true"
    assert reply.headers["link"] == f'<{successor}>; rel="successor-version"'


def data(events: list[Any]) -> list[Any]:
    return [json.loads(e.data) for e in events]


# --- sidecar routes ---------------------------------------------------------------------------


async def test_progress(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    steps = [
        (progress("received", [], "a", ["b"]), 5.0),
        (progress("processing", [], "a", ["b"], message="thinking"), 25.0),
        (progress("completed", [], "a", ["b"]), 50.0),
        (progress("received", [], "a", ["b"]), 50.0),  # a late report never lowers it
        (progress("received", ["a"], "b", []), 55.0),
    ]
    for body, percent in steps:
        reply = await sidecar(compat, envelope_id, "progress", body)
        assert (reply.status, reply.json()) == (200, {"status": "ok", "progress_percent": percent})
        assert reply.headers["content-type"] == "application/json"
        assert_deprecated(reply, compat.path(f"{envelope_id}/events"))
    envelope = await compat.get(envelope_id)
    assert envelope["status"] == "running"
    assert envelope["data"] == {
        "actor": "a",
        "payload": None,
        "headers": envelope["data"]["headers"],
        "prev": ["a"],
        "curr": "b",
        "next": [],
        "task_state": "received",
        "progress_percent": 55.0,
        "message": "thinking",
    }


async def test_pause(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    meta = {"reason": "needs approval", "approver": "ops"}
    reply = await sidecar(
        compat, envelope_id, "progress", progress("processing", [], "a", [], pause_metadata=meta)
    )
    assert reply.json() == {"status": "ok", "progress_percent": 50.0}
    paused = await compat.get(envelope_id)
    assert paused["status"] == "paused"
    assert paused["data"]["reason"] == "needs approval"
    assert paused["data"]["approver"] == "ops"
    # `running` ranks below `paused`: a later report is stale, as for a new sidecar.
    reply = await sidecar(compat, envelope_id, "progress", progress("completed", [], "a", []))
    assert reply.json() == {"status": "ok", "progress_percent": 50.0}
    assert await compat.get(envelope_id) == paused


async def test_final(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    await sidecar(compat, envelope_id, "progress", progress("processing", [], "a", []))
    body = {"id": envelope_id, "status": "succeeded", "result": {"answer": 42}, "trace": "t1"}
    reply = await sidecar(compat, envelope_id, "final", body)
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert_deprecated(reply, compat.path(f"{envelope_id}/events"))
    done = await compat.get(envelope_id)
    assert done["status"] == "succeeded"
    assert done["data"]["result"] == {"answer": 42}
    assert done["data"]["trace"] == "t1"
    assert done["data"]["progress_percent"] == 100
    # Terminal never changes: a second final is answered ok and changes nothing.
    reply = await sidecar(compat, envelope_id, "final", {"status": "failed", "error": "late"})
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert await compat.get(envelope_id) == done


async def test_final_failed(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    body = {"status": "failed", "error": "boom", "error_details": {"type": "ValueError"}}
    assert (await sidecar(compat, envelope_id, "final", body)).status == 200
    failed = await compat.get(envelope_id)
    assert failed["status"] == "failed"
    assert failed["data"]["error"] == "boom"
    assert failed["data"]["error_details"] == {"type": "ValueError"}


async def test_bad_bodies_store_and_publish_nothing(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    await sidecar(compat, envelope_id, "progress", progress("received", [], "a", ["b"]))
    before = await compat.get(envelope_id)
    watcher = await compat.sse(envelope_id)
    await watcher.wait_for(1)
    bad = [
        ("progress", b"{not json"),
        ("progress", b"[]"),
        ("progress", {"status": "running"}),
        ("progress", {"status": "completed", "prev": "a"}),
        ("progress", {"status": "completed", "pause_metadata": "soon"}),
        ("progress", {"status": "completed", "id": str(uuid.uuid4())}),
        ("final", {"status": "running"}),
        ("final", {"status": "canceled"}),
        ("final", {"result": 1}),
        ("final", {"status": "succeeded", "id": "someone-else"}),
        ("fly", b"{"),
        ("fly", b""),
    ]
    for route, body in bad:
        reply = await sidecar(compat, envelope_id, route, body)
        assert reply.status == 400, (route, body, reply)
        assert set(reply.json()) == {"error"}
        assert_deprecated(reply, compat.path(f"{envelope_id}/events"))
    assert await compat.get(envelope_id) == before
    # Nothing was published either: the next frame the watcher sees is this marker.
    assert (await sidecar(compat, envelope_id, "fly", {"marker": 1})).status == 200
    events = await watcher.wait_for(2)
    assert [(e.event, e.data) for e in events[1:]] == [("fly", '{"marker":1}')]
    await watcher.aclose()


async def test_fly(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    new, old = await compat.sse(envelope_id), await legacy_sse(compat, envelope_id)
    await new.wait_for(1)
    await old.wait_for(1)
    reply = await sidecar(compat, envelope_id, "fly", {"token": "he"})
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert_deprecated(reply, compat.path(f"{envelope_id}/events"))
    at_limit = b'"' + b"x" * (FLY_LIMIT - 2) + b'"'
    assert (await sidecar(compat, envelope_id, "fly", at_limit)).status == 200
    await new.wait_for(3)
    await old.wait_for(3)
    assert [(e.event, e.data) for e in new.events[1:]] == [
        ("fly", '{"token":"he"}'),
        ("fly", at_limit.decode()),
    ]
    assert [(e.event, e.data) for e in old.events[1:]] == [
        ("partial", '{"token":"he"}'),
        ("partial", at_limit.decode()),
    ]
    await new.aclose()
    await old.aclose()


async def test_fly_too_large(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    over = b'"' + b"x" * (FLY_LIMIT - 1) + b'"'
    for chunked in (False, True):
        reply = await http(
            compat.int_port, "POST", f"/mesh/{envelope_id}/fly", over, chunked=chunked
        )
        assert reply.status == 413
        assert reply.json() == {"error": f"body larger than {FLY_LIMIT} bytes"}
        assert_deprecated(reply, compat.path(f"{envelope_id}/events"))


async def test_unknown_envelope(compat: MeshClient) -> None:
    unknown = str(uuid.uuid4())
    for route, body in [
        ("progress", progress("received", [], "a", [])),
        ("final", {"status": "succeeded"}),
        ("fly", {"token": "x"}),
    ]:
        reply = await sidecar(compat, unknown, route, body)
        assert (reply.status, reply.json()) == (404, {"error": "envelope not found"})
        assert_deprecated(reply, compat.path(f"{unknown}/events"))
    for path, successor in [
        (f"/mesh/{unknown}/stream", f"{unknown}/events"),
        (f"/mesh/{unknown}/active", unknown),
        (f"/mesh/{unknown}", unknown),
    ]:
        reply = await client(compat, "GET", path)
        assert (reply.status, reply.json()) == (404, {"error": "envelope not found"})
        assert_deprecated(reply, compat.path(successor))


async def test_ids_that_are_not_envelope_ids(compat: MeshClient) -> None:
    # Not a canonical UUID: not a legacy path at all, so the new API's plain 404 answers.
    envelope_id = await compat.create("a")
    for port, method, path in [
        (compat.int_port, "POST", "/mesh/task-1/progress"),
        (compat.int_port, "POST", f"/mesh/{envelope_id.upper()}/final"),
        (compat.ext_port, "GET", "/mesh/task-1/stream"),
        (compat.ext_port, "GET", f"/mesh/{envelope_id.upper()}/active"),
        (compat.ext_port, "GET", "/mesh/task-1"),
    ]:
        reply = await http(
            port, method, path, {"status": "succeeded"} if method == "POST" else None
        )
        assert (reply.status, reply.json()) == (404, {"error": "not found"}), path
        assert "deprecation" not in reply.headers


# --- client routes ----------------------------------------------------------------------------


async def test_active(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    reply = await client(compat, "GET", f"/mesh/{envelope_id}/active")
    assert (reply.status, reply.json()) == (200, {"active": True})
    assert_deprecated(reply, compat.path(envelope_id))
    head = await client(compat, "HEAD", f"/mesh/{envelope_id}/active")
    assert (head.status, head.body) == (200, b"")
    assert (await compat.ext("DELETE", envelope_id)).status == 204
    reply = await client(compat, "GET", f"/mesh/{envelope_id}/active")
    assert (reply.status, reply.json()) == (410, {"active": False})


async def test_task_json(compat: MeshClient) -> None:
    envelope_id = await compat.create("a", {"payload": {"q": "hi"}})
    await sidecar(compat, envelope_id, "progress", progress("processing", [], "a", ["b"]))
    reply = await client(compat, "GET", f"/mesh/{envelope_id}")
    assert reply.status == 200
    assert_deprecated(reply, compat.path(envelope_id))
    envelope = await compat.get(envelope_id)
    assert reply.json() == {
        "id": envelope_id,
        "status": "running",
        "route": {"prev": [], "curr": "a", "next": ["b"]},
        "payload": {"q": "hi"},
        "progress_percent": 25.0,
        "current_actor_name": "a",
        "created_at": envelope["created_at"],
        "updated_at": envelope["updated_at"],
    }


async def test_stream_of_a_finished_envelope(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    await sidecar(compat, envelope_id, "final", {"status": "succeeded", "result": [1]})
    stream = await legacy_sse(compat, envelope_id)
    await stream.wait_end()
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert_deprecated(stream, compat.path(f"{envelope_id}/events"))
    assert stream.raw == snapshot_frame(await compat.bound.mesh.get(envelope_id))


async def test_stream_keepalive(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_SSE_KEEPALIVE="0.05", **COMPAT)
    envelope_id = await mesh.create("a")
    stream = await legacy_sse(mesh, envelope_id)
    await stream.wait_raw(b"\n\n: keepalive\n\n")
    assert b":keepalive" not in stream.raw  # the new dialect's comment stays on the new stream
    await stream.aclose()


async def test_stream_unsubscribes_when_the_client_leaves(compat: MeshClient) -> None:
    hub = compat.bound.mesh.broadcaster
    envelope_id = await compat.create("a")
    stream = await legacy_sse(compat, envelope_id)
    await stream.wait_for(1)
    assert hub.subscribers(envelope_id) == 1
    await stream.aclose()
    with trio.fail_after(WAIT):
        while hub.subscribers(envelope_id):
            await sidecar(compat, envelope_id, "fly", "ping")  # a write notices the closed socket
            await trio.sleep(0.01)
    assert hub.statistics().subscribers == 0


async def test_stream_ends_on_shutdown(nursery: trio.Nursery) -> None:
    shutdown = trio.Event()
    mesh = await start_mesh(nursery, shutdown=shutdown, **COMPAT)
    envelope_id = await mesh.create("a")
    stream = await legacy_sse(mesh, envelope_id)
    await stream.wait_for(1)
    shutdown.set()
    events = await stream.wait_end()
    assert [e.event for e in events] == ["update"]


# --- legacy and new side by side --------------------------------------------------------------


async def test_legacy_and_new_clients_on_one_envelope(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    new, old = await compat.sse(envelope_id), await legacy_sse(compat, envelope_id)
    await new.wait_for(1)
    await old.wait_for(1)
    await sidecar(compat, envelope_id, "progress", progress("processing", [], "a", ["b"]))
    reply = await compat.status(envelope_id, "running", {"progress_percent": 60, "message": "m"})
    assert reply.status == 204
    await sidecar(compat, envelope_id, "fly", {"token": "x"})
    assert (await compat.fly(envelope_id, "y")).status == 204
    await sidecar(compat, envelope_id, "final", {"status": "succeeded", "result": {"n": 1}})
    new_events, old_events = await new.wait_end(), await old.wait_end()

    assert [e.event for e in new_events] == ["status"] * 3 + ["fly"] * 2 + ["status"]
    assert [e.event for e in old_events] == ["update"] * 3 + ["partial"] * 2 + ["update"]
    new_data, old_data = data(new_events), data(old_events)
    assert [d["status"] for d in new_data if isinstance(d, dict) and "status" in d] == [
        d["status"] for d in old_data if isinstance(d, dict) and "status" in d
    ]
    assert [d["status"] for d in old_data[:3]] == ["pending", "running", "running"]
    assert [d.get("progress_percent") for d in new_data[1:3]] == [25.0, 60]
    assert [d.get("progress_percent") for d in old_data[1:3]] == [25.0, 60.0]
    assert old_data[2]["message"] == new_data[2]["message"] == "m"
    assert new_data[3:5] == old_data[3:5] == [{"token": "x"}, "y"]
    assert new_data[5]["result"] == old_data[5]["result"] == {"n": 1}
    assert old_data[5]["status"] == "succeeded"

    envelope = await compat.get(envelope_id)
    task = (await client(compat, "GET", f"/mesh/{envelope_id}")).json()
    assert (task["status"], task["result"]) == (envelope["status"], envelope["data"]["result"])
    assert task["progress_percent"] == envelope["data"]["progress_percent"] == 100


async def test_legacy_progress_then_new_events(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    await sidecar(compat, envelope_id, "progress", progress("received", [], "a", ["b"]))
    assert (await compat.status(envelope_id, "running", {"progress_percent": 80})).status == 204
    # A legacy report reads what the new API stored: 80 % is not lowered to 5.5 %.
    reply = await sidecar(compat, envelope_id, "progress", progress("completed", [], "a", ["b"]))
    assert reply.json() == {"status": "ok", "progress_percent": 80.0}
    assert (await compat.status(envelope_id, "succeeded", {"result": "r"})).status == 204
    reply = await client(compat, "GET", f"/mesh/{envelope_id}/active")
    assert (reply.status, reply.json()) == (410, {"active": False})
    # ... and the new API sees what the legacy routes stored.
    reply = await sidecar(compat, envelope_id, "final", {"status": "failed", "error": "late"})
    assert reply.status == 200
    envelope = await compat.get(envelope_id)
    assert (envelope["status"], envelope["data"]["result"]) == ("succeeded", "r")
    assert envelope["data"]["task_state"] == "completed"


# --- routing: overlap, non-legacy requests, compat off ---------------------------------------


async def test_no_prefix_new_routes_win(bare: MeshClient) -> None:
    envelope_id = await bare.create("a")
    assert bare.path(envelope_id) == f"/mesh/{envelope_id}"
    # External `GET /mesh/{id}` is the new envelope route, not the legacy task JSON.
    reply = await client(bare, "GET", f"/mesh/{envelope_id}")
    assert reply.status == 200
    assert set(reply.json()) == {"id", "status", "created_at", "updated_at", "data"}
    assert "deprecation" not in reply.headers
    # Internal `GET /mesh/{id}` stays the new heartbeat.
    heartbeat = await http(bare.int_port, "GET", f"/mesh/{envelope_id}")
    assert (heartbeat.status, heartbeat.json()) == (200, reply.json())
    # The legacy routes that do not overlap work, pointing at the unprefixed new routes.
    reply = await sidecar(bare, envelope_id, "progress", progress("processing", [], "a", []))
    assert reply.json() == {"status": "ok", "progress_percent": 50.0}
    assert_deprecated(reply, f"/mesh/{envelope_id}/events")
    assert (await bare.status(envelope_id, "running", {"step": 2})).status == 204
    reply = await client(bare, "GET", f"/mesh/{envelope_id}/active")
    assert (reply.status, reply.json()) == (200, {"active": True})
    assert_deprecated(reply, f"/mesh/{envelope_id}")
    stream = await legacy_sse(bare, envelope_id)
    assert_deprecated(stream, f"/mesh/{envelope_id}/events")
    await stream.wait_for(1)
    assert (await client(bare, "DELETE", f"/mesh/{envelope_id}")).status == 204
    events = await stream.wait_end()
    assert [json.loads(e.data)["status"] for e in events] == ["running", "canceled"]
    listing = await client(bare, "GET", "/mesh/")
    assert listing.json()["total"] == 1


# Requests no legacy route takes: answered exactly as without compat.
NOT_LEGACY = [
    ("int", "GET", "/nope"),
    ("int", "GET", "/mesh/"),
    ("int", "GET", "/api/v1/mesh/"),
    ("int", "DELETE", "/api/v1/mesh/{id}/events"),
    ("int", "POST", "/api/v1/mesh/task-1/events"),
    ("int", "POST", "/mesh/{id}/stream"),
    ("int", "POST", "/mesh/{id}/events"),
    ("ext", "GET", "/nope"),
    ("ext", "POST", "/mesh/{id}/progress"),
    ("ext", "PUT", "/api/v1/mesh/{id}"),
    ("ext", "OPTIONS", "/mesh/"),
]


async def test_non_legacy_requests_answer_as_without_compat(nursery: trio.Nursery) -> None:
    plain, legacy = await start_mesh(nursery), await start_mesh(nursery, **COMPAT)
    ids = {plain: await plain.create("a"), legacy: await legacy.create("a")}
    for port, method, path in NOT_LEGACY:
        replies = []
        for mesh in (plain, legacy):
            target = path.format(id=ids[mesh])
            reply = await http(mesh.int_port if port == "int" else mesh.ext_port, method, target)
            replies.append((reply.status, reply.body, reply.headers.get("allow")))
        assert replies[0] == replies[1], (port, method, path)
        assert replies[0][0] in (404, 405)


async def test_legacy_path_wrong_method(compat: MeshClient) -> None:
    envelope_id = await compat.create("a")
    reply = await http(compat.int_port, "GET", f"/mesh/{envelope_id}/progress")
    assert (reply.status, reply.headers["allow"]) == (405, "POST")
    assert_deprecated(reply, compat.path(f"{envelope_id}/events"))
    # The core decides the 405 and its `Allow` for legacy rows as for its own (HEAD is answered
    # wherever GET is, and not listed); OPTIONS is one more method a legacy path does not take.
    for method, path, successor in [
        ("DELETE", f"{envelope_id}/stream", f"{envelope_id}/events"),
        ("OPTIONS", f"{envelope_id}/stream", f"{envelope_id}/events"),
        ("DELETE", envelope_id, envelope_id),
    ]:
        reply = await client(compat, method, f"/mesh/{path}")
        assert (reply.status, reply.headers["allow"]) == (405, "GET")
        assert reply.json() == {"error": "method not allowed"}
        assert_deprecated(reply, compat.path(successor))
    assert (await compat.get(envelope_id))["status"] == "pending"


async def test_cors_preflight_of_a_legacy_path(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_CORS_ORIGINS="http://ui.example", **COMPAT)
    envelope_id = await mesh.create("a")
    headers = {"origin": "http://ui.example", "access-control-request-method": "GET"}
    path = f"/mesh/{envelope_id}/stream"
    reply = await http(mesh.ext_port, "OPTIONS", path, headers=headers)
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == "http://ui.example"


async def test_compat_off_legacy_paths_404(mesh: MeshClient) -> None:
    envelope_id = await mesh.create("a")
    before = await mesh.get(envelope_id)
    for route, body in [
        ("progress", progress("received", [], "a", [])),
        ("final", {"status": "succeeded"}),
        ("fly", {"token": "x"}),
    ]:
        reply = await sidecar(mesh, envelope_id, route, body)
        assert (reply.status, reply.json()) == (404, {"error": "not found"})
        assert "deprecation" not in reply.headers
    for suffix in ("/stream", "/active", ""):
        reply = await client(mesh, "GET", f"/mesh/{envelope_id}{suffix}")
        assert (reply.status, reply.json()) == (404, {"error": "not found"})
    assert await mesh.get(envelope_id) == before
