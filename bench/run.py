# Benchmark runner: the bare app and the real server, the same scenarios, one table of ratios.
#
# Both servers are started up front, each pinned to core 0 (`taskset -c 0`), and declared ready
# once `GET /health` answers on both ports (polled, with a bound). Then every step (create,
# events, fanout with 1/100/1000 subscribers, tokens) is run `--runs` times, alternating between
# the servers run by run, with `bench/loadgen.py` pinned to core 1 (`taskset -c 1`). The server
# not being measured is paused (SIGSTOP), so it takes no CPU from the one under load. Medians
# of the runs are reported per server. The memory scenario comes last, on a fresh server per
# target, because memory freed by earlier streams would be reused. Figures of the real server
# ("ours") are printed as ratios to the bare app (bench/bare_app.py), the stack's own limit.
#
# Servers inherit this process's RLIMIT_NOFILE, raised to the hard limit here, so 5000 streams
# fit. Ports are free ports on 127.0.0.1 picked at start; nothing else is contacted. Each
# loadgen call has a timeout and the whole run a deadline (`--budget`, default 290 s).
#
# Run: .venv/bin/python bench/run.py [--quick] [--targets bare,ours]
#      [--ours-cmd ".venv/bin/asya-mesh-api"] [--ours-env ASYA_MESH_STORE=sqlite:/tmp/b.db]
# Writes bench/results/latest.json and bench/results/*.log (server logs); prints a markdown table.

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable

Results = dict[str, dict[str, float]]


@attrs.define
class ServerSpec:
    """How to start one server: argv (ports substituted) and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = attrs.field(factory=dict)

    def command(self, external: int, internal: int) -> tuple[list[str], dict[str, str]]:
        ports = {"external": str(external), "internal": str(internal)}
        argv = [part.format(**ports) for part in self.argv]
        env = dict(os.environ)
        env.update(
            ASYA_MESH_EXTERNAL_PORT=str(external),
            ASYA_MESH_INTERNAL_PORT=str(internal),
            ASYA_LOG_LEVEL="warning",
        )
        env.update({k: v.format(**ports) for k, v in self.env.items()})
        return ["taskset", "-c", "0", *argv], env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextmanager
def running(spec: ServerSpec, log: Path, ready_within: float = 20.0) -> Iterator[Server]:
    """Start `spec` on two free ports; yield it once both ports answer `GET /health`.

    Raises RuntimeError (with the log's tail) if it exits or is not healthy in time.
    """
    external, internal = free_port(), free_port()
    argv, env = spec.command(external, internal)
    with open(log, "ab") as out:
        out.write(f"\n=== {shlex.join(argv)}\n".encode())
        out.flush()
        # A session of its own: a stopped (paused) process in our process group would make the
        # kernel send the whole group SIGHUP once the group is orphaned (our shell exited).
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + ready_within
        while not (healthy(external) and healthy(internal)):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{spec.name} did not become healthy:\n{tail}")
            time.sleep(0.1)
        yield Server(spec.name, proc.pid, external, internal)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@attrs.define
class Server:
    """A started server: its pid and ports. `pause`/`resume` are SIGSTOP/SIGCONT."""

    name: str
    pid: int
    external: int
    internal: int

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def loadgen(server: Server, args: list[str], timeout: float) -> Results:
    out = RESULTS / f"loadgen-{server.pid}.json"
    argv = [
        "taskset",
        "-c",
        "1",
        PYTHON,
        str(BENCH / "loadgen.py"),
        f"--external-port={server.external}",
        f"--internal-port={server.internal}",
        f"--server-pid={server.pid}",
        f"--json={out}",
        *args,
    ]
    subprocess.run(argv, cwd=ROOT, check=True, timeout=timeout)
    results: Results = json.loads(out.read_text())["results"]
    out.unlink()
    return results


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(figure group, loadgen arguments) for every measured step but memory."""
    out = []
    for name in args.scenarios.split(","):
        if name == "fanout":
            for n in args.subscribers.split(","):
                out.append((f"fanout_{n}", ["--scenarios=fanout", f"--subscribers={n}"]))
        elif name:
            out.append((name, [f"--scenarios={name}"]))
    return out


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}


