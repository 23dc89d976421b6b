# The HTTP stack alone: a handler that answers 204 on the lean listener and on hypercorn.
#
# Each server runs pinned to core 0 (`taskset -c 0`), wrk pinned to core 1 drives it over
# keep-alive connections; targets are interleaved run by run. Reported per target: requests/s,
# requests per server CPU second (from /proc/PID/stat over wrk's window) and non-2xx replies.
# This is the per-request cost of the listener itself, which every mesh route pays on top of
# its own work. Needs wrk (Debian package `wrk`).
#
# Run:   .venv/bin/python bench/lean_204.py [--runs 2] [--duration 5] [--connections 32]
#        [--pipeline N]   (N requests per write, through a wrk Lua script)
# Serve: .venv/bin/python bench/lean_204.py --serve lean|hypercorn --port P

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = ("lean", "hypercorn")


async def _serve_lean(port: int) -> None:
    from mesh_trio._lean import Reply, Request, serve_lean

    no_content = Reply(204)

    async def handler(request: Request) -> Reply:
        return no_content

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    await serve_lean(handler, listeners)


async def _serve_hypercorn(port: int) -> None:
    from hypercorn.trio import serve

    sys.path.insert(0, str(BENCH))
    from bare_app import hypercorn_config

    async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await serve(app, hypercorn_config(port))  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not start")


_PIPELINE_LUA = """
init = function(args)
  local r = {}
  for i = 1, %d do r[i] = wrk.format("GET", "/") end
  req = table.concat(r)
end
request = function() return req end
"""


def _wrk(port: int, seconds: float, connections: int, pipeline: int) -> tuple[float, int]:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if pipeline > 1:
            script.write(_PIPELINE_LUA % pipeline)
            script.flush()
            command += ["-s", script.name]
        output = subprocess.run(
            [*command, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True
        ).stdout
    requests = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return requests, int(bad[1]) if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="the HTTP stack alone: 204 on lean vs hypercorn")
    parser.add_argument("--serve", choices=TARGETS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pipeline", type=int, default=1)
    args = parser.parse_args()
    if args.serve:
        serve = _serve_lean if args.serve == "lean" else _serve_hypercorn
        trio.run(partial(serve, args.port))
        return
    servers = {}
    for target in TARGETS:
        port = _free_port()
        process = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, __file__, "--serve", target, f"--port={port}"]
        )
        _wait_listening(port)
        servers[target] = (port, process)
    figures: dict[str, list[tuple[float, float, int]]] = {target: [] for target in TARGETS}
    try:
        for _ in range(args.runs):
            for target, (port, process) in servers.items():
                before, start = _cpu_seconds(process.pid), time.monotonic()
                requests, bad = _wrk(port, args.duration, args.connections, args.pipeline)
                cpu, wall = _cpu_seconds(process.pid) - before, time.monotonic() - start
                figures[target].append((requests / wall, requests / max(cpu, 1e-9), bad))
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait()
    for target, runs in figures.items():
        rate = statistics.median(run[0] for run in runs)
        per_cpu = statistics.median(run[1] for run in runs)
        print(
            f"{target:10} {rate:9.0f} req/s  {per_cpu:9.0f} req per server CPU s  "
            f"non-2xx {sum(run[2] for run in runs)}"
        )


if __name__ == "__main__":
    main()
