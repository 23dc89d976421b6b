"""Prometheus metrics: `/metrics` on the mesh API's internal port (not the external one), and the
state proxy's own metrics port, read over real sockets and parsed with prometheus-client."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from mesh_proto import (
    CreateRequest,
    Envelope,
    ServiceError,
    Status,
    StatusEvent,
    put_request,
    read_writes,
    writes_request,
)
from mesh_trio import MemoryStore
from mesh_trio._metrics import BUCKETS, MeshMetrics, MeteredStore
from mesh_trio._proxy_store import open_proxy_store
from mesh_trio.stateproxy import serve_state_proxy
from mesh_trio.stateproxy._errors import StartupError
from mesh_trio.stateproxy._settings import Settings, SettingsError
from mesh_trio.transports import ActorNotFound, DispatchUnavailable
from tests.harness import WAIT, MeshClient, http, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series is absent (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(port: int) -> Samples:
    reply = await http(port, "GET", "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(reply.body)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


async def test_the_internal_port_counts_an_envelope_lifecycle(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery)
    envelope_id = await mesh.create("worker", {"payload": {}})
    stream = await mesh.sse(envelope_id)
    assert (await mesh.status(envelope_id, "running")).status == 204
    assert (await mesh.fly(envelope_id, {"token": "hi"})).status == 204
    during = await scrape(mesh.int_port)
    assert value(during, "asya_mesh_sse_streams") == 1
    assert (await mesh.status(envelope_id, "succeeded", {"result": 1})).status == 204
    await stream.wait_end()
    assert (await http(mesh.int_port, "GET", "/nope")).status == 404
    assert (await http(mesh.ext_port, "GET", "/nope")).status == 404

    samples = await scrape(mesh.int_port)
    requests = "asya_mesh_requests_total"
    assert value(samples, requests, port="external", op="create", status="201") == 1
    assert value(samples, requests, port="external", op="stream", status="200") == 1
    assert value(samples, requests, port="internal", op="publish", status="204") == 3
    assert value(samples, requests, port="internal", op="none", status="404") == 1
    assert value(samples, requests, port="external", op="none", status="404") == 1
    # Scrapes are not counted.
    assert not [key for key in samples if key[0] == requests and ("op", "metrics") in key[1]]
    latency = "asya_mesh_request_duration_seconds_count"
    assert value(samples, latency, port="internal", op="publish") == 3
    assert value(samples, "asya_mesh_request_duration_seconds_sum", port="internal", op="publish")
    assert value(samples, "asya_mesh_creates_total") == 1
    assert value(samples, "asya_mesh_envelopes_ended_total", status="succeeded") == 1
    assert value(samples, "asya_mesh_dispatch_duration_seconds_count") == 1
    assert value(samples, "asya_mesh_store_duration_seconds_count", op="create") == 1
    assert value(samples, "asya_mesh_store_duration_seconds_count", op="update") == 2
    assert value(samples, "asya_mesh_store_errors_total", op="update") == 0
    # running, the FLY token, succeeded: each published once and delivered to the one stream.
    assert value(samples, "asya_mesh_frames_published_total") == 3
    assert value(samples, "asya_mesh_frames_delivered_total") == 3
    assert value(samples, "asya_mesh_frames_dropped_total") == 0
    assert value(samples, "asya_mesh_resyncs_total") == 0
    assert value(samples, "asya_mesh_sse_streams") == 0


async def test_the_external_port_has_no_metrics(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery)
    assert (await http(mesh.ext_port, "GET", "/metrics")).status == 404
    refused = await http(mesh.int_port, "POST", "/metrics", b"")
    assert (refused.status, refused.headers["allow"]) == (405, "GET")
    assert (await http(mesh.int_port, "HEAD", "/metrics")).status == 200


async def test_two_servers_in_one_process_count_apart(nursery: trio.Nursery) -> None:
    first = await start_mesh(nursery)
    second = await start_mesh(nursery)
    await first.create("worker")
    assert value(await scrape(first.int_port), "asya_mesh_creates_total") == 1
    assert value(await scrape(second.int_port), "asya_mesh_creates_total") == 0


async def test_backstop_reaps_are_counted(nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, ASYA_BACKSTOP_INTERVAL="50ms")
    envelope_id = await mesh.create("worker", {"payload": {}, "timeout": 0.2})
    stream = await mesh.sse(envelope_id)
    await stream.wait_end()  # failed by the backstop
    with trio.fail_after(WAIT):
        # The reap is counted once the backstop's round is over, just after the stream ended.
        while value(samples := await scrape(mesh.int_port), "asya_mesh_backstop_expired_total") < 1:
            pass
    assert value(samples, "asya_mesh_envelopes_ended_total", status="failed") == 1


def test_dispatch_failures_are_counted_by_reason() -> None:
    metrics = MeshMetrics()
    for error in (ActorNotFound("asya-default-a"), DispatchUnavailable("down")):
        with pytest.raises(type(error)), metrics.dispatching():
            raise error
    with metrics.dispatching():
        pass
    samples = parse(metrics.render())
    assert value(samples, "asya_mesh_dispatch_errors_total", reason="actor_not_found") == 1
    assert value(samples, "asya_mesh_dispatch_errors_total", reason="unavailable") == 1
    assert value(samples, "asya_mesh_dispatch_duration_seconds_count") == 3


def test_dispatch_counts_other_exceptions_only_in_its_duration() -> None:
    metrics = MeshMetrics()
    with pytest.raises(KeyError), metrics.dispatching():
        raise KeyError("not a dispatch error")
    samples = parse(metrics.render())
    assert value(samples, "asya_mesh_dispatch_duration_seconds_count") == 1
    assert not [key for key in samples if key[0] == "asya_mesh_dispatch_errors_total"]


# Durations that land on either side of bucket bounds, on a bound itself (a bound is the
# largest value of its bucket), below the first and above the last.
DURATIONS = (0.0, 0.0001, 0.0005, 0.00051, 0.001, 0.003, 0.3, 1.0, 7.0, 10.0, 11.0, 100.0)


def test_request_counts_and_buckets_after_known_durations() -> None:
    metrics = MeshMetrics()
    for seconds in DURATIONS:
        metrics.request("internal", "publish", 204, seconds)
    for _ in range(3):
        metrics.request("internal", "publish", 409, 0.002)
    samples = parse(metrics.render())
    requests = "asya_mesh_requests_total"
    assert value(samples, requests, port="internal", op="publish", status="204") == 12
    assert value(samples, requests, port="internal", op="publish", status="409") == 3
    name = "asya_mesh_request_duration_seconds"
    labels = {"port": "internal", "op": "publish"}
    # Cumulative: how many of the 15 took at most `le` seconds.
    expected = {
        "0.0005": 3, "0.001": 5, "0.0025": 8, "0.005": 9, "0.01": 9, "0.025": 9, "0.05": 9,
        "0.1": 9, "0.25": 9, "0.5": 10, "1.0": 11, "2.5": 11, "5.0": 11, "10.0": 13, "+Inf": 15,
    }  # fmt: skip
    buckets = {le: value(samples, f"{name}_bucket", le=le, **labels) for le in expected}
    assert buckets == expected
    assert value(samples, f"{name}_count", **labels) == 15
    assert value(samples, f"{name}_sum", **labels) == pytest.approx(sum(DURATIONS) + 3 * 0.002)


def test_the_exposition_is_what_prometheus_client_writes() -> None:
    """The hot-path metrics are counted in plain Python and written by a collector: a scraper
    sees the families, help, types, samples and values of prometheus-client's own `Counter`
    and `Histogram` given the same observations."""
    reference = CollectorRegistry()
    requests = Counter(
        "asya_mesh_requests",
        "HTTP requests answered, by port, operation and status",
        ["port", "op", "status"],
        registry=reference,
    )
    request_seconds = Histogram(
        "asya_mesh_request_duration_seconds",
        "time to answer a request (to the response head, for SSE), by port and operation",
        ["port", "op"],
        registry=reference,
        buckets=BUCKETS,
    )
    metrics = MeshMetrics()
    for port, op, status in (
        ("internal", "publish", 204),
        ("external", "get", 200),
        ("external", "get", 404),
        ("external", "none", 404),
    ):
        for seconds in DURATIONS:
            metrics.request(port, op, status, seconds)
            requests.labels(port, op, str(status)).inc()
            request_seconds.labels(port, op).observe(seconds)
    ours = families(metrics.render())
    theirs = families(generate_latest(reference))
    for name, family in theirs.items():
        assert ours[name] == family, name
    # Every hot-path family is there before anything is counted, labelled ones without samples.
    fresh = families(MeshMetrics().render())
    assert fresh["asya_mesh_requests"] == ("counter", requests._documentation, [])
    assert fresh["asya_mesh_store_errors"][2] == []
    assert fresh["asya_mesh_envelopes_ended"][2] == []
    assert fresh["asya_mesh_dispatch_errors"][2] == []
    assert value(parse(MeshMetrics().render()), "asya_mesh_creates_total") == 0
    empty = [s for s in fresh["asya_mesh_dispatch_duration_seconds"][2] if s[1] != 0]
    assert empty == [], "an unlabelled histogram is written with zero counts"


def families(text: bytes) -> dict[str, tuple[str, str, list[tuple[str, float, tuple[Any, ...]]]]]:
    """Each family's type, help and samples, `_created` samples left out (a start time)."""
    return {
        family.name: (
            family.type,
            family.documentation,
            [
                (sample.name, sample.value, tuple(sorted(sample.labels.items())))
                for sample in family.samples
                if not sample.name.endswith("_created")
            ],
        )
        for family in text_string_to_metric_families(text.decode())
        if not family.name.endswith("_created")
    }


