"""List filters and keyset cursors, `GET ...?wait=S`, and the create reply's `Location`, over
real sockets with the embedded store and through the state proxy."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import pytest
import trio

from mesh_proto import REV_GUARD
from mesh_trio._proxy_store import ProxyStore
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import WAIT, MeshClient, start_mesh


async def listed(mesh: MeshClient, query: str) -> dict[str, Any]:
    reply = await mesh.ext("GET", f"?{query}")
    assert reply.status == 200, reply
    return dict(reply.json())


def ids(body: dict[str, Any]) -> list[str]:
    return [m["id"] for m in body["messages"]]


async def test_each_filter_and_their_combinations(mesh: MeshClient) -> None:
    made = [await mesh.create("alpha" if n % 2 else "beta") for n in range(6)]
    await mesh.status(made[1], "running")
    await mesh.status(made[2], "running")
    await mesh.status(made[3], "paused")
    await mesh.status(made[4], "succeeded")
    newest = list(reversed(made))
    every = (await listed(mesh, "limit=100"))["messages"]
    assert [m["id"] for m in every] == newest
    stamps = {m["id"]: m["created_at"] for m in every}

    body = await listed(mesh, "actor=alpha")
    assert (ids(body), body["total"]) == ([made[5], made[3], made[1]], 3)
    assert "next_cursor" not in body
    body = await listed(mesh, "status=running,paused")
    assert (ids(body), body["total"]) == ([made[3], made[2], made[1]], 3)
    body = await listed(mesh, "status=running")
    assert ids(body) == [made[2], made[1]]
    body = await listed(mesh, "actor=beta&status=running,succeeded")
    assert (ids(body), body["total"]) == ([made[4], made[2]], 2)
    after, before = stamps[made[1]], stamps[made[4]]
    body = await listed(mesh, f"created_after={after}&created_before={before}")
    assert (ids(body), body["total"]) == ([made[3], made[2]], 2), "exclusive bounds"
    body = await listed(mesh, f"created_after={after}&actor=alpha")
    assert ids(body) == [made[5], made[3]]
    body = await listed(mesh, f"created_before={after}")
    assert ids(body) == [made[0]]
    body = await listed(mesh, "actor=nobody")
    assert (body["messages"], body["total"]) == ([], 0)


@pytest.mark.parametrize(
    "query",
    [
        "status=running,nope",
        "status=Running",
        "status=running,",
        "actor=a%20b",
        "created_after=yesterday",
        "created_before=2026-01-01T00:00:00",
        "cursor=garbage",
        "cursor=",
        "limit=0",
    ],
)
async def test_bad_list_values_are_400(mesh: MeshClient, query: str) -> None:
    reply = await mesh.ext("GET", f"?{query}")
    assert reply.status == 400, reply
    assert "error" in reply.json()


async def test_a_cursor_with_an_offset_is_400(mesh: MeshClient) -> None:
    for _ in range(3):
        await mesh.create()
    token = (await listed(mesh, "limit=1"))["next_cursor"]
    reply = await mesh.ext("GET", f"?cursor={token}&offset=1")
    assert reply.status == 400 and "cursor" in reply.json()["error"]


async def test_cursor_pages_are_stable_under_concurrent_creates(mesh: MeshClient) -> None:
    existing = [await mesh.create() for _ in range(25)]
    seen: list[str] = []
    body = await listed(mesh, "limit=7")
    while True:
        assert body["total"] >= 25
        seen.extend(ids(body))
        await mesh.create()  # newer than everything paged: never on a later page
        token = body.get("next_cursor")
        if token is None:
            break
        body = await listed(mesh, f"limit=7&cursor={token}")
    assert seen == list(reversed(existing)), "no duplicate, no gap"


async def test_cursor_pages_keep_the_filters(mesh: MeshClient) -> None:
    made = [await mesh.create("alpha" if n % 3 else "beta") for n in range(10)]
    wanted = [i for n, i in reversed(list(enumerate(made))) if n % 3]
    seen: list[str] = []
    query = "actor=alpha&limit=3"
    while True:
        body = await listed(mesh, query)
        assert body["total"] == len(wanted)
        seen.extend(ids(body))
        if "next_cursor" not in body:
            break
        query = f"actor=alpha&limit=3&cursor={body['next_cursor']}"
    assert seen == wanted


async def test_a_full_last_page_has_no_next_cursor(mesh: MeshClient) -> None:
    for _ in range(4):
        await mesh.create()
    first = await listed(mesh, "limit=2")
    second = await listed(mesh, f"limit=2&cursor={first['next_cursor']}")
    assert len(second["messages"]) == 2 and "next_cursor" not in second


async def test_wait_returns_as_soon_as_the_envelope_is_terminal(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    replies: list[Any] = []

    async def waiting() -> None:
        # 60 s is far beyond the harness's bound on one request: only an early return passes.
        replies.append(await mesh.ext("GET", f"{envelope_id}?wait=60"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting)
        await mesh.status(envelope_id, "running")
        await mesh.status(envelope_id, "succeeded", {"result": 42})
    (reply,) = replies
    assert reply.status == 200
    assert reply.json()["status"] == "succeeded" and reply.json()["data"]["result"] == 42


async def test_wait_times_out_with_the_current_state(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    await mesh.status(envelope_id, "running", {"step": 1})
    started = trio.current_time()
    reply = await mesh.ext("GET", f"{envelope_id}?wait=0.3")
    assert reply.status == 200
    assert reply.json()["status"] == "running" and reply.json()["data"]["step"] == 1
    assert trio.current_time() - started < WAIT


async def test_wait_on_a_terminal_envelope_answers_at_once(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    await mesh.status(envelope_id, "failed", {"error": "boom"})
    reply = await mesh.ext("GET", f"{envelope_id}?wait=60")
    assert (reply.status, reply.json()["status"]) == (200, "failed")


@pytest.mark.parametrize("wait", ["-1", "61", "abc", "1e2", "", "inf", "nan"])
async def test_bad_wait_is_400(mesh: MeshClient, wait: str) -> None:
    envelope_id = await mesh.create()
    reply = await mesh.ext("GET", f"{envelope_id}?wait={wait}")
    assert reply.status == 400 and "wait" in reply.json()["error"]


async def test_wait_zero_and_unknown_ids_behave_as_a_plain_get(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    reply = await mesh.ext("GET", f"{envelope_id}?wait=0")
    assert (reply.status, reply.json()["status"]) == (200, "pending")
    missing = "00000000-0000-4000-8000-000000000000"
    assert (await mesh.ext("GET", f"{missing}?wait=5")).status == 404


async def test_create_answers_with_the_location_of_the_envelope(mesh: MeshClient) -> None:
    reply = await mesh.ext("POST", "?actor=worker", {})
    assert reply.status == 201
    location = reply.headers["location"]
    assert location == mesh.path(reply.json()["id"])
    got = await mesh.ext("GET", location.removeprefix(mesh.path("")))
    assert (got.status, got.json()["id"]) == (200, reply.json()["id"])


async def test_time_bounds_and_cursors_need_a_proxy_with_column_filters(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    """Against a proxy that lacks `columns` (the Go one reads them as value fields), the
    requests that need them are a 501 instead of a wrong page; plain filters still work."""
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)
    await mesh.create()
    store = mesh.bound.mesh.store
    while not isinstance(store, ProxyStore):  # under the metrics (and tracing) wrappers
        store = store.inner if hasattr(store, "inner") else store.store  # type: ignore[attr-defined]
    store.features = frozenset({REV_GUARD})
    for query in ("created_after=2026-01-01T00:00:00Z", "created_before=2099-01-01T00:00:00Z"):
        reply = await mesh.ext("GET", f"?{query}")
        assert reply.status == 501 and "column filters" in reply.json()["error"]
    first = await mesh.ext("GET", "?status=pending&limit=1")
    assert first.status == 200 and first.json()["total"] == 1
