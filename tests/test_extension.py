"""The extension API over real sockets (`mesh_trio.Extension`, docs/runtime.md#extensions).

`tests/sample_extension.py` is loaded by name as `mesh_compat` is: its rows join the core's
router, its handlers answer on both ports, its headers go on every response of its paths
(errors and 405s included), and the core's routes and answers are unchanged.
"""

from __future__ import annotations

import uuid

import pytest
import trio

from mesh_trio import Config, ConfigError
from tests.harness import MeshClient, SseClient, http, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners

SAMPLE = ("tests.sample_extension",)


@pytest.fixture
async def mesh(nursery: trio.Nursery) -> MeshClient:
    return await start_mesh(nursery, extensions=SAMPLE)


async def test_internal_route(mesh: MeshClient) -> None:
    envelope_id = await mesh.create("a")
    reply = await http(mesh.int_port, "POST", f"/sample/{envelope_id}/echo", b"12345678")
    assert (reply.status, reply.json()) == (200, {"id": envelope_id, "body": "12345678"})
    assert reply.headers["content-type"] == "application/json"
    assert (reply.headers["x-sample"], reply.headers["x-echo"]) == (envelope_id, "1")


async def test_handler_limit_and_errors_carry_the_headers(mesh: MeshClient) -> None:
    envelope_id = await mesh.create("a")
    path = f"/sample/{envelope_id}/echo"
    for chunked in (False, True):
        reply = await http(mesh.int_port, "POST", path, b"123456789", chunked=chunked)
        assert (reply.status, reply.json()) == (413, {"error": "body larger than 8 bytes"})
        assert reply.headers["x-sample"] == envelope_id
    reply = await http(mesh.int_port, "GET", path)
    assert (reply.status, reply.headers["allow"]) == (405, "POST")
    assert reply.json() == {"error": "method not allowed"}
    assert reply.headers["x-sample"] == envelope_id


async def test_external_route(mesh: MeshClient) -> None:
    envelope_id = await mesh.create("a")
    path = f"{mesh.prefix}/sample/{envelope_id}"
    reply = await http(mesh.ext_port, "GET", path)
    assert (reply.status, reply.json()) == (203, {"status": "pending"})
    assert reply.headers["x-sample"] == envelope_id
    unknown = str(uuid.uuid4())
    reply = await http(mesh.ext_port, "GET", f"{mesh.prefix}/sample/{unknown}")
    assert (reply.status, reply.json()) == (404, {"error": "envelope not found"})
    assert reply.headers["x-sample"] == unknown
    reply = await http(mesh.ext_port, "DELETE", path)
    assert (reply.status, reply.headers["allow"], reply.headers["x-sample"]) == (
        405,
        "GET",
        envelope_id,
    )


async def test_external_stream(mesh: MeshClient) -> None:
    envelope_id = await mesh.create("a")
    stream: SseClient = await mesh.sse(envelope_id, f"{mesh.prefix}/sample/{envelope_id}?stream=1")
    events = await stream.wait_end()
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-sample"] == envelope_id
    assert [e.data for e in events] == ["pending"]
    assert stream.raw == b"data: pending\n\n: done\n\n"


async def test_not_an_extension_path_is_answered_as_without_it(nursery: trio.Nursery) -> None:
    plain, extended = await start_mesh(nursery), await start_mesh(nursery, extensions=SAMPLE)
    for port, method, path in [
        ("int", "POST", "/sample/task-1/echo"),  # not an envelope id: not the extension's
        ("int", "POST", "/sample//echo"),
        ("ext", "GET", "/api/v1/sample/x"),
        ("ext", "GET", "/sample/{id}"),  # the external route is under the prefix
        ("int", "GET", "/api/v1/mesh/{id}/nope"),
        ("ext", "PUT", "/api/v1/mesh/{id}"),
    ]:
        replies = []
        for mesh in (plain, extended):
            target = path.format(id=uuid.uuid4())
            reply = await http(mesh.int_port if port == "int" else mesh.ext_port, method, target)
            replies.append((reply.status, reply.body, reply.headers.get("allow")))
            assert "x-sample" not in reply.headers
        assert replies[0] == replies[1], (port, method, path)
    envelope_id = await extended.create("a")
    assert (await extended.get(envelope_id))["status"] == "pending"
    assert (await extended.fly(envelope_id, "x")).status == 204


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("tests.no_such_extension",), "extension tests.no_such_extension: cannot be imported"),
        (("json",), "extension json: has no routes(mesh, router)"),
        (SAMPLE * 2, "extension tests.sample_extension: op SampleOp.ECHO is taken"),
        (("tests.sample_bad_extension",), "extension tests.sample_bad_extension: op Op.GET"),
    ],
)
async def test_a_bad_extension_stops_the_start(
    nursery: trio.Nursery, names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await start_mesh(nursery, extensions=names)
    assert str(caught.value).startswith(message)


def test_compat_names_the_mesh_compat_extension() -> None:
    assert Config.from_env({"ASYA_MESH_COMPAT": "1"}).extensions == ("mesh_compat",)
    assert Config.from_env({}).extensions == ()
