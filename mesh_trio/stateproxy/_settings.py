# Configuration of the state proxy, read once from the environment.
#
# `Settings.from_env` is the only reader of `CONNECTOR_SOCKET`, `STATE_PROXY_PG_URL` and
# `STATE_PROXY_PG_INDEXES`; any problem raises `SettingsError` whose message is one line that
# starts with the variable's name, which the CLI prints as is. The field-name rule shared by
# index specs and query filters is the protocol's (`mesh_proto.is_field_name`), so there is
# exactly one definition of a safe field name.

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

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


@attrs.frozen(kw_only=True)
class Settings:
    """What the `asya-state-proxy` process needs to run."""

    socket_path: str
    pg_url: str
    indexes: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `environ` (default: the process environment).

        Raises:
            SettingsError: a required variable is missing or empty, or a value is invalid.
        """
        env = os.environ if environ is None else environ
        socket_path = env.get("CONNECTOR_SOCKET", "").strip()
        if not socket_path:
            raise SettingsError("CONNECTOR_SOCKET is not set: give the Unix socket path to serve")
        pg_url = env.get("STATE_PROXY_PG_URL", "").strip()
        if not pg_url:
            raise SettingsError(
                "STATE_PROXY_PG_URL is not set: give a PostgreSQL URL such as "
                "postgresql://user@host:5432/dbname"
            )
        try:
            check_pg_url(pg_url)
        except ValueError as exc:
            raise SettingsError(f"STATE_PROXY_PG_URL is invalid: {exc}") from None
        try:
            indexes = parse_index_spec(env.get("STATE_PROXY_PG_INDEXES", ""))
        except ValueError as exc:
            raise SettingsError(f"STATE_PROXY_PG_INDEXES is invalid: {exc}") from None
        return cls(socket_path=socket_path, pg_url=pg_url, indexes=indexes)
