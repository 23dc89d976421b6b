"""The lean listener over real sockets on 127.0.0.1: every byte the client sends is written by
the test (`tests/lean_helpers.py`), every reply is parsed strictly."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

from mesh_trio import _lean
from mesh_trio._lean import MAX_HEAD, Reply, Request
from tests.lean_helpers import WAIT, Client, Malformed, Streams, make_echo, request, running, until


@pytest.fixture(autouse=True, params=["epoll", "trio"])
def readiness(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: connections waiting on the listener's own epoll set, and (as where
    there is no epoll) on trio's `wait_readable`."""
    if request.param == "trio":
        monkeypatch.setattr(_lean, "EPOLL", False)


async def test_keep_alive_serves_requests_on_one_connection() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            for index in range(3):
                await client.send(request("GET", f"/a/b?x={index}"))
                response = await client.response()
                assert response.status == 200
                assert response.json() == {
                    "method": "GET",
                    "path": "/a/b",
                    "query": f"x={index}",
                    "body": "",
                }
                assert response.header(b"connection") is None
                assert response.header(b"date") is not None
        assert server.stats.connections == 1


async def test_post_body_with_content_length() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("POST", "/p", b'{"a": 1}'))
            response = await client.response()
        assert response.json()["body"] == '{"a": 1}'
        assert response.header(b"content-type") == b"application/json"


async def test_chunked_request_body() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(
                b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
            )
            response = await client.response()
        assert response.json()["body"] == "abcde"


async def test_body_split_across_writes() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            data = request("POST", "/p", b"x" * 100_000)
            for start in range(0, len(data), 7000):
                await client.send(data[start : start + 7000])
            response = await client.response()
        assert response.json()["body"] == "x" * 100_000


async def test_percent_encoded_path_is_decoded_and_query_is_raw() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/a%20b/%C3%A9?q=%20"))
            response = await client.response()
        assert response.json()["path"] == "/a b/\u00e9"
        assert response.json()["query"] == "q=%20"


async def test_hundred_pipelined_requests_in_one_write_are_answered_in_order() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(b"".join(request("GET", f"/n?{index}") for index in range(100)))
            queries = [(await client.response()).json()["query"] for _ in range(100)]
        assert queries == [str(index) for index in range(100)]
        assert server.stats.requests == 100
        assert server.stats.sends < 100  # batched: many replies per send_all


async def test_no_content_reply_has_no_body_and_no_length() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/empty") + request("GET", "/x"))
            empty = await client.response()
            after = await client.response()
        assert empty.status == 204
        assert empty.header(b"content-length") is None
        assert after.json()["path"] == "/x"


async def test_head_has_the_headers_of_get_and_no_body() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/h"))
            get = await client.response()
            await client.send(request("HEAD", "/h") + request("GET", "/next"))
            head = await client.response(head=True)
            after = await client.response()
        assert head.status == 200
        # The echo includes the method, so the body lengths differ by len("HEAD") - len("GET").
        assert int(head.header(b"content-length") or b"") == len(get.body) + 1
        assert head.header(b"content-type") == get.header(b"content-type")
        assert after.json()["path"] == "/next"


async def test_stream_reply_is_chunked_and_closes_its_iterator() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/stream?4"))
            response = await client.response()
            assert await client.closed()
        assert response.status == 200
        assert response.header(b"transfer-encoding") == b"chunked"
        assert response.header(b"content-type") == b"text/event-stream"
        assert response.chunks == [b"data: %d\n\n" % index for index in range(4)]
        assert server.streams.closed == 1


async def test_client_leaving_an_open_stream_closes_its_iterator() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/hold?2"))
            response_head = await client._line()
            assert response_head.startswith(b"HTTP/1.1 200")
            await client.aclose()
            await server.streams.closed_event.wait()
        assert server.streams.opened == server.streams.closed == 1
        await until(lambda: not server.stats.open_connections)


async def test_head_of_a_stream_sends_no_body_and_closes_the_iterator() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("HEAD", "/hold"))
            response = await client.response(head=True)
            assert await client.closed()
        assert response.header(b"transfer-encoding") == b"chunked"
        assert server.streams.closed == 1


async def test_http10_closes_unless_keep_alive_is_asked() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(b"GET /old HTTP/1.0\r\n\r\n")
            response = await client.response()
            assert await client.closed()
        assert response.json()["path"] == "/old"
        assert response.header(b"connection") == b"close"

        client = await server.connect()
        with trio.fail_after(WAIT):
            for _ in range(2):
                await client.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                response = await client.response()
                assert response.header(b"connection") == b"keep-alive"
        assert server.stats.connections == 2


async def test_http10_stream_is_delimited_by_the_close() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(b"GET /stream?2 HTTP/1.0\r\n\r\n")
            head = await client._line()
            while await client._line():
                pass
            while await client._more():
                pass
        assert head.startswith(b"HTTP/1.1 200")
        assert bytes(client.buffer) == b"data: 0\n\ndata: 1\n\n"


