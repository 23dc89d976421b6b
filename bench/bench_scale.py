"""What the event bus costs: SSE delivery across replicas against one replica.

Pods run as child processes (this script with ``--pod``): each is a state proxy on its own
Unix socket and a mesh API on it, as docs/scale-out.md deploys them, all on one PostgreSQL
(a throw-away schema). The load side is `bench/loadgen.py`'s, pointed at two pods at once:
subscribers on one pod's external port, publishers on another's internal port.

Figures, each from one run of `loadgen.scenario_fanout` (FLY events at 100/s, latency from
the moment each was due to its receipt by every subscriber, p50/p99) and
`loadgen.scenario_tokens` (10 streams, tokens posted back to back: tokens/s received):

- ``hub``: one replica with the embedded store (the in-process hub; no bus at all);
- ``same``: publisher and subscribers on pod A (the event goes through ``POST /events``);
- ``cross``: publisher on pod A, subscribers on pod B (and the watch stream between).

Runs in well under 60 s. Usage: ``python bench/bench_scale.py [--pg-url URL] [--json out]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loadgen

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
POD_ENV = {
    "ASYA_MESH_HOST": "127.0.0.1",
    "ASYA_MESH_EXTERNAL_PORT": "0",
    "ASYA_MESH_INTERNAL_PORT": "0",
    "ASYA_MESH_DEMO_ACTORS": "0",
    "ASYA_LOG_LEVEL": "warning",
}


async def run_pod(socket_path: str | None, pg_url: str) -> None:
    """One pod in this process; prints its ports as one JSON line, then serves forever."""
    from mesh_trio import Config, serve
    from mesh_trio.stateproxy import serve_state_proxy

    env = dict(POD_ENV)
    async with trio.open_nursery() as nursery:
        if socket_path is not None:
            await nursery.start(partial(serve_state_proxy, socket_path, pg_url))
            env["ASYA_STATEPROXY_SOCKET"] = socket_path
        config = Config.from_env(env)
        bound = await nursery.start(partial(serve, config))
        ports = {"ext": bound.external_port, "int": bound.internal_port}
        print(json.dumps({**ports, "prefix": config.router.prefix}), flush=True)


def start_pod(socket_path: str | None, pg_url: str) -> tuple[subprocess.Popen[str], Any]:
    args = [sys.executable, __file__, "--pod", socket_path or "-", "--pg-url", pg_url]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit("a pod did not start")
    return process, json.loads(line)


async def measure(publish: Any, subscribe: Any) -> dict[str, float]:
    settings = loadgen.Settings(runs=1, duration=2.0, rate=100.0)
    target = loadgen.Target(subscribe["ext"], publish["int"], subscribe["prefix"], None)
    figures: dict[str, float] = {}
    for subscribers in (1, 100):
        with trio.fail_after(15):
            fanout = await loadgen.scenario_fanout(target, settings, subscribers)
        figures[f"p50_ms@{subscribers}"] = fanout["p50_ms"]
        figures[f"p99_ms@{subscribers}"] = fanout["p99_ms"]
        figures[f"delivered_pct@{subscribers}"] = fanout["delivered_pct"]
    with trio.fail_after(15):
        tokens = await loadgen.scenario_tokens(target, settings)
    figures["tokens_per_s"] = tokens["tokens_per_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get("MESH_TEST_PG_URL", PG_URL))
    parser.add_argument("--pod", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.pod is not None:
        trio.run(run_pod, None if args.pod == "-" else args.pod, args.pg_url)
        return
    loadgen.raise_fd_limit()
    schema = f"bench_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    url = f"{args.pg_url}?options=-csearch_path%3D{schema}"
    pods: list[subprocess.Popen[str]] = []
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="scale-", dir="/tmp") as tmp:
            hub, hub_ports = start_pod(None, url)
            a, a_ports = start_pod(os.path.join(tmp, "a.sock"), url)
            b, b_ports = start_pod(os.path.join(tmp, "b.sock"), url)
            pods += [hub, a, b]
            for name, publish, subscribe in (
                ("hub", hub_ports, hub_ports),
                ("same", a_ports, a_ports),
                ("cross", a_ports, b_ports),
            ):
                results[name] = trio.run(measure, publish, subscribe)
                print(name, " ".join(f"{k}={v:.1f}" for k, v in results[name].items()))
    finally:
        for pod in pods:
            pod.terminate()
            pod.wait(10)
        with psycopg.connect(args.pg_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
