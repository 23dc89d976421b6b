"""How the mesh API's HTTP client (`mesh_trio._client.HttpPool`) reads replies, over real
sockets: a scripted server answers each request with bytes of the test's own, so every framing
the parser must handle (chunked, to EOF, interim 1xx, HEAD, `Connection: close`, too large,
malformed, bytes past the reply) is checked, and with it whether the connection is reused."""

from __future__ import annotations

from functools import partial
from typing import Any

import attrs
import pytest
import trio

from mesh_trio._client import ExchangeError, HttpPool
from tests.harness import WAIT

CLOSE = b"<close>"  # a reply ending with this: the server closes the connection after it


@attrs.define(eq=False)
class ScriptedServer:
    """Answers the n-th request (on whatever connection) with `replies[n]`, as is."""

    replies: list[bytes]
    port: int = 0
    connections: int = 0
    requests: list[bytes] = attrs.field(factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffered = b""
        async with stream:
            while self.replies:
                while b"\r\n\r\n" not in buffered:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                self.requests.append(head)
                reply = self.replies.pop(0)
                await stream.send_all(reply.removesuffix(CLOSE))
                if reply.endswith(CLOSE):
                    return


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> Any:
    """`await scripted(*replies)`: a server answering with `replies`, and a pool to it."""
    pools: list[HttpPool] = []

    async def serve(*replies: bytes) -> tuple[ScriptedServer, HttpPool]:
        server = ScriptedServer(list(replies))
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        pools.append(HttpPool.tcp("127.0.0.1", server.port, timeout=WAIT, max_reply=1000))
        return server, pools[-1]

    yield serve
    for pool in pools:
        await pool.aclose()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def test_a_content_length_reply_keeps_the_connection(scripted: Any) -> None:
    server, pool = await scripted(OK, OK)
    for _ in range(2):
        reply = await pool.request("GET", "/a")
        assert (reply.status, reply.body) == (200, b"ok")
        assert (b"content-length", b"2") in reply.headers
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /a HTTP/1.1\r\nhost: 127.0.0.1:")


async def test_a_chunked_reply_is_joined(scripted: Any) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    )
    server, pool = await scripted(chunked, OK)
    assert (await pool.request("GET", "/")).body == b"abcde"
    assert (await pool.request("GET", "/")).body == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        # Bytes past the reply; the server keeps the connection open, so only the client's
        # refusal to reuse it opens the second one.
        OK + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0", "bytes-past-the-reply"],
)
async def test_a_reply_that_ends_the_connection_is_not_reused(scripted: Any, first: bytes) -> None:
    server, pool = await scripted(first if first.startswith(OK) else first + CLOSE, OK)
    assert (await pool.request("GET", "/")).body == b"ok"
    assert (await pool.request("GET", "/")).body == b"ok"
    assert server.connections == 2


async def test_a_body_delimited_by_the_end_of_the_connection(scripted: Any) -> None:
    server, pool = await scripted(b"HTTP/1.1 200 OK\r\n\r\nuntil the end" + CLOSE, OK)
    assert (await pool.request("GET", "/")).body == b"until the end"
    assert (await pool.request("GET", "/")).body == b"ok"
    assert server.connections == 2


async def test_an_interim_reply_is_skipped(scripted: Any) -> None:
    _, pool = await scripted(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    reply = await pool.request("POST", "/", body=b"x")
    assert (reply.status, reply.body) == (200, b"ok")


async def test_a_head_reply_has_no_body_whatever_its_length(scripted: Any) -> None:
    _, pool = await scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", OK)
    with trio.fail_after(WAIT):
        reply = await pool.request("HEAD", "/")
    assert (reply.status, reply.body) == (200, b"")
    assert (await pool.request("GET", "/")).body == b"ok"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n" + b"x" * 2000, "larger than 1000"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "malformed reply"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort" + CLOSE, "before its reply ended"),
        (b"" + CLOSE, "before its reply ended"),
    ],
    ids=["too-large", "malformed", "cut-short", "no-reply"],
)
async def test_a_bad_reply_is_an_exchange_error(scripted: Any, reply: bytes, message: str) -> None:
    server, pool = await scripted(reply, OK)
    with pytest.raises(ExchangeError, match=message):
        await pool.request("POST", "/", body=b"x")
    assert len(server.requests) == 1  # a write is not sent again once the peer read it
    assert (await pool.request("GET", "/")).body == b"ok"  # on a fresh connection
    assert server.connections == 2
