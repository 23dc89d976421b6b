# The failures of the state proxy, each carrying the HTTP status it answers with.
#
# These are members of mesh_proto's error family (`ProtocolError`), the one the wire protocol's
# decoding raises too: request handling raises a `ProtocolError` and the router answers
# `status_hint` with its `body()`, ``{"error": message}``, without a lookup table. `BadRequest`
# is mesh_proto's own, so a key, a query or a guard refused by the shared protocol code and one
# refused by PostgreSQL are the same error. Client mistakes (4xx) and an
# unavailable database (503) are kept apart from our own bugs: anything else that escapes a
# handler is a 500 plus a log line. `PgError` is what the driver raises for an SQL error; the
# store decides whether that is the client's fault (bad JSON, value too large) or ours.

from __future__ import annotations

from mesh_proto import BadRequest, ProtocolError

__all__ = [
    "BadRequest",
    "Conflict",
    "PgError",
    "StartupError",
    "StateProxyError",
    "StoreUnavailable",
]


class StateProxyError(ProtocolError):
    """Base of the proxy's own errors that carry their reply: `status_hint` and a message."""

    status_hint = 500


class Conflict(StateProxyError):
    """A conditional write found another status (or no record at all)."""

    status_hint = 409


class StoreUnavailable(StateProxyError):
    """PostgreSQL cannot serve the request now (down, restarting, connection lost, timed out).

    The statement may or may not have run when the connection broke mid-way; callers retry
    only reads.
    """

    status_hint = 503


class PgError(Exception):
    """An SQL error reported by PostgreSQL on a healthy connection.

    Attributes:
        sqlstate: the five-character SQLSTATE code (e.g. ``22P02``), or ``""`` when absent.
        message: the primary error message.
    """

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message


class StartupError(Exception):
    """The proxy could not start. `setting` names what is wrong: ``"socket"`` or ``"pg_url"``.

    The CLI prints it as one line naming the environment variable behind `setting`.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.message = message
