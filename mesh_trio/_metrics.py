"""Prometheus metrics of one mesh API instance, served at `/metrics` on the internal port.

Each `serve()` makes its own `MeshMetrics` with its own registry (never prometheus-client's
global one), so several servers in one process (the tests) count apart. Two kinds of figures:

- Counted as things happen, kept cheap for the hot path: requests by port, operation and
  status with a latency histogram (`request`: one dict lookup for the series, an int
  incremented, a bucket found by `bisect` and its count incremented, the sum added to),
  envelopes created and ended and store latency (`MeteredStore`, the `Store` that `serve()`
  hands to `Mesh`), dispatch latency and errors (`dispatching`, around the one `send` of
  `Mesh.create`). These are plain ints and floats, not prometheus-client metrics (whose
  every `inc` and `observe` takes a lock and walks the buckets in Python; the server runs on
  one thread), written out by a collector when scraped with the same names, help, labels,
  buckets and `_created` samples prometheus-client would write. The rare ones (backstop
  reaps, retention deletes) stay prometheus-client counters.
- Read when scraped, at no cost per request: the broadcaster's `statistics()` (open SSE
  streams, frames published, delivered and dropped, resyncs) and, with the state-proxy store,
  its connection pool's and envelope cache's (custom collectors).

The names, labels and meanings are listed in docs/operations.md.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from itertools import accumulate
from time import perf_counter
from types import TracebackType
from typing import TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import metrics as client_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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
from ._bus import BusStatistics
from ._proxy_store import ProxyStore
from ._store import Store, never_waits
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
        if isinstance(stats, BusStatistics):  # the replicated broadcaster (docs/scale-out.md)
            for name, help_text, value in (
                ("bus_posted", "FLY events this replica put on the event bus", stats.posted),
                ("bus_relayed", "events of other replicas delivered here", stats.relayed),
                ("bus_reconnects", "times the event bus's watch stream reconnected",
                 stats.reconnects),
            ):  # fmt: skip
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


class _Count:
    """One counter series, a plain int: the server runs on one thread (trio), so it needs none
    of prometheus-client's locks."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()  # the `_created` sample, as prometheus-client writes it

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _Histogram:
    """One histogram series: a count per bucket of `BUCKETS` (not cumulative; the last one is
    +Inf) and the sum. The hot paths observe inline: `counts[bisect_left(BUCKETS, s)] += 1`
    and `sum += s` (`bisect_left` finds the first bound >= s, as prometheus-client does)."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


# The `le` labels of the buckets, written as prometheus-client writes them.
_LE = (*map(floatToGoString, BUCKETS), "+Inf")

_Labels = tuple[str, ...]


def _use_created() -> bool:
    """Whether to write `_created` samples, as prometheus-client decides for its own metrics
    (`PROMETHEUS_DISABLE_CREATED_SERIES`, `disable_created_metrics()`)."""
    return bool(getattr(client_metrics, "_use_created", True))


def _counter_family(
    name: str, help_text: str, labels: _Labels, series: Mapping[_Labels, _Count], created: bool
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, count in series.items():
        family.add_metric(values, count.value, count.created if created else None)
    return family


def _histogram_family(
    name: str, help_text: str, labels: _Labels, series: Mapping[_Labels, _Histogram], created: bool
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=labels)
    for values, histogram in series.items():
        family.add_metric(
            values, list(zip(_LE, accumulate(histogram.counts), strict=True)), histogram.sum
        )
        if created:
            family.samples.append(
                Sample(f"{name}_created", dict(zip(labels, values, strict=True)), histogram.created)
            )
    return family


@attrs.define(eq=False)
class _Counted(Collector):
    """The metrics `MeshMetrics` counts as things happen, as metric families when scraped (the
    same names, help, labels and samples a prometheus-client `Counter` or `Histogram` writes)."""

    metrics: MeshMetrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        created = _use_created()
        yield _counter_family(
            "asya_mesh_requests",
            "HTTP requests answered, by port, operation and status",
            ("port", "op", "status"),
            m._requests,
            created,
        )
        yield _histogram_family(
            "asya_mesh_request_duration_seconds",
            "time to answer a request (to the response head, for SSE), by port and operation",
            ("port", "op"),
            m._request_seconds,
            created,
        )
        yield _counter_family(
            "asya_mesh_creates", "envelopes stored by a create", (), {(): m.creates}, created
        )
        yield _counter_family(
            "asya_mesh_envelopes_ended",
            "envelopes this process moved to a terminal status, by status",
            ("status",),
            m._ended,
            created,
        )
        yield _histogram_family(
            "asya_mesh_store_duration_seconds",
            "time of one store call, by operation",
            ("op",),
            m._store_seconds,
            created,
        )
        yield _counter_family(
            "asya_mesh_store_errors",
            "store calls that failed (store unavailable), by operation",
            ("op",),
            m._store_errors,
            created,
        )
        yield _histogram_family(
            "asya_mesh_dispatch_duration_seconds",
            "time to hand a new envelope to its queue",
            (),
            {(): m.dispatch_seconds},
            created,
        )
        yield _counter_family(
            "asya_mesh_dispatch_errors",
            "dispatches that failed, by reason (actor_not_found, unavailable)",
            ("reason",),
            m._dispatch_errors,
            created,
        )


class _Dispatching:
    """`MeshMetrics.dispatching()`: a plain context manager (a `@contextmanager` generator
    costs several µs per create)."""

    __slots__ = ("_metrics", "_started")

    def __init__(self, metrics: MeshMetrics) -> None:
        self._metrics = metrics
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = perf_counter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        metrics = self._metrics
        metrics.dispatch_seconds.observe(perf_counter() - self._started)
        if kind is None:
            return
        if issubclass(kind, ActorNotFound):
            metrics.dispatch_error("actor_not_found")
        elif issubclass(kind, DispatchUnavailable):
            metrics.dispatch_error("unavailable")


class MeshMetrics:
    """The metrics of one mesh API instance, in a registry of its own (`render` serves it).

    The hot ones (requests, store calls, creates, terminal transitions, dispatches) are plain
    ints and floats updated inline, read by the `_Counted` collector when scraped; the rare
    ones (backstop, retention) are prometheus-client counters. A series appears in the
    exposition from its first use, as a prometheus-client child does from its `labels()`.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # (port, op, status) -> the request counter of that series and the (port, op) histogram.
        self._request_series: dict[tuple[str, str, int], tuple[_Count, _Histogram]] = {}
        self._requests: dict[_Labels, _Count] = {}  # by (port, op, status as text)
        self._request_seconds: dict[_Labels, _Histogram] = {}  # by (port, op)
        self.creates = _Count()
        self._ended: dict[_Labels, _Count] = {}  # by (status,)
        self._store_seconds: dict[_Labels, _Histogram] = {}  # by (op,)
        self._store_errors: dict[_Labels, _Count] = {}  # by (op,)
        self.dispatch_seconds = _Histogram()
        self._dispatch_errors: dict[_Labels, _Count] = {}  # by (reason,)
        # Registered first, so the families come out in the order they always had.
        registry.register(_Counted(self))
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
        series = self._request_series.get((port, op, status))
        if series is None:
            series = self._new_request_series(port, op, status)
        series[0].value += 1
        histogram = series[1]
        histogram.counts[bisect_left(BUCKETS, seconds)] += 1
        histogram.sum += seconds

    def _new_request_series(self, port: str, op: str, status: int) -> tuple[_Count, _Histogram]:
        count = self._requests.setdefault((port, op, str(status)), _Count())
        histogram = self._request_seconds.get((port, op))
        if histogram is None:
            histogram = self._request_seconds[port, op] = _Histogram()
        series = self._request_series[port, op, status] = (count, histogram)
        return series

    def store_series(self, op: str) -> tuple[_Histogram, _Count]:
        """The latency histogram and the error counter of store calls `op` (both appear in the
        exposition from the first call)."""
        histogram = self._store_seconds.get((op,))
        if histogram is None:
            histogram = self._store_seconds[op,] = _Histogram()
        errors = self._store_errors.get((op,))
        if errors is None:
            errors = self._store_errors[op,] = _Count()
        return histogram, errors

    def ended(self, status: Status) -> _Count:
        """The counter of terminal transitions to `status`."""
        count = self._ended.get((status.value,))
        if count is None:
            count = self._ended[status.value,] = _Count()
        return count

    def dispatch_error(self, reason: str) -> None:
        """Count one failed dispatch."""
        count = self._dispatch_errors.get((reason,))
        if count is None:
            count = self._dispatch_errors[reason,] = _Count()
        count.value += 1

    def dispatching(self) -> AbstractContextManager[None]:
        """Time the block (one dispatch) and count its `ActorNotFound` / `DispatchUnavailable`."""
        return _Dispatching(self)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


