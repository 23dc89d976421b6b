"""Many mesh API replicas behaving as one (docs/scale-out.md): each replica with its own state
proxy, all on one PostgreSQL, requests spread over them with no sticky routing.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from typing import Any

import psycopg
import pytest
import trio

from mesh_trio._bus import SINGLE_REPLICA, ProxyBroadcaster
from mesh_trio._hub import Hub
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import WAIT, MeshClient, SseClient, start_mesh
from tests.test_metrics import scrape, value
from tests.test_proxy_faults import Proxy

pytestmark = pytest.mark.postgres


async def replica(
    nursery: trio.Nursery, pg_url: str, short_dir: str, name: str, **env: str
) -> MeshClient:
    """One pod: a state proxy on its own socket and a mesh API on it."""
    path = os.path.join(short_dir, f"{name}.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    settings: dict[str, Any] = {"ASYA_STATEPROXY_SOCKET": path, **env}
    return await start_mesh(nursery, **settings)


async def replicas(
    nursery: trio.Nursery, pg_url: str, short_dir: str, count: int = 3, **env: str
) -> list[MeshClient]:
    return [await replica(nursery, pg_url, short_dir, f"r{i}", **env) for i in range(count)]


def bus_of(mesh: MeshClient) -> ProxyBroadcaster:
    broadcaster = mesh.bound.mesh.broadcaster
    assert isinstance(broadcaster, ProxyBroadcaster)
    return broadcaster


def frames(stream: SseClient) -> list[tuple[str, Any]]:
    """The stream's live frames (after the snapshot) as (event, data)."""
    return [(e.event, json.loads(e.data)) for e in stream.events[1:]]


async def subscribed(mesh: MeshClient, envelope_id: str, **headers: str) -> SseClient:
    stream = await mesh.sse(envelope_id, headers=headers)
    await stream.wait_for(1)
    return stream


async def accepted(reply: Any) -> None:
    assert reply.status == 204, reply


