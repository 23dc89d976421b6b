"""The state-proxy protocol (docs/stateproxy.md), client side, as a codec and sans-IO procedures.

Builders return `StoreRequest` values (method, target with the key percent-encoded, headers,
body); readers turn a `StoreReply` (status, body) into results or raise: `StoreProtocolError`
(502) for replies the protocol does not allow, `ServiceError` (503) when the proxy reports
that its backend is unavailable.

The procedures are generators that yield requests and receive replies, so every runtime drives
the same logic and gets the same guarantees::

    proc = update_status(envelope_id, event, now)
    request = next(proc)
    while True:
        reply = await transport(request)
        try:
            request = proc.send(reply)
        except StopIteration as done:
            return done.value

`update_status` is the conditional update: read, decide with the status table, write with
`if_status=<the status read>&if_rev=<the revision read>`, and on 409 (someone else wrote first)
read again. Our state proxy honours both guards, so any concurrent write, status or data, makes
the loser re-read and decide again: no merged key is ever lost. A proxy without the revision
guard (the Go one ignores unknown parameters) still honours `if_status`, which keeps the status
monotonic. Whether a proxy guards revisions is what its health reply says
(`FEATURES_HEADER`, see `check_health`); only then may a runtime pass the envelope it last
wrote as `known`, which saves the read in the common case: a stale `known` only costs a 409 and
a read.

With a proxy that has the event bus (`EVENTS`), `update_status(..., publish=origin)` writes
the status change and publishes its event in one transaction (``PUT ?publish=1&origin=O`` with
body ``{"value": V, "event": E}``, reply ``{"seq": N}``): the `Applied` it returns carries the
event's `seq`, and no subscriber anywhere sees an event that was not stored. FLY events go
through `events_request` (``POST /events``), replays through `replay_request`.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import attrs

from ._envelope import KEY_PREFIX, Envelope, envelope_key
from ._errors import PayloadTooLarge, ProtocolError, ServiceError, StoreProtocolError
from ._json import dumps, loads
from ._requests import Cursor, ListQuery
from ._sse import Published
from ._status import TERMINAL, Applied, Outcome, Status, StatusEvent, apply_event
from ._time import format_time
from ._wire import (
    FEATURES_HEADER,
    IF_ABSENT,
    MAX_EVENTS,
    WRITES_TYPE,
    BusEvent,
    Query,
    encode_key,
    encode_writes,
    event_bytes,
    key_target,
)

# A conditional update loses a race only when another writer changed the envelope in between,
# and every lost race is progress for someone: with N writers racing on one envelope the last
# one wins by its N-th attempt. The bound is well above the writers one envelope sees at once.
MAX_ATTEMPTS: Final = 64
JSON_HEADERS: Final = (("content-type", "application/json"),)
WRITES_HEADERS: Final = (("content-type", WRITES_TYPE),)
LIVE_STATUSES: Final = tuple(s.value for s in Status if s not in TERMINAL)


@attrs.frozen(kw_only=True)
class StoreRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@attrs.frozen(kw_only=True)
class StoreReply:
    """A proxy's reply; `headers` (lower-case names) only where a reader needs them."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def health_request() -> StoreRequest:
    return StoreRequest(method="GET", target="/healthz")


def get_request(key: str) -> StoreRequest:
    return StoreRequest(method="GET", target=key_target(key))


def put_request(
    key: str,
    value: Any,
    *,
    if_status: str | None = None,
    if_rev: int | None = None,
    if_absent: bool = False,
) -> StoreRequest:
    """`PUT /keys/{key}`, optionally guarded by the stored status and/or revision, or written
    only if the key is absent (`if_absent`, our proxy's `IF_ABSENT`)."""
    params = {"if_status": if_status} if if_status is not None else {}
    if if_rev is not None:
        params["if_rev"] = str(if_rev)
    if if_absent:
        params[IF_ABSENT] = "1"
    return StoreRequest(
        method="PUT", target=key_target(key, **params), headers=JSON_HEADERS, body=dumps(value)
    )


