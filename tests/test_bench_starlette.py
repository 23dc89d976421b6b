# The benchmark's Starlette yardstick (bench/starlette_app.py) still serves the contract's
# measured paths, so `bench/run.py --variant starlette` cannot compare against a broken server.
# It runs as the benchmark runs it: its own process, two free ports, ready once /health answers.

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio

from tests.harness import WAIT, SseClient, http

APP = Path(__file__).resolve().parent.parent / "bench" / "starlette_app.py"
MESH = "/api/v1/mesh/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def ports() -> AsyncIterator[tuple[int, int]]:
    external, internal = free_port(), free_port()
    argv = [sys.executable, str(APP), f"--external-port={external}"]
    process = await trio.lowlevel.open_process([*argv, f"--internal-port={internal}"])
    try:
        with trio.fail_after(20):
            for port in (external, internal):
                while True:
                    assert process.returncode is None and process.poll() is None
                    try:
                        if (await http(port, "GET", "/health")).status == 200:
                            break
                    except OSError:
                        await trio.sleep(0.05)  # not listening yet: retry, under the bound
        yield external, internal
        process.terminate()
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def open_sse(port: int, path: str) -> SseClient:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("host", "127.0.0.1")])
    await stream.send_all(conn.send(request))
    client = SseClient(stream, conn)
    with trio.fail_after(WAIT):
        while client.status == 0 and not client.ended:
            await client._pump()
    return client


async def test_create_status_event_get_and_sse_catch_up(ports: tuple[int, int]) -> None:
    external, internal = ports
    created = await http(external, "POST", MESH + "?actor=bench", {"payload": {"n": 1}})
    assert created.status == 201
    envelope_id = created.json()["id"]

    event = {"type": "status", "status": "processing", "data": {"prev": [], "next": ["b"]}}
    assert (await http(internal, "POST", f"{MESH}{envelope_id}/events", event)).status == 204

    got = await http(external, "GET", MESH + envelope_id)
    assert got.status == 200
    envelope = got.json()
    assert envelope["status"] == "running"
    assert envelope["data"]["progress_percent"] == 50.0

    sse = await open_sse(external, f"{MESH}{envelope_id}/events")
    try:
        assert sse.status == 200
        assert sse.headers["content-type"].startswith("text/event-stream")
        [catch_up] = await sse.wait_for(1)
        assert catch_up.event == "status"
        assert json.loads(catch_up.data) == envelope
        done = {"type": "status", "status": "succeeded", "data": {"result": 42}}
        assert (await http(internal, "POST", f"{MESH}{envelope_id}/events", done)).status == 204
        events = await sse.wait_end()
        assert [(e.event, json.loads(e.data)) for e in events[1:]] == [
            ("status", {"result": 42, "status": "succeeded"})
        ]
    finally:
        await sse.aclose()
