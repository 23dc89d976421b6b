"""Logs, request ids and OpenTelemetry spans, over real sockets.

JSON logs are read from the real commands' stderr; `X-Request-Id` is checked on both ports,
errors included; spans go to an OTLP/HTTP receiver this module runs on 127.0.0.1 (a thread
with the stdlib's HTTP server) and are decoded with the OTLP protobuf types.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh_trio import serve
from mesh_trio._config import SETTINGS
from mesh_trio._observability import REQUEST_ID_HEADER, RequestIdFilter, TracedStore
from mesh_trio.stateproxy._settings import SETTINGS as PROXY_SETTINGS

from .harness import WAIT, MeshClient, http, make_config, start_mesh

pytestmark = pytest.mark.usefixtures("listener")  # the HTTP edge is under test: both listeners

MESH = [str(Path(sys.executable).with_name("asya-mesh-api"))]
PROXY = [sys.executable, "-c", "from mesh_trio.stateproxy._cli import main; main()"]
GIVEN = "client-id_42.x:y/z"


def environment(**settings: str) -> dict[str, str]:
    names = {s.env for s in SETTINGS} | {s.env for s in PROXY_SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("OTEL_")}
    return {**env, **settings}


class LogReader:
    """The stderr of a running command, one JSON object per line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""
        self.lines: list[dict[str, Any]] = []

    async def until(self, needle: str) -> dict[str, Any]:
        """The first line whose message contains `needle` (reading more as needed)."""
        assert self.process.stderr is not None
        with trio.fail_after(WAIT):
            while True:
                for line in self.lines:
                    if needle in line["message"]:
                        return line
                data = await self.process.stderr.receive_some(65536)
                assert data, f"stderr ended without {needle!r}: {self.lines}"
                self.buffer += data
                *complete, self.buffer = self.buffer.split(b"\n")
                # Every line is one JSON object: json.loads fails the test otherwise.
                self.lines += [json.loads(raw) for raw in complete if raw]


async def run_command(command: list[str], env: dict[str, str]) -> trio.Process:
    return await trio.lowlevel.open_process(command, env=env, stderr=subprocess.PIPE)


async def test_mesh_api_json_logs_carry_the_request_id() -> None:
    env = environment(
        ASYA_MESH_HOST="127.0.0.1",
        ASYA_MESH_EXTERNAL_PORT="0",
        ASYA_MESH_INTERNAL_PORT="0",
        ASYA_MESH_DEMO_ACTORS="0",
        ASYA_LOG_FORMAT="json",
        ASYA_LOG_LEVEL="debug",
    )
    process = await run_command(MESH, env)
    try:
        logs = LogReader(process)
        started = await logs.until("mesh API listening")
        assert (started["level"], started["logger"]) == ("info", "mesh_trio")
        assert "request_id" not in started
        ports = re.search(r"external \S+:(\d+), internal \S+:(\d+)", started["message"])
        assert ports is not None, started
        external, internal = int(ports[1]), int(ports[2])
        reply = await http(external, "GET", "/health", headers={"x-request-id": GIVEN})
        assert (reply.status, reply.headers[REQUEST_ID_HEADER]) == (200, GIVEN)
        line = await logs.until("request port=external")
        assert line["request_id"] == GIVEN
        assert (line["path"], line["status"], line["method"]) == ("/health", 200, "GET")
        reply = await http(internal, "GET", "/health")
        line = await logs.until("request port=internal")
        assert line["request_id"] == reply.headers[REQUEST_ID_HEADER]
        assert (line["path"], line["status"]) == ("/health", 200)
        assert {"time", "level", "logger", "message"} <= line.keys()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    await logs.until("mesh API stopped")


@pytest.mark.postgres
async def test_state_proxy_json_logs(pg_url: str, short_dir: str) -> None:
    socket = f"{short_dir}/proxy.sock"
    env = environment(CONNECTOR_SOCKET=socket, STATE_PROXY_PG_URL=pg_url, ASYA_LOG_FORMAT="json")
    process = await run_command(PROXY, env)
    logs = LogReader(process)
    try:
        line = await logs.until("asya-state-proxy listening")
        assert (line["level"], line["logger"]) == ("info", "mesh_trio.stateproxy")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    await logs.until("asya-state-proxy stopped")