def test_each_series_has_a_created_sample_unless_disabled() -> None:
    metrics = MeshMetrics()
    metrics.request("external", "get", 200, 0.001)
    with metrics.dispatching():
        pass
    samples = parse(metrics.render())
    created = {key for key in samples if key[0].endswith("_created")}
    labels = frozenset({("port", "external"), ("op", "get")})
    assert ("asya_mesh_requests_created", labels | {("status", "200")}) in created
    assert ("asya_mesh_request_duration_seconds_created", labels) in created
    assert ("asya_mesh_creates_created", frozenset()) in created
    assert ("asya_mesh_dispatch_duration_seconds_created", frozenset()) in created
    assert ("asya_mesh_backstop_expired_created", frozenset()) in created
    disable_created_metrics()
    try:
        samples = parse(metrics.render())
    finally:
        enable_created_metrics()
    assert not [key for key in samples if key[0].endswith("_created")]


async def test_the_store_counts_creates_and_terminal_transitions() -> None:
    metrics = MeshMetrics()
    store = MeteredStore(MemoryStore(), metrics)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    envelopes = [
        Envelope.new(
            CreateRequest(actor="worker"), envelope_id=f"{n:036d}", now=now, gateway_url="http://gw"
        )
        for n in range(3)
    ]
    for envelope in envelopes:
        await store.create(envelope)
    await store.get(envelopes[0].id)
    await store.get("absent")
    samples = parse(metrics.render())
    assert value(samples, "asya_mesh_creates_total") == 3
    assert value(samples, "asya_mesh_store_duration_seconds_count", op="create") == 3
    assert value(samples, "asya_mesh_store_duration_seconds_bucket", op="get", le="+Inf") == 2
    # A series appears from its operation's first call, its errors at 0 from then.
    assert ("asya_mesh_store_errors_total", frozenset({("op", "get")})) in samples
    assert not [key for key in samples if ("op", "update") in key[1]]
    assert not [key for key in samples if key[0] == "asya_mesh_envelopes_ended_total"]

    for envelope, status in zip(
        envelopes, (Status.SUCCEEDED, Status.SUCCEEDED, Status.FAILED), strict=True
    ):
        await store.update(envelope.id, StatusEvent(status=Status.RUNNING), now)
        await store.update(envelope.id, StatusEvent(status=status), now)
    await store.update(envelopes[0].id, StatusEvent(status=Status.FAILED), now)  # ignored
    samples = parse(metrics.render())
    assert value(samples, "asya_mesh_envelopes_ended_total", status="succeeded") == 2
    assert value(samples, "asya_mesh_envelopes_ended_total", status="failed") == 1
    assert value(samples, "asya_mesh_store_duration_seconds_count", op="update") == 7