@attrs.define(eq=False)
class MeteredStore:
    """A `Store` that times every call of `inner` and counts its failures, the envelopes
    created and the terminal transitions it applied."""

    inner: Store
    metrics: MeshMetrics
    _ops: dict[str, tuple[_Histogram, _Count]] = attrs.field(factory=dict)
    _ended: dict[Status, _Count] = attrs.field(factory=dict)

    @property
    def never_waits(self) -> bool:
        return never_waits(self.inner)

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        series = self._ops.get(op)
        if series is None:
            series = self._ops[op] = self.metrics.store_series(op)
        started = perf_counter()
        try:
            return await call
        except ServiceError:
            series[1].value += 1
            raise
        finally:
            seconds = perf_counter() - started
            histogram = series[0]
            histogram.counts[bisect_left(BUCKETS, seconds)] += 1
            histogram.sum += seconds

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def create(self, envelope: Envelope) -> None:
        await self._timed("create", self.inner.create(envelope))
        self.metrics.creates.value += 1

    async def get(self, envelope_id: str) -> Envelope | None:
        return await self._timed("get", self.inner.get(envelope_id))

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        outcome = await self._timed("update", self.inner.update(envelope_id, event, now))
        if isinstance(outcome, Applied) and outcome.envelope.terminal:
            status = outcome.envelope.status
            counter = self._ended.get(status)
            if counter is None:
                counter = self._ended[status] = self.metrics.ended(status)
            counter.value += 1
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