def test_a_bad_log_format_is_a_configuration_error() -> None:
    env = environment(
        ASYA_LOG_FORMAT="yaml",
        CONNECTOR_SOCKET="/tmp/unused.sock",
        STATE_PROXY_PG_URL="postgresql://nobody@127.0.0.1:1/unused",
    )
    for command, needle in ((MESH, "ASYA_LOG_FORMAT='yaml'"), (PROXY, "ASYA_LOG_FORMAT")):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr


# Non-ASCII goes as raw bytes (obs-text), which h11 sends as they are.
BAD_IDS: list[str | bytes] = ["has space", "x" * 129, "tab\there", "\u00e9t\u00e9".encode(), ""]


def _is_generated(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@pytest.fixture
async def mesh(nursery: trio.Nursery) -> MeshClient:
    return await start_mesh(nursery)


@pytest.mark.parametrize("port", ["external", "internal"])
async def test_request_id_given_is_echoed(mesh: MeshClient, port: str) -> None:
    target = mesh.ext_port if port == "external" else mesh.int_port
    for path in ("/health", mesh.path("no-such-id")):
        reply = await http(target, "GET", path, headers={"X-Request-Id": GIVEN})
        assert reply.headers[REQUEST_ID_HEADER] == GIVEN, (path, reply)
    longest = "~" * 128
    reply = await http(target, "GET", "/health", headers={"X-Request-Id": longest})
    assert reply.headers[REQUEST_ID_HEADER] == longest


@pytest.mark.parametrize("port", ["external", "internal"])
async def test_request_id_generated_and_bad_ones_replaced(mesh: MeshClient, port: str) -> None:
    target = mesh.ext_port if port == "external" else mesh.int_port
    seen = set()
    for given in [None, *BAD_IDS]:
        headers = {} if given is None else {"X-Request-Id": given}
        reply = await http(target, "GET", "/health", headers=headers)
        assert _is_generated(reply.headers[REQUEST_ID_HEADER]), (given, reply)
        seen.add(reply.headers[REQUEST_ID_HEADER])
    assert len(seen) == 1 + len(BAD_IDS)


async def test_request_id_on_error_replies(mesh: MeshClient) -> None:
    envelope_id = await mesh.create()
    cases = [
        (mesh.ext_port, "GET", mesh.path("no-such-id"), None, 404),
        (mesh.ext_port, "POST", mesh.path("?actor=worker"), "not json", 400),
        (mesh.ext_port, "TRACE", mesh.path(""), None, 405),
        (mesh.int_port, "POST", mesh.path("no-such-id/events"), {"type": "fly"}, 404),
        (mesh.int_port, "POST", mesh.path(f"{envelope_id}/events"), "not json", 400),
        (mesh.int_port, "GET", "/nowhere", None, 404),
    ]
    for port, method, path, body, status in cases:
        reply = await http(port, method, path, body, headers={"X-Request-Id": GIVEN})
        assert (reply.status, reply.headers.get(REQUEST_ID_HEADER)) == (status, GIVEN), path
        reply = await http(port, method, path, body)
        assert reply.status == status
        assert _is_generated(reply.headers[REQUEST_ID_HEADER])


class Captured(logging.Handler):
    """Records of the `mesh_trio` loggers, stamped by the filter the CLI's handler has."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []
        self.changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def lines(self, prefix: str) -> list[logging.LogRecord]:
        """The records whose message starts with `prefix`, once there is one."""
        with trio.fail_after(WAIT):
            while not (found := [r for r in self.records if r.getMessage().startswith(prefix)]):
                self.changed = trio.Event()
                await self.changed.wait()
        return found


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("mesh_trio")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def test_every_line_of_a_request_carries_its_id(mesh: MeshClient, captured: Captured) -> None:
    reply = await http(mesh.ext_port, "GET", "/health", headers={"X-Request-Id": GIVEN})
    assert reply.status == 200
    lines = await captured.lines("request port=external")
    assert [getattr(r, "request_id", None) for r in lines] == [GIVEN]
    reply = await mesh.int("GET", "no-such-id")
    # The internal port logs its request line just after the reply is sent.
    lines = await captured.lines("request port=internal")
    assert [getattr(r, "request_id", None) for r in lines] == [reply.headers[REQUEST_ID_HEADER]]


async def test_the_access_log_is_one_info_line_per_request_on_lean(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, listener: str
) -> None:
    caplog.set_level(logging.INFO)
    mesh = await start_mesh(nursery, ASYA_MESH_ACCESS_LOG="1")
    assert (await http(mesh.ext_port, "GET", "/health")).status == 200
    assert (await mesh.int("GET", "no-such-id")).status == 404
    access = [r for r in caplog.records if r.name == "mesh_trio.access"]
    if listener == "hypercorn":  # hypercorn's own access log is the one
        assert access == []
        return
    assert [(r.levelno, getattr(r, "port", None), getattr(r, "status", None)) for r in access] == [
        (logging.INFO, "external", 200),
        (logging.INFO, "internal", 404),
    ]


async def test_no_access_log_by_default(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mesh = await start_mesh(nursery)
    assert (await http(mesh.ext_port, "GET", "/health")).status == 200
    assert [r for r in caplog.records if "request port=" in r.getMessage()] == []


# --- OpenTelemetry ----------------------------------------------------------------------------


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: every span it was sent, as protobuf objects."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        spans: list[Any] = []
        self.spans = spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/traces"
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans if s.name == name]


def attribute(span: Any, key: str) -> str | None:
    for kv in span.attributes:
        if kv.key == key:
            return str(kv.value.string_value)
    return None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join()


async def test_otlp_spans_and_the_stamped_traceparent(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller = f"00-{caller_trace}-00f067aa0ba902b7-01"
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        config = make_config()
        bound = await nursery.start(
            lambda task_status: serve(config, shutdown_trigger=stop.wait, task_status=task_status)
        )
        mesh = MeshClient(bound, config.router.prefix)
        reply = await mesh.ext(
            "POST", "?actor=worker", {}, headers={"traceparent": caller, "X-Request-Id": GIVEN}
        )
        assert reply.status == 201, reply
        envelope_id = reply.json()["id"]
        assert (await mesh.status(envelope_id, "running")).status == 204
        stamped = (await mesh.get(envelope_id))["data"]["headers"]["traceparent"]
        stop.set()
    # serve() has returned: the batch processor was shut down, so every span was exported.
    (create,) = receiver.named("mesh.create")
    assert create.trace_id.hex() == caller_trace
    assert stamped == f"00-{caller_trace}-{create.span_id.hex()}-01"
    assert attribute(create, "mesh.envelope_id") == envelope_id
    assert attribute(create, "mesh.request_id") == GIVEN
    for name in ("mesh.dispatch", "store.create"):
        (span,) = receiver.named(name)
        assert (span.trace_id, span.parent_span_id) == (create.trace_id, create.span_id)
        assert attribute(span, "mesh.envelope_id") == envelope_id
    (status,) = receiver.named("mesh.status")
    assert attribute(status, "mesh.envelope_id") == envelope_id
    assert attribute(status, "mesh.status") == "running"
    updates = [s for s in receiver.named("store.update") if s.parent_span_id == status.span_id]
    assert [attribute(s, "mesh.envelope_id") for s in updates] == [envelope_id]


async def test_no_endpoint_no_spans(mesh: MeshClient) -> None:
    # Unset, the mesh has no tracer and its store is the store itself, not a traced wrapper.
    assert mesh.bound.mesh.otel is None
    assert not isinstance(mesh.bound.mesh.store, TracedStore)
