"""Prometheus metrics of one mesh API instance, served at `/metrics` on the internal port.

Each `serve()` makes its own `MeshMetrics` with its own registry (never prometheus-client's
global one), so several servers in one process (the tests) count apart. Two kinds of figures:

- Counted as things happen, kept cheap for the hot path: requests by port, operation and
  status with a latency histogram (`request`: one dict lookup for the cached label children,
  then an increment and an observation), envelopes created and ended and store latency
  (`MeteredStore`, the `Store` that `serve()` hands to `Mesh`), dispatch latency and errors
  (`dispatching`, around the one `send` of `Mesh.create`), backstop reaps.
- Read when scraped, at no cost per request: the broadcaster's `statistics()` (open SSE
  streams, frames published, delivered and dropped, resyncs) and, with the state-proxy store,
  its connection pool's and envelope cache's (custom collectors).

The names, labels and meanings are listed in docs/operations.md.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from mesh_proto import (
    OPENAPI_PATH,
    Applied,
    Claim,
    Envelope,
    ListQuery,
    MethodNotAllowed,
    Outcome,
    ProtocolError,
    Role,
    Router,
    ServiceError,
    Status,
    StatusEvent,
)

from ._broadcast import Broadcaster
from ._proxy_store import ProxyStore
from ._store import Store
from .transports import ActorNotFound, DispatchUnavailable

__all__ = [
    "CONTENT_TYPE",
    "METRICS_PATH",
    "NO_OP",
    "MeshMetrics",
    "MeteredStore",
    "is_metrics",
    "route_label",
]

METRICS_PATH = "/metrics"
# The classic text format, which every Prometheus version reads (`generate_latest` writes it for
# names like ours).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: an internal event takes well under a millisecond, a state-proxy round trip about one,
# a broker confirm a few; the top buckets catch stalls.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The `op` label of a request no route answered (404, or 405 on no route's path).
NO_OP = "none"

T = TypeVar("T")


def is_metrics(method: str, path: str) -> bool:
    """Whether a request asks for the metrics (a bare path beside the route table, answered
    for GET and HEAD on the internal port).

    Raises:
        MethodNotAllowed: the metrics path with another method.
    """
    if path != METRICS_PATH:
        return False
    if method not in ("GET", "HEAD"):
        raise MethodNotAllowed(("GET",))
    return True


def route_label(router: Router, role: Role, method: str, path: str) -> str:
    """The `op` label of a request: the operation `router` resolves it to (an extension's op
    by its value), `openapi` for the OpenAPI document, `NO_OP` when routing refused it."""
    if path == OPENAPI_PATH:
        return "openapi" if method in ("GET", "HEAD") else NO_OP
    try:
        return str(router.resolve(role, method, path).op.value)
    except ProtocolError:
        return NO_OP


@attrs.define(eq=False)
class _Fanout(Collector):
    """The broadcaster's `statistics()` as metric families, read when the registry is scraped."""

    broadcaster: Broadcaster

    def collect(self) -> Iterator[Metric]:
        stats = self.broadcaster.statistics()
        yield GaugeMetricFamily(
            "asya_mesh_sse_streams", "SSE streams open now", value=stats.subscribers
        )
        yield GaugeMetricFamily(
            "asya_mesh_sse_envelopes",
            "envelopes with at least one open SSE stream",
            value=stats.envelopes,
        )
        for name, help_text, value in (
            ("frames_published", "status and FLY frames published", stats.published),
            ("frames_delivered", "frames handed to an SSE stream", stats.delivered),
            ("frames_dropped", "FLY frames a full SSE stream did not get", stats.dropped_fly),
            ("resyncs", "SSE streams sent back to the store for a fresh snapshot", stats.resyncs),
        ):
            yield CounterMetricFamily(f"asya_mesh_{name}", help_text, value=value)


@attrs.define(eq=False)
class _ProxyPool(Collector):
    """The state-proxy store's pool and cache `statistics()`, read when scraped."""

    store: ProxyStore

    def collect(self) -> Iterator[Metric]:
        return _proxy_pool(self.store)


def _proxy_pool(store: ProxyStore) -> Iterator[Metric]:
    pool = store.pool.statistics()
    yield GaugeMetricFamily(
        "asya_mesh_stateproxy_connections",
        "connections to the state proxy open now",
        value=pool.connections_open,
    )
    yield GaugeMetricFamily(
        "asya_mesh_stateproxy_connections_idle",
        "connections to the state proxy idle now",
        value=pool.connections_idle,
    )
    cache = store.cache.statistics()
    for name, help_text, value in (
        ("connections_opened", "connections to the state proxy opened", pool.connections_opened),
        ("requests", "requests sent to the state proxy (a retry counts again)", pool.requests),
        ("retries", "requests sent again on a fresh connection", pool.retries),
        ("cache_hits", "status updates that found the envelope in the cache", cache.hits),
        ("cache_misses", "status updates that had to read the envelope", cache.misses),
    ):
        yield CounterMetricFamily(f"asya_mesh_stateproxy_{name}", help_text, value=value)


