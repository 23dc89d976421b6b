"""The mesh API's HTTP client (`mesh_trio._client.HttpPool`) over real sockets.

- Idle connections the server closed are never written on: the demo actors keep working across
  idle gaps longer than hypercorn's keep-alive timeout, and the state-proxy store across a proxy
  restart.
- The retry rule, against a tiny server of the test's own that counts the requests it received:
  a request that never reached the peer whole is sent again on a fresh connection, writes
  included; one the peer read whole is not re-sent unless idempotent.
- Connect errors and exchange errors map apart; a cancelled request leaves no connection open.
- The demo actors retry a 503 or a connection error for a bounded time, then log once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import h11
import pytest
import trio

from mesh_trio import _demo, _server
from mesh_trio._client import ConnectError, ExchangeError, HttpPool
from tests.harness import WAIT, MeshClient, start_mesh
from tests.test_proxy_faults import Proxy

# hypercorn's keep-alive timeout in these tests: far below the client's expiry (3 s), so only
# the readability check before reuse can save a request from a connection the server closed.
SHORT_KEEP_ALIVE = 0.2


@pytest.fixture
def short_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the mesh API's listeners close idle connections after SHORT_KEEP_ALIVE seconds."""
    make = _server.hypercorn_config

    def config(*args: Any, **kwargs: Any) -> Any:
        settings = make(*args, **kwargs)
        settings.keep_alive_timeout = SHORT_KEEP_ALIVE
        return settings

    monkeypatch.setattr(_server, "hypercorn_config", config)


async def idle_gap(port: int) -> None:
    """Return once the server at `port` closes idle connections: a probe connection made now,
    after the connections under test went idle, is closed by the server's keep-alive timeout."""
    with trio.fail_after(WAIT):
        probe = await trio.open_tcp_stream("127.0.0.1", port)
        async with probe:
            await probe.send_all(b"GET /health HTTP/1.1\r\nhost: probe\r\n\r\n")
            while await probe.receive_some(65536):
                pass


async def wait_status(mesh: MeshClient, envelope_id: str, status: str) -> None:
    """Poll the envelope until it has `status` (an actor's result arrives over its own socket)."""
    with trio.fail_after(WAIT):
        while True:
            if (await mesh.get(envelope_id))["status"] == status:
                return
            await trio.sleep(0.01)


async def test_demo_actors_post_after_an_idle_gap_longer_than_keep_alive(
    nursery: trio.Nursery, short_keep_alive: None
) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_DEMO_ACTORS="1")
    for n in range(3):
        envelope_id = await mesh.create("echo", {"payload": {"n": n}})
        await wait_status(mesh, envelope_id, "succeeded")
        assert (await mesh.get(envelope_id))["data"]["result"] == {"n": n}
        await idle_gap(mesh.int_port)


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    nursery: trio.Nursery, short_keep_alive: None
) -> None:
    mesh = await start_mesh(nursery)
    envelope_id = await mesh.create()
    pool = HttpPool.tcp("127.0.0.1", mesh.int_port)
    try:
        for status in ("running", "running", "succeeded"):
            reply = await pool.request(
                "POST",
                mesh.path(f"{envelope_id}/events"),
                body=b'{"type":"status","status":"%s"}' % status.encode(),
            )
            assert reply.status == 204, reply
            await idle_gap(mesh.int_port)
        stats = pool.statistics()
    finally:
        await pool.aclose()
    assert (stats.connections_opened, stats.requests, stats.retries) == (3, 3, 0)
    assert (await mesh.get(envelope_id))["status"] == "succeeded"


@pytest.mark.postgres
async def test_first_create_after_a_state_proxy_restart_is_created(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    proxy = Proxy(nursery, os.path.join(short_dir, "proxy.sock"), pg_url)
    await proxy.start()
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=proxy.path)
    first = await mesh.create()
    await proxy.stop()
    await proxy.start()
    reply = await mesh.ext("POST", "?actor=worker", {})
    assert reply.status == 201, reply
    assert (await mesh.get(first))["status"] == "pending"


