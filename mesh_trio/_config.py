"""Configuration from the environment (the README's "Production" table).

`SETTINGS` is the one list of what the mesh API reads: each `Setting` names its environment
variable, its default (as text, parsed like any value), a one-line meaning, and the parser that
turns the text into a `Config` field. `Config.from_env(environ)` walks it once at start; the
CLI's `--help` and the README's settings table (`tools/gen_docs.py`) are generated from it, so
neither can drift from what is parsed. A bad value raises `ConfigError` whose message is one
line naming the variable; the CLI prints it and exits 2.
Durations accept Go-style values (`5s`, `500ms`, `1m`, `1m30s`) and plain seconds (`2`, `0.5`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import trio

from mesh_proto import Router

from .transports import transport_names


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


class StartupError(Exception):
    """The process cannot start (a port, a host, a file); the message is one line naming why."""


def root_cause(exc: BaseException) -> BaseException:
    """The first exception inside `exc` that is not a group (trio nests them per nursery).

    Cancellations are skipped when there is anything else: they are the nursery's reaction
    to the failure, not its cause.
    """
    while isinstance(exc, BaseExceptionGroup):
        causes = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)] or list(
            exc.exceptions
        )
        exc = causes[0]
    return exc


# Go's units, and `d` (not Go's) so that a retention period reads naturally as `7d`.
_UNITS: Final = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0
}  # fmt: skip
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_NAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")


def parse_duration(text: str) -> float:
    """Seconds from `"5s"`, `"500ms"`, `"1m30s"`, `"7d"` or `"2.5"`.

    Raises:
        ValueError: not a duration, or negative / not finite.
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pos, value = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            value += float(match[1]) * _UNITS[match[2]]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration: {text!r} (use e.g. 5s, 500ms, 1m or 2.5)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a non-negative duration: {text!r}")
    return value


# A parser gets the variable's name (for the message) and its stripped text.
Parser = Callable[[str, str], Any]


def _text(name: str, raw: str) -> str:
    return raw