async def test_a_stream_on_one_replica_sees_in_order_what_the_others_were_posted(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    a, b, c = await replicas(nursery, pg_url, short_dir)
    envelope_id = await a.create()
    stream = await subscribed(b, envelope_id)
    await accepted(await a.status(envelope_id, "running", {"step": 1}))
    await accepted(await c.fly(envelope_id, {"token": "x"}))
    await accepted(await a.fly(envelope_id, {"token": "y"}))
    await accepted(await c.status(envelope_id, "running", {"step": 2}))
    await accepted(await a.fly(envelope_id, {"token": "z"}))
    await accepted(await c.status(envelope_id, "succeeded", {"result": 42}))
    await stream.wait_end()
    assert frames(stream) == [
        ("status", {"step": 1, "status": "running"}),
        ("fly", {"token": "x"}),
        ("fly", {"token": "y"}),
        ("status", {"step": 2, "status": "running"}),
        ("fly", {"token": "z"}),
        ("status", {"result": 42, "status": "succeeded"}),
    ]
    seqs = [int(str(e.id).split(".")[1]) for e in stream.events[1:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert bus_of(b).statistics().relayed == 6
    assert bus_of(a).statistics().posted == 2
    # The same counters on /metrics (what an operator watches).
    assert value(await scrape(b.int_port), "asya_mesh_bus_relayed_total") == 6
    samples = await scrape(a.int_port)
    assert value(samples, "asya_mesh_bus_posted_total") == 2
    assert samples[("asya_mesh_bus_reconnects_total", frozenset())] == 0


async def test_requests_spread_round_robin_behave_as_one_server(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    a, b, c = await replicas(nursery, pg_url, short_dir)
    envelope_id = await a.create("worker", {"payload": {"q": 1}})
    assert (await b.get(envelope_id))["status"] == "pending"
    on_c = await subscribed(c, envelope_id)
    on_b = await subscribed(b, envelope_id)
    await accepted(await b.status(envelope_id, "running", {"step": 1}))
    await accepted(await a.ext("DELETE", envelope_id))
    listed = (await c.ext("GET", "")).json()
    assert envelope_id in [m["id"] for m in listed["messages"]]
    for stream in (on_b, on_c):
        await stream.wait_end()
        assert frames(stream) == [
            ("status", {"step": 1, "status": "running"}),
            ("status", {"status": "canceled"}),
        ]
    assert (await c.get(envelope_id))["status"] == "canceled"


async def test_the_watch_recovers_when_its_listen_connection_is_killed(
    nursery: trio.Nursery,
    pg_url: str,
    app_name: str,
    short_dir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mesh_trio.bus")
    a, b = await replicas(nursery, pg_url, short_dir, count=2)
    envelope_id = await a.create()
    stream = await subscribed(b, envelope_id)
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND query LIKE 'LISTEN %%'",
            (app_name,),
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    # Posted while the watch streams may be down: what reaches B is a resync, not the event.
    await accepted(await a.status(envelope_id, "succeeded", {"result": 1}))
    await stream.wait_end()
    assert json.loads(stream.events[-1].data)["status"] == "succeeded"
    with trio.fail_after(WAIT):
        while bus_of(b).statistics().reconnects < 1:  # noqa: ASYNC110 (a counter, no event)
            await trio.sleep(0.01)
    lost = [r for r in caplog.records if "watch stream lost" in r.getMessage()]
    restored = [r for r in caplog.records if "watch stream restored" in r.getMessage()]
    # Once per outage and once on recovery, on each of the two replicas.
    assert len(lost) == len(restored) == killed[0] == 2
    assert all(r.levelno == logging.WARNING for r in lost)
    # And the bus carries events again.
    second = await a.create()
    again = await subscribed(b, second)
    await accepted(await a.fly(second, {"after": "recovery"}))
    await again.wait_for(2)
    await again.aclose()
    assert frames(again) == [("fly", {"after": "recovery"})]


async def test_the_backstop_fails_an_expired_envelope_once_across_replicas(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    meshes = await replicas(nursery, pg_url, short_dir, ASYA_BACKSTOP_INTERVAL="50ms")
    ids = [await meshes[i % 3].create("worker", {"timeout": 0.3}) for i in range(6)]
    streams = [await subscribed(mesh, envelope_id) for envelope_id in ids for mesh in meshes]
    for stream in streams:
        await stream.wait_end()
        # Under load an envelope can expire before its stream subscribes: then the snapshot
        # is the one `failed` frame, so count it too.
        every = [json.loads(e.data) for e in stream.events]
        failed = [data for data in every if data.get("status") == "failed"]
        assert len(failed) == 1, every
    expired = sum(m.bound.mesh.metrics.backstop_expired._value.get() for m in meshes)
    assert expired == len(ids)


async def fake_proxy(path: str, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
    """A state proxy that answers every request 200 and lists no `events` (like the Go one
    with our other features): enough for a mesh API to start and choose its broadcaster."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nasya-state-proxy-features: if_rev,columns\r\n"
                b"content-length: 2\r\nconnection: close\r\n\r\nok"
            )

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    await trio.serve_listeners(answer, [trio.SocketListener(sock)], task_status=task_status)


async def test_a_proxy_without_the_bus_means_one_replica_and_one_warning(
    nursery: trio.Nursery, short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = os.path.join(short_dir, "go.sock")
    await nursery.start(fake_proxy, path)
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)
    assert isinstance(mesh.bound.mesh.broadcaster, Hub)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        SINGLE_REPLICA
    ]


async def run_killable(
    pg_url: str, short_dir: str, task_status: trio.TaskStatus[tuple[MeshClient, trio.CancelScope]]
) -> None:
    """A replica whose whole pod (proxy and mesh API) can be killed by cancelling a scope."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as pod:
            mesh = await replica(pod, pg_url, short_dir, "killed")
            task_status.started((mesh, scope))
            await trio.sleep_forever()


async def test_a_client_resumes_on_another_replica_when_its_replica_dies(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    a, c = await replicas(nursery, pg_url, short_dir, count=2)
    b, kill_b = await nursery.start(run_killable, pg_url, short_dir)
    envelope_id = await a.create()
    first = await subscribed(b, envelope_id)
    await accepted(await a.status(envelope_id, "running", {"step": 1}))
    for token in ("t1", "t2"):
        await accepted(await c.fly(envelope_id, {"token": token}))
    await first.wait_for(4)
    kill_b.cancel()
    with trio.fail_after(WAIT):
        while not first.ended:
            await first._pump()
    await first.aclose()
    last_id = first.events[-1].id
    assert last_id is not None
    # Meanwhile: FLY events the bus buffers, and a status change.
    for token in ("t3", "t4"):
        await accepted(await a.fly(envelope_id, {"token": token}))
    await accepted(await c.status(envelope_id, "running", {"step": 2}))
    second = await subscribed(c, envelope_id, **{"Last-Event-ID": last_id})
    await accepted(await a.fly(envelope_id, {"token": "t5"}))
    await accepted(await a.status(envelope_id, "succeeded", {"result": 1}))
    await second.wait_end()
    events = first.events[1:] + second.events
    tokens = [json.loads(e.data)["token"] for e in events if e.event == "fly"]
    assert tokens == ["t1", "t2", "t3", "t4", "t5"]
    statuses = [json.loads(e.data) for e in second.events if e.event == "status"]
    # The status change it missed is in the snapshot (the newest state), sent once.
    snapshot, terminal = statuses
    assert snapshot["status"] == "running" and snapshot["data"]["step"] == 2, statuses
    assert terminal == {"result": 1, "status": "succeeded"}
    assert not [e for e in second.events if e.event == "gap"]


async def test_concurrent_fly_events_all_reach_the_local_and_remote_streams_in_order(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    """Concurrent posts share `POST /events` requests; each stream still gets every one."""
    a, b = await replicas(nursery, pg_url, short_dir, count=2)
    envelope_id = await a.create()
    streams = [await subscribed(a, envelope_id), await subscribed(b, envelope_id)]
    async with trio.open_nursery() as posters:
        for n in range(40):
            posters.start_soon(partial(a.fly, envelope_id, {"n": n}))
    await accepted(await a.status(envelope_id, "succeeded"))
    for stream in streams:
        await stream.wait_end()
        fly = [e for e in stream.events if e.event == "fly"]
        assert sorted(json.loads(e.data)["n"] for e in fly) == list(range(40))
        seqs = [int(str(e.id).split(".")[1]) for e in fly]
        assert seqs == sorted(seqs)
    assert bus_of(a).statistics().posted == 40


async def test_a_fly_event_the_bus_cannot_take_is_a_503(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    proxy = Proxy(nursery, os.path.join(short_dir, "down.sock"), pg_url)
    await proxy.start()
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=proxy.path)
    envelope_id = await mesh.create()  # known live: a FLY event then needs only the bus
    await accepted(await mesh.fly(envelope_id, {"n": 1}))
    await proxy.stop()
    reply = await mesh.fly(envelope_id, {"n": 2})
    assert reply.status == 503 and "state proxy" in reply.json()["error"]
    assert bus_of(mesh).statistics().posted == 1
