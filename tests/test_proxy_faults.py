"""The mesh API through the state proxy when things break: the proxy killed and restarted, and
PostgreSQL connections terminated under load. Requests fail fast with 503 while the store is
unreachable, `/ready` says so, and service resumes by itself with no transition lost or doubled.
"""

from __future__ import annotations

import json
import os
from functools import partial

import psycopg
import pytest
import trio

from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import MeshClient, Reply, http, start_mesh

pytestmark = pytest.mark.postgres


class Proxy:
    """A state proxy that a test can stop and start again on the same socket."""

    def __init__(self, nursery: trio.Nursery, path: str, pg_url: str) -> None:
        self.nursery, self.path, self.pg_url = nursery, path, pg_url
        self.scope: trio.CancelScope | None = None
        self.stopped = trio.Event()

    async def start(self) -> None:
        self.stopped = trio.Event()
        self.scope = await self.nursery.start(self._run)

    async def _run(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(serve_state_proxy, self.path, self.pg_url))
                    task_status.started(scope)
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()
        with trio.fail_after(10):
            await self.stopped.wait()


async def ready(mesh: MeshClient) -> tuple[int, int]:
    ext = await http(mesh.ext_port, "GET", "/ready")
    internal = await http(mesh.int_port, "GET", "/ready")
    return ext.status, internal.status


async def test_proxy_killed_and_restarted(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    proxy = Proxy(nursery, os.path.join(short_dir, "proxy.sock"), pg_url)
    await proxy.start()
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=proxy.path)
    envelope_id = await mesh.create()
    assert await ready(mesh) == (200, 200)

    await proxy.stop()
    with trio.fail_after(6):  # bounded: the pool's timeout, not a hang
        create = await mesh.ext("POST", "?actor=w", {})
        event = await mesh.status(envelope_id, "running")
        get = await mesh.ext("GET", envelope_id)
    for reply in (create, event, get):
        assert reply.status == 503
        assert "state proxy" in reply.json()["error"]
    assert await ready(mesh) == (503, 503)
    assert (await http(mesh.ext_port, "GET", "/health")).status == 200

    await proxy.start()
    assert await ready(mesh) == (200, 200)
    assert (await mesh.get(envelope_id))["status"] == "pending"
    assert (await mesh.status(envelope_id, "running")).status == 204
    assert (await mesh.get(envelope_id))["status"] == "running"
    await mesh.create()


async def post_until_accepted(mesh: MeshClient, envelope_id: str, status: str) -> int:
    """A sidecar's retry loop: repost on 503 until the event is accepted. Returns 503s seen."""
    failures = 0
    with trio.fail_after(30):
        while True:
            reply: Reply = await mesh.status(envelope_id, status, {"by": status})
            if reply.status == 204:
                return failures
            assert reply.status == 503, reply
            failures += 1
            await trio.sleep(0.02)


async def test_postgres_connections_terminated_under_load(
    nursery: trio.Nursery, pg_url: str, app_name: str, short_dir: str
) -> None:
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    mesh = await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)
    ids = [await mesh.create() for _ in range(20)]
    streams = [await mesh.sse(envelope_id) for envelope_id in ids]
    for stream in streams:
        await stream.wait_for(1)
    done = trio.Event()

    async def killer() -> None:
        while not done.is_set():
            with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
                # Only this test's proxy: other programs may use the same server.
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (app_name,),
                )
            await trio.sleep(0.05)

    async def drive(envelope_id: str) -> None:
        for status in ("running", "running", "succeeded"):
            await post_until_accepted(mesh, envelope_id, status)

    async with trio.open_nursery() as load:
        load.start_soon(killer)
        async with trio.open_nursery() as sidecars:
            for envelope_id in ids:
                sidecars.start_soon(drive, envelope_id)
        done.set()
    for envelope_id, stream in zip(ids, streams, strict=True):
        # The last terminations may still be news to the proxy's pool: a 503 means "retry".
        with trio.fail_after(10):
            while True:
                reply = await mesh.ext("GET", envelope_id)
                if reply.status != 503:
                    break
                await trio.sleep(0.02)
        assert reply.json()["status"] == "succeeded"
        events = await stream.wait_end()
        statuses = [json.loads(e.data)["status"] for e in events[1:]]
        assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded"