async def test_store_failures_are_counted_by_operation(short_dir: str) -> None:
    metrics = MeshMetrics()
    async with open_proxy_store(os.path.join(short_dir, "nobody.sock")) as proxy:
        store = MeteredStore(proxy, metrics)
        with pytest.raises(ServiceError):
            await store.get("00000000-0000-4000-8000-000000000000")
    samples = parse(metrics.render())
    assert value(samples, "asya_mesh_store_errors_total", op="get") == 1
    assert value(samples, "asya_mesh_store_duration_seconds_count", op="get") == 1


async def test_the_state_proxy_store_reports_its_pool(mesh_via_proxy: MeshClient) -> None:
    mesh = mesh_via_proxy
    envelope_id = await mesh.create("worker")
    await mesh.status(envelope_id, "running")
    samples = await scrape(mesh.int_port)
    assert value(samples, "asya_mesh_stateproxy_requests_total") >= 2
    assert value(samples, "asya_mesh_stateproxy_connections") >= 1
    assert value(samples, "asya_mesh_store_duration_seconds_count", op="update") == 1


@pytest.fixture
async def mesh_via_proxy(nursery: trio.Nursery, pg_url: str, short_dir: str) -> MeshClient:
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    return await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)


async def test_the_state_proxy_serves_its_metrics_port(
    nursery: trio.Nursery, pg_url: str, short_dir: str
) -> None:
    path = os.path.join(short_dir, "proxy.sock")
    port = free_port()
    await nursery.start(partial(serve_state_proxy, path, pg_url, metrics_port=port))
    async with open_proxy_store(path) as store:
        await store.ping()
        assert await store.get("00000000-0000-4000-8000-000000000000") is None
        assert await store.get("00000000-0000-4000-8000-000000000001") is None
        puts = [put_request(f"m/{n}", {"n": n}) for n in range(3)]
        assert len(read_writes(await store._send(writes_request(puts)), 3)) == 3
        samples = await scrape(port)
    requests = "asya_state_proxy_requests_total"
    assert value(samples, requests, op="health", status="200") == 1
    assert value(samples, requests, op="get", status="404") == 2
    assert value(samples, "asya_state_proxy_request_duration_seconds_count", op="get") == 2
    assert value(samples, requests, op="writes", status="200") == 1
    assert value(samples, "asya_state_proxy_batched_writes_total") == 3
    assert value(samples, "asya_state_proxy_pg_opened_total") >= 1
    assert value(samples, "asya_state_proxy_pg_in_use") == 0
    assert value(samples, "asya_state_proxy_pg_size") == 10
    assert value(samples, "asya_state_proxy_pg_failures_total") == 0
    assert value(samples, "asya_state_proxy_connections") >= 1
    assert (await http(port, "GET", "/other")).status == 404
    assert (await http(port, "POST", "/metrics", b"")).status == 405


async def test_a_metrics_port_in_use_stops_the_start(pg_url: str, short_dir: str) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(StartupError) as failed:
            await serve_state_proxy(
                os.path.join(short_dir, "proxy.sock"),
                pg_url,
                metrics_port=taken.getsockname()[1],
            )
    assert failed.value.setting == "metrics_port"
    assert not await trio.Path(short_dir, "proxy.sock").exists()


def test_the_metrics_port_setting() -> None:
    base = {"CONNECTOR_SOCKET": "/tmp/x.sock", "STATE_PROXY_PG_URL": "postgresql://h/db"}
    assert Settings.from_env(base).metrics_port is None
    assert Settings.from_env({**base, "STATE_PROXY_METRICS_PORT": "9102"}).metrics_port == 9102
    for bad in ("http", "70000", "-1"):
        with pytest.raises(SettingsError, match=r"^STATE_PROXY_METRICS_PORT is invalid"):
            Settings.from_env({**base, "STATE_PROXY_METRICS_PORT": bad})
