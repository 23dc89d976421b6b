"""CPU per state-proxy round trip in the mesh API's HTTP client: h11 (old), httpcore, and now.

The state proxy runs as its own process (`asya-state-proxy`) on a temporary Unix socket, over
PostgreSQL in a throw-away schema with an application_name of its own (the schema is dropped at
the end). This process is only the client: `time.process_time()` around N requests is the CPU the
mesh API spends per round trip, the proxy's and PostgreSQL's excluded. Workloads, each at
concurrency 1 and 16 (workers sharing one client, one request at a time each):

- GET of a random key out of 1000;
- conditional PUT (`?if_status=`) that always wins: each worker flips its own key's status.

Variants:

- ``h11``: the client the mesh API had before: our own h11 keep-alive pool, with no expiry, no
  readability check and no retry of writes;
- ``httpcore``: httpcore's `AsyncConnectionPool` (trio backend) behind the adapter the mesh API
  used briefly (trace extension to tell how far a request got);
- ``new``: `mesh_trio._client.HttpPool`, what the mesh API uses now: the h11 pool with expiry,
  readability check before reuse and the retry rule.

The first two are defined here, not in the package: they exist to keep the comparison in
docs/performance.md reproducible.

Every (variant, workload, concurrency) is measured in `--runs` runs; the median is printed with
the lowest and highest run.

Usage: ``python bench/bench_client.py [--requests 3000] [--runs 3] [--variant h11|httpcore|new|all]
[--pg-url postgresql://postgres@127.0.0.1:5432/test]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import h11
import psycopg
import trio

GET_KEYS = 1000
VALUE = {"status": "running", "actor": "bench", "payload": {"text": "x" * 120}, "progress": 0.5}
JSON = (("content-type", "application/json"),)


class Reply(Protocol):
    status: int


class Client(Protocol):
    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply: ...

    async def aclose(self) -> None: ...


# -- the old client (h11 keep-alive pool), as it was in mesh_trio/_client.py -------------------


@attrs.frozen(kw_only=True)
class _OldReply:
    status: int
    body: bytes


@attrs.define(eq=False)
class _OldConnection:
    stream: trio.abc.Stream
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))

    async def exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> _OldReply:
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response: Any = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return _OldReply(status=response.status_code, body=b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise OSError("connection closed before the reply ended")


@attrs.define(eq=False)
class OldH11Pool:
    """The old pool's request path (reuse, exchange, keep), without its error mapping."""

    path: str
    host: str = "state-proxy"
    size: int = 32
    timeout: float = 5.0
    _idle: list[_OldConnection] = attrs.field(factory=list)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.size)

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> _OldReply:
        all_headers = [("host", self.host), ("content-length", str(len(body))), *headers]
        async with self._limiter:
            with trio.fail_after(self.timeout):
                if self._idle:
                    conn = self._idle.pop()
                else:
                    conn = _OldConnection(await trio.open_unix_socket(self.path))
                try:
                    reply = await conn.exchange(method, target, all_headers, body)
                except BaseException:
                    await trio.aclose_forcefully(conn.stream)
                    raise
                if conn.conn.our_state is h11.DONE and conn.conn.their_state is h11.DONE:
                    conn.conn.start_next_cycle()
                    self._idle.append(conn)
                else:
                    await trio.aclose_forcefully(conn.stream)
                return reply

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


# -- httpcore, as the mesh API used it briefly (mesh_trio/_client.py at commit 8933a23) --------


@attrs.define(eq=False)
class _Tracker:
    written: bool = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            self.written = True


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if not self._data:
            raise StopAsyncIteration
        data, self._data = self._data, b""
        return data


@attrs.define(eq=False)
class HttpcorePool:
    """The httpcore adapter's request path: pool, trace of how far the request got, body read."""

    path: str
    size: int = 32
    timeout: float = 5.0
    _pool: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        import httpcore

        self._pool = httpcore.AsyncConnectionPool(
            max_connections=self.size,
            keepalive_expiry=4.0,
            uds=self.path,
            network_backend=httpcore.TrioBackend(),
        )

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> _OldReply:
        import httpcore

        all_headers = [(b"Host", b"state-proxy"), (b"Content-Length", b"%d" % len(body)), *headers]
        url = httpcore.URL(scheme="http", host="state-proxy", target=target)
        tracker = _Tracker()
        request = httpcore.Request(
            method,
            url,
            headers=all_headers,
            content=_Body(body),
            extensions={"trace": tracker.trace},
        )
        with trio.fail_after(self.timeout):
            response = await self._pool.handle_async_request(request)
            try:
                chunks = [chunk async for chunk in response.aiter_stream()]
            finally:
                await response.aclose()
        return _OldReply(status=response.status, body=b"".join(chunks))

    async def aclose(self) -> None:
        await self._pool.aclose()


