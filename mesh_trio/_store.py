"""The store seam, and the embedded stores (memory, SQLite file).

`Store` is what the mesh operations use. Every implementation applies status events through
`mesh_proto.apply_event`, never deciding on its own. The embedded stores run inside the trio
thread with no await between reading and writing an envelope, so each update is atomic without
locks; the state-proxy store (`_proxy_store.py`) gets the same guarantee from the proxy's
conditional PUT. `tests/test_store.py` runs one suite against every implementation.

Store failures raise `mesh_proto.ServiceError` (503 to the client), never anything else.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import ClassVar, Protocol

import attrs

from mesh_proto import (
    TERMINAL,
    Applied,
    Claim,
    Envelope,
    ListQuery,
    Outcome,
    ServiceError,
    Status,
    StatusEvent,
    apply_event,
    dumps,
    format_time,
    is_expired,
)


class Store(Protocol):
    async def ping(self) -> None:
        """Return when the store answers; raise `ServiceError` when it does not."""

    async def create(self, envelope: Envelope) -> None:
        """Store a new envelope."""

    async def get(self, envelope_id: str) -> Envelope | None:
        """The stored envelope, or None."""

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        """Apply a status event atomically under the status rules; None if there is no such id."""

    async def delete(self, envelope_id: str) -> bool:
        """Remove an envelope; False if there was none."""

    async def list(self, query: ListQuery) -> tuple[Sequence[Envelope], int]:
        """A page of at most `query.limit` envelopes that match its filters, newest first (ties
        by id, descending), strictly after its cursor or past its offset; and the count of all
        that match the filters (not the cursor)."""

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        """Up to `limit` live envelopes whose deadline is at or before `now`."""

    async def claim(self, key: str, claim: Claim, now: datetime) -> Claim | None:
        """Store `claim` at `key` (a `mesh_proto.claim_key`) atomically if no live claim is
        there (none, or one expired at `now`, which is replaced); else return the live one.

        Raises:
            IdempotencyUnsupported: the store cannot claim atomically (a state proxy without
                `IF_ABSENT`).
        """

    async def release(self, key: str) -> None:
        """Forget the claim at `key` (nothing if there is none)."""


def never_waits(component: object) -> bool:
    """Whether a store or dispatcher declares (`never_waits = True`) that none of its calls
    suspends: the embedded ones, which work in this process and cannot be cancelled midway.
    """
    return getattr(component, "never_waits", False) is True


# At most this many expired claims are dropped by each new claim (a bound on its cost; more
# than one, so that they go faster than they come).
_CLAIMS_DROPPED = 8


def _newest_first(envelope: Envelope) -> tuple[datetime, str]:
    return (envelope.created_at, envelope.id)


@attrs.define(eq=False)
class MemoryStore:
    """Envelopes in a dict, with sorted indexes so that no operation scans them all.

    `_order` holds every envelope's `(created_at, id)` in ascending order, and `_by_status` the
    same per status, so a newest-first page is a slice from the end (a status change moves one
    entry between two lists). Live envelopes with a deadline are kept apart for the backstop,
    and terminal ones in `_ended` by `(updated_at, id)`, oldest first, for the retention sweep.
    """

    _envelopes: dict[str, Envelope] = attrs.field(factory=dict)
    _deadlines: dict[str, Envelope] = attrs.field(factory=dict)
    _claims: dict[str, Claim] = attrs.field(factory=dict)
    _order: list[tuple[datetime, str]] = attrs.field(factory=list)
    _by_status: dict[Status, list[tuple[datetime, str]]] = attrs.field(
        factory=lambda: {status: [] for status in Status}
    )
    _ended: list[tuple[datetime, str]] = attrs.field(factory=list)
    # No call ever suspends (`never_waits`).
    never_waits: ClassVar[bool] = True

    async def ping(self) -> None:
        return None

    def _put(self, envelope: Envelope) -> None:
        old = self._envelopes.get(envelope.id)
        self._envelopes[envelope.id] = envelope
        position = _newest_first(envelope)
        if old is None:
            bisect.insort(self._order, position)
            bisect.insort(self._by_status[envelope.status], position)
        elif old.status is not envelope.status:
            _remove(self._by_status[old.status], position)
            bisect.insort(self._by_status[envelope.status], position)
        if envelope.deadline_at is not None and not envelope.terminal:
            self._deadlines[envelope.id] = envelope
        else:
            self._deadlines.pop(envelope.id, None)
        if old is not None and old.terminal:
            _remove(self._ended, (old.updated_at, old.id))
        if envelope.terminal:
            bisect.insort(self._ended, (envelope.updated_at, envelope.id))

    async def create(self, envelope: Envelope) -> None:
        self._put(envelope)

    async def get(self, envelope_id: str) -> Envelope | None:
        return self._envelopes.get(envelope_id)

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        envelope = self._envelopes.get(envelope_id)
        if envelope is None:
            return None
        outcome = apply_event(envelope, event, now)
        if isinstance(outcome, Applied):
            self._put(outcome.envelope)
        return outcome

    async def delete(self, envelope_id: str) -> bool:
        self._deadlines.pop(envelope_id, None)
        envelope = self._envelopes.pop(envelope_id, None)
        if envelope is None:
            return False
        _remove(self._order, _newest_first(envelope))
        _remove(self._by_status[envelope.status], _newest_first(envelope))
        if envelope.terminal:
            _remove(self._ended, (envelope.updated_at, envelope.id))
        return True

    async def purge(self, cutoff: datetime, limit: int) -> int:
        """Delete up to `limit` terminal envelopes last updated before `cutoff`, oldest first."""
        doomed = self._ended[: min(bisect.bisect_left(self._ended, (cutoff, "")), limit)]
        for _, envelope_id in doomed:
            await self.delete(envelope_id)
        return len(doomed)

    async def list(self, query: ListQuery) -> tuple[Sequence[Envelope], int]:
        # One sorted index per status asked for (or all of them), cut to the time bounds by
        # bisection; only an actor filter or several statuses make it walk entries.
        orders = [self._by_status[s] for s in query.statuses] or [self._order]
        low = (query.created_after, _LAST_ID) if query.created_after is not None else None
        high = (query.created_before, "") if query.created_before is not None else None
        spans = [_span(order, low, high) for order in orders]
        actor = query.actor
        if actor is None:
            total = sum(end - start for _, start, end in spans)
        else:
            total = sum(
                self._envelopes[key].data.get("actor") == actor
                for order, start, end in spans
                for _, key in order[start:end]
            )
        cursor = query.cursor
        if cursor is not None:
            after = (cursor.created_at, cursor.id)
            spans = [(o, start, min(end, bisect.bisect_left(o, after))) for o, start, end in spans]
        if len(spans) == 1 and actor is None:
            order, start, end = spans[0]
            end = max(end - query.offset, start)
            page = order[max(end - query.limit, start) : end]
            return [self._envelopes[key] for _, key in reversed(page)], total
        newest = heapq.merge(*(_backwards(*span) for span in spans), reverse=True)
        matching = (
            self._envelopes[key]
            for _, key in newest
            if actor is None or self._envelopes[key].data.get("actor") == actor
        )
        end = query.offset + query.limit
        return list(itertools.islice(matching, query.offset, end)), total

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        return [e for e in self._deadlines.values() if is_expired(e, now)][:limit]

    async def claim(self, key: str, claim: Claim, now: datetime) -> Claim | None:
        stored = self._claims.get(key)
        if stored is not None and not stored.expired(now):
            return stored
        # Claims sit in the order they were made, which (one TTL per process) is the order
        # they expire in: each claim drops the expired ones at the front, so none pile up.
        self._claims.pop(key, None)
        for oldest in list(itertools.islice(self._claims, _CLAIMS_DROPPED)):
            if not self._claims[oldest].expired(now):
                break
            del self._claims[oldest]
        self._claims[key] = claim
        return None

    async def release(self, key: str) -> None:
        self._claims.pop(key, None)


# Above every id at one instant, so that `(t, _LAST_ID)` bisects just past the entries at `t`.
_LAST_ID = "\U0010ffff"


def _span(
    order: list[tuple[datetime, str]],
    low: tuple[datetime, str] | None,
    high: tuple[datetime, str] | None,
) -> tuple[list[tuple[datetime, str]], int, int]:
    start = bisect.bisect_right(order, low) if low is not None else 0
    end = bisect.bisect_left(order, high) if high is not None else len(order)
    return order, start, max(start, end)


def _backwards(
    order: list[tuple[datetime, str]], start: int, end: int
) -> Iterator[tuple[datetime, str]]:
    return (order[i] for i in range(end - 1, start - 1, -1))


def _remove(order: list[tuple[datetime, str]], position: tuple[datetime, str]) -> None:
    index = bisect.bisect_left(order, position)
    if index < len(order) and order[index] == position:
        del order[index]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    deadline_at TEXT
);
CREATE INDEX IF NOT EXISTS envelopes_created ON envelopes (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS envelopes_status ON envelopes (status, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS envelopes_live_deadline ON envelopes (deadline_at)
    WHERE deadline_at IS NOT NULL AND status NOT IN ('succeeded', 'failed', 'canceled');
CREATE INDEX IF NOT EXISTS envelopes_ended ON envelopes (updated_at)
    WHERE status IN ('succeeded', 'failed', 'canceled');
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_expires ON claims (expires_at);
"""


