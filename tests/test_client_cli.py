"""The `asya-mesh` client CLI against a real mesh API (embedded store; demo actors on demand).

`main(argv)` is sync and blocks on its HTTP calls, so the tests run it in a worker thread
(`trio.to_thread.run_sync`) while the server runs in the test's trio loop; output is read from
pytest's capture of stdout/stderr. A watch under way is abandoned on a failed wait: the server's
shutdown at the end of the test ends its stream.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from mesh_cli._main import main
from mesh_trio._demo import run_demo_actors
from mesh_trio.transports import MemoryQueues
from tests.harness import WAIT, MeshClient, start_mesh

STORY = {"text": "a b c", "delay": 0.05}


@pytest.fixture
async def mesh(nursery: trio.Nursery) -> MeshClient:
    """A mesh API with the embedded store; the demo actors run when a test starts them."""
    return await start_mesh(nursery)


def start_demo_actors(nursery: trio.Nursery, mesh: MeshClient) -> None:
    """Run the demo actors (`story`, `echo`) on the mesh's in-process queues, from now on."""
    queues = mesh.bound.mesh.dispatcher
    assert isinstance(queues, MemoryQueues)
    run = partial(
        run_demo_actors,
        queues,
        namespace="default",
        internal_port=mesh.int_port,
        prefix=mesh.prefix,
    )
    nursery.start_soon(run)


def url(mesh: MeshClient) -> str:
    return f"http://127.0.0.1:{mesh.ext_port}{mesh.prefix}"


async def run(*argv: str) -> int:
    """`main(argv)` in a thread, bounded."""
    with trio.fail_after(WAIT):
        return await trio.to_thread.run_sync(main, list(argv), abandon_on_cancel=True)