class MeshMetrics:
    """The metrics of one mesh API instance, in a registry of its own (`render` serves it)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "asya_mesh_requests",
            "HTTP requests answered, by port, operation and status",
            ["port", "op", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "asya_mesh_request_duration_seconds",
            "time to answer a request (to the response head, for SSE), by port and operation",
            ["port", "op"],
            registry=registry,
            buckets=BUCKETS,
        )
        self.creates = Counter(
            "asya_mesh_creates", "envelopes stored by a create", registry=registry
        )
        self.envelopes_ended = Counter(
            "asya_mesh_envelopes_ended",
            "envelopes this process moved to a terminal status, by status",
            ["status"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "asya_mesh_store_duration_seconds",
            "time of one store call, by operation",
            ["op"],
            registry=registry,
            buckets=BUCKETS,
        )
        self.store_errors = Counter(
            "asya_mesh_store_errors",
            "store calls that failed (store unavailable), by operation",
            ["op"],
            registry=registry,
        )
        self.dispatch_seconds = Histogram(
            "asya_mesh_dispatch_duration_seconds",
            "time to hand a new envelope to its queue",
            registry=registry,
            buckets=BUCKETS,
        )
        self.dispatch_errors = Counter(
            "asya_mesh_dispatch_errors",
            "dispatches that failed, by reason (actor_not_found, unavailable)",
            ["reason"],
            registry=registry,
        )
        self.backstop_expired = Counter(
            "asya_mesh_backstop_expired",
            "envelopes the deadline backstop failed",
            registry=registry,
        )
        self.backstop_errors = Counter(
            "asya_mesh_backstop_errors",
            "backstop rounds that found the store unavailable",
            registry=registry,
        )
        self.retention_deleted = Counter(
            "asya_mesh_retention_deleted",
            "terminal envelopes the retention sweep deleted (ASYA_MESH_RETENTION)",
            registry=registry,
        )

    def watch_broadcaster(self, broadcaster: Broadcaster) -> None:
        """Report the fan-out's `statistics()` when scraped (once per instance)."""
        self.registry.register(_Fanout(broadcaster))

    def watch_store(self, store: Store) -> None:
        """Report the state-proxy pool's and cache's `statistics()` when scraped, if `store`
        is the state-proxy store (the embedded stores have none); once per instance."""
        if isinstance(store, ProxyStore):
            self.registry.register(_ProxyPool(store))

    def request(self, port: str, op: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        key = (port, op, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(port, op, str(status)),
                self.request_seconds.labels(port, op),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    @contextmanager
    def dispatching(self) -> Iterator[None]:
        """Time the block (one dispatch) and count its `ActorNotFound` / `DispatchUnavailable`."""
        started = time.perf_counter()
        try:
            yield
        except ActorNotFound:
            self.dispatch_errors.labels("actor_not_found").inc()
            raise
        except DispatchUnavailable:
            self.dispatch_errors.labels("unavailable").inc()
            raise
        finally:
            self.dispatch_seconds.observe(time.perf_counter() - started)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


@attrs.define(eq=False)
class MeteredStore:
    """A `Store` that times every call of `inner` and counts its failures, the envelopes
    created and the terminal transitions it applied."""

    inner: Store
    metrics: MeshMetrics
    _ops: dict[str, tuple[Histogram, Counter]] = attrs.field(factory=dict)
    _ended: dict[Status, Counter] = attrs.field(factory=dict)

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        children = self._ops.get(op)
        if children is None:
            metrics = self.metrics
            children = (metrics.store_seconds.labels(op), metrics.store_errors.labels(op))
            self._ops[op] = children
        started = time.perf_counter()
        try:
            return await call
        except ServiceError:
            children[1].inc()
            raise
        finally:
            children[0].observe(time.perf_counter() - started)

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def create(self, envelope: Envelope) -> None:
        await self._timed("create", self.inner.create(envelope))
        self.metrics.creates.inc()

    async def get(self, envelope_id: str) -> Envelope | None:
        return await self._timed("get", self.inner.get(envelope_id))

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        outcome = await self._timed("update", self.inner.update(envelope_id, event, now))
        if isinstance(outcome, Applied) and outcome.envelope.terminal:
            status = outcome.envelope.status
            counter = self._ended.get(status)
            if counter is None:
                counter = self._ended[status] = self.metrics.envelopes_ended.labels(status.value)
            counter.inc()
        return outcome

    async def delete(self, envelope_id: str) -> bool:
        return await self._timed("delete", self.inner.delete(envelope_id))

    async def list(self, query: ListQuery) -> tuple[Sequence[Envelope], int]:
        return await self._timed("list", self.inner.list(query))

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        return await self._timed("expired", self.inner.expired(now, limit))

    async def claim(self, key: str, claim: Claim, now: datetime) -> Claim | None:
        return await self._timed("claim", self.inner.claim(key, claim, now))

    async def release(self, key: str) -> None:
        await self._timed("release", self.inner.release(key))
