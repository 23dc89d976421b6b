"""Test harness: a real mesh API on 127.0.0.1 (random ports) and clients for it.

`start_mesh(nursery, **env)` runs `mesh_trio.serve` inside the test's nursery with the given
`ASYA_*` settings on top of test defaults and returns a `MeshClient`. The HTTP listener is
`MESH_TEST_HTTP` (`lean` or `hypercorn`) when set, else the configured default; a test module
runs its tests on both with the `listener` fixture (tests/conftest.py). Plain requests go through
h11 on fresh TCP connections; SSE streams are read from the raw byte stream, so tests can assert
exact frame bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs
import h11
import trio

from mesh_proto import SseEvent, SseParser
from mesh_trio import Bound, Config, serve

TEST_ENV = {
    "ASYA_MESH_HOST": "127.0.0.1",
    "ASYA_MESH_EXTERNAL_PORT": "0",
    "ASYA_MESH_INTERNAL_PORT": "0",
    "ASYA_MESH_DEMO_ACTORS": "0",
    "ASYA_LOG_LEVEL": "warning",
    "ASYA_MESH_GRACEFUL_TIMEOUT": "2",
}
if os.environ.get("MESH_TEST_HTTP"):
    TEST_ENV["ASYA_MESH_HTTP"] = os.environ["MESH_TEST_HTTP"]
WAIT = 10.0  # bound on any single wait in a test


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http(
    port: int,
    method: str,
    path: str,
    body: bytes | str | dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    chunked: bool = False,
) -> Reply:
    """One request on a fresh connection to 127.0.0.1:port."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    hdrs = [("host", f"127.0.0.1:{port}"), ("connection", "close")]
    hdrs += list((headers or {}).items())
    if body is not None:
        hdrs.append(
            ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body)))
        )
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            out = conn.send(h11.Request(method=method, target=path, headers=hdrs))
            if body:
                step = 65536 if chunked else len(body)
                for i in range(0, len(body), step):
                    out += conn.send(h11.Data(data=body[i : i + step]))
            out += conn.send(h11.EndOfMessage())
            response: Any = None
            chunks = []

            async def send() -> None:
                # The server may answer (413) and close before it read the whole body.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(out)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        response = event
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                nursery.cancel_scope.cancel()
    return Reply(
        response.status_code,
        {k.decode().lower(): v.decode() for k, v in response.headers},
        b"".join(chunks),
    )


@attrs.define(eq=False)
class SseClient:
    """An open SSE stream: `raw` holds every body byte received, `events` the parsed ones."""

    stream: trio.SocketStream
    conn: h11.Connection
    status: int = 0
    headers: dict[str, str] = attrs.field(factory=dict)
    raw: bytes = b""
    events: list[SseEvent] = attrs.field(factory=list)
    ended: bool = False
    parser: SseParser = attrs.field(factory=SseParser)

    @property
    def plain(self) -> bytes:
        """`raw` without the `id:` and `retry:` lines: the frames as they are encoded once."""
        return re.sub(rb"(?m)^(?:id|retry): [^\n]*\n", b"", self.raw)

    async def _pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(data)
                if not data and self.conn.their_state is not h11.DONE:
                    self.ended = True
                    return
                continue
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                return
            if isinstance(event, h11.Data):
                self.raw += bytes(event.data)
                self.events += self.parser.feed(bytes(event.data))
                return
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.ended = True
                return

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[SseEvent]:
        """Wait until at least `count` events arrived (fails after `timeout`)."""
        with trio.fail_after(timeout):
            while len(self.events) < count:
                if self.ended:
                    raise AssertionError(f"stream ended after {len(self.events)} events")
                await self._pump()
        return self.events

    async def wait_end(self, timeout: float = WAIT) -> list[SseEvent]:
        """Read until the server ends the stream."""
        with trio.fail_after(timeout):
            while not self.ended:
                await self._pump()
        await self.aclose()
        return self.events

    async def wait_raw(self, needle: bytes, timeout: float = WAIT) -> None:
        with trio.fail_after(timeout):
            while needle not in self.raw:
                if self.ended:
                    raise AssertionError(f"stream ended without {needle!r}")
                await self._pump()

    async def aclose(self) -> None:
        await self.stream.aclose()


