"""Logs, request ids and OpenTelemetry spans: what an operator sees of a running process.

Logs go through the stdlib `logging`; `configure_logging` installs one handler on the root
logger with either the text format or one JSON object per line (`ASYA_LOG_FORMAT=json`). Both
add the id of the request being handled, read from the `request_id` context variable: the
HTTP edge (`_web.py`) sets it per request (trio runs each request in its own task, so the
variable belongs to that request and is gone with it), and any line logged while handling the
request, by our code or a library's, carries it.

Spans exist only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set:
`open_tracing` then imports the OpenTelemetry SDK (the optional extra `otel`), exports over
OTLP HTTP/protobuf from the SDK's batch thread, and shuts that thread down (flushing) when the
context ends. Unset, it yields None, nothing of OpenTelemetry is imported, and the `Mesh` runs
the same code as without it. The store is traced by wrapping it (`TracedStore`), so the
untraced path has no span calls at all.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from mesh_proto import Claim, Envelope, ListQuery, Outcome, StatusEvent

from ._config import LOG_FORMATS, ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from ._store import Store

REQUEST_ID_HEADER: Final = "x-request-id"
MAX_REQUEST_ID: Final = 128

# The id of the request this task is handling (None outside requests).
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# What every LogRecord has; anything else on a record came as `extra=` and is logged as a field.
_RECORD_FIELDS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class _RequestIds:
    """Fresh request ids: 32 hex digits, a random 64-bit prefix per process then a counter.

    Unique across processes and replicas (the prefix) and within one (the counter), which is
    all a correlation id needs; a uuid4 per request cost a `getrandom` system call and a UUID
    object, a tenth of a small request's CPU. A forked child draws a prefix of its own.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


fresh_request_id = _RequestIds()


def new_request_id(given: str | bytes | None = None) -> str:
    """`given` if it is a sane token (1 to 128 visible ASCII characters), else a fresh id
    (`fresh_request_id`).

    A client's id is kept so a request can be followed across services; anything else
    (spaces, control characters, non-ASCII, too long) is replaced rather than logged.
    """
    if given:
        text = given.decode("latin-1") if isinstance(given, bytes) else given
        if len(text) <= MAX_REQUEST_ID and all("!" <= c <= "~" for c in text):
            return text
    return fresh_request_id()


def request_id_in(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The id of an ASGI request (its lower-cased raw headers): see `new_request_id`."""
    for name, value in headers:
        if name == b"x-request-id":
            return new_request_id(value)
    return fresh_request_id()


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` (None outside a request) when the line is logged, in the
    task that logs it; a formatter may run later or elsewhere (pytest's caplog does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, then ` request_id=...` inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return line if rid is None else f"{line} request_id={rid}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, then
    `request_id` inside a request (`RequestIdFilter`), every `extra=` field, and `exception`
    with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: int | str, log_format: str = "text") -> None:
    """Send every log line to stderr in `log_format` (`text` or `json`) from `level` up."""
    assert log_format in LOG_FORMATS
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


# --- OpenTelemetry -----------------------------------------------------------------------------

SERVICE_NAME: Final = "asya-mesh-api"
_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def traceparent_of(span: Span) -> str:
    """The W3C `traceparent` naming `span` (what a create stamps into the envelope)."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


@attrs.define(eq=False)
class Tracing:
    """The spans of one `serve()`: a tracer of a private provider (no global state, so several
    servers in one process each export their own)."""

    tracer: Tracer

    @contextmanager
    def span(
        self, name: str, envelope_id: str | None = None, *, traceparent: str | None = None
    ) -> Iterator[Span]:
        """A span around the block, child of the current one, or of `traceparent` if given
        (the caller's W3C header; an invalid one starts a new trace). The exception that
        leaves the block, if any, is recorded and marks the span as an error."""
        context = None
        if traceparent is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
        attributes = {"mesh.envelope_id": envelope_id} if envelope_id is not None else None
        rid = request_id.get()
        with self.tracer.start_as_current_span(name, context=context, attributes=attributes) as s:
            if rid is not None:
                s.set_attribute("mesh.request_id", rid)
            yield s


def _provider(environ: Mapping[str, str]) -> TracerProvider:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
            "(pip install 'asya-mesh-api[otel]')"
        ) from None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself; the name
    # given here would override them, so it is only a default.
    names = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(names))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


@asynccontextmanager
async def open_tracing(environ: Mapping[str, str]) -> AsyncIterator[Tracing | None]:
    """Tracing when an OTLP endpoint is configured (the standard `OTEL_*` variables), else None.

    On exit the provider shuts down: queued spans are exported (bounded by the exporter's
    timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`) and the export thread ends.

    Raises:
        ConfigError: an endpoint is set but the `otel` extra is not installed.
    """
    if not any(environ.get(name) for name in _ENDPOINTS):
        yield None
        return
    provider = _provider(environ)
    try:
        yield Tracing(provider.get_tracer("mesh_trio"))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(provider.shutdown)


@attrs.define(eq=False)
class TracedStore:
    """A `Store` whose every call is a `store.<method>` span (only built with tracing on)."""

    store: Store
    tracing: Tracing

    async def ping(self) -> None:
        with self.tracing.span("store.ping"):
            await self.store.ping()

    async def create(self, envelope: Envelope) -> None:
        with self.tracing.span("store.create", envelope.id):
            await self.store.create(envelope)

    async def get(self, envelope_id: str) -> Envelope | None:
        with self.tracing.span("store.get", envelope_id):
            return await self.store.get(envelope_id)

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        with self.tracing.span("store.update", envelope_id):
            return await self.store.update(envelope_id, event, now)

    async def delete(self, envelope_id: str) -> bool:
        with self.tracing.span("store.delete", envelope_id):
            return await self.store.delete(envelope_id)

    async def list(self, query: ListQuery) -> tuple[Sequence[Envelope], int]:
        with self.tracing.span("store.list"):
            return await self.store.list(query)

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        with self.tracing.span("store.expired"):
            return await self.store.expired(now, limit)

    async def claim(self, key: str, claim: Claim, now: datetime) -> Claim | None:
        with self.tracing.span("store.claim", claim.envelope_id):
            return await self.store.claim(key, claim, now)

    async def release(self, key: str) -> None:
        with self.tracing.span("store.release"):
            await self.store.release(key)