def _port(name: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{name}={raw!r}: not a TCP port (0-65535)")
    return int(raw)


def _duration(name: str, raw: str) -> float:
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: must be greater than zero")
    return value


def _retention(name: str, raw: str) -> float | None:
    """A retention period, or None (off) for `0` / `off`."""
    if raw.lower() in ("0", "off"):
        return None
    return _duration(name, raw)


def _flag(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: use 1 or 0")


def _choice(options: Callable[[], tuple[str, ...]]) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in options():
            raise ConfigError(f"{name}={value!r}: one of {', '.join(options())}")
        return value

    return parse


def _url(*schemes: str) -> Parser:
    def parse(name: str, raw: str) -> str:
        if not raw.startswith(tuple(f"{scheme}://" for scheme in schemes)):
            raise ConfigError(f"{name}={raw!r}: not a {'/'.join(schemes)}:// URL")
        return raw

    return parse


def _store(name: str, raw: str) -> str:
    if raw != "memory" and not (raw.startswith("sqlite:") and len(raw) > 7):
        raise ConfigError(f"{name}={raw!r}: use memory or sqlite:PATH")
    return raw


def _namespace(name: str, raw: str) -> str:
    if not _NAME.fullmatch(raw):
        raise ConfigError(f"{name}={raw!r}: letters, digits, '-', '_', '.'")
    return raw


def _count(low: int, high: int) -> Parser:
    def parse(name: str, raw: str) -> int:
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise ConfigError(f"{name}={raw!r}: a whole number from {low} to {high}")
        return int(raw)

    return parse


LISTENERS: Final = ("hypercorn", "lean")


def _origins(name: str, raw: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in raw.split(",") if origin.strip())


@attrs.frozen(kw_only=True)
class Setting:
    """One environment variable: where it goes in `Config`, its default and what it means.

    `default` is text parsed like a value from the environment; None means unset, which leaves
    the `Config` field's own default. `shown` is how the default reads (Markdown) in `--help`
    and the README when it is not the text itself. With `blank_is_value`, a variable set to
    the empty string means the empty string rather than the default.
    """

    env: str
    field: str
    default: str | None
    meaning: str
    parse: Parser = _text
    shown: str | None = None
    blank_is_value: bool = False

    @property
    def shown_default(self) -> str:
        """The default as it reads in docs, in Markdown: `` `8080` ``, `` `""` ``, `unset`."""
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "unset"
        return f"`{self.default}`" if self.default else '`""`'


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        env="ASYA_MESH_EXTERNAL_PORT",
        field="external_port",
        default="8080",
        meaning="client port (`0`: any free port)",
        parse=_port,
    ),
    Setting(
        env="ASYA_MESH_INTERNAL_PORT",
        field="internal_port",
        default="8081",
        meaning="sidecar port (`0`: any free port)",
        parse=_port,
    ),
    Setting(
        env="ASYA_MESH_HOST", field="host", default="0.0.0.0", meaning="address both ports bind to"
    ),
    Setting(
        env="ASYA_MESH_API_PREFIX",
        field="prefix",
        default="/api/v1",
        meaning='route prefix; `""` gives `/mesh/...`',
        blank_is_value=True,
    ),
    Setting(
        env="ASYA_STATEPROXY_SOCKET",
        field="state_proxy_socket",
        default=None,
        meaning="state-proxy Unix socket; unset = embedded store",
    ),
    Setting(
        env="ASYA_MESH_STORE",
        field="store",
        default="memory",
        meaning="embedded store: `memory` or `sqlite:PATH` (survives restarts)",
        parse=_store,
    ),
    Setting(
        env="ASYA_QUEUE_TRANSPORT",
        field="transport",
        default="memory",
        meaning="`memory`, `rabbitmq` or `sqs`",
        parse=_choice(transport_names),
    ),
    Setting(
        env="ASYA_NAMESPACE",
        field="namespace",
        default="default",
        meaning="queue `asya-{namespace}-{actor}`; `?namespace=` overrides per create",
        parse=_namespace,
    ),
    Setting(
        env="ASYA_INTERNAL_URL",
        field="internal_url",
        default=None,
        meaning="stamped into header `x-asya-gateway-url`; required with a real transport",
        parse=_url("http", "https"),
        shown="`http://127.0.0.1:<internal port>`",
    ),
    Setting(
        env="ASYA_RABBITMQ_URL",
        field="rabbitmq_url",
        default=None,
        meaning="broker URL, required with `rabbitmq` (see docs/rabbitmq.md)",
        parse=_url("amqp", "amqps"),
    ),
    Setting(
        env="ASYA_RABBITMQ_EXCHANGE",
        field="rabbitmq_exchange",
        default="",
        meaning="exchange (see docs/rabbitmq.md)",
        blank_is_value=True,
    ),
    Setting(
        env="ASYA_SQS_REGION",
        field="sqs_region",
        default=None,
        meaning="SQS region, required with `sqs` (see docs/sqs.md)",
    ),
    Setting(
        env="ASYA_SQS_ENDPOINT",
        field="sqs_endpoint",
        default=None,
        meaning="SQS endpoint URL instead of AWS's (see docs/sqs.md)",
        parse=_url("http", "https"),
    ),
    Setting(
        env="ASYA_BACKSTOP_INTERVAL",
        field="backstop_interval",
        default="5s",
        meaning="how often expired envelopes are failed",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_RETENTION",
        field="retention",
        default=None,
        meaning=(
            "delete terminal envelopes not updated for this long, e.g. `7d` (docs/operations.md)"
        ),
        parse=_retention,
        shown="off",
    ),
    Setting(
        env="ASYA_MESH_RETENTION_INTERVAL",
        field="retention_interval",
        default="1m",
        meaning="how often the retention sweep runs",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_IDEMPOTENCY_TTL",
        field="idempotency_ttl",
        default="24h",
        meaning="how long an `Idempotency-Key` of a create is remembered (docs/contract.md)",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_SSE_KEEPALIVE",
        field="sse_keepalive",
        default="15s",
        meaning="`:keepalive` after this much silence",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_COMPAT",
        field="compat",
        default="0",
        meaning="`1` mounts the legacy routes (docs/compat.md)",
        parse=_flag,
    ),
    Setting(
        env="ASYA_MESH_CORS_ORIGINS",
        field="cors_origins",
        default=None,
        meaning="comma-separated origins allowed to call the external port",
        parse=_origins,
        shown="none",
    ),
    Setting(
        env="ASYA_MESH_DEMO_ACTORS",
        field="demo_actors",
        default="1",
        meaning="run the demo actors (only with the `memory` transport)",
        parse=_flag,
    ),
    Setting(
        env="ASYA_MESH_GRACEFUL_TIMEOUT",
        field="graceful_timeout",
        default="5s",
        meaning="how long in-flight requests may finish on shutdown",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_HTTP",
        field="http",
        default="lean",
        meaning=(
            "the HTTP listener: `lean` (our trio HTTP/1.1 server) or `hypercorn` "
            "(quart-trio on hypercorn)"
        ),
        parse=_choice(lambda: LISTENERS),
    ),
    Setting(
        env="ASYA_MESH_KEEPALIVE_TIMEOUT",
        field="keepalive_timeout",
        default="5s",
        meaning="an idle kept-alive client connection is closed after this long",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_HEADER_TIMEOUT",
        field="header_timeout",
        default="10s",
        meaning="a request whose head has not fully arrived by then is refused (slow clients)",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_WORKERS",
        field="workers",
        default="1",
        meaning=(
            "processes serving the same two ports, each a replica on the event bus "
            "(more than 1 needs the state proxy)"
        ),
        parse=_count(1, 64),
    ),
    Setting(
        env="ASYA_MESH_EVENT_BUFFER",
        field="event_buffer",
        default="256",
        meaning="FLY events kept per envelope for streams resuming with `Last-Event-ID`",
        parse=_count(0, 1_000_000),
    ),
    Setting(
        env="ASYA_MESH_EVENT_BUFFER_AGE",
        field="event_buffer_age",
        default="60s",
        meaning="how long a buffered FLY event is kept for resuming streams",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_SSE_RETRY",
        field="sse_retry",
        default="3s",
        meaning="the reconnect delay each SSE stream advises its client (`retry:`)",
        parse=_duration,
    ),
    Setting(
        env="ASYA_MESH_TRACING",
        field="tracing",
        default="0",
        meaning=(
            "`1` stamps a W3C `traceparent` header on new envelopes (joining the caller's trace)"
        ),
        parse=_flag,
    ),
    Setting(
        env="ASYA_MESH_ACCESS_LOG",
        field="access_log",
        default="0",
        meaning=(
            "`1` logs every request at INFO: on lean one line per request on `mesh_trio.access`, "
            "on hypercorn hypercorn's access log (costs 10-20 % of its throughput)"
        ),
        parse=_flag,
    ),
    Setting(
        env="ASYA_LOG_LEVEL",
        field="log_level",
        default="info",
        meaning="`debug`, `info`, `warning` or `error`; `debug` adds one line per request",
        parse=_choice(lambda: LOG_LEVELS),
    ),
    Setting(
        env="ASYA_LOG_FORMAT",
        field="log_format",
        default="text",
        meaning="`text`, or `json`: one JSON object per line (docs/operations.md)",
        parse=_choice(lambda: LOG_FORMATS),
    ),
)


