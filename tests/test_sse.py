"""SSE over real sockets: headers, exact frames, catch-up, terminal close, the subscribe /
snapshot race, keepalive, slow clients, fan-out to many subscribers, disconnect clean-up."""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from mesh_proto import encode_frame
from tests.harness import WAIT, MeshClient, http, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners


async def test_headers_and_catch_up_frame(mesh: MeshClient) -> None:
    envelope_id = await mesh.create(body={"payload": "p"})
    stream = await mesh.sse(envelope_id)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    events = await stream.wait_for(1)
    assert events[0].event == "status"
    assert json.loads(events[0].data) == await mesh.get(envelope_id)
    await stream.aclose()


async def test_live_frames_exact_bytes_and_terminal_close(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    await stream.wait_for(1)
    head = len(stream.plain)
    await mesh.status(envelope_id, "running", {"step": 1})
    await mesh.fly(envelope_id, {"token": "a\nb"})
    await mesh.status(envelope_id, "succeeded", {"result": {"x": 1}})
    await stream.wait_end()
    assert stream.plain[head:] == (
        b'event: status\ndata: {"step":1,"status":"running"}\n\n'
        b'event: fly\ndata: {"token":"a\\nb"}\n\n'
        b'event: status\ndata: {"result":{"x":1},"status":"succeeded"}\n\n'
    )


async def test_terminal_envelope_gets_one_frame_and_end(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    await mesh.status(envelope_id, "failed", {"error": "boom"})
    stream = await mesh.sse(envelope_id)
    events = await stream.wait_end()
    assert len(events) == 1
    snapshot = json.loads(events[0].data)
    assert snapshot["status"] == "failed" and snapshot["data"]["error"] == "boom"


async def test_unknown_id_is_404_before_any_stream_bytes(mesh: MeshClient) -> None:
    for rest in (str(uuid.uuid4()), "junk"):
        reply = await http(mesh.ext_port, "GET", mesh.path(f"{rest}/events"))
        assert reply.status == 404
        assert reply.headers["content-type"] == "application/json"


async def test_stale_and_fly_after_terminal_are_not_streamed(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    await stream.wait_for(1)
    await mesh.status(envelope_id, "running")
    await mesh.status(envelope_id, "pending")  # stale: not published
    await mesh.status(envelope_id, "canceled")
    await mesh.fly(envelope_id, "late")
    events = await stream.wait_end()
    assert [json.loads(e.data)["status"] for e in events[1:]] == ["running", "canceled"]


async def test_keepalive_after_silence(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_SSE_KEEPALIVE="100ms")
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    await stream.wait_raw(b":keepalive\n\n:keepalive\n\n")
    assert stream.plain.startswith(catch_up_frame_prefix())
    await mesh.fly(envelope_id, 1)
    await stream.wait_raw(b"event: fly\ndata: 1\n\n")
    await stream.aclose()


def catch_up_frame_prefix() -> bytes:
    return b"event: status\ndata: {"


async def test_subscribe_snapshot_race_loses_nothing(mesh: MeshClient) -> None:
    """Events posted while streams connect: every stream ends with the same final state and
    sees each status at most once, in order."""
    envelope_id = await mesh.create()
    streams = []

    async def connect() -> None:
        streams.append(await mesh.sse(envelope_id))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(connect)
        for step in range(20):
            nursery.start_soon(mesh.status, envelope_id, "running", {"step": step})
    await mesh.status(envelope_id, "succeeded")
    for stream in streams:
        events = await stream.wait_end()
        statuses = [json.loads(e.data)["status"] for e in events]
        assert statuses[-1] == "succeeded"
        assert statuses.count("succeeded") == 1
        assert all(s in ("pending", "running") for s in statuses[:-1])


async def test_many_subscribers_get_every_status_frame(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    streams = [await mesh.sse(envelope_id) for _ in range(50)]
    for stream in streams:
        await stream.wait_for(1)
    for step in range(10):
        await mesh.status(envelope_id, "running", {"step": step})
    await mesh.status(envelope_id, "succeeded")
    expected = [encode_frame("status", {"step": s, "status": "running"}) for s in range(10)]
    expected.append(encode_frame("status", {"status": "succeeded"}))
    for stream in streams:
        await stream.wait_end()
        assert stream.plain.endswith(b"".join(expected))


async def test_client_disconnect_unsubscribes(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery)
    hub = mesh.bound.mesh.broadcaster
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    await stream.wait_for(1)
    assert hub.subscribers(envelope_id) == 1
    await stream.aclose()
    with trio.fail_after(WAIT):
        while hub.subscribers(envelope_id):
            await mesh.fly(envelope_id, "ping")  # a write notices the closed socket
            await trio.sleep(0.01)
    assert hub.statistics().subscribers == 0


async def test_slow_subscriber_never_blocks_publishers(nursery: trio.Nursery) -> None:
    """A client that stops reading: publishers go on, FLY frames are dropped for it only, and
    its status frames survive (folded into a resync snapshot if need be)."""
    mesh = await start_mesh(nursery)
    envelope_id = await mesh.create()
    slow = await mesh.sse(envelope_id)  # never read again until the end
    fast = await mesh.sse(envelope_id)
    await fast.wait_for(1)
    payload = "x" * 65536  # 16 MiB in all: more than socket buffers and the hub hold
    for _ in range(256):
        assert (await mesh.fly(envelope_id, payload)).status == 204
    await mesh.status(envelope_id, "succeeded", {"result": "done"})
    events = await fast.wait_end(timeout=30)
    assert sum(e.event == "fly" for e in events) > 0
    assert mesh.bound.mesh.broadcaster.statistics().dropped_fly > 0
    slow_events = await slow.wait_end(timeout=30)
    last = json.loads(slow_events[-1].data)
    assert last["status"] == "succeeded"
    assert sum(e.event == "fly" for e in slow_events) < 256


async def test_hub_encodes_once_for_all_subscribers(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    streams = [await mesh.sse(envelope_id) for _ in range(5)]
    for stream in streams:
        await stream.wait_for(1)
    hub = mesh.bound.mesh.broadcaster
    before = hub.statistics()
    await mesh.fly(envelope_id, {"t": 1})
    after = hub.statistics()
    assert after.published - before.published == 1
    assert after.delivered - before.delivered == 5
    for stream in streams:
        await stream.aclose()


class CountingStore:
    """Wraps a store and records the name of every call."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        method = getattr(self.inner, name)

        async def call(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return call


async def test_fly_events_cost_no_store_round_trip(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery)
    core = mesh.bound.mesh
    # 50 requests may outlast the 5 s liveness window on a loaded machine, and a store read
    # after it is right: the window is made long enough that only the contract is tested.
    core.live.ttl = 3600.0
    envelope_id = await mesh.create()
    counting = CountingStore(core.store)
    core.store = counting  # type: ignore[assignment]
    for n in range(50):
        assert (await mesh.fly(envelope_id, n)).status == 204
    assert counting.calls == []
    await mesh.status(envelope_id, "succeeded")
    counting.calls.clear()
    assert (await mesh.fly(envelope_id, "late")).status == 204
    assert (await mesh.fly(envelope_id, "later")).status == 204
    assert counting.calls == ["get", "get"]  # an ended envelope is re-checked every time