def make_client(variant: str, socket_path: str) -> Client:
    if variant == "h11":
        return OldH11Pool(socket_path)
    if variant == "httpcore":
        return HttpcorePool(socket_path)
    from mesh_trio._client import HttpPool

    # The settings `open_proxy_store` uses.
    return HttpPool.unix(socket_path, host="state-proxy", size=32, timeout=5.0)


# -- the load ----------------------------------------------------------------------------------


async def run_load(
    concurrency: int, count: int, one: Callable[[int, int], Awaitable[None]]
) -> tuple[float, float]:
    """Run `count` requests on `concurrency` workers; return (CPU µs per request, requests/s)."""
    next_index = 0

    async def worker(w: int) -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await one(w, i)

    cpu, wall = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / count * 1e6, count / wall


async def measure(
    variant: str, socket_path: str, count: int, runs: int
) -> dict[tuple[str, int], list[tuple[float, float]]]:
    client = make_client(variant, socket_path)
    rng = random.Random(1)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for k in range(GET_KEYS):
            reply = await client.request(
                "PUT", f"/keys/bench%2Fget%2F{k}", body=json.dumps(VALUE).encode(), headers=JSON
            )
            assert reply.status == 204, reply
        flips: dict[int, int] = {}
        for concurrency in (1, 16):
            for w in range(concurrency):
                body = json.dumps({**VALUE, "status": "s0"}).encode()
                reply = await client.request(
                    "PUT", f"/keys/bench%2Fcas%2F{w}", body=body, headers=JSON
                )
                assert reply.status == 204, reply
                flips[w] = 0

            async def get(w: int, i: int) -> None:
                reply = await client.request(
                    "GET", f"/keys/bench%2Fget%2F{rng.randrange(GET_KEYS)}"
                )
                assert reply.status == 200, reply

            async def cas(w: int, i: int) -> None:
                j = flips[w]
                flips[w] += 1
                body = json.dumps({**VALUE, "status": f"s{(j + 1) % 2}", "n": j}).encode()
                target = f"/keys/bench%2Fcas%2F{w}?if_status=s{j % 2}"
                reply = await client.request("PUT", target, body=body, headers=JSON)
                assert reply.status == 204, reply

            await run_load(concurrency, min(count, 500), get)  # warm-up: connections, caches
            for _ in range(runs):
                for name, one in (("GET", get), ("conditional PUT", cas)):
                    got = await run_load(concurrency, count, one)
                    results.setdefault((name, concurrency), []).append(got)
    finally:
        await client.aclose()
    return results


def start_proxy(socket_path: str, pg_url: str) -> subprocess.Popen[bytes]:
    exe = shutil.which("asya-state-proxy", path=os.path.dirname(sys.executable))
    command = (
        [exe]
        if exe
        else [sys.executable, "-c", "from mesh_trio.stateproxy._cli import main; main()"]
    )
    env = {
        **os.environ,
        "CONNECTOR_SOCKET": socket_path,
        "STATE_PROXY_PG_URL": pg_url,
        "ASYA_LOG_LEVEL": "warning",
    }
    child = subprocess.Popen(command, env=env)
    until = time.monotonic() + 20
    while not os.path.exists(socket_path):
        if child.poll() is not None or time.monotonic() > until:
            child.kill()
            raise RuntimeError("the state proxy did not start")
        time.sleep(0.05)
    return child


def spread(values: list[float], digits: int = 0) -> str:
    mid, low, high = statistics.median(values), min(values), max(values)
    low, mid, high = (f"{v:.{digits}f}" for v in (low, mid, high))
    return f"{mid} ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("h11", "httpcore", "new", "all"), default="all")
    parser.add_argument("--requests", type=int, default=3000, help="requests per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:8]
    schema = f"client_bench_{tag}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[call-overload]
    sep = "&" if "?" in args.pg_url else "?"
    url = f"{args.pg_url}{sep}options=-csearch_path%3D{schema}&application_name=bench-client-{tag}"
    variants = ("h11", "httpcore", "new") if args.variant == "all" else (args.variant,)
    try:
        with tempfile.TemporaryDirectory(prefix="bcl", dir="/tmp") as tmp:
            child = start_proxy(os.path.join(tmp, "proxy.sock"), url)
            try:
                print(
                    f"{args.requests} requests per run, median (lowest-highest) of {args.runs} "
                    "runs; client CPU µs per request and requests/s"
                )
                print(f"{'variant':9} {'workload':16} {'conc':>4} {'CPU µs':>16} {'req/s':>20}")
                for variant in variants:
                    got = trio.run(
                        measure, variant, os.path.join(tmp, "proxy.sock"), args.requests, args.runs
                    )
                    for (name, concurrency), rows in got.items():
                        cpu = spread([row[0] for row in rows])
                        rate = spread([row[1] for row in rows])
                        print(f"{variant:9} {name:16} {concurrency:4} {cpu:>16} {rate:>20}")
                    sys.stdout.flush()
            finally:
                child.send_signal(signal.SIGTERM)
                child.wait(timeout=20)
    finally:
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")  # type: ignore[call-overload]


if __name__ == "__main__":
    main()
