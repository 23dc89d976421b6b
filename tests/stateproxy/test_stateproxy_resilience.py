"""Concurrency, PostgreSQL failures, start-up and shutdown of the state proxy.

PostgreSQL "going down" is simulated with a TCP forwarder between the proxy and the server, so
these tests never disturb other users of the shared PostgreSQL: stopping the forwarder cuts every
connection and refuses new ones (what a restart looks like from the proxy), freezing it keeps the
connections but forwards nothing (a hung server or a network partition).
"""

from __future__ import annotations

import functools
import os
import socket
import stat
from collections.abc import Callable

import psycopg
import pytest
import trio

from mesh_trio.stateproxy import StartupError, serve_state_proxy

pytestmark = pytest.mark.postgres

PG_HOST, PG_PORT = "127.0.0.1", 5432


class Forwarder:
    """A TCP forwarder to PostgreSQL on 127.0.0.1 that can be stopped, restarted and frozen,
    and can hold back PostgreSQL's hang-ups (`hold_hangups`: the bytes before it pass, the
    client's side stays open; `hangups` counts them)."""

    def __init__(self) -> None:
        self.port = 0
        self.frozen = False
        self.hold_hangups = False
        self.hangups = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                task_status.started()
                async with listeners[0] as listener:
                    while True:
                        client = await listener.accept()
                        nursery.start_soon(self._pipe_pair, client)

    async def _pipe_pair(self, client: trio.SocketStream) -> None:
        async with client:
            if self.frozen:
                await trio.sleep_forever()
            server = await trio.open_tcp_stream(PG_HOST, PG_PORT)
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, server, nursery.cancel_scope, False)
                nursery.start_soon(self._pipe, server, client, nursery.cancel_scope, True)

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        from_server: bool,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                while self.frozen:
                    await trio.sleep_forever()
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        if from_server and self.hold_hangups:
            self.hangups += 1
            return  # the client's side closes when the client writes, or the forwarder stops
        scope.cancel()