async def test_connection_close_is_honoured_and_later_requests_ignored() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(
                request("GET", "/one", headers="Connection: close\r\n") + request("GET", "/two")
            )
            response = await client.response()
            assert await client.closed()
        assert response.json()["path"] == "/one"
        assert response.header(b"connection") == b"close"
        assert server.stats.requests == 1


async def test_max_requests_per_connection() -> None:
    async with running(max_requests=3) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(b"".join(request("GET", f"/m?{index}") for index in range(5)))
            responses = [await client.response() for _ in range(3)]
            assert await client.closed()
        assert [r.header(b"connection") for r in responses] == [None, None, b"close"]


async def test_idle_connection_is_closed_after_keepalive_timeout() -> None:
    async with running(keepalive_timeout=0.2) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/i"))
            assert (await client.response()).status == 200
            assert await client.closed()


async def test_slow_head_is_cut_at_header_timeout() -> None:
    async with running(header_timeout=0.5, keepalive_timeout=30) as server:
        client = await server.connect()
        data = request("GET", "/slow")
        sent = 0
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    nonlocal sent
                    for byte in data[:-1]:
                        await client.send(bytes([byte]))
                        sent += 1
                        await trio.sleep(0.1)

                nursery.start_soon(trickle)
                response = await client.response()
                nursery.cancel_scope.cancel()
        assert response.status == 408
        assert response.header(b"connection") == b"close"
        assert sent < len(data) - 1


async def test_slow_body_is_cut_at_header_timeout() -> None:
    async with running(header_timeout=0.3, keepalive_timeout=30) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("POST", "/p", b"0123456789")[:-5])
            response = await client.response()
            assert await client.closed()
        assert response.status == 408


async def test_client_that_reads_no_reply_is_cut_at_header_timeout() -> None:
    big = Reply(200, body=b"x" * (16 * 1024 * 1024))

    async def handler(request: Request) -> Reply:
        return big

    async with running(handler, header_timeout=0.3) as server:
        client = await server.connect()
        # A small receive buffer (no autotuning), so the reply cannot all fit in the kernel.
        client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        await client.send(request("GET", "/big"))
        await until(lambda: server.stats.open_connections == 0)


async def test_expect_100_continue_before_the_body() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(
                b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = await client.response()
            assert interim.status == 100
            await client.send(b"hello")
            response = await client.response()
        assert response.json()["body"] == "hello"


async def test_no_100_continue_when_the_body_came_with_the_head() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("POST", "/e", b"hello", headers="Expect: 100-continue\r\n"))
            response = await client.response()
        assert response.status == 200


async def test_expect_100_continue_with_too_large_body_gets_413_not_100() -> None:
    async with running(max_body=10) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(
                b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
            )
            response = await client.response()
            assert await client.closed()
        assert response.status == 413


async def _refused(raw: bytes, status: int = 400, **settings: object) -> str:
    async with running(**settings) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(raw)
            response = await client.response()
            assert await client.closed()
        assert response.status == status
        assert response.header(b"connection") == b"close"
        assert response.header(b"content-type") == b"application/json"
        error: str = response.json()["error"]
        assert server.stats.requests == 0
        return error


async def test_content_length_over_max_body_is_413_before_reading() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(
                b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (10 * 1024**2 + 1)
            )
            response = await client.response()  # no body sent at all
            assert await client.closed()
        assert response.status == 413


async def test_body_of_exactly_max_body_is_accepted() -> None:
    async with running(max_body=1000) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("POST", "/p", b"x" * 1000))
            assert (await client.response()).status == 200


async def test_chunked_body_over_max_body_is_413() -> None:
    chunk = b"100\r\n" + b"x" * 256 + b"\r\n"
    raw = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 5
    assert "too large" in await _refused(raw, 413, max_body=1000)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="garbage"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n", id="bad-name"),
        pytest.param(b"GET /%ff HTTP/1.1\r\nHost: t\r\n\r\n", id="path-not-utf8"),
        pytest.param(b"CONNECT t:80 HTTP/1.1\r\nHost: t\r\n\r\n", id="connect"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="cl-and-te",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            id="duplicate-cl",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            id="conflicting-cl",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc", id="signed-cl"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            id="te-gzip-chunked",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="te-twice",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n", id="te-identity"
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n folded\r\n\r\n", id="obs-fold"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"ffffffffffffffffffff\r\n",
            id="chunk-size-overflow",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            id="chunk-without-crlf",
        ),
    ],
)
async def test_malformed_and_smuggling_requests_get_400_and_close(raw: bytes) -> None:
    assert await _refused(raw, 400)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_other_http_versions_get_505(version: bytes) -> None:
    assert await _refused(b"GET / " + version + b"\r\nHost: t\r\n\r\n", 505)


async def test_huge_head_gets_431() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert "too large" in await _refused(raw, 431)