# The retention sweep's batch. The statuses are spelled out as in the partial index's predicate,
# which SQLite needs to use it; INDEXED BY holds the planner to it even before any ANALYZE (on
# an empty file it would pick `envelopes_status` and sort every terminal envelope).
PURGE = (
    "DELETE FROM envelopes WHERE id IN (SELECT id FROM envelopes INDEXED BY envelopes_ended"
    " WHERE status IN ('succeeded', 'failed', 'canceled') AND updated_at < ?"
    " ORDER BY updated_at LIMIT ?)"
)


@attrs.define(eq=False)
class SqliteStore:
    """Envelopes in a SQLite file, so an embedded run survives a restart.

    Calls run inline in the trio thread: a local WAL-mode SQLite statement takes microseconds,
    and not awaiting between the read and the write of an update keeps it atomic.
    """

    _db: sqlite3.Connection

    @classmethod
    def open(cls, path: str) -> SqliteStore:
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ServiceError(f"cannot open SQLite store {path!r}: {exc}") from None
        return cls(db)

    def close(self) -> None:
        self._db.close()

    def _row(self, row: tuple[str, str, str, str]) -> Envelope:
        envelope_id, value, created_at, updated_at = row
        return Envelope.from_value(
            envelope_id, json.loads(value), created_at=created_at, updated_at=updated_at
        )

    def _write(self, envelope: Envelope, *, replace: bool) -> None:
        deadline = envelope.deadline_at
        self._db.execute(
            ("INSERT OR REPLACE" if replace else "INSERT")
            + " INTO envelopes VALUES (?, ?, ?, ?, ?, ?)",
            (
                envelope.id,
                str(envelope.status),
                dumps(envelope.to_value()).decode(),
                format_time(envelope.created_at),
                format_time(envelope.updated_at),
                format_time(deadline) if deadline is not None else None,
            ),
        )

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise ServiceError(f"SQLite store unavailable: {exc}") from None

    async def create(self, envelope: Envelope) -> None:
        self._write(envelope, replace=False)

    async def get(self, envelope_id: str) -> Envelope | None:
        row = self._db.execute(
            "SELECT id, value, created_at, updated_at FROM envelopes WHERE id = ?", (envelope_id,)
        ).fetchone()
        return None if row is None else self._row(row)

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        envelope = await self.get(envelope_id)
        if envelope is None:
            return None
        outcome = apply_event(envelope, event, now)
        if isinstance(outcome, Applied):
            self._write(outcome.envelope, replace=True)
        return outcome

    async def delete(self, envelope_id: str) -> bool:
        cursor = self._db.execute("DELETE FROM envelopes WHERE id = ?", (envelope_id,))
        return cursor.rowcount > 0

    async def list(self, query: ListQuery) -> tuple[Sequence[Envelope], int]:
        # Timestamps are stored in one fixed format, so they compare as text.
        clauses: list[str] = []
        args: list[str] = []
        if query.actor is not None:
            clauses.append("json_extract(value, '$.actor') = ?")
            args.append(query.actor)
        if query.statuses:
            clauses.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            args.extend(s.value for s in query.statuses)
        if query.created_after is not None:
            clauses.append("created_at > ?")
            args.append(format_time(query.created_after))
        if query.created_before is not None:
            clauses.append("created_at < ?")
            args.append(format_time(query.created_before))
        where = "WHERE " + " AND ".join(clauses) if clauses else ""
        (total,) = self._db.execute(f"SELECT count(*) FROM envelopes {where}", args).fetchone()
        page_args = list(args)
        if query.cursor is not None:
            where += (" AND " if clauses else "WHERE ") + "(created_at, id) < (?, ?)"
            page_args.extend((format_time(query.cursor.created_at), query.cursor.id))
        rows = self._db.execute(
            f"SELECT id, value, created_at, updated_at FROM envelopes {where} "
            "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            (*page_args, query.limit, query.offset),
        ).fetchall()
        return [self._row(r) for r in rows], total

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        rows = self._db.execute(
            "SELECT id, value, created_at, updated_at FROM envelopes WHERE deadline_at IS NOT NULL"
            " AND status NOT IN (?, ?, ?) AND deadline_at <= ? ORDER BY deadline_at LIMIT ?",
            (*sorted(str(s) for s in TERMINAL), format_time(now), limit),
        ).fetchall()
        return [self._row(r) for r in rows]

    async def purge(self, cutoff: datetime, limit: int) -> int:
        """Delete up to `limit` terminal envelopes last updated before `cutoff`, oldest first."""
        return self._db.execute(PURGE, (format_time(cutoff), limit)).rowcount

    async def claim(self, key: str, claim: Claim, now: datetime) -> Claim | None:
        # One statement: inserted, or replacing an expired claim, or (rowcount 0) left alone;
        # atomic across processes sharing the file too.
        cursor = self._db.execute(
            "INSERT INTO claims VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
            " SET value = excluded.value, expires_at = excluded.expires_at"
            " WHERE claims.expires_at <= ?",
            (
                key,
                dumps(claim.to_value()).decode(),
                format_time(claim.expires_at),
                format_time(now),
            ),
        )
        if cursor.rowcount == 1:
            await self.purge_claims(now, _CLAIMS_DROPPED)  # so that none pile up
            return None
        (value,) = self._db.execute("SELECT value FROM claims WHERE key = ?", (key,)).fetchone()
        return Claim.from_value(json.loads(value))

    async def release(self, key: str) -> None:
        self._db.execute("DELETE FROM claims WHERE key = ?", (key,))

    async def purge_claims(self, now: datetime, limit: int) -> int:
        """Delete up to `limit` claims expired at `now` (by the `expires_at` index)."""
        return self._db.execute(
            "DELETE FROM claims WHERE key IN"
            " (SELECT key FROM claims WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
            (format_time(now), limit),
        ).rowcount


@asynccontextmanager
async def open_embedded_store(spec: str) -> AsyncIterator[Store]:
    """`memory` or `sqlite:PATH` (the `ASYA_MESH_STORE` setting)."""
    if spec == "memory":
        yield MemoryStore()
        return
    store = SqliteStore.open(spec.removeprefix("sqlite:"))
    try:
        yield store
    finally:
        store.close()
