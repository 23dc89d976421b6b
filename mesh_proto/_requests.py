"""Parsing and validation of untrusted request input.

Each parser takes raw values (query string, body bytes) and either returns a typed, frozen
input or raises `ClientError` (a `BadRequest`, `NotFound` or `PayloadTooLarge`) carrying the
reply. Nothing else escapes: a property test feeds them arbitrary bytes to prove it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qsl

import attrs

from ._envelope import Envelope
from ._errors import BadRequest, NotFound, PayloadTooLarge
from ._json import MAX_DEPTH, loads
from ._status import ALIASES, Status, StatusEvent

MAX_BODY: Final = 10 * 1024 * 1024
MAX_TIMEOUT: Final = 10 * 365 * 24 * 3600.0
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
MAX_WAIT: Final = 60.0
# 17 digits of microseconds reach the year 5138, within what `datetime` holds.
CURSOR_PATTERN: Final = (
    r"([0-9]{1,17})\.([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
_CURSOR: Final = re.compile(CURSOR_PATTERN)
# RFC 3339 with a `T` and a zone, as `datetime.fromisoformat` reads it (an offset may carry
# seconds); the OpenAPI document says the same pattern.
TIMESTAMP_PATTERN: Final = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)"
)
_TIMESTAMP: Final = re.compile(TIMESTAMP_PATTERN)
_CANONICAL_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
FORBIDDEN_KEYS: Final = ("route", "route_next", "next")
# Actor and namespace names become part of a queue name (`asya-{namespace}-{actor}`), so they
# are held to what RabbitMQ, SQS and Kubernetes all accept.
_NAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")


def parse_query(query: str | bytes) -> dict[str, str]:
    """A query string as a dict (the last of repeated keys wins).

    Raw bytes are UTF-8 like the percent-encoded ones, so `é` and `%C3%A9` read the same.

    Raises:
        BadRequest: the query is not UTF-8, raw or percent-encoded.
    """
    try:
        if isinstance(query, bytes):
            query = query.decode("utf-8")
        if "%" in query or "+" in query:
            return dict(parse_qsl(query, keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("invalid query string") from None
    # Nothing to unquote (the usual `actor=A`): `parse_qsl`'s answer, without its cost.
    pairs: dict[str, str] = {}
    for piece in query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            pairs[name] = value
    return pairs


def check_body_size(size: int) -> None:
    """Raise `PayloadTooLarge` if a body of `size` bytes is over the 10 MiB limit."""
    if size > MAX_BODY:
        raise PayloadTooLarge(f"body larger than {MAX_BODY} bytes")


def parse_id(raw: str) -> str:
    """An envelope id from a path: a UUID in canonical form, else `NotFound`.

    Ids are minted by the mesh API as UUID4s, so anything else cannot name an envelope. The
    canonical form (what `str(uuid.UUID(...))` gives) is lowercase hex in 8-4-4-4-12 groups.
    """
    if _CANONICAL_ID.fullmatch(raw) is None:
        raise NotFound("envelope not found")
    return raw


def _name(value: str | None, what: str) -> str:
    if not value:
        raise BadRequest(f"missing {what}")
    if not _NAME.fullmatch(value):
        raise BadRequest(
            f"invalid {what} {value[:80]!r}: use letters, digits, '-', '_' or '.', "
            "at most 63 characters"
        )
    return value


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    check_body_size(len(body))
    if not body.strip():
        return {}
    value = loads(body, what=what, max_depth=MAX_DEPTH)
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


@attrs.frozen(kw_only=True)
class CreateRequest:
    """`POST {prefix}/mesh/?actor=A[&namespace=N]` with `{"payload", "headers", "timeout"}`."""

    actor: str
    namespace: str | None = None
    payload: Any = None
    headers: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: float = 0.0

    @classmethod
    def parse(cls, query: str | bytes, body: bytes) -> CreateRequest:
        """Validate a create request.

        Raises:
            BadRequest: missing/invalid actor or namespace, invalid JSON, a body nested deeper
                than `MAX_DEPTH` levels, a body that is not an object, `headers` not an object,
                `timeout` not a non-negative number, or a routing key (`route`, `route_next`,
                `next`) in the body.
            PayloadTooLarge: body over 10 MiB.
        """
        params = parse_query(query)
        actor = _name(params.get("actor"), "actor")
        namespace = params.get("namespace")
        if namespace is not None:
            namespace = _name(namespace, "namespace")
        fields = _json_object(body, "body")
        for key in FORBIDDEN_KEYS:
            if key in fields:
                raise BadRequest(f"field {key!r} is not allowed: the route is the mesh's to set")
        headers = fields.get("headers", {})
        if headers is None:
            headers = {}
        if not isinstance(headers, dict):
            raise BadRequest("headers must be a JSON object")
        timeout = fields.get("timeout", 0)
        if timeout is None:
            timeout = 0
        # Compared, never converted, until bounded: `float()` of a 400-digit integer overflows.
        # (JSON input holds no NaN or infinity: `loads` rejects them.)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise BadRequest("timeout must be a non-negative number of seconds")
        if timeout > MAX_TIMEOUT:
            raise BadRequest(f"timeout must be at most {MAX_TIMEOUT:.0f} seconds")
        return cls(
            actor=actor,
            namespace=namespace,
            payload=fields.get("payload"),
            headers=headers,
            timeout=float(timeout),
        )


@attrs.frozen(kw_only=True)
class Cursor:
    """Where a keyset page ends: the last row's `(created_at, id)`.

    On the wire an opaque token, ``<microseconds since 1970>.<id>`` (`CURSOR_PATTERN`): every
    string of that shape is a valid cursor, so the OpenAPI pattern says exactly what parses.
    The next page holds the rows strictly after it in the newest-first order.
    """

    created_at: datetime
    id: str

    def encode(self) -> str:
        return f"{(self.created_at - _EPOCH) // _MICROSECOND}.{self.id}"

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor of a token made by `encode`.

        Raises:
            BadRequest: anything else.
        """
        match = _CURSOR.fullmatch(token)
        if match is None:
            raise BadRequest("invalid cursor")
        micros, envelope_id = match.groups()
        return cls(created_at=_EPOCH + int(micros) * _MICROSECOND, id=envelope_id)


