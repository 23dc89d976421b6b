# Configuration of the state proxy, read once from the environment.
#
# `SETTINGS` is the one list of what the proxy reads: each `Setting` names its variable, its
# default (None: required), a one-line meaning and its parser; the CLI's `--help` is generated
# from it. `Settings.from_env` walks it and is the only reader of these variables; any problem
# raises `SettingsError` whose message is one line that starts with the variable's name, which
# the CLI prints as is. The field-name rule shared by
# index specs and query filters is the protocol's (`mesh_proto.is_field_name`), so there is
# exactly one definition of a safe field name.

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs
import psycopg

from mesh_proto import MAX_FIELD_NAME, is_field_name

# The Go proxy also accepts ``(field)::type``; we index `field` the way we compare it.
_GO_CAST_SPEC = re.compile(r"\(\s*([^()]*?)\s*\)\s*::\s*[A-Za-z ]+")


class SettingsError(Exception):
    """A missing or bad setting; the message is one line naming the variable."""


def check_indexes(fields: Iterable[str]) -> tuple[str, ...]:
    """Validate index field names, dropping duplicates but keeping their order.

    Raises:
        ValueError: a name does not match ``^[A-Za-z_][A-Za-z0-9_]*$`` or is too long.
    """
    seen: dict[str, None] = {}
    for name in fields:
        if not is_field_name(name):
            raise ValueError(
                f"invalid index field {name!r}: want [A-Za-z_][A-Za-z0-9_]*, "
                f"at most {MAX_FIELD_NAME} characters"
            )
        seen[name] = None
    return tuple(seen)


def parse_index_spec(text: str) -> tuple[str, ...]:
    """Parse ``STATE_PROXY_PG_INDEXES``: comma-separated field names, blanks ignored.

    The Go proxy's ``(field)::type`` form is accepted and means `field`.

    Raises:
        ValueError: an entry is not a valid field name.
    """
    names = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        cast = _GO_CAST_SPEC.fullmatch(entry)
        names.append(cast.group(1) if cast else entry)
    return check_indexes(names)


def check_pg_url(url: str) -> None:
    """Check that `url` is a libpq connection string or URI (nothing is contacted).

    Raises:
        ValueError: libpq cannot parse it.
    """
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(str(exc).strip().splitlines()[0]) from None


def parse_pg_url(text: str) -> str:
    """`text` once `check_pg_url` accepts it."""
    check_pg_url(text)
    return text


def parse_log_level(text: str) -> int:
    """The `logging` level named by `text` (`debug`, `info`, ...; any case).

    Raises:
        ValueError: not a level name.
    """
    level = logging.getLevelNamesMapping().get(text.upper())
    if level is None:
        raise ValueError(f"{text!r} (want debug, info, warning...)")
    return level


def parse_log_format(text: str) -> str:
    """`text` or `json` (any case).

    Raises:
        ValueError: neither.
    """
    if text.lower() not in ("text", "json"):
        raise ValueError(f"{text!r} (want text or json)")
    return text.lower()


def parse_port(text: str) -> int | None:
    """A TCP port from `"9102"`; None for `""` (unset).

    Raises:
        ValueError: not a port number (0 to 65535).
    """
    if not text:
        return None
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{text!r} (want a port number)")
    return int(text)


def parse_grace(text: str) -> float:
    """Seconds from `"10"` or `"10s"`.

    Raises:
        ValueError: not a number of seconds >= 0.
    """
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{text!r} (want seconds >= 0)")
    return value


def parse_positive_int(text: str) -> int:
    """A whole number >= 1 from `"256"`.

    Raises:
        ValueError: anything else.
    """
    if not text.isdecimal() or not text.isascii() or int(text) < 1:
        raise ValueError(f"{text!r} (want a whole number >= 1)")
    return int(text)


def parse_age(text: str) -> float:
    """Seconds > 0 from `"60"` or `"60s"`.

    Raises:
        ValueError: not a number of seconds > 0.
    """
    value = parse_grace(text) if text else 0.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} (want seconds > 0)")
    return value


@attrs.frozen(kw_only=True)
class Setting:
    """One environment variable: the `Settings` field it fills, its default and its meaning.

    `default` is text parsed like a value from the environment; None means required, and
    `missing` then says what to give.
    """

    env: str
    field: str
    default: str | None
    meaning: str
    parse: Callable[[str], Any]
    missing: str = ""

    @property
    def shown_default(self) -> str:
        """How the default reads in `--help`: `required`, `default: ""`, `default: info`."""
        if self.default is None:
            return "required"
        return f"default: {self.default}" if self.default else 'default: ""'


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        env="CONNECTOR_SOCKET",
        field="socket_path",
        default=None,
        meaning="Unix socket path to serve",
        parse=str,
        missing="give the Unix socket path to serve",
    ),
    Setting(
        env="STATE_PROXY_PG_URL",
        field="pg_url",
        default=None,
        meaning="PostgreSQL URL, e.g. postgresql://user@host:5432/db",
        parse=parse_pg_url,
        missing="give a PostgreSQL URL such as postgresql://user@host:5432/dbname",
    ),
    Setting(
        env="STATE_PROXY_PG_INDEXES",
        field="indexes",
        default="",
        meaning="comma-separated value fields to index, e.g. status,deadline_at",
        parse=parse_index_spec,
    ),
    Setting(
        env="ASYA_LOG_LEVEL",
        field="log_level",
        default="info",
        meaning="debug, info, warning or error",
        parse=parse_log_level,
    ),
    Setting(
        env="ASYA_LOG_FORMAT",
        field="log_format",
        default="text",
        meaning="text, or json: one JSON object per line",
        parse=parse_log_format,
    ),
    Setting(
        env="ASYA_STATE_PROXY_GRACE",
        field="grace",
        default="10",
        meaning="seconds in-flight requests may finish after SIGINT/SIGTERM",
        parse=parse_grace,
    ),
    Setting(
        env="STATE_PROXY_METRICS_PORT",
        field="metrics_port",
        default="",
        meaning="TCP port (all interfaces) serving Prometheus GET /metrics; unset: no metrics",
        parse=parse_port,
    ),
    Setting(
        env="STATE_PROXY_EVENT_BUFFER",
        field="event_buffer",
        default="256",
        meaning="events kept per key for event bus replays (the newest ones)",
        parse=parse_positive_int,
    ),
    Setting(
        env="STATE_PROXY_EVENT_AGE",
        field="event_age",
        default="60",
        meaning="seconds an event is kept for event bus replays, e.g. 60 or 60s",
        parse=parse_age,
    ),
)


@attrs.frozen(kw_only=True)
class Settings:
    """What the `asya-state-proxy` process needs to run."""

    socket_path: str
    pg_url: str
    indexes: tuple[str, ...] = ()
    log_level: int = logging.INFO
    log_format: str = "text"
    grace: float = 10.0
    metrics_port: int | None = None
    event_buffer: int = 256
    event_age: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting of `SETTINGS` from `environ` (default: the process environment).

        Raises:
            SettingsError: a required variable is missing or empty, or a value is invalid.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            text = env.get(setting.env, "").strip() or setting.default
            if text is None:
                raise SettingsError(f"{setting.env} is not set: {setting.missing}")
            try:
                values[setting.field] = setting.parse(text)
            except ValueError as exc:
                raise SettingsError(f"{setting.env} is invalid: {exc}") from None
        return cls(**values)