@attrs.define(eq=False)
class MeshClient:
    bound: Bound
    prefix: str

    @property
    def ext_port(self) -> int:
        return self.bound.external_port

    @property
    def int_port(self) -> int:
        return self.bound.internal_port

    def path(self, rest: str) -> str:
        return f"{self.prefix}/mesh/{rest}"

    async def ext(self, method: str, rest: str, body: Any = None, **kw: Any) -> Reply:
        return await http(self.ext_port, method, self.path(rest), body, **kw)

    async def int(self, method: str, rest: str, body: Any = None, **kw: Any) -> Reply:
        return await http(self.int_port, method, self.path(rest), body, **kw)

    async def create(self, actor: str = "worker", body: Any = None, **query: str) -> str:
        qs = "&".join(f"{k}={v}" for k, v in {"actor": actor, **query}.items())
        reply = await self.ext("POST", f"?{qs}", body if body is not None else {})
        assert reply.status == 201, reply
        return str(reply.json()["id"])

    async def get(self, envelope_id: str) -> dict[str, Any]:
        reply = await self.ext("GET", envelope_id)
        assert reply.status == 200, reply
        return dict(reply.json())

    async def status(self, envelope_id: str, status: str, data: Any = None) -> Reply:
        event: dict[str, Any] = {"type": "status", "status": status}
        if data is not None:
            event["data"] = data
        return await self.int("POST", f"{envelope_id}/events", event)

    async def fly(self, envelope_id: str, data: Any) -> Reply:
        return await self.int("POST", f"{envelope_id}/events", {"type": "fly", "data": data})

    async def sse(
        self, envelope_id: str, path: str | None = None, headers: Mapping[str, str] | None = None
    ) -> SseClient:
        """Open the SSE stream (with extra request `headers`) and wait for the response head."""
        target = path or self.path(f"{envelope_id}/events")
        stream = await trio.open_tcp_stream("127.0.0.1", self.ext_port)
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(
            conn.send(
                h11.Request(
                    method="GET",
                    target=target,
                    headers=[
                        ("host", "127.0.0.1"),
                        ("accept", "text/event-stream"),
                        *(headers or {}).items(),
                    ],
                )
            )
            + conn.send(h11.EndOfMessage())
        )
        client = SseClient(stream, conn)
        with trio.fail_after(WAIT):
            while client.status == 0 and not client.ended:
                await client._pump()
        return client


def make_config(**env: str) -> Config:
    return Config.from_env({**TEST_ENV, **env})


async def start_mesh(
    nursery: trio.Nursery,
    *,
    shutdown: trio.Event | None = None,
    extensions: tuple[str, ...] | None = None,
    **env: str,
) -> MeshClient:
    """Run a mesh API in `nursery` (until the test ends, or `shutdown` is set), with the
    extension modules `extensions` when given."""
    config = make_config(**env)
    if extensions is not None:
        config = attrs.evolve(config, extensions=extensions)
    trigger = shutdown.wait if shutdown is not None else None
    bound = await nursery.start(
        lambda task_status: serve(config, shutdown_trigger=trigger, task_status=task_status)
    )
    return MeshClient(bound, config.router.prefix)


async def start_stoppable(
    nursery: trio.Nursery, shutdown: trio.Event
) -> tuple[MeshClient, trio.Event]:
    """A mesh API that drains once `shutdown` is set, and an event set once `serve` returned."""
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[MeshClient]) -> None:
        async with trio.open_nursery() as inner:
            task_status.started(await start_mesh(inner, shutdown=shutdown))
        stopped.set()

    return await nursery.start(run), stopped
