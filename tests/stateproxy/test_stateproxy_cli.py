"""The `asya-state-proxy` command: settings errors, start-up failures, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

COMMAND = [sys.executable, "-c", "from mesh_trio.stateproxy._cli import main; main()"]


def environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNECTOR_", "STATE_PROXY"))}
    env.update(settings)
    return env


async def run_cli(**settings: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            COMMAND,
            env=environment(**settings),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({}, "CONNECTOR_SOCKET"),
        ({"CONNECTOR_SOCKET": "/tmp/x.sock"}, "STATE_PROXY_PG_URL"),
        (
            {"CONNECTOR_SOCKET": "/tmp/x.sock", "STATE_PROXY_PG_URL": "host=a port"},
            "STATE_PROXY_PG_URL",
        ),
        (
            {
                "CONNECTOR_SOCKET": "/tmp/x.sock",
                "STATE_PROXY_PG_URL": "postgresql://postgres@127.0.0.1/test",
                "STATE_PROXY_PG_INDEXES": "status,a;b",
            },
            "STATE_PROXY_PG_INDEXES",
        ),
        (
            {
                "CONNECTOR_SOCKET": "/tmp/x.sock",
                "STATE_PROXY_PG_URL": "postgresql://postgres@127.0.0.1/test",
                "ASYA_LOG_LEVEL": "chatty",
            },
            "ASYA_LOG_LEVEL",
        ),
    ],
)
async def test_bad_settings_stop_with_one_line_naming_the_variable(
    settings: dict[str, str], variable: str
) -> None:
    done = await run_cli(**settings)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"asya-state-proxy: {variable}")


@pytest.mark.postgres
async def test_unreachable_postgres_stops_with_one_line(socket_path: str) -> None:
    done = await run_cli(
        CONNECTOR_SOCKET=socket_path, STATE_PROXY_PG_URL="postgresql://postgres@127.0.0.1:1/test"
    )
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("asya-state-proxy: STATE_PROXY_PG_URL: cannot use PostgreSQL")


@pytest.mark.postgres
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serves_until_a_signal_then_stops_cleanly(
    socket_path: str, pg_url: str, make_client, signum: int
) -> None:
    process = await trio.lowlevel.open_process(
        COMMAND,
        env=environment(
            CONNECTOR_SOCKET=socket_path,
            STATE_PROXY_PG_URL=pg_url,
            STATE_PROXY_PG_INDEXES="status",
        ),
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    try:
        with trio.fail_after(20):
            while b"listening on" not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
        client = make_client(socket_path)
        assert (await client.put("cli", {"status": "pending"})).status == 204
        assert (await client.get("/keys/cli")).status == 200
        process.send_signal(signum)
        with trio.fail_after(20):
            while chunk := await process.stderr.receive_some(4096):
                log += chunk
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = log.decode()
    assert "INFO" in text and "listening on" in text and "stopped" in text
    assert "Traceback" not in text
    assert not await trio.Path(socket_path).exists()
