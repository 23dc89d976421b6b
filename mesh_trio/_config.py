"""Configuration from the environment (the README's "Production" table).

`Config.from_env(environ)` reads every `ASYA_*` setting once at start. A bad value raises
`ConfigError` whose message is one line naming the variable; the CLI prints it and exits 2.
Durations accept Go-style values (`5s`, `500ms`, `1m`, `1m30s`) and plain seconds (`2`, `0.5`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Final

import attrs

from mesh_proto import Router

from .transports import transport_names


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def parse_duration(text: str) -> float:
    """Seconds from `"5s"`, `"500ms"`, `"1m30s"` or `"2.5"`.

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
    sse_keepalive: float = 15.0
    log_level: str = "info"
    compat: bool = False
    cors_origins: tuple[str, ...] = ()
    demo_actors: bool = True
    graceful_timeout: float = 5.0
    access_log: bool = False
    tracing: bool = False
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
        """Read the configuration; raises `ConfigError` naming the first bad variable."""

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() != "" else None

        def port(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            if not raw.isdigit() or int(raw) > 65535:
                raise ConfigError(f"{name}={raw!r}: not a TCP port (0-65535)")
            return int(raw)

        def duration(name: str, default: float, *, positive: bool = True) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = parse_duration(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            if positive and value <= 0:
                raise ConfigError(f"{name}={raw!r}: must be greater than zero")
            return value

        def choice(name: str, default: str, options: tuple[str, ...]) -> str:
            raw = (get(name) or default).lower()
            if raw not in options:
                raise ConfigError(f"{name}={raw!r}: one of {', '.join(options)}")
            return raw

        def flag(name: str, default: bool) -> bool:
            raw = get(name)
            if raw is None:
                return default
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}={raw!r}: use 1 or 0")

        store = get("ASYA_MESH_STORE") or "memory"
        if store != "memory" and not (store.startswith("sqlite:") and len(store) > 7):
            raise ConfigError(f"ASYA_MESH_STORE={store!r}: use memory or sqlite:PATH")
        namespace = get("ASYA_NAMESPACE") or "default"
        if not _NAME.fullmatch(namespace):
            raise ConfigError(f"ASYA_NAMESPACE={namespace!r}: letters, digits, '-', '_', '.'")
        transport = choice("ASYA_QUEUE_TRANSPORT", "memory", transport_names())
        rabbitmq_url = get("ASYA_RABBITMQ_URL")
        if transport == "rabbitmq" and rabbitmq_url is None:
            raise ConfigError("ASYA_RABBITMQ_URL: required with ASYA_QUEUE_TRANSPORT=rabbitmq")
        if rabbitmq_url is not None and not rabbitmq_url.startswith(("amqp://", "amqps://")):
            raise ConfigError(f"ASYA_RABBITMQ_URL={rabbitmq_url!r}: not an amqp:// URL")
        sqs_region = get("ASYA_SQS_REGION")
        if transport == "sqs" and sqs_region is None:
            raise ConfigError("ASYA_SQS_REGION: required with ASYA_QUEUE_TRANSPORT=sqs")
        sqs_endpoint = get("ASYA_SQS_ENDPOINT")
        if sqs_endpoint is not None and not sqs_endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"ASYA_SQS_ENDPOINT={sqs_endpoint!r}: not an http(s):// URL")
        internal_url = get("ASYA_INTERNAL_URL")
        if internal_url is not None and not internal_url.startswith(("http://", "https://")):
            raise ConfigError(f"ASYA_INTERNAL_URL={internal_url!r}: not an http(s):// URL")
        origins = tuple(o.strip() for o in (get("ASYA_MESH_CORS_ORIGINS") or "").split(",") if o)
        return cls(
            host=get("ASYA_MESH_HOST") or "0.0.0.0",
            external_port=port("ASYA_MESH_EXTERNAL_PORT", 8080),
            internal_port=port("ASYA_MESH_INTERNAL_PORT", 8081),
            prefix=env.get("ASYA_MESH_API_PREFIX", "/api/v1"),
            state_proxy_socket=get("ASYA_STATEPROXY_SOCKET"),
            store=store,
            internal_url=internal_url,
            transport=transport,
            namespace=namespace,
            rabbitmq_url=rabbitmq_url or cls.rabbitmq_url,
            rabbitmq_exchange=env.get("ASYA_RABBITMQ_EXCHANGE", "").strip(),
            sqs_region=sqs_region,
            sqs_endpoint=sqs_endpoint,
            backstop_interval=duration("ASYA_BACKSTOP_INTERVAL", 5.0),
            sse_keepalive=duration("ASYA_MESH_SSE_KEEPALIVE", 15.0),
            log_level=choice("ASYA_LOG_LEVEL", "info", LOG_LEVELS),
            compat=flag("ASYA_MESH_COMPAT", False),
            cors_origins=origins,
            demo_actors=flag("ASYA_MESH_DEMO_ACTORS", True),
            graceful_timeout=duration("ASYA_MESH_GRACEFUL_TIMEOUT", 5.0),
            access_log=flag("ASYA_MESH_ACCESS_LOG", False),
            tracing=flag("ASYA_MESH_TRACING", False),
        )