async def test_create_get_list_cancel_round_trip_as_json(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("--url", url(mesh), "--json")
    argv = ("create", "mine", "--payload", '{"n": 1}', "--header", "k=v", "--timeout", "60")
    assert await run(*base, *argv) == 0
    envelope_id = json.loads(capsys.readouterr().out)["id"]

    assert await run(*base, "get", envelope_id) == 0
    envelope = json.loads(capsys.readouterr().out)
    assert envelope["id"] == envelope_id
    assert envelope["status"] == "pending"
    assert envelope["data"]["payload"] == {"n": 1}
    assert envelope["data"]["headers"]["k"] == "v"
    assert "deadline_at" in envelope["data"]

    assert await run(*base, "list", "--status", "pending", "--limit", "5") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["total"] == 1
    assert [m["id"] for m in listed["messages"]] == [envelope_id]

    assert await run(*base, "cancel", envelope_id) == 0
    assert json.loads(capsys.readouterr().out) == {"id": envelope_id, "status": "canceled"}
    assert (await mesh.get(envelope_id))["status"] == "canceled"

    assert await run(*base, "list", "--status", "pending") == 0
    assert json.loads(capsys.readouterr().out)["total"] == 0


async def test_human_create_prints_the_id_and_list_keeps_it_whole(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run("--url", url(mesh), "create", "mine") == 0
    envelope_id = capsys.readouterr().out.strip()
    assert (await mesh.get(envelope_id))["data"]["actor"] == "mine"
    assert await run("--url", url(mesh), "list") == 0
    out = capsys.readouterr().out
    assert envelope_id in out
    assert "1 of 1" in out


async def test_watch_story_prints_the_tokens_and_exits_0(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope_id = await mesh.create("story", {"payload": STORY})
    async with trio.open_nursery() as nursery:
        result: list[int] = []

        async def watch() -> None:
            result.append(await run("--url", url(mesh), "watch", envelope_id))
            nursery.cancel_scope.cancel()  # the demo actors

        nursery.start_soon(watch)
        await wait_subscribed(mesh, envelope_id)
        start_demo_actors(nursery, mesh)  # only now: every token comes after the subscription
    assert result == [0]
    captured = capsys.readouterr()
    assert captured.out == "a b c \n"
    assert captured.err == "succeeded\n"


async def test_watch_json_prints_the_final_envelope(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope_id = await mesh.create("tale")
    async with following(mesh, envelope_id, "--json", "watch", envelope_id) as result:
        await mesh.fly(envelope_id, {"token": "not shown"})
        await mesh.status(envelope_id, "succeeded", {"result": "ok"})
    assert result == [0]
    final = json.loads(capsys.readouterr().out)
    assert final["id"] == envelope_id
    assert final["status"] == "succeeded"
    assert final["data"]["result"] == "ok"


async def test_watch_shows_other_fly_data_as_json_lines(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope_id = await mesh.create("tale")
    async with following(mesh, envelope_id, "watch", envelope_id) as result:
        await mesh.fly(envelope_id, {"token": "x"})
        await mesh.fly(envelope_id, {"other": 1})
        await mesh.status(envelope_id, "failed", {"error": "boom"})
    assert result == [1]
    captured = capsys.readouterr()
    assert captured.out == 'x{"other": 1}\n'
    assert captured.err == "failed: boom\n"


async def test_watch_on_a_terminal_draws_the_bar_and_the_tokens(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat the captured stdout as a terminal
    envelope_id = await mesh.create("tale")
    async with following(mesh, envelope_id, "watch", envelope_id) as result:
        route = {"prev": ["plan"], "curr": "write", "next": ["review"]}
        await mesh.status(envelope_id, "processing", route)
        await mesh.fly(envelope_id, {"token": "hello "})
        await mesh.fly(envelope_id, {"token": "world"})
        await mesh.status(envelope_id, "failed", {"error": "boom"})
    assert result == [1]
    captured = capsys.readouterr()
    assert "hello world" in captured.out
    assert "67%" in captured.out  # 2 of 3 hops
    assert "review" in captured.out
    assert "failed: boom" in captured.err


async def test_watch_of_an_envelope_canceled_meanwhile_exits_3(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope_id = await mesh.create("mine")
    async with following(mesh, envelope_id, "watch", envelope_id) as result:
        await mesh.status(envelope_id, "running")
        assert await run("--url", url(mesh), "cancel", envelope_id) == 0
    assert result == [3]
    assert capsys.readouterr().err.strip() == "canceled"


async def test_events_json_lines_parse(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope_id = await mesh.create("tale")
    async with following(mesh, envelope_id, "--json", "events", envelope_id) as result:
        await mesh.fly(envelope_id, {"token": "x"})
        await mesh.status(envelope_id, "succeeded", {"result": 7})
    assert result == [0]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines] == ["status", "fly", "status"]
    assert lines[0]["data"]["id"] == envelope_id
    assert lines[1]["data"] == {"token": "x"}
    assert lines[2]["data"] == {"status": "succeeded", "result": 7}


@pytest.mark.parametrize("command", ["get", "cancel", "events", "watch"])
async def test_unknown_id_is_one_stderr_line_and_exit_2(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert await run("--url", url(mesh), command, "no-such-id") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "asya-mesh: HTTP 404: envelope not found\n"


async def test_bad_request_exits_2(mesh: MeshClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("--url", url(mesh), "list", "--limit", "0") == 2
    assert capsys.readouterr().err.startswith("asya-mesh: HTTP 400: ")


async def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        await run("create", "a", "--payload", "{not json")
    assert exc.value.code == 2
    assert "the payload is not JSON" in capsys.readouterr().err


async def test_watch_cut_off_by_a_server_shutdown_exits_4(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    shutdown = trio.Event()
    mesh = await start_mesh(nursery, shutdown=shutdown)
    envelope_id = await mesh.create("mine")
    async with following(mesh, envelope_id, "watch", envelope_id) as result:
        shutdown.set()  # the drain ends open streams cleanly, before any terminal status
    assert result == [4]
    assert capsys.readouterr().err == (
        f"asya-mesh: the stream of {envelope_id} ended while it was pending\n"
    )


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", [("get", "x"), ("create", "a"), ("watch", "x")])
async def test_server_down_exits_4(
    closed_port: int, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    assert await run("--url", f"http://127.0.0.1:{closed_port}/api/v1", *command) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"asya-mesh: cannot reach http://127.0.0.1:{closed_port}/api/v1/mesh/")
    assert err.count("\n") == 1


async def test_url_from_the_environment(
    mesh: MeshClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYA_MESH_URL", url(mesh))
    assert await run("--json", "create", "echo") == 0
    assert "id" in json.loads(capsys.readouterr().out)


@asynccontextmanager
async def following(mesh: MeshClient, envelope_id: str, *argv: str) -> AsyncIterator[list[int]]:
    """Run the CLI (`--url` of `mesh`, then `argv`: a watch or events of `envelope_id`) in the
    background and enter once its stream is subscribed; leaving waits for the CLI to exit. The
    list yielded holds its exit status by then."""
    result: list[int] = []

    async def cli() -> None:
        result.append(await run("--url", url(mesh), *argv))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cli)
        await wait_subscribed(mesh, envelope_id)
        yield result


async def wait_subscribed(mesh: MeshClient, envelope_id: str) -> None:
    """Wait until a stream of `envelope_id` is subscribed (the CLI's, in its thread)."""
    hub = mesh.bound.mesh.broadcaster
    with trio.fail_after(WAIT):
        # Polled: the hub signals no subscription, and the subscriber is in another thread.
        while hub.subscribers(envelope_id) == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)
