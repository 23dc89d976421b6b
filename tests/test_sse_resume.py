"""SSE ids and resume over real sockets: a stream cut mid-way and resumed with `Last-Event-ID`
misses no status and no buffered FLY event and repeats none; a gap when the buffer lost some; a
malformed id; a terminal envelope; `retry:`; `?last_event_id=0`. Then the hub's replay buffer
itself (trimming by count and age, the watermark of dropped keys, `resync_all`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from mesh_proto import Published, SseEvent
from mesh_trio import Hub
from tests.harness import MeshClient, SseClient, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners


def event_id(event: SseEvent) -> tuple[int, int]:
    assert event.id is not None
    rev, seq = event.id.split(".")
    return int(rev), int(seq)


def flys(events: list[SseEvent]) -> list[Any]:
    return [json.loads(e.data) for e in events if e.event == "fly"]


async def resume(mesh: MeshClient, envelope_id: str, last_event_id: str) -> SseClient:
    return await mesh.sse(envelope_id, headers={"Last-Event-ID": last_event_id})


async def test_resume_misses_nothing_and_repeats_nothing(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    first = await mesh.sse(envelope_id)
    await first.wait_for(1)
    await mesh.status(envelope_id, "running", {"step": 1})
    await mesh.fly(envelope_id, "a")
    events = await first.wait_for(3)
    assert first.raw.startswith(b"retry: 3000\nid: ")
    ids = [event_id(e) for e in events]
    assert ids == sorted(ids)
    await first.aclose()  # the connection drops mid-way

    await mesh.status(envelope_id, "running", {"step": 2})
    await mesh.fly(envelope_id, "b")
    await mesh.fly(envelope_id, "c")
    second = await resume(mesh, envelope_id, events[-1].id or "")
    await second.wait_for(3)
    await mesh.fly(envelope_id, "d")
    await mesh.status(envelope_id, "succeeded", {"result": 1})
    resumed = await second.wait_end()

    assert flys(events) + flys(resumed) == ["a", "b", "c", "d"]
    statuses = [json.loads(e.data) for e in resumed if e.event == "status"]
    assert statuses[0]["status"] == "running" and statuses[0]["data"]["step"] == 2  # catch-up
    assert statuses[-1] == {"result": 1, "status": "succeeded"}
    assert len(statuses) == 2
    resumed_ids = [event_id(e) for e in resumed]
    assert resumed_ids == sorted(resumed_ids) and resumed_ids[0] > ids[-1]
    # FLY replayed at the client's revision, then the catch-up's, then the terminal one's.
    assert len({rev for rev, _ in resumed_ids}) == 3


async def test_resume_at_the_newest_id_sends_only_what_follows(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    await mesh.status(envelope_id, "running")
    first = await mesh.sse(envelope_id)
    snapshot = (await first.wait_for(1))[0]
    await first.aclose()
    second = await resume(mesh, envelope_id, snapshot.id or "")
    await mesh.fly(envelope_id, "next")
    events = await second.wait_for(1)
    assert [(e.event, e.data) for e in events] == [("fly", '"next"')]
    await second.aclose()


async def test_a_lost_buffer_is_a_gap_then_a_fresh_snapshot(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_EVENT_BUFFER="2")
    envelope_id = await mesh.create()
    first = await mesh.sse(envelope_id)
    snapshot = (await first.wait_for(1))[0]
    await first.aclose()
    for token in range(5):
        await mesh.fly(envelope_id, token)
    second = await resume(mesh, envelope_id, snapshot.id or "")
    events = await second.wait_for(4)
    assert events[0].event == "gap"
    assert json.loads(events[0].data) == {"last_event_id": snapshot.id}
    assert json.loads(events[1].data) == await mesh.get(envelope_id)
    assert flys(events) == [3, 4]  # what the buffer still held
    await mesh.status(envelope_id, "failed")
    assert [e.event for e in await second.wait_end()][4:] == ["status"]


async def test_a_malformed_id_is_a_gap_then_a_fresh_snapshot_then_live(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    for bad in ("junk", "1.2.3", "99.1"):
        stream = await resume(mesh, envelope_id, bad)
        events = await stream.wait_for(2)
        assert events[0].event == "gap" and json.loads(events[0].data) == {"last_event_id": bad}
        assert json.loads(events[1].data) == await mesh.get(envelope_id)
        await mesh.fly(envelope_id, bad)
        assert flys(await stream.wait_for(3)) == [bad]
        await stream.aclose()


async def test_a_terminal_envelope_answers_one_frame_and_closes(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    await mesh.status(envelope_id, "succeeded", {"result": 7})
    first = await mesh.sse(envelope_id)
    (terminal,) = await first.wait_end()
    second = await resume(mesh, envelope_id, terminal.id or "")
    assert await second.wait_end() == [terminal]
    assert second.raw.startswith(b"retry: 3000\n")


async def test_last_event_id_0_gets_the_tokens_sent_before_connecting(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    await mesh.fly(envelope_id, "early")
    await mesh.fly(envelope_id, "earlier-than-you")
    stream = await mesh.sse(envelope_id, mesh.path(f"{envelope_id}/events?last_event_id=0"))
    events = await stream.wait_for(3)
    assert flys(events) == ["early", "earlier-than-you"]
    assert json.loads(events[2].data) == await mesh.get(envelope_id)
    await stream.aclose()


async def test_retry_follows_the_setting(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_SSE_RETRY="250ms")
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    await stream.wait_for(1)
    assert stream.raw.startswith(b"retry: 250\nid: 0.0\nevent: status\n")
    await stream.aclose()


# --- the hub's replay buffer --------------------------------------------------------------


def fly(text: str) -> Published:
    return Published.fly(text)


async def test_hub_gives_increasing_seqs_and_keeps_bus_seqs() -> None:
    hub = Hub()
    async with hub.subscribe("k") as sub:
        await hub.publish("k", fly("a"))
        await hub.publish("k", fly("b"))
        await hub.publish("k", Published(frame=b"x", seq=10**18))
        await hub.publish("k", fly("c"))
        seqs = [p.seq or 0 for p in sub.take()[0]]
    assert seqs[0] < seqs[1] < seqs[2] == 10**18 < seqs[3]


async def test_hub_replay_trims_by_count_and_reports_the_gap() -> None:
    hub = Hub(buffer=2)
    for text in "abcd":
        await hub.publish("k", fly(text))
    events, gap = await hub.replay("k", 0)
    assert [e.frame for e in events] == [fly("c").frame, fly("d").frame] and gap
    after_c = events[0].seq or 0
    assert await hub.replay("k", after_c) == ([events[1]], False)
    assert await hub.replay("k", events[1].seq or 0) == ([], False)
    assert await hub.replay("k", (events[1].seq or 0) + 1) == ([], True)  # a seq not given
    assert await hub.replay("other", 0) == ([], False)


async def test_hub_forgets_aged_keys_but_remembers_the_gap() -> None:
    now = [0.0]
    hub = Hub(buffer_age=10.0, clock=lambda: now[0])
    await hub.publish("old", fly("a"))
    (kept,), _ = await hub.replay("old", 0)
    now[0] = 11.0
    await hub.publish("new", fly("b"))  # publishing elsewhere sweeps the aged key
    assert "old" not in hub._buffers
    assert await hub.replay("old", 0) == ([], True)
    assert await hub.replay("old", kept.seq or 0) == ([], False)
    await hub.publish("old", fly("c"))  # the key comes back with its watermark
    events, gap = await hub.replay("old", 0)
    assert [e.frame for e in events] == [fly("c").frame] and gap
    now[0] = 200.0
    await hub.publish("new", fly("d"))
    assert "old" not in hub._buffers
    now[0] = 1000.0
    await hub.publish("other", fly("e"))
    assert set(hub._buffers) == {"other"}
    assert await hub.replay("new", 0) == ([], True)
    assert await hub.replay("old", 0) == ([], False)  # watermarks are forgotten after a while


async def test_hub_replay_drops_events_past_their_age() -> None:
    now = [0.0]
    hub = Hub(buffer_age=10.0, clock=lambda: now[0])
    await hub.publish("k", fly("a"))
    now[0] = 5.0
    await hub.publish("k", fly("b"))
    now[0] = 12.0
    events, gap = await hub.replay("k", 0)
    assert [e.frame for e in events] == [fly("b").frame] and gap


async def test_hub_resync_all_sends_every_subscriber_back_to_the_store() -> None:
    hub = Hub()
    async with hub.subscribe("a") as one, hub.subscribe("b") as two:
        await hub.publish("a", fly("x"))
        hub.resync_all()
        hub.resync_all()
        with trio.fail_after(1):
            await one.wait()
            await two.wait()
        assert one.take() == ([], True) and two.take() == ([], True)
        assert hub.statistics().resyncs == 2
