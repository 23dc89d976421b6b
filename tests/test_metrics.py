"""Prometheus metrics: the state proxy's own metrics port, read over real sockets and parsed with
prometheus-client."""

from __future__ import annotations

import os
import socket
from functools import partial

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mesh_trio._proxy_store import open_proxy_store
from mesh_trio.stateproxy import serve_state_proxy
from mesh_trio.stateproxy._errors import StartupError
from mesh_trio.stateproxy._settings import Settings, SettingsError
from tests.harness import http

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
        samples = await scrape(port)
    requests = "asya_state_proxy_requests_total"
    assert value(samples, requests, op="health", status="200") == 1
    assert value(samples, requests, op="get", status="404") == 2
    assert value(samples, "asya_state_proxy_request_duration_seconds_count", op="get") == 2
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
