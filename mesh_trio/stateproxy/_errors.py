# The failures of the state proxy, each carrying the HTTP status it answers with.
#
# Request handling raises a `StateProxyError` subclass and the router turns it into
# `{"error": message}` with `status_hint`, without a lookup table. Client mistakes (4xx) and an
# unavailable database (503) are kept apart from our own bugs: anything else that escapes a
# handler is a 500 plus a log line. `PgError` is what the driver raises for an SQL error; the
# store decides whether that is the client's fault (bad JSON, value too large) or ours.

from __future__ import annotations

from typing import ClassVar


class StateProxyError(Exception):
    """Base of the errors that carry their reply: `status_hint` and a one-line message."""

    status_hint: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(StateProxyError):
    """The request is malformed: bad JSON, bad field name, bad key, bad parameter."""

    status_hint = 400


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