# -- a tiny server of the test's own -----------------------------------------------------------

REPLY = "reply"  # read the request, answer 200 and keep the connection
DROP = "drop"  # read the whole request, then close without an answer
RESET = "reset"  # read nothing of the next request: close (RST) once its bytes arrive
HANG = "hang"  # read the whole request, never answer; note when the client closes


@attrs.define(eq=False)
class TinyServer:
    """Counts every request it read whole; `actions` says what to do with the next ones
    (one action per request, on whatever connection it arrives; REPLY once they run out)."""

    port: int = 0
    actions: list[str | int] = attrs.field(factory=list)  # an int: answer with that status
    received: list[tuple[int, str, str, int]] = attrs.field(factory=list)
    connections: int = 0
    hanging: trio.Event = attrs.field(factory=trio.Event)
    client_closed: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                # Decide once the next request's first bytes (or EOF) arrive, not before.
                await trio.lowlevel.wait_readable(stream.socket)
                action = self.actions.pop(0) if self.actions else REPLY
                if action == RESET:
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                request, size = await self._read(stream, conn)
                if request is None:
                    return
                self.received.append(
                    (number, request.method.decode(), request.target.decode(), size)
                )
                if action == DROP:
                    return
                if action == HANG:
                    self.hanging.set()
                    while await stream.receive_some(65536):
                        pass
                    self.client_closed.set()
                    return
                body = b"" if action == 204 else b"ok"
                status = action if isinstance(action, int) else 200
                head = h11.Response(
                    status_code=status, headers=[("content-length", str(len(body)))]
                )
                await stream.send_all(
                    conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()

    @staticmethod
    async def _read(stream: trio.SocketStream, conn: h11.Connection) -> tuple[Any, int]:
        request: Any = None
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive_some(65536))
                except trio.BrokenResourceError:
                    return None, 0
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, size
            else:  # ConnectionClosed
                return None, 0


@pytest.fixture
async def tiny(nursery: trio.Nursery) -> TinyServer:
    server = TinyServer()
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


@pytest.fixture
async def pool(tiny: TinyServer) -> Any:
    client = HttpPool.tcp("127.0.0.1", tiny.port, timeout=WAIT)
    yield client
    await client.aclose()


# Far more than the socket buffers take while the server reads nothing: the write is still
# going on when the server resets the connection.
BIG = b"x" * (16 << 20)


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_write_the_peer_never_read_is_sent_again_on_a_fresh_connection(
    tiny: TinyServer, pool: HttpPool, method: str
) -> None:
    assert (await pool.request(method, "/first", body=b"1")).status == 200
    tiny.actions = [RESET]
    assert (await pool.request(method, "/second", body=BIG)).status == 200
    assert tiny.received == [(1, method, "/first", 1), (2, method, "/second", len(BIG))]
    assert pool.statistics().retries == 1


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_write_the_peer_read_whole_is_not_sent_again(
    tiny: TinyServer, pool: HttpPool, method: str
) -> None:
    assert (await pool.request(method, "/first", body=b"1")).status == 200
    tiny.actions = [DROP]
    with pytest.raises(ExchangeError, match="after the request was sent"):
        await pool.request(method, "/second", body=b"2")
    assert tiny.received == [(1, method, "/first", 1), (1, method, "/second", 1)]
    assert tiny.connections == 1
    assert pool.statistics().retries == 0


async def test_a_read_the_peer_dropped_is_sent_again_once(tiny: TinyServer, pool: HttpPool) -> None:
    tiny.actions = [DROP]
    assert (await pool.request("GET", "/key")).status == 200
    assert tiny.received == [(1, "GET", "/key", 0), (2, "GET", "/key", 0)]
    tiny.actions = [DROP, DROP]
    with pytest.raises(ExchangeError):
        await pool.request("GET", "/key")
    assert len(tiny.received) == 4  # once more, not forever