def publish_put_request(
    key: str, value: Any, event: bytes, *, origin: str, if_status: str, if_rev: int
) -> StoreRequest:
    """The guarded `PUT /keys/{key}?publish=1&origin=O` that stores `value` and, only if it
    was written, publishes `event` (JSON bytes, `event_bytes`) in the same transaction."""
    params = {"if_status": if_status, "if_rev": str(if_rev), "publish": "1", "origin": origin}
    body = b'{"value":' + dumps(value) + b',"event":' + event + b"}"
    return StoreRequest(
        method="PUT", target=key_target(key, **params), headers=JSON_HEADERS, body=body
    )


def read_published(reply: StoreReply) -> int | None:
    """The `seq` of a publishing PUT, or None on 409 (nothing written, nothing published)."""
    if reply.status == 409:
        return None
    if reply.status != 200:
        raise _fail(reply, "put")
    seq = _field(reply, "seq")
    if type(seq) is not int:
        raise StoreProtocolError("state proxy publishing put reply has no seq")
    return seq


def writes_request(puts: Sequence[StoreRequest]) -> StoreRequest:
    """`POST /writes` (our proxy's `WRITES`): the PUTs `puts` in one request, each answered as
    it would have been alone (`read_writes`)."""
    body = encode_writes([(put.target, put.body) for put in puts])
    return StoreRequest(method="POST", target="/writes", headers=WRITES_HEADERS, body=body)


def read_writes(reply: StoreReply, count: int) -> list[StoreReply]:
    """The replies of the `count` PUTs of a `writes_request`, in order, as each PUT's own
    reply would have been (status, and the body as JSON bytes, or empty).

    Raises:
        ServiceError: the proxy could not take the request (503).
        StoreProtocolError: it answered outside the protocol.
    """
    if reply.status != 200:
        raise _fail(reply, "writes")
    results = _field(reply, "results")
    if not isinstance(results, list) or len(results) != count:
        raise StoreProtocolError(f"state proxy writes reply has no {count} results")
    replies = []
    for result in results:
        status = result.get("status") if isinstance(result, dict) else None
        if type(status) is not int:
            raise StoreProtocolError("state proxy writes reply has a result without a status")
        body = result.get("body")
        replies.append(StoreReply(status=status, body=b"" if body is None else dumps(body)))
    return replies


def events_request(origin: str, events: Sequence[tuple[str, bytes]]) -> StoreRequest:
    """`POST /events` of 1..`MAX_EVENTS` ``(key, event JSON bytes)`` from `origin`."""
    if not 0 < len(events) <= MAX_EVENTS:
        raise ValueError(f"POST /events takes 1 to {MAX_EVENTS} events, not {len(events)}")
    items = b",".join(b'{"key":' + dumps(k) + b',"event":' + e + b"}" for k, e in events)
    body = b'{"origin":' + dumps(origin) + b',"events":[' + items + b"]}"
    return StoreRequest(method="POST", target="/events", headers=JSON_HEADERS, body=body)


def read_seqs(reply: StoreReply, count: int) -> list[int]:
    """The `seqs` of a `POST /events` reply: one per event sent (`count`), in order."""
    if reply.status != 200:
        raise _fail(reply, "publish")
    seqs = _field(reply, "seqs")
    if not isinstance(seqs, list) or not all(type(seq) is int for seq in seqs):
        raise StoreProtocolError("state proxy publish reply has no seqs")
    if len(seqs) != count:
        raise StoreProtocolError(f"state proxy gave {len(seqs)} seqs for {count} events")
    return seqs


def _field(reply: StoreReply, name: str) -> Any:
    body = loads(reply.body, error=StoreProtocolError, what="store reply")
    return body.get(name) if isinstance(body, dict) else None


def replay_request(key: str, after: int) -> StoreRequest:
    """`GET /events/{key}?after=N`: the buffered events of `key` after seq `after`."""
    return StoreRequest(method="GET", target=f"/events/{encode_key(key)}?after={after}")


