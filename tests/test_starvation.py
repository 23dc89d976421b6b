"""CPU starvation changes latency, never outcomes.

The state proxy runs as its own `asya-state-proxy` process (its own schema and
application_name, from the `pg_url` fixture) so that it can be frozen with SIGSTOP for 1.5 s in
the middle of creates, status events, FLY events and an open SSE stream, as a loaded machine
freezes a process. Every request must then get the answer it gets without the pause (no 503),
and the stream must carry every frame once, in order, and end on the terminal frame.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio

from mesh_proto import encode_frame
from tests.harness import WAIT, start_mesh

pytestmark = pytest.mark.postgres

PAUSE = 1.5  # seconds the state proxy is frozen: what a loaded 2-core machine can do to it
COMMAND = [sys.executable, "-c", "from mesh_trio.stateproxy._cli import main; main()"]


@pytest.fixture
async def proxy_process(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> AsyncIterator[tuple[trio.Process, str]]:
    """`asya-state-proxy` in a process of its own, listening; yields it and its socket."""
    path = os.path.join(short_dir, "proxy.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNECTOR_", "STATE_PROXY"))}
    env.update(CONNECTOR_SOCKET=path, STATE_PROXY_PG_URL=pg_url, ASYA_LOG_LEVEL="info")
    process = await trio.lowlevel.open_process(COMMAND, env=env, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr
    try:
        log = b""
        with trio.fail_after(20):
            while b"listening on" not in log:
                chunk = await stderr.receive_some(65536)
                assert chunk, f"state proxy exited: {log.decode()}"
                log += chunk
        nursery.start_soon(_drain, stderr)  # never let a full pipe block the proxy
        yield process, path
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        with trio.move_on_after(WAIT):
            await process.wait()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(65536):
        pass


async def frozen(process: trio.Process, seconds: float) -> None:
    """Keep `process` stopped for `seconds` (already stopped when this starts), then resume it."""
    try:
        await trio.sleep(seconds)
    finally:
        process.send_signal(signal.SIGCONT)


async def test_a_frozen_state_proxy_changes_no_outcome(
    nursery: trio.Nursery, proxy_process: tuple[trio.Process, str]
) -> None:
    process, socket_path = proxy_process
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=socket_path)
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    assert stream.status == 200
    await stream.wait_for(1)
    head = len(stream.plain)

    async def post_steps(steps: range) -> None:
        for step in steps:
            reply = await mesh.status(envelope_id, "running", {"step": step})
            assert reply.status == 204, reply
            reply = await mesh.fly(envelope_id, {"token": step})
            assert reply.status == 204, reply

    created: list[str] = []

    async def create(n: int) -> None:
        created.append(await mesh.create(body={"payload": n}))  # asserts the 201

    await post_steps(range(3))
    process.send_signal(signal.SIGSTOP)
    async with trio.open_nursery() as during:
        during.start_soon(frozen, process, PAUSE)
        during.start_soon(post_steps, range(3, 8))
        for n in range(10):
            during.start_soon(create, n)
    await post_steps(range(8, 10))
    reply = await mesh.status(envelope_id, "succeeded", {"result": "done"})
    assert reply.status == 204, reply

    await stream.wait_end(timeout=WAIT + PAUSE)
    expected = b"".join(
        encode_frame("status", {"step": step, "status": "running"})
        + encode_frame("fly", {"token": step})
        for step in range(10)
    )
    expected += encode_frame("status", {"result": "done", "status": "succeeded"})
    assert stream.plain[head:] == expected

    listed = (await mesh.ext("GET", "?limit=100")).json()
    assert listed["total"] == 11
    assert sorted(m["id"] for m in listed["messages"]) == sorted([*created, envelope_id])
    assert sorted(m["data"]["payload"] for m in listed["messages"] if m["id"] in created) == list(
        range(10)
    )
    assert (await mesh.get(envelope_id))["status"] == "succeeded"


async def test_a_stream_opened_while_the_proxy_is_frozen_gets_its_snapshot(
    nursery: trio.Nursery, proxy_process: tuple[trio.Process, str]
) -> None:
    """Subscribe, then the snapshot read waits out the pause; an event posted meanwhile is
    neither lost nor sent twice."""
    process, socket_path = proxy_process
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=socket_path)
    envelope_id = await mesh.create()
    process.send_signal(signal.SIGSTOP)
    streams = []

    async def connect() -> None:
        streams.append(await mesh.sse(envelope_id))

    async def running() -> None:
        reply = await mesh.status(envelope_id, "running", {"step": 1})
        assert reply.status == 204, reply

    async with trio.open_nursery() as during:
        during.start_soon(frozen, process, PAUSE)
        during.start_soon(connect)
        during.start_soon(running)
    (stream,) = streams
    assert stream.status == 200
    # The catch-up frame first: the stream reads its snapshot after sending the response head,
    # so a terminal status posted before that would (rightly) be the snapshot itself.
    await stream.wait_for(1, timeout=WAIT + PAUSE)
    reply = await mesh.status(envelope_id, "succeeded")
    assert reply.status == 204, reply
    events = await stream.wait_end(timeout=WAIT + PAUSE)
    statuses = [json.loads(e.data)["status"] for e in events]
    assert statuses[-1] == "succeeded" and statuses.count("succeeded") == 1
    assert statuses.count("running") == 1
    assert (await mesh.get(envelope_id))["data"]["step"] == 1