async def test_a_write_marked_idempotent_is_sent_again(tiny: TinyServer, pool: HttpPool) -> None:
    tiny.actions = [DROP]
    assert (await pool.request("POST", "/lookup", body=b"q", idempotent=True)).status == 200
    assert [r[2] for r in tiny.received] == ["/lookup", "/lookup"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda where: HttpPool.tcp("127.0.0.1", closed_port()),
        lambda where: HttpPool.unix(os.path.join(where, "missing.sock")),
    ],
    ids=["tcp", "unix"],
)
async def test_nothing_listening_is_a_connect_error_after_one_retry(
    make: Callable[[str], HttpPool], short_dir: str
) -> None:
    pool = make(short_dir)
    with trio.fail_after(WAIT), pytest.raises(ConnectError, match="cannot connect"):
        await pool.request("POST", "/x", body=b"1")
    stats = pool.statistics()
    assert (stats.requests, stats.retries, stats.connections_open) == (0, 1, 0)  # none written
    await pool.aclose()
    with pytest.raises(ConnectError, match="closed"):
        await pool.request("GET", "/x")


async def test_no_reply_in_time_is_an_exchange_error(tiny: TinyServer) -> None:
    pool = HttpPool.tcp("127.0.0.1", tiny.port, timeout=0.3)
    tiny.actions = [HANG]
    with trio.fail_after(WAIT), pytest.raises(ExchangeError, match=r"within 0\.3s"):
        await pool.request("PUT", "/slow", body=b"1")
    assert len(tiny.received) == 1
    assert pool.statistics().connections_open == 0
    await pool.aclose()


async def test_cancelled_mid_request_leaves_no_connection_open(
    tiny: TinyServer, pool: HttpPool
) -> None:
    assert (await pool.request("GET", "/warm")).status == 200
    tiny.actions = [HANG]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(pool.request, "PUT", "/hang", body=b"1"))
        with trio.fail_after(WAIT):
            await tiny.hanging.wait()
        nursery.cancel_scope.cancel()
    assert pool.statistics().connections_open == 0
    with trio.fail_after(WAIT):
        await tiny.client_closed.wait()  # the server saw the socket close
    assert (await pool.request("GET", "/after")).status == 200
    assert pool.statistics().connections_opened == 2


# -- the demo actors' sidecar retry ------------------------------------------------------------


async def test_demo_sidecar_retries_a_503_until_accepted(tiny: TinyServer, pool: HttpPool) -> None:
    tiny.actions = [503, 503, 204]
    side = _demo._Sidecar(pool, "/api/v1", "e1")
    with trio.fail_after(WAIT):
        await side.status("running", {})
    assert [r[2] for r in tiny.received] == ["/api/v1/mesh/e1/events"] * 3


@pytest.mark.parametrize("unreachable", [True, False], ids=["connect-error", "503"])
async def test_demo_sidecar_gives_up_after_a_bounded_time_and_logs_once(
    tiny: TinyServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    unreachable: bool,
) -> None:
    monkeypatch.setattr(_demo, "RETRY_FOR", 0.3)
    port = closed_port() if unreachable else tiny.port
    tiny.actions = [503] * 100
    pool = HttpPool.tcp("127.0.0.1", port)
    side = _demo._Sidecar(pool, "/api/v1", "e1")
    with trio.fail_after(WAIT), pytest.raises(_demo._Unreachable):
        await side.post({"type": "fly", "data": {"token": "t"}})
    await pool.aclose()
    lines = [r for r in caplog.records if r.name == "mesh_trio.demo"]
    assert len(lines) == 1 and "not taken in 0.3s" in lines[0].getMessage()
    if unreachable:
        assert tiny.received == []
    else:
        assert len(tiny.received) > 1  # retried, not just tried