def bench_interleaved(
    specs: list[ServerSpec], args: argparse.Namespace, deadline: float
) -> dict[str, Results]:
    """Every step, run by run, against each server in turn (A B A B ...), the others paused.

    On a machine shared with other work, load comes and goes; taking the runs of the servers
    alternately exposes them to the same conditions, so their ratio holds better than their
    absolute figures. A paused server (SIGSTOP) takes no CPU from the one being measured.
    """
    extra = ["--runs=1", *(["--quick"] if args.quick else []), *args.loadgen_arg]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {spec.name: {} for spec in specs}
    with ExitStack() as stack:
        servers: list[Server] = []
        for spec in specs:
            try:
                servers.append(stack.enter_context(running(spec, RESULTS / f"{spec.name}.log")))
            except RuntimeError as exc:
                print(f"[{spec.name}] not benchmarked: {exc}", flush=True)
        for server in servers:
            server.pause()
        for step, step_args in steps(args):
            for run in range(args.runs):
                for server in servers:
                    left = deadline - time.monotonic()
                    if left < 10:
                        print(f"[{server.name}] {step}: skipped, run budget spent", flush=True)
                        continue
                    print(f"[{server.name}] {step} run {run + 1}/{args.runs}", flush=True)
                    server.resume()
                    try:
                        figures = loadgen(server, [*step_args, *extra], timeout=left)
                        runs[server.name].setdefault(step, []).extend(figures.values())
                    except subprocess.SubprocessError as exc:
                        print(f"[{server.name}] {step} failed: {exc}", flush=True)
                    finally:
                        server.pause()
    return {
        name: {step: median(figures) for step, figures in by_step.items()}
        for name, by_step in runs.items()
    }


def bench_memory(spec: ServerSpec, args: argparse.Namespace, deadline: float) -> Results:
    """The memory scenario on a fresh server: memory freed by earlier streams would be reused."""
    left = deadline - time.monotonic()
    if left < 10:
        print(f"[{spec.name}] memory: skipped, run budget spent", flush=True)
        return {}
    print(f"[{spec.name}] memory", flush=True)
    extra = [*(["--quick"] if args.quick else []), *args.loadgen_arg]
    try:
        with running(spec, RESULTS / f"{spec.name}.log") as server:
            return loadgen(server, ["--scenarios=memory", *extra], timeout=left)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"[{spec.name}] memory failed: {exc}", flush=True)
        return {}