def read_replay(reply: StoreReply) -> tuple[list[BusEvent], bool]:
    """The records of a replay, oldest first, and whether some were pruned (a gap)."""
    if reply.status != 200:
        raise _fail(reply, "replay")
    body = loads(reply.body, error=StoreProtocolError, what="store reply")
    rows = body.get("events") if isinstance(body, dict) else None
    gap = body.get("gap") if isinstance(body, dict) else None
    if not isinstance(rows, list) or type(gap) is not bool:
        raise StoreProtocolError("state proxy replay reply is not {events, gap}")
    return [BusEvent.from_json(row) for row in rows], gap


def delete_request(key: str) -> StoreRequest:
    return StoreRequest(method="DELETE", target=key_target(key))


def query_request(
    *,
    prefix: str,
    filter: Mapping[str, Any] | None = None,
    sort: Sequence[str] = (),
    limit: int | None = None,
    offset: int = 0,
    count: bool = False,
) -> StoreRequest:
    """`POST /query` with the Mango-style filter of docs/stateproxy.md, as `Query` encodes it.

    Raises:
        BadRequest: the query breaks a rule the proxy enforces (see `Query`): a bug of the
            caller, since every query the mesh API makes is fixed in shape.
    """
    query = Query.build(
        prefix=prefix, filter=filter, sort=sort, limit=limit, offset=offset, count=count
    )
    return StoreRequest(method="POST", target="/query", headers=JSON_HEADERS, body=query.to_body())


def _fail(reply: StoreReply, what: str) -> ProtocolError:
    detail = reply.body[:200].decode("utf-8", "replace")
    if reply.status == 413:
        return PayloadTooLarge(f"envelope too large for the state proxy ({what}: 413)")
    if reply.status in (500, 502, 503, 504):
        return ServiceError(f"state proxy unavailable ({what}: {reply.status} {detail})".strip())
    return StoreProtocolError(f"unexpected state proxy reply to {what}: {reply.status} {detail}")


def check_health(reply: StoreReply) -> frozenset[str]:
    """The features the proxy advertises (empty for a plain Asya proxy such as the Go one).

    Raises:
        ServiceError, StoreProtocolError: the proxy is not healthy.
    """
    if reply.status != 200:
        raise _fail(reply, "health")
    listed = ",".join(value for name, value in reply.headers if name == FEATURES_HEADER)
    return frozenset(filter(None, (feature.strip() for feature in listed.split(","))))


def read_row(envelope_id: str, row: Any) -> Envelope:
    """An envelope from a `{"key","value","created_at","updated_at"}` row."""
    if not isinstance(row, dict):
        raise StoreProtocolError("state proxy row is not an object")
    try:
        return Envelope.from_value(
            envelope_id, row["value"], created_at=row["created_at"], updated_at=row["updated_at"]
        )
    except (KeyError, TypeError):
        raise StoreProtocolError(f"state proxy row for {envelope_id} is incomplete") from None


def read_envelope(envelope_id: str, reply: StoreReply) -> Envelope | None:
    """The envelope of a GET reply, or None on 404."""
    if reply.status == 404:
        return None
    if reply.status != 200:
        raise _fail(reply, "get")
    return read_row(envelope_id, loads(reply.body, error=StoreProtocolError, what="store reply"))


def check_write(reply: StoreReply) -> bool:
    """True when a PUT was applied, False on 409 (condition failed or key missing)."""
    if reply.status in (200, 201, 204):
        return True
    if reply.status == 409:
        return False
    raise _fail(reply, "put")


def check_delete(reply: StoreReply) -> bool:
    """True when a key was deleted, False when it did not exist."""
    if reply.status in (200, 204):
        return True
    if reply.status == 404:
        return False
    raise _fail(reply, "delete")


def read_rows(reply: StoreReply) -> tuple[list[Envelope], int | None]:
    """Envelopes and `total` from a `/query` reply."""
    if reply.status != 200:
        raise _fail(reply, "query")
    body = loads(reply.body, error=StoreProtocolError, what="store reply")
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise StoreProtocolError("state proxy query reply has no rows")
    envelopes = []
    for row in rows:
        key = row.get("key") if isinstance(row, dict) else None
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            raise StoreProtocolError("state proxy query row has no envelope key")
        envelopes.append(read_row(key[len(KEY_PREFIX) :], row))
    total = body.get("total")
    return envelopes, total if type(total) is int else None


