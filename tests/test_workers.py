"""`ASYA_MESH_WORKERS=2` over real processes: a supervisor `asya-mesh-api` and its two workers
on the same two ports, through a state proxy over PostgreSQL.

Which worker answers a connection is the kernel's choice; to know, a test stops the other
worker (SIGSTOP), so only the one left running can accept, and lets it go on afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import attrs
import pytest
import trio

from tests.harness import WAIT, http
from tests.test_cli import MESH, environment, run

PREFIX = "/api/v1/mesh"
LISTENING = r"^.* mesh API listening: .* worker={}$"


@attrs.define(eq=False)
class Supervised:
    """A running supervisor: its stderr so far, its ports, the pid of each worker."""

    process: trio.Process
    log: str = ""
    external: int = 0
    internal: int = 0

    async def wait_log(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """The lines matching `pattern`, once there are `count` (fails after WAIT)."""
        assert self.process.stderr is not None
        with trio.fail_after(WAIT):
            while len(found := list(re.finditer(pattern, self.log, re.MULTILINE))) < count:
                chunk = await self.process.stderr.receive_some(65536)
                assert chunk, self.log
                self.log += chunk.decode()
        return found

    def pids(self) -> dict[int, int]:
        """Worker index to pid, the latest started."""
        found = re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log)
        return {int(index): int(pid) for index, pid in found}

    @contextmanager
    def only(self, index: int) -> Iterator[None]:
        """Stop every worker but `index` for the block: whatever answers, `index` did."""
        others = [pid for i, pid in self.pids().items() if i != index]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)


def settings(**more: str) -> dict[str, str]:
    return {
        "ASYA_MESH_WORKERS": "2",
        "ASYA_MESH_EXTERNAL_PORT": "0",
        "ASYA_MESH_INTERNAL_PORT": "0",
        "ASYA_MESH_DEMO_ACTORS": "0",
        "ASYA_MESH_GRACEFUL_TIMEOUT": "2",
        "ASYA_LOG_LEVEL": "info",
        **more,
    }


@pytest.fixture
async def supervised(proxy_socket: str) -> AsyncIterator[Supervised]:
    """A supervisor with both workers listening; everything it started is killed at the end."""
    process = await trio.lowlevel.open_process(
        MESH,
        env=environment(**settings(ASYA_STATEPROXY_SOCKET=proxy_socket)),
        stderr=subprocess.PIPE,
    )
    sup = Supervised(process)
    try:
        [ports] = await sup.wait_log(
            r"supervisor listening: external http://127\.0\.0\.1:(\d+), "
            r"internal http://127\.0\.0\.1:(\d+) \(2 workers\)"
        )
        sup.external, sup.internal = int(ports[1]), int(ports[2])
        for index in (0, 1):
            await sup.wait_log(LISTENING.format(index))
        yield sup
    finally:
        for pid in sup.pids().values():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.returncode is None:
            process.kill()
        await process.wait()


async def exited(pids: list[int]) -> None:
    """Wait until every process of `pids` has exited, child or not (fails after WAIT)."""
    fds = []
    for pid in pids:
        with suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    try:
        with trio.fail_after(WAIT):
            for fd in fds:
                await trio.lowlevel.wait_readable(fd)
    finally:
        for fd in fds:
            os.close(fd)


async def round_trip(sup: Supervised) -> None:
    """Create on the external port, post a status on the internal one, read it back."""
    created = await http(sup.external, "POST", f"{PREFIX}/?actor=worker", {})
    assert created.status == 201, created
    envelope_id = created.json()["id"]
    event = {"type": "status", "status": "running"}
    posted = await http(sup.internal, "POST", f"{PREFIX}/{envelope_id}/events", event)
    assert posted.status == 204, posted
    got = await http(sup.external, "GET", f"{PREFIX}/{envelope_id}")
    assert (got.status, got.json()["status"]) == (200, "running"), got


def test_workers_over_the_embedded_store_is_one_line_and_exit_2() -> None:
    done = run(MESH, **settings())
    assert done.returncode == 2
    assert done.stderr == (
        "asya-mesh-api: configuration error: ASYA_MESH_WORKERS=2 needs the state proxy "
        "(ASYA_STATEPROXY_SOCKET): with the embedded store each worker would keep envelopes "
        "of its own\n"
    )


def test_a_worker_failing_at_start_is_one_line_and_its_exit_status(tmp_path: Path) -> None:
    # serve() refuses a real queue transport without ASYA_INTERNAL_URL: only a worker sees it.
    done = run(
        MESH,
        **settings(
            ASYA_STATEPROXY_SOCKET=f"{tmp_path}/state.sock",
            ASYA_QUEUE_TRANSPORT="rabbitmq",
            ASYA_RABBITMQ_URL="amqp://127.0.0.1:1/",
            ASYA_LOG_LEVEL="error",
        ),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "asya-mesh-api: configuration error: ASYA_INTERNAL_URL: required with a real queue"
        " transport (sidecars post events there)"
    ]


async def test_each_worker_serves_both_ports(supervised: Supervised) -> None:
    for index in (0, 1):
        with supervised.only(index):
            await round_trip(supervised)
            assert (await http(supervised.internal, "GET", "/ready")).status == 200


async def test_a_killed_worker_is_logged_once_and_restarted(supervised: Supervised) -> None:
    killed = supervised.pids()[0]
    os.kill(killed, signal.SIGKILL)
    await supervised.wait_log(
        rf"WARNING mesh_trio\.supervisor: worker 0 \(pid {killed}\) was killed by SIGKILL: "
        r"restarting it in 0\.5s$"
    )
    await round_trip(supervised)  # worker 1 answers meanwhile
    await supervised.wait_log(LISTENING.format(0), count=2)
    restarted = supervised.pids()[0]
    assert restarted != killed
    with supervised.only(0):
        await round_trip(supervised)
    assert supervised.log.count("was killed") == 1, supervised.log


async def test_sigterm_stops_every_worker_and_exits_0(supervised: Supervised) -> None:
    workers = list(supervised.pids().values())
    supervised.process.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT):
        assert await supervised.process.wait() == 0
    await exited(workers)
    await supervised.wait_log(r"mesh API stopped worker=1$")
    await supervised.wait_log(r"mesh API stopped worker=0$")
    assert "Traceback" not in supervised.log
    assert "restarting" not in supervised.log and "killed" not in supervised.log


async def test_workers_of_a_killed_supervisor_exit(supervised: Supervised) -> None:
    workers = list(supervised.pids().values())
    supervised.process.kill()
    await supervised.process.wait()
    await exited(workers)
    for index in (0, 1):
        await supervised.wait_log(rf"supervisor \(pid \d+\) is gone: shutting down worker={index}$")
