# Request throughput with a C-speed load generator: wrk (Debian package `wrk`) instead of our
# Python loadgen, so that the load side can never be what limits a fast server.
#
# For each target and each scenario, wrk runs pinned to core 1 while the server is pinned to
# core 0. Targets: ours on either listener (`lean`, `hypercorn`), the Starlette/uvicorn
# yardstick (`starlette`), and `proxy`: ours on lean through `asya-state-proxy` in a schema of
# its own, the proxy on core 0 too and counted in the server's CPU. Targets are interleaved run
# by run (A B A B ...) and the ones not measured are paused with SIGSTOP, as in bench/run.py
# (whose server helpers this reuses). Reported per (target, scenario), medians of the runs:
# requests/s, requests per server CPU second, server CPU %,
# wrk's own CPU %, and non-2xx replies (must be 0); for `proxy`, also the CPU per request of
# the mesh API, of the state proxy and of its PostgreSQL backends (by application_name).
#
#   create   POST {prefix}/mesh/?actor=bench  {"payload":{"n":1}}            (external port)
#   events   POST {prefix}/mesh/{id}/events, status progress and FLY 1:1     (internal port)
#   status / fly   only one of the two kinds                                  (internal port)
#   get      GET {prefix}/mesh/{id}, the sidecar heartbeat                    (internal port)
#   tokens   10 fresh envelopes, each streamed by one `curl -N` (C, on core 1 with wrk); wrk
#            posts FLY tokens to them round robin on 10 connections (internal port). Figures
#            count the tokens the streams received (rps = tokens/s; delivered % of posted),
#            and the load side's CPU is wrk's and curl's together
#
# Run: .venv/bin/python bench/wrk_compare.py [--targets lean,hypercorn,starlette]
#          [--scenarios create,events,get,tokens] [--runs 3] [--duration 3] [--connections 32]
# (about targets x scenarios x runs x (duration + 1) seconds.)

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402  (bench/loadgen.py: PostgreSQL backends by application_name)
import run  # noqa: E402  (bench/run.py: server start/stop, specs)

PREFIX = "/api/v1"
STATUS = '{"type":"status","status":"running","data":{"progress_percent":1}}'
FLY = '{"type":"fly","data":{"token":"x"}}'

LUA_CREATE = """
wrk.method = "POST"
wrk.body = '{"payload":{"n":1}}'
wrk.headers["Content-Type"] = "application/json"
"""

LUA_EVENTS = """
local ids = {%(ids)s}
local bodies = {%(bodies)s}
local i = 0
local headers = {["Content-Type"] = "application/json"}
request = function()
  i = i + 1
  local id = ids[(i %% #ids) + 1]
  local body = bodies[(i %% #bodies) + 1]
  return wrk.format("POST", "%(prefix)s/mesh/" .. id .. "/events", headers, body)
end
"""

LUA_GET = """
local ids = {%(ids)s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "%(prefix)s/mesh/" .. ids[(i %% #ids) + 1])
end
"""

LUA_DONE = """
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format("WRKJSON {\\"requests\\": %d, \\"seconds\\": %f, \\"non2xx\\": %d, " ..
    "\\"socket_errors\\": %d, \\"p50_ms\\": %f, \\"p99_ms\\": %f}\\n",
    summary.requests, summary.duration / 1e6, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(server: run.Server) -> float:
    """CPU seconds of the server and its companions (the state proxy of `proxy`)."""
    return sum(cpu_seconds(pid) for pid in [server.pid, *server.companions])


def children_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def create_envelopes(server: run.Server, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.external}{PREFIX}/mesh/?actor=bench",
            data=b'{"payload":{"n":1}}',
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            ids.append(json.loads(reply.read())["id"])
    return ids


def script(scenario: str, ids: list[str]) -> tuple[str, str]:
    """(Lua source, port name) of a scenario."""
    quoted = ", ".join(f'"{i}"' for i in ids)
    bodies = {"events": [STATUS, FLY], "status": [STATUS], "fly": [FLY]}
    if scenario == "create":
        return LUA_CREATE + LUA_DONE, "external"
    if scenario in bodies:
        body_list = ", ".join(f"'{b}'" for b in bodies[scenario])
        source = LUA_EVENTS % {"ids": quoted, "bodies": body_list, "prefix": PREFIX}
        return source + LUA_DONE, "internal"
    if scenario == "get":
        return LUA_GET % {"ids": quoted, "prefix": PREFIX} + LUA_DONE, "internal"
    raise SystemExit(f"unknown scenario {scenario!r}")


def run_wrk(lua: str, connections: int, duration: int, url: str) -> dict:
    """wrk on core 1 with the script `lua` (which ends with LUA_DONE): its figures."""
    argv = [
        "taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
        "--latency", "-s", lua, url,
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    match = re.search(r"WRKJSON (\{.*\})", out.stdout)
    if match is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    figures: dict = json.loads(match.group(1))
    return figures


def pg_backends_cpu(server: run.Server) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend of the `proxy` target's state proxy (found by
    its application_name, as bench/loadgen.py does); empty for other targets."""
    options = dict(a.removeprefix("--").split("=", 1) for a in server.loadgen_args if "=" in a)
    if "pg-app" not in options:
        return {}
    cpu = {}
    for pid in loadgen.pg_backend_pids(options["pg-url"], options["pg-app"]):
        with suppress(OSError):  # ended meanwhile
            cpu[pid] = cpu_seconds(pid)
    return cpu


