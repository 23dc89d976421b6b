"""`statistics()` of the pool and of the HTTP server: frozen snapshots, real connections."""

from __future__ import annotations

import os

import attrs
import pytest
import trio
import trio.testing

from mesh_trio.stateproxy._http import HttpServer, Request, Response, ServerStatistics
from mesh_trio.stateproxy._pg import PgPool, PoolStatistics

pytestmark = pytest.mark.postgres


async def test_pool_statistics_count_connections_and_failures(pg_url: str) -> None:
    pool = PgPool(pg_url, max_size=2)
    try:
        assert pool.statistics() == PoolStatistics(idle=0, in_use=0, opened=0, failures=0)
        await pool.execute(b"SELECT 1")
        await pool.execute(b"SELECT 2")
        stats = pool.statistics()
        assert stats == PoolStatistics(idle=1, in_use=0, opened=1, failures=0)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            stats.idle = 5  # type: ignore[misc]
    finally:
        pool.close()
    dead = PgPool("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    with pytest.raises(Exception, match="connect"):
        await dead.execute(b"SELECT 1")
    assert dead.statistics() == PoolStatistics(idle=0, in_use=0, opened=0, failures=1)


async def test_server_statistics_count_open_and_idle_connections(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s.sock")
    gate = trio.Event()

    async def handler(request: Request) -> Response:
        await gate.wait()
        return Response(status=204)

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    server = HttpServer(handler, 1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, trio.SocketListener(sock))
        assert server.statistics() == ServerStatistics(connections=0, idle=0)
        idle = await trio.open_unix_socket(path)
        busy = await trio.open_unix_socket(path)
        await busy.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics() == ServerStatistics(connections=2, idle=1)
        gate.set()
        assert (await busy.receive_some(1000)).startswith(b"HTTP/1.1 204")
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics() == ServerStatistics(connections=2, idle=2)
        await idle.aclose()
        await busy.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics() == ServerStatistics(connections=0, idle=0)
        server.begin_drain()
        with trio.fail_after(5):
            await server.finished.wait()
