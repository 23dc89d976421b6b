# Benchmark runner: the bare app and the real server, the same scenarios, one table of ratios.
#
# Every target is started up front, each server pinned to core 0 (`taskset -c 0`), and declared
# ready once `GET /health` answers on both ports (polled, with a bound). Then every step (create,
# events, fanout with 1/100/1000 subscribers, tokens, ...) is run `--runs` times, alternating
# between the targets run by run, with `bench/loadgen.py` pinned to core 1 (`taskset -c 1`). The
# targets not being measured are paused (SIGSTOP), so they take no CPU from the one under load.
# Medians of the runs are reported per target. The memory scenario comes last, on a fresh
# server per target, because memory freed by earlier streams would be reused. Each figure is
# also printed as a ratio to its baseline target.
#
# Targets (`--targets`, or chosen by `--variant`):
#   bare       bench/bare_app.py, the HTTP stack's own limit
#   starlette  bench/starlette_app.py, the contract on Starlette + uvicorn[standard] (uvloop,
#              httptools), in-memory: what a Python team would write instead
#   ours       the real server, embedded memory store, memory transport
#   proxy      the real server through `asya-state-proxy` (pinned to core 0 with the server:
#              the mesh gets the same one core as `ours`) on PostgreSQL, in a schema of its own
#   rabbitmq   the real server, memory store, RabbitMQ transport (publisher confirms) to a
#              durable queue `asya-<ns>-bench` declared here, purged after every run
#   T+N        target T with N envelopes stored before anything is measured (`--preload N`)
# Variants: `default` (bare vs ours, every scenario), `proxy` (ours vs proxy), `rabbitmq` (ours
# vs rabbitmq), `starlette` (ours vs starlette, every scenario); `--preload N` compares the
# variant's subject with and without N envelopes.
#
# Servers inherit this process's RLIMIT_NOFILE, raised to the hard limit here, so 5000 streams
# fit. Ports are free ports on 127.0.0.1 picked at start; only 127.0.0.1 is contacted
# (PostgreSQL and RabbitMQ included). Each loadgen call has a timeout and the whole run a
# deadline (`--budget`, default 290 s). Schemas and queues made here are dropped at the end.
#
# Run: .venv/bin/python bench/run.py [--quick] [--variant default|proxy|rabbitmq|starlette]
#      [--preload N] [--targets bare,ours] [--ours-env KEY=VALUE]
# Writes bench/results/latest.json and bench/results/*.log (server logs); prints a markdown table.

from __future__ import annotations

import argparse
import http.client
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
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"

Results = dict[str, dict[str, float]]

# What each variant measures: (targets, scenarios, baseline, memory scenario, preload subject,
# runs per step and target). The variants with few steps take more runs (less noise, same time).
VARIANTS = {
    "default": ("bare,ours", "create,events,fanout,tokens", "bare", True, "ours", 3),
    "proxy": ("ours,proxy", "create,events,status,fly", "ours", False, "proxy", 5),
    "rabbitmq": ("ours,rabbitmq", "create", "ours", False, "rabbitmq", 7),
    "starlette": ("starlette,ours", "create,events,fanout,tokens", "starlette", True, "ours", 3),
}
PRELOAD_SCENARIOS = "create,events,status,fly,get,list"
# Runs per step with --preload: the memory store's preload (through the API) takes ~90 s of the
# budget; the state proxy's (SQL) takes seconds.
PRELOAD_RUNS = {"ours": 3, "proxy": 5, "rabbitmq": 3}


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


def stop_process(proc: subprocess.Popen[bytes]) -> None:
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
    """A started target: the server's pid and ports, the processes paused along with it (the
    state proxy), what the loadgen needs to measure them, and a hook run after each run."""

    name: str
    pid: int
    external: int
    internal: int
    companions: list[int] = attrs.field(factory=list)
    loadgen_args: list[str] = attrs.field(factory=list)
    after_run: Callable[[], None] | None = None

    def pause(self) -> None:
        for pid in [self.pid, *self.companions]:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in [*self.companions, self.pid]:
            os.kill(pid, signal.SIGCONT)


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
        stop_process(proc)


# --- State proxy on PostgreSQL ---------------------------------------------------------------


@attrs.define
class Proxy:
    pid: int
    socket: str
    url: str  # the proxy's own URL: its schema and application_name
    app: str