def purge_request(cutoff: datetime, limit: int) -> StoreRequest:
    """`POST /delete` of the retention sweep: up to `limit` terminal envelopes whose
    `updated_at` is before `cutoff` (`DELETE_QUERY` in the proxy's features).

    Unsorted on purpose: the proxy then deletes whichever match it finds first, which its
    planner serves by the `updated_at` index or a scan that stops after `limit` matches."""
    terminal = sorted(s.value for s in TERMINAL)
    return delete_query_request(
        prefix=KEY_PREFIX,
        filter={"status": {"$in": terminal}, "updated_at": {"$lt": format_time(cutoff)}},
        limit=limit,
    )


def delete_query_request(*, prefix: str, filter: Mapping[str, Any], limit: int) -> StoreRequest:
    """`POST /delete` of up to `limit` records under `prefix` that match `filter`.

    Raises:
        BadRequest: as `query_request`.
    """
    query = Query.build(prefix=prefix, filter=filter, limit=limit)
    return StoreRequest(method="POST", target="/delete", headers=JSON_HEADERS, body=query.to_body())


def read_deleted(reply: StoreReply) -> int:
    """How many records a `POST /delete` removed (``{"deleted": N}``)."""
    if reply.status != 200:
        raise _fail(reply, "delete query")
    body = loads(reply.body, error=StoreProtocolError, what="store reply")
    deleted = body.get("deleted") if isinstance(body, dict) else None
    if type(deleted) is not int or deleted < 0:
        raise StoreProtocolError("state proxy delete reply has no count")
    return deleted


def create_envelope(envelope: Envelope) -> Generator[StoreRequest, StoreReply, None]:
    """Store a new envelope (an unconditional PUT).

    Raises:
        ServiceError: the state proxy is unavailable.
        StoreProtocolError: it refused the write or answered outside the protocol.
    """
    reply = yield put_request(envelope_key(envelope.id), envelope.to_value())
    if not check_write(reply):
        raise StoreProtocolError("state proxy refused an unconditional put")


def update_status(
    envelope_id: str,
    event: StatusEvent,
    now: datetime,
    *,
    known: Envelope | None = None,
    publish: str | None = None,
) -> Generator[StoreRequest, StoreReply, Outcome | None]:
    """The conditional update. Returns the outcome, or None if the envelope does not exist.

    Args:
        known: the envelope as this runtime last wrote or read it, used instead of a first
            read. Only for a proxy with the revision guard (`REV_GUARD`): without it a stale
            `known` could overwrite merged data. An event that `known` would ignore is decided
            again on a fresh read, so an `Ignored` outcome always carries the stored envelope.

    Raises:
        ServiceError: the state proxy is unavailable, or MAX_ATTEMPTS writes in a row lost
            their race (the envelope is changing too fast).
        StoreProtocolError: the state proxy answered outside the protocol.
    """
    key = envelope_key(envelope_id)
    envelope = known
    for _ in range(MAX_ATTEMPTS):
        read = envelope is None
        if envelope is None:
            envelope = read_envelope(envelope_id, (yield get_request(key)))
            if envelope is None:
                return None
        outcome = apply_event(envelope, event, now)
        if isinstance(outcome, Applied) and publish is not None:
            published = Published.status(outcome)
            request = publish_put_request(
                key,
                outcome.envelope.to_value(),
                event_bytes(published),
                origin=publish,
                if_status=envelope.status,
                if_rev=envelope.revision,
            )
            seq = read_published((yield request))
            if seq is not None:
                stored = Applied(
                    rule=outcome.rule, envelope=outcome.envelope, event=outcome.event, seq=seq
                )
                stored.remember(published.with_seq(seq))  # framed once, for the bus and here
                return stored
        elif isinstance(outcome, Applied):
            reply = yield put_request(
                key,
                outcome.envelope.to_value(),
                if_status=envelope.status,
                if_rev=envelope.revision,
            )
            if check_write(reply):
                return outcome
        elif read:
            return outcome
        envelope = None
    raise ServiceError(f"envelope {envelope_id} is changing too fast: update not applied")