@attrs.frozen(kw_only=True)
class ListQuery:
    """`GET {prefix}/mesh/?actor=&status=&created_after=&created_before=&cursor=&limit=&offset=`.

    Every filter narrows the list (and its `total`); `statuses` matches any of them;
    `created_after` / `created_before` are exclusive bounds; `cursor` continues after a row.
    """

    actor: str | None = None
    statuses: tuple[Status, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    cursor: Cursor | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def parse(cls, query: str | bytes) -> ListQuery:
        """Validate list parameters.

        Raises:
            BadRequest: an invalid actor name, an unknown status among the comma-separated
                `status` (names are exact and lower-case), a `created_after` / `created_before`
                that is not an RFC 3339 timestamp with a time zone, a malformed `cursor`, a
                `cursor` with an `offset` above 0, `limit` outside 1..1000, or a negative or
                non-integer `offset`.
        """
        params = parse_query(query)
        actor = _name(params["actor"], "actor") if "actor" in params else None
        statuses: list[Status] = []
        for name in params["status"].split(",") if "status" in params else ():
            try:
                status = Status(name)
            except ValueError:
                raise BadRequest(
                    f"invalid status {name[:40]!r}: one of " + ", ".join(s.value for s in Status)
                ) from None
            if status not in statuses:
                statuses.append(status)
        cursor = Cursor.decode(params["cursor"]) if "cursor" in params else None
        limit = _integer(params.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _integer(params.get("offset"), "offset", 0, 0, None)
        if cursor is not None and offset:
            raise BadRequest("cursor and offset cannot be used together")
        return cls(
            actor=actor,
            statuses=tuple(sorted(statuses, key=lambda s: s.value)),
            created_after=_moment(params.get("created_after"), "created_after"),
            created_before=_moment(params.get("created_before"), "created_before"),
            cursor=cursor,
            limit=limit,
            offset=offset,
        )

    def matches(self, envelope: Envelope) -> bool:
        """Whether `envelope` passes the filters (not the cursor): what `total` counts."""
        return (
            (self.actor is None or envelope.data.get("actor") == self.actor)
            and (not self.statuses or envelope.status in self.statuses)
            and (self.created_after is None or envelope.created_at > self.created_after)
            and (self.created_before is None or envelope.created_at < self.created_before)
        )

    def next_cursor(self, rows: Sequence[Envelope]) -> str | None:
        """The token continuing after this page, given the rows a store returned for a query
        one longer than `limit` (so that a full last page needs no extra request); None when
        there is nothing after it."""
        if len(rows) <= self.limit:
            return None
        last = rows[self.limit - 1]
        return Cursor(created_at=last.created_at, id=last.id).encode()


def parse_wait(query: str | bytes) -> float:
    """The `wait=S` of `GET {prefix}/mesh/{id}`: seconds to hold the reply until the envelope
    is terminal, 0.0 when absent or 0 (answer at once).

    Raises:
        BadRequest: not a decimal number of seconds from 0 to `MAX_WAIT`.
    """
    if not query:
        return 0.0  # a sidecar's heartbeat: no query to parse
    raw = parse_query(query).get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = float(raw) if len(raw) <= 40 else math.nan
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_WAIT:  # NaN included
        raise BadRequest(f"wait must be a number of seconds from 0 to {MAX_WAIT:.0f}")
    return seconds


def _moment(raw: str | None, what: str) -> datetime | None:
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw) if _TIMESTAMP.fullmatch(raw) else None
    except ValueError:  # no such day or time
        moment = None
    if moment is None:
        raise BadRequest(f"{what} must be an RFC 3339 timestamp with a time zone")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # within a day of the first or the last representable instant
        return (datetime.min if moment.year == 1 else datetime.max).replace(tzinfo=UTC)


def _integer(raw: str | None, what: str, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadRequest(f"{what} must be an integer")
    value = int(raw)
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{what} must be {bound}")
    return value


@attrs.frozen(kw_only=True)
class FlyEvent:
    """An ephemeral event (a streamed token, ...): published, never stored. `data` is any JSON."""

    data: Any = None


def parse_event(body: bytes) -> StatusEvent | FlyEvent:
    """Parse an internal-port event body.

    `{"type": "status", "status": S, "data": {...}}` becomes a normalised `StatusEvent`:
    sidecar aliases (`received`, `processing`, `completed`) mean `running`; a route in `data`
    (`prev`/`next` arrays) without `progress_percent` yields
    `(len(prev)+1) / (len(prev)+1+len(next)) * 100` (omitted for a one-actor route); and
    `progress == 1.0` means `progress_percent = 100`. `{"type": "fly", "data": any}` becomes a
    `FlyEvent`.

    Raises:
        BadRequest: invalid JSON, nested deeper than `MAX_DEPTH` levels, not an object, unknown
            `type` or `status`, status `data` present but not an object.
        PayloadTooLarge: body over 10 MiB.
    """
    fields = _json_object(body, "event")
    kind = fields.get("type")
    if kind == "fly":
        return FlyEvent(data=fields.get("data"))
    if kind != "status":
        raise BadRequest("event type must be 'status' or 'fly'")
    raw_status = fields.get("status")
    status = _event_status(raw_status)
    data = fields.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest("status event data must be a JSON object")
    return StatusEvent(status=status, data=_with_progress(data))


_EVENT_STATUSES: Final[dict[str, Status]] = {**{s.value: s for s in Status}, **ALIASES}


def _event_status(raw: Any) -> Status:
    status = _EVENT_STATUSES.get(raw) if isinstance(raw, str) else None
    if status is not None:
        return status
    names = [s.value for s in Status] + list(ALIASES)
    raise BadRequest("status must be one of " + ", ".join(names))


def _with_progress(data: dict[str, Any]) -> dict[str, Any]:
    if "progress_percent" in data:
        return data
    if data.get("progress") == 1.0 and not isinstance(data.get("progress"), bool):
        return {**data, "progress_percent": 100}
    prev, nxt = data.get("prev"), data.get("next")
    if isinstance(prev, list) and isinstance(nxt, list):
        hops = len(prev) + 1 + len(nxt)
        if hops > 1:
            return {**data, "progress_percent": (len(prev) + 1) / hops * 100}
    return data