def measure(server: run.Server, scenario: str, ids: list[str], args: argparse.Namespace) -> dict:
    source, port_name = script(scenario, ids)
    port = server.external if port_name == "external" else server.internal
    path = f"{PREFIX}/mesh/?actor=bench" if scenario == "create" else "/"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(source)
    before_pg = pg_backends_cpu(server)  # a query: outside the measured window
    before_server, before_mesh, before_wrk, started = (
        server_cpu(server),
        cpu_seconds(server.pid),
        children_cpu(os.getpid()),
        time.monotonic(),
    )
    figures = run_wrk(f.name, args.connections, args.duration, f"http://127.0.0.1:{port}{path}")
    wall = time.monotonic() - started
    used_cpu = server_cpu(server) - before_server
    wrk_cpu = children_cpu(os.getpid()) - before_wrk
    os.unlink(f.name)
    rps = figures["requests"] / figures["seconds"]
    split = {}
    if server.companions:  # CPU per request of each part: mesh API, state proxy, PostgreSQL
        mesh = cpu_seconds(server.pid) - before_mesh
        after_pg = pg_backends_cpu(server)  # a backend opened meanwhile counts whole
        pg = sum(cpu - before_pg.get(pid, 0.0) for pid, cpu in after_pg.items())
        per = 1e6 / max(figures["requests"], 1)
        split = {"mesh_us": mesh * per, "proxy_us": (used_cpu - mesh) * per, "pg_us": pg * per}
    return {
        **split,
        "rps": rps,
        "per_cpu_s": figures["requests"] / used_cpu if used_cpu else 0.0,
        "server_cpu_pct": 100 * used_cpu / wall,
        "wrk_cpu_pct": 100 * wrk_cpu / wall,
        "p99_ms": figures["p99_ms"],
        "non2xx": figures["non2xx"],
        "socket_errors": figures["socket_errors"],
    }


TOKEN_STREAMS = 10


def _count_fly(paths: list[Path]) -> int:
    return sum(path.read_bytes().count(b"event: fly\n") for path in paths)


def _wait_for(condition: Callable[[], bool], bound: float, what: str) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"tokens: {what} within {bound} s")
        time.sleep(0.05)


def measure_tokens(server: run.Server, args: argparse.Namespace) -> dict:
    """The `tokens` scenario (module comment): wrk posts, curl streams, both in C."""
    ids = create_envelopes(server, TOKEN_STREAMS)
    source = LUA_EVENTS % {"ids": ", ".join(f'"{i}"' for i in ids), "bodies": f"'{FLY}'",
                           "prefix": PREFIX}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(source + LUA_DONE)
    folder = Path(tempfile.mkdtemp(prefix="wrk-tokens-"))
    paths = [folder / f"{index}.sse" for index in range(len(ids))]
    curls = []
    for envelope_id, path in zip(ids, paths, strict=True):
        url = f"http://127.0.0.1:{server.external}{PREFIX}/mesh/{envelope_id}/events"
        with path.open("wb") as out:  # curl keeps its own copy of the descriptor
            curls.append(subprocess.Popen(["taskset", "-c", "1", "curl", "-sN", url], stdout=out))
    try:
        _wait_for(lambda: all(p.stat().st_size for p in paths), 10, "streams did not start")
        before_server, before_load, started = (
            server_cpu(server),
            children_cpu(os.getpid()) + sum(cpu_seconds(c.pid) for c in curls),
            time.monotonic(),
        )
        url = f"http://127.0.0.1:{server.internal}/"
        figures = run_wrk(f.name, TOKEN_STREAMS, args.duration, url)
        posted = figures["requests"] - figures["non2xx"]
        # Delivered: every posted token reached its stream, or none came for half a second.
        last = [-1, time.monotonic()]

        def settled() -> bool:
            count = _count_fly(paths)
            if count != last[0]:
                last[:] = [count, time.monotonic()]
            return count >= posted or time.monotonic() - last[1] > 0.5

        _wait_for(settled, 30, "tokens still arriving")
        wall = time.monotonic() - started
        used_cpu = server_cpu(server) - before_server
        load_cpu = children_cpu(os.getpid()) + sum(cpu_seconds(c.pid) for c in curls)
        load_cpu -= before_load
    finally:
        for curl in curls:
            curl.terminate()
            curl.wait()
        os.unlink(f.name)
    delivered = _count_fly(paths)
    shutil.rmtree(folder)
    return {
        "rps": delivered / figures["seconds"],
        "per_cpu_s": delivered / used_cpu if used_cpu else 0.0,
        "server_cpu_pct": 100 * used_cpu / wall,
        "wrk_cpu_pct": 100 * load_cpu / wall,
        "p99_ms": figures["p99_ms"],
        "non2xx": figures["non2xx"],
        "socket_errors": figures["socket_errors"],
        "delivered_pct": 100 * delivered / posted if posted else 0.0,
    }