async def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait, at most `timeout` seconds, until `condition()` is true (checked every 10 ms)."""
    with trio.fail_after(timeout):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


def forwarded(pg_url: str, port: int) -> str:
    return pg_url.replace(f"{PG_HOST}:{PG_PORT}", f"{PG_HOST}:{port}")


async def start_proxy(nursery, socket_path: str, pg_url: str, **kwargs) -> None:
    await nursery.start(
        lambda task_status: serve_state_proxy(
            socket_path, pg_url, task_status=task_status, **kwargs
        )
    )


def backends(pg_admin, app_name: str) -> int:
    row = pg_admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
    ).fetchone()
    return int(row[0])


async def test_fifty_concurrent_conditional_updates_have_one_winner(client, make_client) -> None:
    await client.put("race", {"status": "pending"})
    results: dict[int, int] = {}

    async def contender(i: int) -> None:
        c = make_client(client.socket_path)
        reply = await c.put("race", {"status": "running", "winner": i}, if_status="pending")
        results[i] = reply.status

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(contender, i)
    winners = [i for i, status in results.items() if status == 204]
    assert len(winners) == 1
    assert sorted(results.values()) == [204] + [409] * 49
    stored = (await client.get("/keys/race")).json()["value"]
    assert stored == {"status": "running", "winner": winners[0]}


async def test_conditional_updates_serialise_a_status_chain(client, make_client) -> None:
    # 20 writers each try every step pending -> s1 -> ... -> s5: each step is won exactly once.
    await client.put("chain", {"status": "s0"})
    wins: list[tuple[int, int]] = []

    async def writer(w: int) -> None:
        c = make_client(client.socket_path)
        for step in range(5):
            body = {"status": f"s{step + 1}", "by": w}
            if (await c.put("chain", body, if_status=f"s{step}")).status == 204:
                wins.append((step, w))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for w in range(20):
                nursery.start_soon(writer, w)
    assert sorted(step for step, _ in wins) == [0, 1, 2, 3, 4]
    assert (await client.get("/keys/chain")).json()["value"]["status"] == "s5"


async def test_terminated_backends_under_load_fail_fast_and_recover(
    client, make_client, pg_admin, app_name
) -> None:
    for i in range(20):
        await client.put(f"load/{i}", {"status": "pending", "i": i})
    statuses: list[int] = []
    stop = trio.Event()

    async def worker(w: int) -> None:
        c = make_client(client.socket_path)
        n = 0
        while not stop.is_set():
            with trio.fail_after(10):  # never hang
                if n % 2:
                    reply = await c.get(f"/keys/load%2F{(w + n) % 20}")
                else:
                    reply = await c.put(f"load/{w}", {"status": "pending", "n": n})
            statuses.append(reply.status)
            assert reply.status in (200, 204, 503), reply.body
            n += 1

    async with trio.open_nursery() as nursery:
        for w in range(8):
            nursery.start_soon(worker, w)
        for _ in range(5):
            before = len(statuses)
            await wait_until(lambda before=before: len(statuses) >= before + 40, timeout=10)
            killed = pg_admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app_name,),
            ).fetchone()
            assert killed[0] >= 1
        stop.set()
    assert statuses.count(503) < len(statuses) / 2
    # Service resumed without a restart: every request now succeeds on fresh connections.
    for i in range(20):
        assert (await client.get(f"/keys/load%2F{i}")).status == 200
        assert (await client.put(f"load/{i}", {"status": "done"})).status == 204
    assert backends(pg_admin, app_name) >= 1


async def test_idle_connections_killed_are_replaced_without_an_error(
    client, pg_admin, app_name
) -> None:
    await client.put("k", {"v": 1})
    pg_admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (app_name,),
    )
    await wait_until(lambda: not backends(pg_admin, app_name))
    # The dead idle connection is noticed before use: both a read and a write just work.
    assert (await client.get("/keys/k")).status == 200
    assert (await client.put("k", {"v": 2})).status == 204


async def test_an_idle_connection_told_fatal_is_dropped_before_its_hangup_arrives(
    nursery, socket_path, pg_url, pg_admin, app_name, make_client
) -> None:
    # A killed backend sends its FATAL, then exits; the EOF can reach the proxy later than the
    # FATAL. Held here indefinitely: a connection with only the FATAL to read must not be used.
    forwarder = Forwarder()
    await forwarder.start(nursery)
    await start_proxy(nursery, socket_path, forwarded(pg_url, forwarder.port), pool_size=2)
    client = make_client(socket_path)
    assert (await client.put("k", {"v": 1})).status == 204
    opened = backends(pg_admin, app_name)
    forwarder.hold_hangups = True
    pg_admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (app_name,),
    )
    await wait_until(lambda: forwarder.hangups == opened)
    # A write is never retried on another connection: it must not be sent on the dead one.
    assert (await client.put("k", {"v": 2})).status == 204
    assert (await client.get("/keys/k")).json()["value"] == {"v": 2}


async def test_postgres_restart_gives_fast_503_then_recovers(
    nursery, socket_path, pg_url, make_client
) -> None:
    forwarder = Forwarder()
    await forwarder.start(nursery)
    await start_proxy(nursery, socket_path, forwarded(pg_url, forwarder.port), pool_size=3)
    client = make_client(socket_path)
    assert (await client.put("r", {"status": "pending"})).status == 204

    forwarder.stop()  # connections cut, new ones refused
    for _ in range(5):
        with trio.fail_after(2):
            for request in (client.get("/keys/r"), client.put("r", {"status": "x"})):
                reply = await request
                assert reply.status == 503, reply.body
                assert "error" in reply.json()
                assert reply.headers["retry-after"] == "1"
    assert (await client.get("/healthz")).status == 200  # the proxy itself is fine

    await forwarder.start(nursery)  # same port: PostgreSQL is back
    with trio.fail_after(5):
        assert (await client.get("/keys/r")).status == 200
        assert (await client.put("r", {"status": "running"}, if_status="pending")).status == 204


async def test_hung_postgres_gives_503_within_the_timeout(
    nursery, socket_path, pg_url, make_client
) -> None:
    forwarder = Forwarder()
    await forwarder.start(nursery)
    url = forwarded(pg_url, forwarder.port)
    await start_proxy(nursery, socket_path, url, pool_size=2, pg_timeout=0.5)
    client = make_client(socket_path)
    assert (await client.put("h", {"status": "pending"})).status == 204

    forwarder.frozen = True
    with trio.fail_after(5):
        assert (await client.get("/keys/h")).status == 503  # statement times out
        assert (await client.get("/keys/h")).status == 503  # a new connection cannot start
    forwarder.frozen = False
    with trio.fail_after(5):
        assert (await client.get("/keys/h")).status == 200


async def test_start_fails_fast_when_postgres_is_unreachable(socket_path, pg_url) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound but not listening: connection refused
        with trio.fail_after(10), pytest.raises(StartupError) as info:
            await serve_state_proxy(socket_path, forwarded(pg_url, dead_port))
    assert info.value.setting == "pg_url"
    assert not await trio.Path(socket_path).exists()


async def test_bad_index_names_are_refused(socket_path, pg_url) -> None:
    for bad in (["status", "bad-name"], ["x" * 60], [""], ["a.b"]):
        with pytest.raises(ValueError):
            await serve_state_proxy(socket_path, pg_url, indexes=bad)


async def test_socket_is_0666_and_removed_on_stop(socket_path, pg_url) -> None:
    async with trio.open_nursery() as nursery:
        await start_proxy(nursery, socket_path, pg_url)
        mode = os.stat(socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o666
        nursery.cancel_scope.cancel()
    assert not await trio.Path(socket_path).exists()


async def test_a_stale_socket_file_is_replaced(socket_path, pg_url, make_client) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(socket_path)
    stale.close()  # the file stays, nobody listens
    async with trio.open_nursery() as nursery:
        await start_proxy(nursery, socket_path, pg_url)
        client = make_client(socket_path)
        assert (await client.get("/healthz")).status == 200
        nursery.cancel_scope.cancel()


async def test_a_live_socket_or_another_file_is_left_alone(socket_path, pg_url) -> None:
    live = socket.socket(socket.AF_UNIX)
    live.bind(socket_path)
    live.listen()
    try:
        with pytest.raises(StartupError, match="another process") as info:
            await serve_state_proxy(socket_path, pg_url)
        assert info.value.setting == "socket"
    finally:
        live.close()
        os.unlink(socket_path)
    await trio.Path(socket_path).write_text("precious")
    with pytest.raises(StartupError, match="not a socket"):
        await serve_state_proxy(socket_path, pg_url)
    assert await trio.Path(socket_path).read_text() == "precious"


async def test_schema_is_created_once_and_reused(socket_path, pg_url, pg_admin) -> None:
    async with trio.open_nursery() as nursery:
        # Two proxies starting together on the same schema, then a restart with a new index.
        async with trio.open_nursery() as starting:
            for path in (socket_path, socket_path + "2"):
                start = functools.partial(serve_state_proxy, path, pg_url, indexes=["status"])
                starting.start_soon(nursery.start, start)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await start_proxy(nursery, socket_path, pg_url, indexes=["status", "actor"])
        nursery.cancel_scope.cancel()
    names = {
        r[0]
        for r in pg_admin.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename = 'kv'"
        )
    }
    assert {"kv_pkey", "kv_value_gin", "kv_value_status", "kv_value_actor"} <= names


async def test_drain_finishes_in_flight_requests_and_closes_idle_ones(
    nursery, socket_path, pg_url, pg_admin, app_name, make_client
) -> None:
    shutdown = trio.Event()
    done = trio.Event()

    async def run_proxy(task_status: trio.TaskStatus[None]) -> None:
        await serve_state_proxy(
            socket_path, pg_url, shutdown_trigger=shutdown.wait, task_status=task_status
        )
        done.set()

    await nursery.start(run_proxy)
    busy = make_client(socket_path)
    await busy.put("lock", {"status": "pending"})
    idle = await trio.open_unix_socket(socket_path)
    await idle.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(5):
        assert (await idle.receive_some(1000)).startswith(b"HTTP/1.1 200 ")

    # Hold the row lock so that the busy client's conditional write waits inside PostgreSQL.
    with psycopg.connect(pg_admin.info.dsn, autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT 1 FROM kv WHERE key = 'lock' FOR UPDATE")
        replies = []

        async def slow_write() -> None:
            replies.append(await busy.put("lock", {"status": "running"}, if_status="pending"))

        nursery.start_soon(slow_write)
        waiting_for_lock = (
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'"
        )
        await wait_until(lambda: pg_admin.execute(waiting_for_lock, (app_name,)).fetchone())
        shutdown.set()
        with trio.fail_after(5):
            assert await idle.receive_some(1000) == b""  # the idle connection is closed...
        await idle.aclose()
        assert not done.is_set()  # ...while the write is still in flight
        assert not replies
        locker.execute("COMMIT")
    with trio.fail_after(5):
        await done.wait()
    assert replies[0].status == 204
    assert replies[0].headers["connection"] == "close"
    assert not await trio.Path(socket_path).exists()
