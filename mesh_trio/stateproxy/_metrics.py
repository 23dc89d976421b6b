# Prometheus metrics of the state proxy, served on a TCP port of their own (off by default).
#
# `ProxyMetrics` holds a registry of its own (never prometheus-client's global one). Requests
# are counted by `Router.handle` as they are answered: by operation and status, with a latency
# histogram (each request is one statement, or two for a guarded write, so this is the
# statement latency as the client sees it). The PostgreSQL pool's and the HTTP server's
# `statistics()` are read only when scraped (`_Snapshots`, a custom collector). The event bus
# counts published events and watch streams opened as they happen (one `inc` each), and the
# streams open now when scraped.
#
# `serve_metrics` answers `GET /metrics` on a TCP listener with the proxy's own small HTTP
# server (`_http.HttpServer`), as a task of the proxy's nursery: no thread, nothing outlives
# the proxy. The names are listed in docs/operations.md.

from __future__ import annotations

from collections.abc import Iterator

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from mesh_proto import error_body

from ._events import EventBus
from ._http import HttpServer, Request, Response
from ._pg import PgPool

METRICS_PATH = b"/metrics"
# The classic text format, which every Prometheus version reads.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_KEY_OPS = {b"GET": "get", b"HEAD": "head", b"PUT": "put", b"DELETE": "delete"}
_PATH_OPS = {
    b"/keys/": "keys",
    b"/query": "query",
    b"/delete": "delete_query",
    b"/writes": "writes",
    b"/healthz": "health",
    b"/events": "publish",
    b"/events/watch": "watch",
}


def operation(request: Request) -> str:
    """The `op` label of a request: `get`, `head`, `put`, `delete` (a key), `keys`, `query`,
    `delete_query`, `writes`, `health`, `publish`, `watch`, `replay`, or `none` (no such
    route)."""
    path = request.target.partition(b"?")[0]
    if path.startswith(b"/keys/") and len(path) > len(b"/keys/"):
        return _KEY_OPS.get(request.method, "none")
    op = _PATH_OPS.get(path)
    if op is None and path.startswith(b"/events/"):
        return "replay"
    return op or "none"


@attrs.define(eq=False)
class _Snapshots(Collector):
    pool: PgPool | None
    servers: list[HttpServer]
    bus: EventBus | None

    def collect(self) -> Iterator[Metric]:
        connections = sum(server.statistics().connections for server in self.servers)
        yield GaugeMetricFamily(
            "asya_state_proxy_connections",
            "client connections open now (the mesh API's pool)",
            value=connections,
        )
        if self.bus is not None:
            yield GaugeMetricFamily(
                "asya_state_proxy_watch_streams_open",
                "event bus watch streams open now",
                value=self.bus.watchers,
            )
        if self.pool is None:
            return
        pool = self.pool.statistics()
        yield GaugeMetricFamily(
            "asya_state_proxy_pg_in_use",
            "PostgreSQL pool slots taken by statements in flight",
            value=pool.in_use,
        )
        yield GaugeMetricFamily(
            "asya_state_proxy_pg_idle", "PostgreSQL connections idle now", value=pool.idle
        )
        yield GaugeMetricFamily(
            "asya_state_proxy_pg_size", "most PostgreSQL connections", value=self.pool.max_size
        )
        yield CounterMetricFamily(
            "asya_state_proxy_pg_opened", "PostgreSQL connections opened", value=pool.opened
        )
        yield CounterMetricFamily(
            "asya_state_proxy_pg_failures",
            "statements that ended with PostgreSQL unavailable (answered 503)",
            value=pool.failures,
        )


class ProxyMetrics:
    """The state proxy's metrics, in a registry of its own (`render` serves it)."""

    def __init__(self, pool: PgPool | None, bus: EventBus | None = None) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        #: The HTTP servers whose connections are reported (the proxy's own).
        self.servers: list[HttpServer] = []
        self.requests = Counter(
            "asya_state_proxy_requests",
            "requests answered, by operation and status",
            ["op", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "asya_state_proxy_request_duration_seconds",
            "time to answer a request (its statements included), by operation",
            ["op"],
            registry=registry,
            buckets=BUCKETS,
        )
        self.events_published = Counter(
            "asya_state_proxy_events_published",
            "events published on the bus by this proxy (POST /events and PUT ?publish=1)",
            registry=registry,
        )
        self.batched_writes = Counter(
            "asya_state_proxy_batched_writes",
            "PUTs received in POST /writes (each batch is one request with op=writes)",
            registry=registry,
        )
        self.watch_streams = Counter(
            "asya_state_proxy_watch_streams",
            "event bus watch streams opened",
            registry=registry,
        )
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        registry.register(_Snapshots(pool, self.servers, bus))

    def request(self, request: Request, status: int, seconds: float) -> None:
        """Count one answered request."""
        op = operation(request)
        children = self._children.get((op, status))
        if children is None:
            children = (self.requests.labels(op, str(status)), self.request_seconds.labels(op))
            self._children[(op, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    async def answer(self, request: Request) -> Response:
        """The metrics endpoint: `GET /metrics`; 404 or 405 for anything else."""
        if request.target.partition(b"?")[0] != METRICS_PATH:
            return Response(status=404, body=error_body("not found"))
        if request.method not in (b"GET", b"HEAD"):
            return Response(
                status=405, body=error_body("method not allowed"), headers=((b"allow", b"GET"),)
            )
        return Response(status=200, body=self.render(), content_type=CONTENT_TYPE)


async def serve_metrics(
    metrics: ProxyMetrics,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer `GET /metrics` on `listeners` until cancelled (closes them)."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            await nursery.start(HttpServer(metrics.answer, 4096).serve, listener)
        task_status.started()
