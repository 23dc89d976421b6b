"""Fuzzing the lean listener with raw bytes over a real socket: random bytes and mutated valid
requests. Whatever arrives, the server answers only well-formed HTTP/1.1 responses (or just
closes), never fails a connection task (nothing logged), and serves the next connection."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_trio._lean import Reply, Request
from tests.lean_helpers import WAIT, request, running, statuses_after

VALID = [
    request("GET", "/a?b=1"),
    request("HEAD", "/h"),
    request("POST", "/p", b'{"x": [1, 2]}'),
    request("POST", "/e", b"hello", headers="Expect: 100-continue\r\n"),
    b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    request("GET", "/1") + request("POST", "/2", b"xy") + request("GET", "/3"),
]

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def echo(request: Request) -> Reply:
    """Echo, with an empty body for HEAD so the reader needs no knowledge of which request
    (in fuzzed bytes) was a HEAD."""
    if request.method == "HEAD":
        return Reply(200)
    body = json.dumps([request.method, request.path, request.body.decode("latin-1")])
    return Reply(200, [(b"content-type", b"application/json")], body.encode())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with a few bytes inserted, deleted, replaced or repeated."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        if kind == "insert":
            data[at:at] = draw(
                st.binary(max_size=8)
                | st.sampled_from([b"\r\n", b" ", b":", b"\x00", b"\n", b"0", b"9" * 12, b";"])
            )
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
    return bytes(data)


async def _check(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    async with running(echo, header_timeout=2.0) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            statuses = await statuses_after(client, data)
        assert all(status in (100, 200, 400, 408, 413, 431, 505) for status in statuses)
        # The server is still up, and serves a well-formed request on a new connection.
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/after"))
            assert (await client.response()).json() == ["GET", "/after", ""]
        assert server.stats.handler_errors == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@FUZZ
@given(data=st.binary(max_size=600))
async def test_random_bytes(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    await _check(data, caplog)


@FUZZ
@given(data=mutated())
async def test_mutated_valid_requests(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    await _check(data, caplog)