def proxy_healthy(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(path)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextmanager
def state_proxy(name: str, args: argparse.Namespace) -> Iterator[Proxy]:
    """`asya-state-proxy` on a socket of its own, pinned to `--proxy-core`, in a fresh schema
    (dropped afterwards). Its PostgreSQL connections carry an application_name of their own, so
    the loadgen can find the backends and report their CPU."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    app = f"asya-bench-{schema}"
    url = f"{args.pg_url}?options=-csearch_path%3D{schema}&application_name={app}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sock = f"/tmp/{schema}.sock"
    log = RESULTS / f"{name}-proxy.log"
    env = dict(os.environ)
    env.update(
        CONNECTOR_SOCKET=sock,
        STATE_PROXY_PG_URL=url,
        STATE_PROXY_PG_INDEXES="status,deadline_at",
        ASYA_LOG_LEVEL="warning",
    )
    argv = ["taskset", "-c", args.proxy_core, str(Path(PYTHON).parent / "asya-state-proxy")]
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 20
            while not proxy_healthy(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"state proxy of {name} did not start:\n{tail}")
                time.sleep(0.1)
            yield Proxy(proc.pid, sock, url, app)
        finally:
            stop_process(proc)
    finally:
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def create_one(server: Server) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.external, timeout=10)
    try:
        conn.request("POST", "/api/v1/mesh/?actor=bench", body=b'{"payload":{"n":0}}')
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    if reply.status != 201:
        raise RuntimeError(f"create answered {reply.status}: {body[:200]!r}")
    return str(json.loads(body)["id"])


def preload_sql(server: Server, proxy: Proxy, count: int) -> Results:
    """Store `count` copies of one envelope created through the API, straight into the proxy's
    table (new ids, created_at 1 ms apart), then VACUUM ANALYZE as autovacuum would: the state
    the API would leave, in seconds instead of minutes."""
    import psycopg

    template = create_one(server)
    start = time.perf_counter()
    with psycopg.connect(proxy.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO kv (key, value, created_at, updated_at) "
            "SELECT 'msg/' || gen_random_uuid(), t.value, t.created_at - g * interval '1 ms', "
            "t.created_at - g * interval '1 ms' "
            "FROM kv t, generate_series(1, %s) g WHERE t.key = %s",
            (count, f"msg/{template}"),
        )
        conn.execute("VACUUM ANALYZE kv")
        [(stored,)] = conn.execute("SELECT count(*) FROM kv").fetchall()
    wall = time.perf_counter() - start
    return {"preload": {"created": float(stored), "wall_s": wall, "req_per_s": stored / wall}}


# --- RabbitMQ -------------------------------------------------------------------------------


def amqp(action: str, queue: str) -> None:
    """declare / purge / delete `queue` with the tests' admin client (tests/amqp_helpers.py)."""
    import trio

    sys.path.insert(0, str(ROOT))
    from tests.amqp_helpers import open_admin

    async def run() -> None:
        with trio.fail_after(20):
            async with open_admin(RABBITMQ_URL) as admin:
                await getattr(admin, f"{action}_queue")(queue)

    trio.run(run)


def broker_pid() -> int | None:
    """The RabbitMQ node on this machine (beam.smp), to report its CPU."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


@contextmanager
def rabbitmq_queue(queue: str) -> Iterator[None]:
    amqp("declare", queue)
    try:
        yield
    finally:
        amqp("delete", queue)


# --- Targets --------------------------------------------------------------------------------


def bare_spec() -> ServerSpec:
    argv = [PYTHON, str(BENCH / "bare_app.py")]
    return ServerSpec("bare", [*argv, "--external-port={external}", "--internal-port={internal}"])


def starlette_spec() -> ServerSpec:
    argv = [PYTHON, str(BENCH / "starlette_app.py")]
    return ServerSpec(
        "starlette", [*argv, "--external-port={external}", "--internal-port={internal}"]
    )


def ours_spec(name: str, args: argparse.Namespace, env: dict[str, str]) -> ServerSpec:
    extra = dict(item.split("=", 1) for item in args.ours_env)
    return ServerSpec(
        name, shlex.split(args.ours_cmd), {"ASYA_MESH_DEMO_ACTORS": "0", **env, **extra}
    )


def preload_api(server: Server, count: int, timeout: float) -> Results:
    print(f"[{server.name}] preload {count} envelopes through the API", flush=True)
    return loadgen(
        server,
        ["--scenarios=preload", f"--preload={count}", *server.loadgen_args],
        timeout=timeout,
    )


@contextmanager
def target(
    name: str, args: argparse.Namespace, deadline: float
) -> Iterator[tuple[Server, Results]]:
    """Start target `name` (see the module comment) with what it needs; yield it and the
    figures of its preload (if any)."""
    base, _, count = name.partition("+")
    preload = int(count) if count else 0
    log = RESULTS / f"{name}.log"
    with ExitStack() as stack:
        if base == "bare":
            server = stack.enter_context(running(bare_spec(), log))
        elif base == "starlette":
            server = stack.enter_context(running(starlette_spec(), log))
        elif base == "ours":
            server = stack.enter_context(running(ours_spec(name, args, {}), log))
        elif base == "proxy":
            proxy = stack.enter_context(state_proxy(name, args))
            env = {"ASYA_STATEPROXY_SOCKET": proxy.socket}
            server = stack.enter_context(running(ours_spec(name, args, env), log))
            server.companions.append(proxy.pid)
            server.loadgen_args += [
                f"--aux-pid=proxy:{proxy.pid}",
                f"--pg-url={args.pg_url}",
                f"--pg-app={proxy.app}",
            ]
        elif base == "rabbitmq":
            namespace = f"bench{uuid.uuid4().hex[:8]}"
            queue = f"asya-{namespace}-bench"
            stack.enter_context(rabbitmq_queue(queue))
            env = {
                "ASYA_QUEUE_TRANSPORT": "rabbitmq",
                "ASYA_RABBITMQ_URL": RABBITMQ_URL,
                "ASYA_RABBITMQ_EXCHANGE": "",
                "ASYA_NAMESPACE": namespace,
                "ASYA_INTERNAL_URL": "http://127.0.0.1:{internal}",
            }
            server = stack.enter_context(running(ours_spec(name, args, env), log))
            server.after_run = lambda: amqp("purge", queue)
            if (pid := broker_pid()) is not None:
                server.loadgen_args.append(f"--aux-pid=rabbitmq:{pid}")
        else:
            raise SystemExit(f"unknown target {name!r}")
        loaded: Results = {}
        if preload:
            if base == "proxy":
                print(f"[{name}] preload {preload} envelopes into PostgreSQL", flush=True)
                loaded = preload_sql(server, proxy, preload)
            else:
                loaded = preload_api(server, preload, deadline - time.monotonic())
            if server.after_run:
                server.after_run()
            print(f"[{name}] preloaded: {loaded.get('preload')}", flush=True)
        yield server, loaded


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
    """The median of every figure over the runs; for requests/s also the lowest and highest."""
    out = {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}
    rates = [r["req_per_s"] for r in runs if "req_per_s" in r]
    if rates:
        out["req_per_s_lo"], out["req_per_s_hi"] = min(rates), max(rates)
    return out


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def bench_interleaved(
    names: list[str], args: argparse.Namespace, deadline: float, meta: dict[str, list[float]]
) -> dict[str, Results]:
    """Every step, run by run, against each target in turn (A B A B ...), the others paused.

    On a machine shared with other work, load comes and goes; taking the runs of the targets
    alternately exposes them to the same conditions, so their ratio holds better than their
    absolute figures. A paused server (SIGSTOP) takes no CPU from the one being measured.
    """
    extra = ["--runs=1", *(["--quick"] if args.quick else []), *args.loadgen_arg]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in names}
    preloaded: dict[str, Results] = {}
    with ExitStack() as stack:
        servers: list[Server] = []
        for name in names:
            try:
                server, loaded = stack.enter_context(target(name, args, deadline))
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                print(f"[{name}] not benchmarked: {exc}", flush=True)
                continue
            preloaded[name] = loaded
            servers.append(server)
            server.pause()  # the next target starts (and preloads) alone
        for step, step_args in steps(args):
            for run in range(args.runs):
                for server in servers:
                    left = deadline - time.monotonic()
                    if left < 10:
                        print(f"[{server.name}] {step}: skipped, run budget spent", flush=True)
                        continue
                    print(f"[{server.name}] {step} run {run + 1}/{args.runs}", flush=True)
                    meta["loadavg"].append(load_average())
                    server.resume()
                    try:
                        figures = loadgen(
                            server, [*step_args, *extra, *server.loadgen_args], timeout=left
                        )
                        runs[server.name].setdefault(step, []).extend(figures.values())
                    except subprocess.SubprocessError as exc:
                        print(f"[{server.name}] {step} failed: {exc}", flush=True)
                    finally:
                        server.pause()
                        if server.after_run:
                            server.after_run()
    return {
        name: {
            **preloaded.get(name, {}),
            **{step: median(figures) for step, figures in by_step.items()},
        }
        for name, by_step in runs.items()
    }


def bench_memory(name: str, args: argparse.Namespace, deadline: float) -> Results:
    """The memory scenario on a fresh server: memory freed by earlier streams would be reused."""
    left = deadline - time.monotonic()
    if left < 10:
        print(f"[{name}] memory: skipped, run budget spent", flush=True)
        return {}
    print(f"[{name}] memory", flush=True)
    extra = [*(["--quick"] if args.quick else []), *args.loadgen_arg]
    try:
        with target(name, args, deadline) as (server, _):
            return loadgen(
                server, ["--scenarios=memory", *extra, *server.loadgen_args], timeout=left
            )
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"[{name}] memory failed: {exc}", flush=True)
        return {}


# --- Table ----------------------------------------------------------------------------------

REQUEST_SCENARIOS = [
    ("create", "create"),
    ("events", "internal events (half status, half FLY)"),
    ("status", "internal status events"),
    ("fly", "internal FLY events"),
    ("get", "internal GET by id"),
    ("list", "list, newest 10 and total"),
]
# (scenario, figure, label, higher is better)
ROWS = [
    *(
        row
        for scenario, label in REQUEST_SCENARIOS
        for row in (
            (scenario, "req_per_s", f"{label}, requests/s", True),
            (scenario, "per_server_cpu_s", f"{label}, requests per server CPU second", True),
        )
    ),
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
    ("fanout_100", "server_us_per_frame", "server CPU per FLY frame, 100 subscribers, us", False),
    ("fanout_1000", "server_us_per_frame", "server CPU per FLY frame, 1000 subscribers, us", False),
    ("tokens", "tokens_per_s", "tokens/s, 10 streams", True),
    ("tokens", "per_server_cpu_s", "tokens per server CPU second, 10 streams", True),
    ("tokens", "streams_ended", "streams ended by the terminal status (of 10)", True),
    ("memory", "kib_per_stream_1000", "RSS per idle SSE stream, 1000 streams, KiB", False),
    ("memory", "kib_per_stream_5000", "RSS per idle SSE stream, 5000 streams, KiB", False),
    ("preload", "created", "preload: envelopes stored before measuring", True),
    ("preload", "req_per_s", "preload: envelopes stored per second", True),
]
CPU_SCENARIOS = [s for s, _ in REQUEST_SCENARIOS] + ["fanout_1000", "tokens"]
CPU_FIGURES = [
    ("server_us_per_req", "server CPU per request, us"),
    ("proxy_us_per_req", "state proxy CPU per request, us"),
    ("pg_us_per_req", "PostgreSQL backends' CPU per request, us"),
    ("rabbitmq_us_per_req", "RabbitMQ node CPU per request, us"),
    ("loadgen_cpu_pct", "loadgen CPU, % of a core"),
    ("server_cpu_pct", "server CPU, % of a core"),
    ("proxy_cpu_pct", "state proxy CPU, % of a core"),
    ("pg_cpu_pct", "PostgreSQL backends' CPU, % of a core"),
    ("rabbitmq_cpu_pct", "RabbitMQ node CPU, % of a core"),
    ("other_cpu_pct", "other processes' CPU (rest of the machine), % of a core"),
]


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def baselines(names: list[str], baseline: str | None) -> dict[str, str]:
    """The target each one is compared with: `T+N` with `T`, the others with `baseline`
    (default: bare if present, else the first target)."""
    base = baseline or ("bare" if "bare" in names else names[0])
    out = {}
    for name in names:
        plain = name.partition("+")[0]
        ref = plain if plain != name and plain in names else base
        if ref != name and ref in names:
            out[name] = ref
    return out


def table(all_results: dict[str, Results], baseline: str | None = None) -> str:
    names = list(all_results)
    bases = baselines(names, baseline)
    head = ["figure", *names, *(f"{n} / {b}" for n, b in bases.items())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, scenario: str, figure: str) -> None:
        values = [all_results[n].get(scenario, {}).get(figure) for n in names]
        if all(v is None for v in values):
            return
        cells = [label, *(_num(v) for v in values)]
        for n, b in bases.items():
            ours = all_results[n].get(scenario, {}).get(figure)
            base = all_results[b].get(scenario, {}).get(figure)
            cells.append(f"{ours / base:.2f}" if ours is not None and base else "-")
        lines.append("| " + " | ".join(cells) + " |")

    for scenario, figure, label, higher in ROWS:
        row(f"{label} ({'higher' if higher else 'lower'} is better)", scenario, figure)
    for scenario, label in REQUEST_SCENARIOS:
        spread = [all_results[n].get(scenario, {}) for n in names]
        if any("req_per_s_lo" in f for f in spread):
            cells = [f"{label}, requests/s, lowest-highest run"]
            cells += [
                f"{_num(f.get('req_per_s_lo'))}-{_num(f.get('req_per_s_hi'))}" for f in spread
            ]
            lines.append("| " + " | ".join(cells + ["-"] * len(bases)) + " |")
    for scenario in CPU_SCENARIOS:
        for figure, label in CPU_FIGURES:
            row(f"{scenario}: {label}", scenario, figure)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="run the benchmarks against bare and ours")
    parser.add_argument("--quick", action="store_true", help="seconds, for a smoke check")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        help="compare the variant's subject with and without N envelopes stored first",
    )
    parser.add_argument("--targets", help="comma-separated (default: the variant's)")
    parser.add_argument("--baseline", help="target the ratios are taken to")
    parser.add_argument("--ours-cmd", default=str(ROOT / ".venv" / "bin" / "asya-mesh-api"))
    parser.add_argument(
        "--ours-env", action="append", default=[], help="KEY=VALUE for the real server"
    )
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--proxy-core", default="0", help="taskset CPU list of the state proxy")
    parser.add_argument("--scenarios", help="comma-separated (default: the variant's)")
    parser.add_argument("--subscribers", help="fan-out subscriber counts (default 1,100,1000)")
    parser.add_argument("--runs", type=int, help="runs per step and target (default 3-7)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", default=None)
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
        saved = json.loads(Path(args.table).read_text())
        if "results" in saved:
            print(table(saved["results"], saved.get("meta", {}).get("baseline")))
        else:
            print(table(saved))
        return
    targets, scenarios, baseline, memory, subject, runs = VARIANTS[args.variant]
    if args.preload:
        runs = PRELOAD_RUNS[subject]
        targets, scenarios, baseline, memory = (
            f"{subject},{subject}+{args.preload}",
            PRELOAD_SCENARIOS,
            subject,
            False,
        )
    names = (args.targets or targets).split(",")
    args.scenarios = args.scenarios or scenarios
    args.baseline = args.baseline or (baseline if baseline in names else None)
    args.memory = memory if args.memory is None else args.memory
    args.subscribers = args.subscribers or ("1,100" if args.quick else "1,100,1000")
    args.runs = args.runs or (1 if args.quick else runs)
    started = time.monotonic()
    deadline = started + args.budget
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        (RESULTS / f"{name}.log").write_text("")
    meta: dict[str, list[float]] = {"loadavg": [load_average()]}
    # The memory scenario comes last and gets a reserve, so slow steps cannot crowd it out.
    reserve = (15.0 if args.quick else 45.0) * len(names) if args.memory else 0.0
    all_results = bench_interleaved(names, args, deadline - reserve, meta)
    if args.memory:
        for index, name in enumerate(names):
            share = (deadline - time.monotonic()) / (len(names) - index)
            all_results[name].update(bench_memory(name, args, time.monotonic() + share))
    meta["loadavg"].append(load_average())
    loads = meta["loadavg"]
    summary = {
        "argv": sys.argv[1:],
        "baseline": args.baseline,
        "wall_s": time.monotonic() - started,
        "loadavg_min": min(loads),
        "loadavg_max": max(loads),
        "loadavg_median": statistics.median(loads),
    }
    Path(args.out).write_text(json.dumps({"meta": summary, "results": all_results}, indent=2))
    print()
    print(
        f"wall {summary['wall_s']:.0f} s; 1-minute load average before the runs: "
        f"min {summary['loadavg_min']:.2f}, median {summary['loadavg_median']:.2f}, "
        f"max {summary['loadavg_max']:.2f}"
    )
    print()
    print(table(all_results, args.baseline))


if __name__ == "__main__":
    main()
