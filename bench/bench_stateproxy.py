"""Requests/s of the state proxy for GET and conditional PUT over keep-alive connections.

Workloads: GET of a random key; PUT guarded by ``if_status`` that always wins; PUT guarded by
``if_status`` and ``if_rev`` together (the mesh API's write) that always wins.

The proxy runs in a child process (this script with ``--serve``) on a temporary Unix socket,
backed by PostgreSQL in a throw-away schema; the load generator runs here, N connections each
sending one request at a time for a fixed duration. Each workload is measured in 3 runs and the
median printed.

``--driver`` picks the PostgreSQL driver of the proxy:

- ``native`` (what `asya-state-proxy` uses): libpq in non-blocking mode waited on by trio
  (`mesh_trio.stateproxy._pg.PgPool`).
- ``thread``: sync psycopg 3 with a `psycopg_pool.ConnectionPool`, each statement run through
  `trio.to_thread.run_sync` under a `CapacityLimiter` of the pool's size. It is defined here,
  not in the package: it exists to keep the comparison in docs/stateproxy.md reproducible.

Both run exactly the same SQL through the same server code (`_server._serve`).

Usage: ``python bench/bench_stateproxy.py [--driver native|thread|both] [--connections 10]
[--seconds 3] [--pg-url postgresql://postgres@127.0.0.1:5432/test]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence

import psycopg
import psycopg_pool
import trio

from mesh_trio.stateproxy._errors import PgError, StoreUnavailable
from mesh_trio.stateproxy._pg import PgPool, Rows
from mesh_trio.stateproxy._server import _serve

GET_KEYS = 1000
VALUE = {"status": "running", "actor": "bench", "payload": {"text": "x" * 120}, "progress": 0.5}


class ThreadedDatabase:
    """Sync psycopg behind `trio.to_thread.run_sync`: the alternative driver being measured."""

    def __init__(self, url: str, size: int) -> None:
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=size, max_size=size, kwargs={"autocommit": True}, open=True
        )
        self._limiter = trio.CapacityLimiter(size)

    async def execute(
        self,
        sql: bytes,
        params: Sequence[bytes] = (),
        *,
        name: bytes | None = None,
        retry: bool = False,
    ) -> Rows:
        text_params = [p.decode() for p in params]
        return await trio.to_thread.run_sync(
            self._run, sql.decode(), text_params, limiter=self._limiter
        )

    async def execute_script(self, sql: bytes) -> None:
        await trio.to_thread.run_sync(self._script, sql.decode(), limiter=self._limiter)

    def close(self) -> None:
        self._pool.close()

    def _run(self, sql: str, params: list[str]) -> Rows:
        try:
            with self._pool.connection() as conn:
                cur = psycopg.RawCursor(conn)
                cur.execute(sql, params)
                values = [str(row[0]).encode() for row in cur.fetchall()] if cur.description else []
                return Rows(values=tuple(values), affected=max(cur.rowcount, 0))
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from None
        except psycopg.Error as exc:
            raise PgError(exc.sqlstate or "", str(exc)) from None

    def _script(self, sql: str) -> None:
        with self._pool.connection() as conn:
            conn.execute(sql)  # type: ignore[call-overload]


def serve(socket_path: str, url: str, driver: str, pool_size: int) -> None:
    """Child process: run the proxy with `driver` until SIGTERM."""

    async def run() -> None:
        db = PgPool(url, max_size=pool_size) if driver == "native" else None
        database = db if db is not None else ThreadedDatabase(url, pool_size)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def stop() -> None:
                async for _ in signals:
                    return

            await _serve(socket_path, database, (), stop, 1.0, trio.TASK_STATUS_IGNORED)

    trio.run(run)


async def _read_status(stream: trio.SocketStream, buf: bytearray) -> int:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            status = int(head[9:12])
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(
                    head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None]
                )
            if len(buf) >= end + 4 + length:
                del buf[: end + 4 + length]
                return status
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise RuntimeError("proxy closed the connection")
        buf += chunk


def _request(method: str, target: str, body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nhost: bench\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _load(
    socket_path: str, connections: int, seconds: float, make: Callable[[int, int], bytes], ok: int
) -> tuple[float, int]:
    """Requests/s of `connections` workers, each sending make(worker, i) in turn; and count."""
    done = [0] * connections
    deadline = trio.current_time() + seconds

    async def worker(w: int) -> None:
        stream = await trio.open_unix_socket(socket_path)
        buf = bytearray()
        async with stream:
            i = 0
            while trio.current_time() < deadline:
                await stream.send_all(make(w, i))
                status = await _read_status(stream, buf)
                if status != ok:
                    raise RuntimeError(f"unexpected status {status}")
                i += 1
            done[w] = i

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(connections):
            nursery.start_soon(worker, w)
    return sum(done) / (time.perf_counter() - start), sum(done)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    socket_path: str, pid: int, connections: int, seconds: float, runs: int
) -> dict[str, tuple[float, float]]:
    """Median requests/s and median proxy CPU microseconds per request, per workload."""
    rng = random.Random(1)
    stream = await trio.open_unix_socket(socket_path)
    buf = bytearray()
    async with stream:
        for k in range(GET_KEYS):
            await stream.send_all(
                _request("PUT", f"/keys/bench%2Fget%2F{k}", json.dumps(VALUE).encode())
            )
            assert await _read_status(stream, buf) == 204
        for w in range(connections):
            body = json.dumps({**VALUE, "status": "s0"}).encode()
            await stream.send_all(_request("PUT", f"/keys/bench%2Fcas%2F{w}", body))
            assert await _read_status(stream, buf) == 204
            await stream.send_all(_request("PUT", f"/keys/bench%2Frev%2F{w}", body))
            assert await _read_status(stream, buf) == 204

    def get(w: int, i: int) -> bytes:
        return _request("GET", f"/keys/bench%2Fget%2F{rng.randrange(GET_KEYS)}")

    # Each worker owns one key and flips its status s0 <-> s1 under the condition, so every
    # conditional PUT wins; the count of a run decides where each worker's key stands.
    flips = [0] * connections

    def cas(w: int, i: int) -> bytes:
        j = flips[w]
        flips[w] += 1
        body = json.dumps({**VALUE, "status": f"s{(j + 1) % 2}", "n": j}).encode()
        return _request("PUT", f"/keys/bench%2Fcas%2F{w}?if_status=s{j % 2}", body)

    # The mesh API's write to a proxy with the revision guard: status and revision both guarded.
    revs = [0] * connections

    def guarded(w: int, i: int) -> bytes:
        j = revs[w]
        revs[w] += 1
        body = json.dumps({**VALUE, "status": f"s{(j + 1) % 2}", "_rev": j + 1}).encode()
        target = f"/keys/bench%2Frev%2F{w}?if_status=s{j % 2}&if_rev={j}"
        return _request("PUT", target, body)

    workloads = {"GET": (get, 200), "conditional PUT": (cas, 204), "guarded PUT": (guarded, 204)}
    rates: dict[str, list[float]] = {name: [] for name in workloads}
    costs: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(runs):
        for name, (make, ok) in workloads.items():
            cpu = _cpu_seconds(pid)
            rate, count = await _load(socket_path, connections, seconds, make, ok)
            rates[name].append(rate)
            costs[name].append((_cpu_seconds(pid) - cpu) / count * 1e6)
    return {
        name: (statistics.median(rates[name]), statistics.median(costs[name])) for name in workloads
    }


def bench(
    driver: str, url: str, connections: int, seconds: float, runs: int
) -> dict[str, tuple[float, float]]:
    """Start a proxy child with `driver`, measure, stop it (see `_measure`)."""
    with tempfile.TemporaryDirectory(prefix="spb", dir="/tmp") as tmp:
        socket_path = os.path.join(tmp, "proxy.sock")
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                socket_path,
                "--driver",
                driver,
                "--pg-url",
                url,
                "--pool-size",
                str(connections),
            ]
        )
        try:
            until = time.monotonic() + 20
            while not os.path.exists(socket_path):
                if child.poll() is not None or time.monotonic() > until:
                    raise RuntimeError("the proxy did not start")
                time.sleep(0.05)
            return trio.run(_measure, socket_path, child.pid, connections, seconds, runs)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=("native", "thread", "both"), default="both")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.pg_url, args.driver, args.pool_size)
        return

    schema = f"sp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[call-overload]
    sep = "&" if "?" in args.pg_url else "?"
    url = f"{args.pg_url}{sep}options=-csearch_path%3D{schema}"
    drivers = ("native", "thread") if args.driver == "both" else (args.driver,)
    try:
        print(
            f"{args.connections} keep-alive connections, {args.seconds:g} s per run, "
            f"median of {args.runs} runs; req/s and proxy CPU microseconds per request"
        )
        print(
            f"{'driver':8} {'GET req/s':>10} {'CPU us':>7} {'cPUT req/s':>11} {'CPU us':>7} "
            f"{'gPUT req/s':>11} {'CPU us':>7}"
        )
        for driver in drivers:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS kv")
            got = bench(driver, url, args.connections, args.seconds, args.runs)
            (get_rate, get_cpu), (cas_rate, cas_cpu) = got["GET"], got["conditional PUT"]
            rev_rate, rev_cpu = got["guarded PUT"]
            print(
                f"{driver:8} {get_rate:10.0f} {get_cpu:7.0f} {cas_rate:11.0f} {cas_cpu:7.0f} "
                f"{rev_rate:11.0f} {rev_cpu:7.0f}",
                flush=True,
            )
    finally:
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")  # type: ignore[call-overload]


if __name__ == "__main__":
    main()