def list_filter(query: ListQuery) -> dict[str, Any]:
    """The Mango filter of a list query's filters (not its cursor)."""
    selector: dict[str, Any] = {}
    if query.actor is not None:
        selector["actor"] = query.actor
    if len(query.statuses) == 1:
        selector["status"] = query.statuses[0].value  # containment: the GIN index
    elif query.statuses:
        selector["status"] = {"$in": [s.value for s in query.statuses]}
    # ISO 8601 with an offset, as the query model keeps column bounds (any year, four digits).
    created: dict[str, str] = {}
    if query.created_after is not None:
        created["$gt"] = query.created_after.isoformat()
    if query.created_before is not None:
        created["$lt"] = query.created_before.isoformat()
    if created:
        selector["created_at"] = created
    return selector


def list_request(query: ListQuery, *, extra: int = 0) -> StoreRequest:
    """The page query behind `GET /mesh/`: newest first, ties by id.

    Without a cursor it asks for the full count too. With one, the proxy cannot say
    "(created_at, key) before (t, k)" in one filter, so the query asks for rows at or before
    `t`, `extra` more than the page, and `list_envelopes` drops the ones at `t` the previous
    page already held.
    """
    selector = list_filter(query)
    if query.cursor is not None:
        bounds = {**selector.get("created_at", {}), "$lte": query.cursor.created_at.isoformat()}
        selector["created_at"] = bounds
    return query_request(
        prefix=KEY_PREFIX,
        filter=selector or None,
        sort=("-created_at", "-key"),
        limit=query.limit + extra,
        offset=query.offset,
        count=query.cursor is None,
    )


def list_envelopes(
    query: ListQuery,
) -> Generator[StoreRequest, StoreReply, tuple[list[Envelope], int]]:
    """A page of envelopes and the count of all that match the filters (see `list_request`).

    Raises:
        ServiceError: the state proxy is unavailable.
        StoreProtocolError: it answered outside the protocol.
    """
    cursor = query.cursor
    if cursor is None:
        envelopes, total = read_rows((yield list_request(query)))
        return envelopes, total if total is not None else query.offset + len(envelopes)
    extra = 1
    while True:
        rows, _ = read_rows((yield list_request(query, extra=extra)))
        page = _after(rows, cursor)
        if len(page) >= query.limit or len(rows) < query.limit + extra:
            break
        extra *= 2  # more rows share the cursor's instant than this page made room for
    selector = list_filter(query) or None
    counted = query_request(prefix=KEY_PREFIX, filter=selector, limit=1, count=True)
    _, total = read_rows((yield counted))
    return page[: query.limit], total if total is not None else len(page)


def _after(rows: list[Envelope], cursor: Cursor) -> list[Envelope]:
    """`rows` (newest first, none after the cursor's instant) past the cursor's row.

    The rows at the cursor's instant come first, in the proxy's key order: the ones up to the
    cursor's row were on earlier pages. (Should that row be gone, ids compare as strings.)
    """
    tied = 0
    while tied < len(rows) and rows[tied].created_at == cursor.created_at:
        tied += 1
    ids = [e.id for e in rows[:tied]]
    if cursor.id in ids:
        return rows[ids.index(cursor.id) + 1 :]
    return [e for e in rows[:tied] if e.id < cursor.id] + rows[tied:]


def expired_request(now: datetime, limit: int) -> StoreRequest:
    """The query of the backstop: live envelopes whose deadline has passed."""
    return query_request(
        prefix=KEY_PREFIX,
        filter={"deadline_at": {"$lte": format_time(now)}, "status": {"$in": list(LIVE_STATUSES)}},
        sort=("deadline_at",),
        limit=limit,
    )
