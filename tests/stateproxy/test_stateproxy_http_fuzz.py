"""Fuzzing the state proxy's HTTP server (`_http.HttpServer`, on httptools) with raw bytes over
a real socket, as the lean listener is fuzzed (tests/test_lean_fuzz.py): whatever arrives, it
answers only well-formed HTTP/1.1 responses (or just closes), logs nothing, and serves the next
connection. No PostgreSQL: the handler echoes."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_trio.stateproxy._http import HttpServer, Request, Response
from tests.lean_helpers import WAIT, Client, request, statuses_after
from tests.test_lean_fuzz import VALID, mutated

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def echo(request: Request) -> Response:
    if request.method == b"HEAD":
        return Response(status=200)
    echoed = [
        request.method.decode(),
        request.target.decode("latin-1"),
        request.body.decode("latin-1"),
    ]
    return Response(status=200, body=json.dumps(echoed).encode())


async def _check(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    server = HttpServer(echo, max_body=64)
    async with trio.open_nursery() as nursery:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        await nursery.start(partial(server.serve, listener))
        with trio.fail_after(WAIT):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            statuses = await statuses_after(client, data)
            await client.aclose()
            assert all(status in (100, 200, 400, 413, 431) for status in statuses)
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await client.send(request("GET", "/after"))
            assert (await client.response()).json() == ["GET", "/after", ""]
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@FUZZ
@given(data=st.binary(max_size=600) | mutated())
async def test_random_and_mutated_bytes(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    await _check(data, caplog)


async def test_the_valid_requests_are_answered(caplog: pytest.LogCaptureFixture) -> None:
    for data in VALID:
        await _check(data, caplog)