@attrs.frozen(kw_only=True)
class Config:
    host: str = "0.0.0.0"
    external_port: int = 8080
    internal_port: int = 8081
    prefix: str = "/api/v1"
    state_proxy_socket: str | None = None
    store: str = "memory"
    internal_url: str | None = None
    transport: str = "memory"
    namespace: str = "default"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    rabbitmq_exchange: str = ""
    sqs_region: str | None = None
    sqs_endpoint: str | None = None
    backstop_interval: float = 5.0
    retention: float | None = None
    retention_interval: float = 60.0
    sse_keepalive: float = 15.0
    idempotency_ttl: float = 24 * 3600.0
    log_level: str = "info"
    log_format: str = "text"
    compat: bool = False
    cors_origins: tuple[str, ...] = ()
    demo_actors: bool = True
    graceful_timeout: float = 5.0
    access_log: bool = False
    tracing: bool = False
    http: str = "lean"
    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    workers: int = 1
    event_buffer: int = 256
    event_buffer_age: float = 60.0
    sse_retry: float = 3.0
    # Extension modules to load by name (`_extension.py`); `ASYA_MESH_COMPAT=1` names
    # `mesh_compat`, the legacy routes.
    extensions: tuple[str, ...] = attrs.field()

    @extensions.default
    def _extensions(self) -> tuple[str, ...]:
        return ("mesh_compat",) if self.compat else ()

    @property
    def router(self) -> Router:
        return Router(self.prefix)

    @property
    def embedded(self) -> bool:
        """True when no state proxy is configured: the in-process store is used."""
        return self.state_proxy_socket is None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Read every setting of `SETTINGS` from `env`.

        Raises:
            ConfigError: a value is invalid or a required one is missing; the message names
                the first bad variable.
        """
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.env)
            text = raw.strip() if raw is not None else None
            if text is None or (text == "" and not setting.blank_is_value):
                text = setting.default
            if text is not None:
                values[setting.field] = setting.parse(setting.env, text)
        if values["transport"] == "rabbitmq" and "rabbitmq_url" not in values:
            raise ConfigError("ASYA_RABBITMQ_URL: required with ASYA_QUEUE_TRANSPORT=rabbitmq")
        if values["transport"] == "sqs" and "sqs_region" not in values:
            raise ConfigError("ASYA_SQS_REGION: required with ASYA_QUEUE_TRANSPORT=sqs")
        return cls(**values)
