"""The two HTTP listeners (`ASYA_MESH_HTTP=lean|hypercorn`) as the mesh API's edge: they answer
alike, start and fail alike, serve a supervisor's sockets, keep connections alive and drain in
the same order on shutdown.

The behaviour of every route is tested on both listeners by the route, SSE and compat suites
(the `listener` fixture); here is what is about the listener wiring itself.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import socket
from typing import Any

import h11
import pytest
import trio

from mesh_trio import Config, serve
from mesh_trio._config import StartupError, root_cause
from tests.harness import TEST_ENV, WAIT, MeshClient, Reply, http, start_mesh, start_stoppable
from tests.test_metrics import scrape, value

ORIGIN = "https://ui.example"
RID = "req-42"
COMPARED = (
    "allow",
    "cache-control",
    "content-type",
    "x-accel-buffering",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
    "vary",
    "x-request-id",
)
ID = re.compile(r"[0-9a-f]{32}|[0-9a-f-]{36}")


def _shape(reply: Reply) -> tuple[int, dict[str, str], Any]:
    """What must be the same on both listeners: status, the headers we set, and the body (ids
    and timestamps, which differ between two meshes, replaced)."""
    headers = {k: v for k, v in reply.headers.items() if k in COMPARED}
    if reply.status == 204 or not reply.body:
        headers.pop("content-type", None)  # quart names a type for an empty body too
    body = ID.sub("<id>", reply.body.decode())
    body = re.sub(r'"(created_at|updated_at|deadline)": ?"[^"]*"', r'"\1": "<t>"', body)
    body = re.sub(r"127\.0\.0\.1:\d+", "<host>", body)
    return reply.status, headers, body


async def _exchanges(mesh: MeshClient) -> list[tuple[int, dict[str, str], Any]]:
    envelope_id = await mesh.create()
    cors = {"origin": ORIGIN, "x-request-id": RID}
    ext, inner = mesh.ext_port, mesh.int_port
    replies = [
        await http(ext, "GET", "/nowhere"),
        await http(ext, "PUT", mesh.path("")),
        await http(ext, "TRACE", mesh.path("")),
        await http(ext, "POST", mesh.path("?actor=w"), b"{not json", {"x-request-id": RID}),
        await http(ext, "POST", mesh.path("?actor=w"), {"payload": 1}, cors),
        await http(ext, "OPTIONS", mesh.path(""), None, cors),
        await http(ext, "OPTIONS", mesh.path(""), None, {"origin": "https://other.example"}),
        await http(ext, "GET", mesh.path(envelope_id), None, {"origin": "https://other"}),
        await http(ext, "DELETE", mesh.path(envelope_id), None, cors),
        await http(ext, "GET", "/openapi.json"),
        await http(ext, "HEAD", "/openapi.json"),
        await http(ext, "GET", "/ready", None, {"x-request-id": "bad id"}),
        await http(inner, "GET", "/openapi.json"),
        await http(inner, "POST", mesh.path(f"{envelope_id}/events"), b"[]"),
        await http(inner, "POST", mesh.path("0" * 32 + "/events"), {"type": "fly"}),
        await http(inner, "DELETE", mesh.path(envelope_id)),
        await http(inner, "GET", mesh.path(envelope_id), None, {"x-request-id": RID}),
    ]
    location = replies[4].headers["location"]
    assert location == mesh.path(replies[4].json()["id"])
    for reply in replies:
        if reply.headers.get("x-request-id") not in (RID, None):
            assert re.fullmatch("[0-9a-f]{32}", reply.headers["x-request-id"]), reply
            reply.headers["x-request-id"] = "<new>"
    return [_shape(reply) for reply in replies]


async def test_both_listeners_answer_alike(nursery: trio.Nursery) -> None:
    shapes = []
    for name in ("hypercorn", "lean"):
        mesh = await start_mesh(nursery, ASYA_MESH_HTTP=name, ASYA_MESH_CORS_ORIGINS=ORIGIN)
        shapes.append(await _exchanges(mesh))
    hypercorn, lean = shapes
    for one, other in zip(hypercorn, lean, strict=True):
        assert one == other
    # The exchanges are not trivially alike: they include errors, CORS and generated ids.
    assert {status for status, _, _ in lean} >= {200, 201, 204, 400, 404, 405}
    assert any(headers.get("access-control-allow-origin") == ORIGIN for _, headers, _ in lean)


def _config(listener: str, **env: str) -> Config:
    return Config.from_env({**TEST_ENV, "ASYA_MESH_HTTP": listener, **env})


async def _startup_error(config: Config) -> str:
    with trio.fail_after(WAIT):
        with pytest.raises(BaseException) as failed:
            await serve(config)
    cause = root_cause(failed.value)
    assert isinstance(cause, StartupError), failed.value
    del failed
    # Hypercorn leaves the socket it failed to bind to the garbage collector: collected here,
    # its ResourceWarning is this test's (ignored below), not a later test's failure.
    gc.collect()
    return str(cause)


HYPERCORN_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@HYPERCORN_LEAK
@pytest.mark.parametrize("variable", ["ASYA_MESH_EXTERNAL_PORT", "ASYA_MESH_INTERNAL_PORT"])
async def test_a_port_in_use_names_its_setting(listener: str, variable: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = await _startup_error(_config(listener, **{variable: str(port)}))
    assert message.startswith(f"{variable}={port}: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in message


@HYPERCORN_LEAK
async def test_an_unknown_host_names_its_setting(listener: str) -> None:
    message = await _startup_error(_config(listener, ASYA_MESH_HOST="no-such-host.invalid"))
    assert message.startswith("ASYA_MESH_HOST='no-such-host.invalid': ")


async def test_a_supervisors_sockets_are_served(listener: str) -> None:
    sockets = []
    try:
        for _ in range(2):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        ext, inner = (sock.getsockname()[1] for sock in sockets)
        config = _config(listener)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: serve(
                    config, sockets=(sockets[0], sockets[1]), task_status=task_status
                )
            )
            assert (bound.external_port, bound.internal_port) == (ext, inner)
            assert (await http(ext, "GET", "/health")).status == 200
            assert (await http(inner, "GET", "/metrics")).status == 200
            assert (await http(ext, "GET", "/metrics")).status == 404  # each its own port
            nursery.cancel_scope.cancel()
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):  # hypercorn closes the descriptor itself
                sock.close()


async def _pipelined(port: int, requests: list[tuple[str, str, bytes]]) -> list[Reply]:
    """Send `requests` back to back on one connection, then read their replies in order."""
    out = b""
    for method, target, body in requests:
        # h11 writes one request per cycle: a connection object per request to pipeline them.
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", "127.0.0.1"), ("content-length", str(len(body)))]
        out += conn.send(h11.Request(method=method, target=target, headers=headers))
        out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    replies = []
    reader = h11.Connection(h11.CLIENT)
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(out)
            for method, target, _ in requests:
                # The reader's own request, so it knows what each reply answers.
                reader.send(h11.Request(method=method, target=target, headers=[("host", "x")]))
                reader.send(h11.EndOfMessage())
                status, got, chunks = 0, {}, []
                while True:
                    event = reader.next_event()
                    if event is h11.NEED_DATA:
                        reader.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        got = {k.decode(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                replies.append(Reply(status, got, b"".join(chunks)))
                reader.start_next_cycle()
    return replies


async def test_events_pipelined_on_one_connection_are_applied_in_order(
    nursery: trio.Nursery, listener: str
) -> None:
    mesh = await start_mesh(nursery)
    envelope_id = await mesh.create()
    events = mesh.path(f"{envelope_id}/events")
    statuses = ["running", "succeeded"]
    requests = [
        ("POST", events, json.dumps({"type": "status", "status": status}).encode())
        for status in statuses
    ]
    requests.append(("GET", mesh.path(envelope_id), b""))
    replies = await _pipelined(mesh.int_port, requests)
    assert [reply.status for reply in replies] == [204, 204, 200]
    assert replies[-1].json()["status"] == "succeeded"


async def test_shutdown_ends_streams_then_drains_the_listeners(
    nursery: trio.Nursery, listener: str
) -> None:
    shutdown = trio.Event()
    mesh, stopped = await start_stoppable(nursery, shutdown)
    envelope_id = await mesh.create()
    stream = await mesh.sse(envelope_id)
    await stream.wait_for(1)
    idle = await trio.open_tcp_stream("127.0.0.1", mesh.int_port)  # kept alive, no request
    shutdown.set()
    await stream.wait_end()
    # The stream ended with its last chunk, not with a cut connection.
    assert stream.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
    with trio.fail_after(WAIT):
        assert await idle.receive_some(1) == b""  # closed by the drain, not left open
        await stopped.wait()
    await idle.aclose()
    with pytest.raises(OSError):
        await http(mesh.ext_port, "GET", "/health")


async def raw_reply(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection; everything the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_the_lean_listeners_own_refusals_carry_an_id_and_are_counted(
    nursery: trio.Nursery,
) -> None:
    mesh = await start_mesh(nursery, ASYA_MESH_HTTP="lean")
    malformed = await raw_reply(mesh.ext_port, b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
    too_big = await raw_reply(
        mesh.int_port,
        b"POST /api/v1/mesh/x/events HTTP/1.1\r\nHost: t\r\nContent-Length: 20000000\r\n\r\n",
    )
    for reply, status in ((malformed, b"400"), (too_big, b"413")):
        head = reply.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 " + status), reply
        assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", head + b"\r\n"), reply
    samples = await scrape(mesh.int_port)
    requests = "asya_mesh_requests_total"
    assert value(samples, requests, port="external", op="refused", status="400") == 1
    assert value(samples, requests, port="internal", op="refused", status="413") == 1