def start(name: str, args: argparse.Namespace, stack: ExitStack) -> run.Server:
    """The target `name`, running until `stack` closes."""
    if name == "starlette":
        return stack.enter_context(run.running(run.starlette_spec(), run.RESULTS / "wrk-s.log"))
    listener = {"lean": "lean", "hypercorn": "hypercorn", "proxy": "lean"}[name]
    ours = argparse.Namespace(ours_cmd=args.ours_cmd, ours_env=[f"ASYA_MESH_HTTP={listener}"])
    if name == "proxy":  # bench/run.py's own proxy target: the proxy is a companion of ours
        ours.pg_url, ours.proxy_core = run.PG_URL, "0"
        server, _ = stack.enter_context(run.target("proxy", ours, deadline=math.inf))
        return server
    spec = run.ours_spec(name, ours, {})
    return stack.enter_context(run.running(spec, run.RESULTS / f"wrk-{name}.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", default="lean,hypercorn,starlette")
    parser.add_argument("--scenarios", default="create,events,get")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--ours-cmd", default=str(Path(run.PYTHON).parent / "asya-mesh-api"))
    parser.add_argument("--json", type=Path, default=run.RESULTS / "wrk.json")
    args = parser.parse_args()
    run.RESULTS.mkdir(exist_ok=True)
    targets = args.targets.split(",")
    results: dict[str, dict[str, list[dict]]] = {t: {} for t in targets}
    with ExitStack() as stack:
        servers = {}
        for name in targets:
            server = start(name, args, stack)
            servers[name] = (server, create_envelopes(server, 100))
            server.pause()
        for scenario in args.scenarios.split(","):
            for index in range(args.runs):
                for name in targets:
                    server, ids = servers[name]
                    server.resume()
                    try:
                        if scenario == "tokens":
                            figures = measure_tokens(server, args)
                        else:
                            figures = measure(server, scenario, ids, args)
                    finally:
                        server.pause()
                    results[name].setdefault(scenario, []).append(figures)
                    print(f"[{name}] {scenario} run {index + 1}: {figures}", flush=True)
        for server, _ in servers.values():
            server.resume()
    medians = {
        name: {
            scenario: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for scenario, runs in by_scenario.items()
        }
        for name, by_scenario in results.items()
    }
    args.json.write_text(json.dumps({"runs": results, "medians": medians}, indent=1))
    base = targets[-1]
    print(
        "\n| scenario | target | req/s | per server CPU s | server CPU % | wrk CPU % | p99 ms "
        f"| vs {base} (per CPU s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for scenario in args.scenarios.split(","):
        for name in targets:
            m = medians[name][scenario]
            ratio = m["per_cpu_s"] / medians[base][scenario]["per_cpu_s"]
            label = scenario
            if "delivered_pct" in m:
                label += f" ({m['delivered_pct']:.0f} % delivered)"
            print(
                f"| {label} | {name} | {m['rps']:.0f} | {m['per_cpu_s']:.0f} | "
                f"{m['server_cpu_pct']:.0f} | {m['wrk_cpu_pct']:.0f} | {m['p99_ms']:.1f} "
                f"| {ratio:.2f} |"
            )
    split = [(s, n) for s in args.scenarios.split(",") for n in targets
             if "mesh_us" in medians[n].get(s, {})]  # fmt: skip
    if split:
        print("\n| scenario | target | CPU per request, µs: mesh API | state proxy | PostgreSQL |")
        print("|---|---|---:|---:|---:|")
        for scenario, name in split:
            m = medians[name][scenario]
            print(f"| {scenario} | {name} | {m['mesh_us']:.0f} | {m['proxy_us']:.0f} "
                  f"| {m['pg_us']:.0f} |")  # fmt: skip
    bad = [
        (n, s) for n in targets for s, m in medians[n].items() if m["non2xx"] or m["socket_errors"]
    ]
    if bad:
        print(f"WARNING: errors in {bad}")


if __name__ == "__main__":
    main()
