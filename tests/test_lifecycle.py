"""Lifecycle over real sockets: deadline backstop, racing writers, demo actors, graceful
shutdown with open streams, and configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

from mesh_trio import Config, ConfigError, parse_duration
from tests.harness import MeshClient, http, start_mesh, start_stoppable


async def test_backstop_fails_expired_envelopes(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_BACKSTOP_INTERVAL="50ms")
    doomed = await mesh.create(body={"timeout": 0.2})
    done = await mesh.create(body={"timeout": 0.2})
    forever = await mesh.create()
    await mesh.status(done, "succeeded", {"result": 1})
    stream = await mesh.sse(doomed)
    events = await stream.wait_end()
    final = json.loads(events[-1].data)
    if len(events) > 1:  # the live frame of the transition
        assert final == {"error": "task timed out", "status": "failed"}
    else:  # expired before the stream opened: the catch-up frame says so
        assert final["status"] == "failed" and final["data"]["error"] == "task timed out"
    envelope = await mesh.get(doomed)
    assert envelope["status"] == "failed" and envelope["data"]["error"] == "task timed out"
    assert (await mesh.get(done))["status"] == "succeeded"
    assert (await mesh.get(forever))["status"] == "pending"


async def test_racing_terminal_writers_one_winner_same_sequence(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    streams = [await mesh.sse(envelope_id) for _ in range(10)]
    for stream in streams:
        await stream.wait_for(1)
    statuses = ["succeeded", "failed", "canceled"] * 10

    async with trio.open_nursery() as nursery:
        for status in statuses:
            nursery.start_soon(mesh.status, envelope_id, status, {"by": status})
        nursery.start_soon(mesh.ext, "DELETE", envelope_id)
    final = await mesh.get(envelope_id)
    sequences = []
    for stream in streams:
        events = await stream.wait_end()
        sequences.append(stream.raw[len(stream.raw) - len(events[-1].data) - 30 :])
        last = json.loads(events[-1].data)
        assert last["status"] == final["status"]
        assert (
            sum(
                json.loads(e.data).get("status") in ("succeeded", "failed", "canceled")
                for e in events[1:]
            )
            == 1
        )
    assert len({s[-200:] for s in sequences}) == 1


async def test_demo_actors_drive_envelopes(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_DEMO_ACTORS="1")
    echo = await mesh.create("echo", {"payload": {"hello": "mesh"}})
    story = await mesh.create("story", {"payload": {"text": "one two three", "delay": 0}})
    stream = await mesh.sse(story)
    events = await stream.wait_end()
    final = json.loads(events[-1].data)
    assert final["status"] == "succeeded" and final["result"] == {"text": "one two three"}
    echo_events = await (await mesh.sse(echo)).wait_end()
    assert json.loads(echo_events[-1].data)["status"] == "succeeded"
    envelope = await mesh.get(echo)
    assert envelope["data"]["result"] == {"hello": "mesh"}
    assert envelope["data"]["progress_percent"] == 100
    done = await mesh.get(story)
    assert done["data"]["progress_percent"] == 100 and done["data"]["curr"] == "review"


async def test_shutdown_ends_open_streams_and_returns(nursery: trio.Nursery) -> None:
    shutdown = trio.Event()
    mesh, stopped = await start_stoppable(nursery, shutdown)
    envelope_id = await mesh.create()
    streams = [await mesh.sse(envelope_id) for _ in range(3)]
    for stream in streams:
        await stream.wait_for(1)
    shutdown.set()
    for stream in streams:
        await stream.wait_end(timeout=5)
    with trio.fail_after(5):
        await stopped.wait()
    with pytest.raises(OSError):
        await http(mesh.ext_port, "GET", "/health")


def test_cli_sigterm_exits_zero_and_bad_config_names_variable(tmp_path: object) -> None:
    env = {
        **os.environ,
        "ASYA_MESH_EXTERNAL_PORT": "0",
        "ASYA_MESH_INTERNAL_PORT": "0",
        "ASYA_MESH_HOST": "127.0.0.1",
        "ASYA_LOG_LEVEL": "info",
    }
    with subprocess.Popen(
        [sys.executable, "-m", "mesh_trio"], env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "mesh API listening" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "mesh API stopped" in proc.stderr.read()
    bad = subprocess.run(
        [sys.executable, "-m", "mesh_trio"],
        env={**env, "ASYA_BACKSTOP_INTERVAL": "soon"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "ASYA_BACKSTOP_INTERVAL" in bad.stderr


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ASYA_MESH_EXTERNAL_PORT": "http"}, "ASYA_MESH_EXTERNAL_PORT"),
        ({"ASYA_MESH_INTERNAL_PORT": "70000"}, "ASYA_MESH_INTERNAL_PORT"),
        ({"ASYA_QUEUE_TRANSPORT": "kafka"}, "ASYA_QUEUE_TRANSPORT"),
        ({"ASYA_QUEUE_TRANSPORT": "rabbitmq"}, "ASYA_RABBITMQ_URL"),
        ({"ASYA_QUEUE_TRANSPORT": "sqs"}, "ASYA_SQS_REGION"),
        ({"ASYA_MESH_STORE": "redis:x"}, "ASYA_MESH_STORE"),
        ({"ASYA_MESH_SSE_KEEPALIVE": "0s"}, "ASYA_MESH_SSE_KEEPALIVE"),
        ({"ASYA_LOG_LEVEL": "loud"}, "ASYA_LOG_LEVEL"),
        ({"ASYA_NAMESPACE": "a b"}, "ASYA_NAMESPACE"),
        ({"ASYA_MESH_COMPAT": "maybe"}, "ASYA_MESH_COMPAT"),
        ({"ASYA_INTERNAL_URL": "ftp://x"}, "ASYA_INTERNAL_URL"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env(env)


def test_defaults_and_durations() -> None:
    config = Config.from_env({})
    assert (config.external_port, config.internal_port, config.prefix) == (8080, 8081, "/api/v1")
    assert config.backstop_interval == 5.0 and config.sse_keepalive == 15.0
    assert config.embedded and config.transport == "memory"
    assert Config.from_env({"ASYA_MESH_API_PREFIX": ""}).router.prefix == ""
    assert [parse_duration(x) for x in ("5s", "500ms", "1m", "1m30s", "2", "0.5", "1h")] == [
        5,
        0.5,
        60,
        90,
        2,
        0.5,
        3600,
    ]
    for bad in ("", "5x", "-1", "s", "1s2", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_duration(bad)