async def test_many_tiny_headers_get_431() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"a: b\r\n" * 1000 + b"\r\n"
    assert await _refused(raw, 431)


async def test_replies_before_a_malformed_pipelined_request_are_sent() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/ok") + b"BAD\x00\r\n\r\n")
            first = await client.response()
            second = await client.response()
            assert await client.closed()
        assert first.json()["path"] == "/ok"
        assert second.status == 400


async def test_handler_exception_is_500_logged_once_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/fail") + request("GET", "/after"))
            response = await client.response()
            assert await client.closed()
        assert response.status == 500
        assert response.json() == {"error": "internal server error"}
        assert response.header(b"connection") == b"close"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert errors[0].exc_info is not None
        # The server is still up.
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/after"))
            assert (await client.response()).status == 200


async def test_client_leaving_mid_request_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as server:
        for partial in (b"GET /x HT", request("POST", "/p", b"0123456789")[:-3]):
            client = await server.connect()
            await client.send(partial)
            await client.aclose()
        client = await server.connect()
        await client.send(request("GET", "/sleep?0.2"))
        await client.aclose()  # leaves before its reply is sent
        await until(lambda: not server.stats.open_connections)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_graceful_drain() -> None:
    async with running(graceful_timeout=WAIT) as server:
        idle = await server.connect()
        await idle.send(request("GET", "/first"))
        busy = await server.connect()
        with trio.fail_after(WAIT):
            assert (await idle.response()).status == 200
            await busy.send(request("GET", "/sleep?0.5"))
            await until(lambda: server.stats.requests == 2)
            server.stop.set()
            assert await idle.closed()
            response = await busy.response()
            assert await busy.closed()
        assert response.status == 200
        assert response.header(b"connection") == b"close"
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", server.port)


async def test_graceful_timeout_cancels_what_is_left() -> None:
    async with running(graceful_timeout=0.2) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/hold"))
            await client._line()
            server.stop.set()
            await server.streams.closed_event.wait()
            while await client._more():
                pass  # the connection ends (no terminating chunk)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(Reply(1000), id="status-out-of-range"),
        pytest.param(Reply(101), id="interim-status"),
        pytest.param(Reply(200, body="text"), id="str-body"),  # type: ignore[arg-type]
        pytest.param(Reply(200, [("x", "y")]), id="str-header"),  # type: ignore[list-item]
        pytest.param(Reply(200, [("x", "y")], stream=iter(())), id="bad-stream-head"),  # type: ignore[arg-type, list-item]
    ],
)
async def test_unsendable_reply_is_500_and_the_server_stays_up(
    bad: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: Request) -> Reply:
        return bad if request.path == "/bad" else Reply(204)

    async with running(handler) as server:
        client: Client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/bad"))
            response = await client.response()
            assert await client.closed()
            client = await server.connect()
            await client.send(request("GET", "/good"))
            assert (await client.response()).status == 204
        assert response.status == 500
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_stream_iterator_failing_truncates_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"one"
        raise RuntimeError("broadcaster bug")

    async def handler(request: Request) -> Reply:
        return Reply(200, stream=broken())

    async with running(handler) as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "/s"))
            with pytest.raises(Malformed):
                await client.response()  # no terminating chunk before the close
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_absolute_form_target() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(request("GET", "http://test/abs/path?q=1"))
            response = await client.response()
        assert response.json()["path"] == "/abs/path"
        assert response.json()["query"] == "q=1"


async def test_upgrade_request_is_answered_then_closed() -> None:
    async with running() as server:
        client = await server.connect()
        with trio.fail_after(WAIT):
            await client.send(
                request("GET", "/ws", headers="Connection: Upgrade\r\nUpgrade: websocket\r\n")
                + b"\x81\x05hello"
            )
            response = await client.response()
            assert await client.closed()
        assert response.json()["path"] == "/ws"


class RunningOutOfDescriptors:
    """A listener whose first `failures` accepts fail as when the process is out of file
    descriptors (EMFILE); then it accepts as the real one does."""

    def __init__(self, real: trio.SocketListener, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.failed = trio.Event()

    async def accept(self) -> trio.SocketStream:
        if self.failures:
            self.failures -= 1
            if not self.failures:
                self.failed.set()
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.real.accept()

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_accept_failures_are_logged_once_and_serving_resumes(
    caplog: pytest.LogCaptureFixture, nursery: trio.Nursery
) -> None:
    (real,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    flaky = RunningOutOfDescriptors(real, failures=3)
    stop = trio.Event()
    await nursery.start(
        partial(_lean.serve_lean, make_echo(Streams()), [flaky], shutdown_trigger=stop.wait)
    )
    with trio.fail_after(WAIT):
        await flaky.failed.wait()
        client = Client(await trio.open_tcp_stream("127.0.0.1", real.socket.getsockname()[1]))
        await client.send(request("GET", "/after"))
        assert (await client.response()).status == 200
    await client.aclose()
    stop.set()
    failures = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
