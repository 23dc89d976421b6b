"""Internal events/s through the state proxy with a retention purge of 100 000 envelopes running,
against the same load without one (docs/performance.md, "Retention").

A child process (this script with ``--serve``) runs the state proxy and the mesh API (state-proxy
store, memory transport, ``ASYA_MESH_RETENTION=1h``, sweep every 0.2 s) on PostgreSQL in a
throw-away schema with its own application_name, dropped at the end. The parent creates live
envelopes and sends status events (``running`` with a progress field, always applied) to the
internal port over N keep-alive connections, one request at a time each:

- without: for `--seconds`, with no old envelope stored;
- with: right after `--rows` terminal envelopes last updated 2 h ago are inserted straight into
  the kv table, until the sweep has deleted them all (the measured window is the purge itself).

Runs alternate between the two, `--runs` times; medians are printed. With ``--explain`` it prints
``EXPLAIN (ANALYZE, BUFFERS)`` of one purge batch at `--rows` rows (rolled back) and exits.

Usage: ``python bench/bench_retention.py [--connections 8] [--seconds 5] [--rows 100000]
[--runs 3] [--explain] [--pg-url postgresql://postgres@127.0.0.1:5432/test]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import trio
from bench_stateproxy import _read_status, _request

from mesh_proto import purge_request
from mesh_trio._config import Config
from mesh_trio._server import serve
from mesh_trio.stateproxy import serve_state_proxy
from mesh_trio.stateproxy._query import compile_delete
from mesh_trio.stateproxy._store import UPDATED_INDEX

ENVELOPES = 64
_INSERT = """
INSERT INTO kv (key, value, created_at, updated_at)
SELECT 'msg/old' || n, '{"status": "succeeded", "actor": "bench", "_rev": 2}'::jsonb,
       now() - interval '3 hours', now() - interval '2 hours'
FROM generate_series(1, %s) AS n
"""


def serve_child(directory: str, url: str) -> None:
    """Child process: the state proxy and the mesh API; prints the internal port, runs until
    stdin closes."""

    async def run() -> None:
        socket_path = os.path.join(directory, "proxy.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_state_proxy, socket_path, url)
            env = {
                "ASYA_STATEPROXY_SOCKET": socket_path,
                "ASYA_MESH_EXTERNAL_PORT": "0",
                "ASYA_MESH_INTERNAL_PORT": "0",
                "ASYA_MESH_HOST": "127.0.0.1",
                "ASYA_MESH_DEMO_ACTORS": "0",
                "ASYA_MESH_RETENTION": "1h",
                "ASYA_MESH_RETENTION_INTERVAL": "200ms",
            }
            bound = await nursery.start(serve, Config.from_env(env))
            print(json.dumps([bound.external_port, bound.internal_port]), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(run)


async def _call(port: int, request: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return int(data[9:12]), data.partition(b"\r\n\r\n")[2]


async def create_envelopes(port: int) -> list[str]:
    ids = []
    for _ in range(ENVELOPES):
        status, body = await _call(port, _request("POST", "/api/v1/mesh/?actor=bench", b"{}"))
        assert status == 201, (status, body)
        ids.append(json.loads(body)["id"])
    return ids


async def load(
    port: int, ids: list[str], connections: int, done: trio.Event | None, seconds: float
) -> float:
    """Events/s of `connections` workers until `done` is set (or for `seconds`)."""
    sent = [0] * connections
    stop = trio.Event()

    async def worker(w: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = bytearray()
        async with stream:
            i = 0
            while not stop.is_set():
                envelope_id = ids[(w + i * connections) % len(ids)]
                body = json.dumps({"type": "status", "status": "running", "data": {"p": i}})
                await stream.send_all(
                    _request("POST", f"/api/v1/mesh/{envelope_id}/events", body.encode())
                )
                status = await _read_status(stream, buf)
                if status != 204:
                    raise RuntimeError(f"unexpected status {status}")
                i += 1
            sent[w] = i

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(connections):
            nursery.start_soon(worker, w)
        if done is None:
            await trio.sleep(seconds)
        else:
            await done.wait()
        stop.set()
    return sum(sent) / (time.perf_counter() - start)


def remaining(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT count(*) FROM kv WHERE key LIKE 'msg/old%'").fetchone()
    return int(row[0]) if row else 0


async def measured_purge(
    url: str, port: int, ids: list[str], rows: int, connections: int
) -> tuple[float, float]:
    """Events/s while the sweep deletes `rows` old envelopes, and how long it took."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(_INSERT, (rows,))
    gone = trio.Event()
    started = time.perf_counter()

    async def watch() -> None:
        while await trio.to_thread.run_sync(remaining, url):  # noqa: ASYNC110 (a poll of PostgreSQL)
            await trio.sleep(0.1)
        gone.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        rate = await load(port, ids, connections, gone, 0.0)
    return rate, time.perf_counter() - started