# (scenario, figure, label, higher is better)
ROWS = [
    ("create", "req_per_s", "create, requests/s", True),
    ("create", "per_server_cpu_s", "create, requests per server CPU second", True),
    ("events", "req_per_s", "internal events, requests/s", True),
    ("events", "per_server_cpu_s", "internal events, requests per server CPU second", True),
    ("fanout_1", "p50_ms", "FLY latency p50, 1 subscriber, ms", False),
    ("fanout_1", "p99_ms", "FLY latency p99, 1 subscriber, ms", False),
    ("fanout_100", "p50_ms", "FLY latency p50, 100 subscribers, ms", False),
    ("fanout_100", "p99_ms", "FLY latency p99, 100 subscribers, ms", False),
    ("fanout_1000", "p50_ms", "FLY latency p50, 1000 subscribers, ms", False),
    ("fanout_1000", "p99_ms", "FLY latency p99, 1000 subscribers, ms", False),
    ("fanout_100", "delivered_pct", "FLY frames delivered, 100 subscribers, %", True),
    ("fanout_1000", "delivered_pct", "FLY frames delivered, 1000 subscribers, %", True),
    ("fanout_100", "publish_rate", "FLY events accepted, 100 subscribers, per s (of 100)", True),
    ("fanout_1000", "publish_rate", "FLY events accepted, 1000 subscribers, per s (of 100)", True),
    ("tokens", "tokens_per_s", "tokens/s, 10 streams", True),
    ("tokens", "per_server_cpu_s", "tokens per server CPU second, 10 streams", True),
    ("tokens", "streams_ended", "streams ended by the terminal status (of 10)", True),
    ("memory", "kib_per_stream_1000", "RSS per idle SSE stream, 1000 streams, KiB", False),
    ("memory", "kib_per_stream_5000", "RSS per idle SSE stream, 5000 streams, KiB", False),
]
CPU_SCENARIOS = ["create", "events", "fanout_1000", "tokens"]


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(all_results: dict[str, Results]) -> str:
    names = list(all_results)
    bare = all_results.get("bare", {})
    head = ["figure", *names]
    others = [n for n in names if n != "bare"]
    head += [f"{n} / bare" for n in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, scenario: str, figure: str) -> None:
        values = [all_results[n].get(scenario, {}).get(figure) for n in names]
        if all(v is None for v in values):
            return
        cells = [label, *(_num(v) for v in values)]
        base = bare.get(scenario, {}).get(figure)
        for n in others:
            ours = all_results[n].get(scenario, {}).get(figure)
            cells.append(f"{ours / base:.2f}" if ours is not None and base else "-")
        lines.append("| " + " | ".join(cells) + " |")

    for scenario, figure, label, higher in ROWS:
        row(f"{label} ({'higher' if higher else 'lower'} is better)", scenario, figure)
    for scenario in CPU_SCENARIOS:
        row(f"loadgen CPU during {scenario}, % of a core", scenario, "loadgen_cpu_pct")
        row(f"server CPU during {scenario}, % of a core", scenario, "server_cpu_pct")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="run the benchmarks against bare and ours")
    parser.add_argument("--quick", action="store_true", help="seconds, for a smoke check")
    parser.add_argument("--targets", default="bare,ours")
    parser.add_argument("--ours-cmd", default=str(ROOT / ".venv" / "bin" / "asya-mesh-api"))
    parser.add_argument(
        "--ours-env", action="append", default=[], help="KEY=VALUE for the real server"
    )
    parser.add_argument("--scenarios", default="create,events,fanout,tokens")
    parser.add_argument("--subscribers", help="fan-out subscriber counts (default 1,100,1000)")
    parser.add_argument("--runs", type=int, help="runs per step and server (default 3)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument(
        "--loadgen-arg", action="append", default=[], help="passed to loadgen.py as is"
    )
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"))
    parser.add_argument("--table", metavar="JSON", help="only print the table of a saved run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    args.subscribers = args.subscribers or ("1,100" if args.quick else "1,100,1000")
    args.runs = args.runs or (1 if args.quick else 3)
    deadline = time.monotonic() + args.budget
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    RESULTS.mkdir(exist_ok=True)
    specs = {
        "bare": ServerSpec(
            "bare",
            [
                PYTHON,
                str(BENCH / "bare_app.py"),
                "--external-port={external}",
                "--internal-port={internal}",
            ],
        ),
        "ours": ServerSpec(
            "ours",
            shlex.split(args.ours_cmd),
            dict(item.split("=", 1) for item in args.ours_env),
        ),
    }
    chosen = [specs[name] for name in args.targets.split(",")]
    for spec in chosen:
        (RESULTS / f"{spec.name}.log").write_text("")
    # The memory scenario comes last and gets a reserve, so slow steps cannot crowd it out.
    reserve = (15.0 if args.quick else 45.0) * len(chosen) if args.memory else 0.0
    all_results = bench_interleaved(chosen, args, deadline - reserve)
    if args.memory:
        for index, spec in enumerate(chosen):
            share = (deadline - time.monotonic()) / (len(chosen) - index)
            all_results[spec.name].update(bench_memory(spec, args, time.monotonic() + share))
    Path(args.out).write_text(json.dumps(all_results, indent=2))
    print()
    print(table(all_results))


if __name__ == "__main__":
    main()