def explain(url: str, rows: int) -> None:
    """EXPLAIN one purge batch at `rows` rows: all of them old, then only 1 % of them."""
    cutoff = datetime.now(UTC) - timedelta(hours=1)
    statement = compile_delete(purge_request(cutoff, 500).body)
    sql = re.sub(r"\$\d+", "%s", statement.sql.decode())  # each parameter appears once, in order
    print(statement.sql.decode())
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "CREATE TABLE kv (key text PRIMARY KEY, value jsonb NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        )
        db.execute(f"CREATE INDEX {UPDATED_INDEX} ON kv (updated_at, key)")
    for old in (rows, rows // 100):
        with psycopg.connect(url) as db:
            db.execute(_INSERT, (old,))
            db.execute(
                "INSERT INTO kv (key, value) SELECT 'msg/new' || n,"
                ' \'{"status": "succeeded", "_rev": 2}\'::jsonb FROM generate_series(1, %s) AS n',
                (rows - old,),
            )
            db.execute("ANALYZE kv")
            plan = db.execute(
                f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}",
                [p.decode() for p in statement.params],
            ).fetchall()
            print(f"\n-- {rows} terminal envelopes, {old} of them older than the cutoff")
            print("\n".join(line for (line,) in plan))
            db.rollback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_child(args.serve, args.pg_url)
        return
    tag = uuid.uuid4().hex[:8]
    schema = f"bench_retention_{tag}"
    base = args.pg_url.split("?")[0]
    url = f"{base}?options=-csearch_path%3D{schema}&application_name=asya-bench-retention-{tag}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        if args.explain:
            explain(url, args.rows)
            return
        with tempfile.TemporaryDirectory(prefix="mesh-") as directory:
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", directory, "--pg-url", url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None and child.stdin is not None
                external, internal = json.loads(child.stdout.readline())
                trio.run(run_all, args, url, external, internal)
            finally:
                assert child.stdin is not None
                child.stdin.close()
                child.wait(timeout=30)
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def run_all(args: argparse.Namespace, url: str, external: int, port: int) -> None:
    ids = await create_envelopes(external)
    without, with_purge, purge_seconds = [], [], []
    for _ in range(args.runs):
        without.append(await load(port, ids, args.connections, None, args.seconds))
        rate, took = await measured_purge(url, port, ids, args.rows, args.connections)
        with_purge.append(rate)
        purge_seconds.append(took)
    base, under = statistics.median(without), statistics.median(with_purge)
    print(f"events/s without purge: {base:.0f}  (runs: {[round(x) for x in without]})")
    print(f"events/s during purge:  {under:.0f}  (runs: {[round(x) for x in with_purge]})")
    print(f"ratio: {under / base:.2f}   purge of {args.rows} rows took "
          f"{statistics.median(purge_seconds):.1f} s (median)")  # fmt: skip


if __name__ == "__main__":
    main()
