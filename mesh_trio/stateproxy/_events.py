# The event bus (feature `events`): publish, watch and replay over PostgreSQL (docs/stateproxy.md).
#
# Storage is the replay buffer, `events(seq, key, origin, event, created_at)` (UNLOGGED: it is a
# buffer, not a record; its `seq` comes from a logged sequence so that it never goes back, even
# after a crash empties the table) and `event_trims(key, upto, at)`, the highest seq pruned per
# key, which is how a replay knows it has a gap. Events are stored as the compact JSON text we
# encoded, and sent out as stored: nothing is parsed again on the way to a watcher.
#
# A `POST /events` is one statement, so one round trip and one (implicit) transaction: it takes
# a transaction-scoped advisory lock per distinct key (sorted, so publishers never deadlock),
# then draws one `nextval` per event in the order given, inserts the rows and calls `pg_notify`
# once per payload. Holding the key's lock from `nextval` to the commit is what makes seq order
# the commit order of one key's events, which NOTIFY preserves (PostgreSQL delivers
# notifications in commit order). Publishing PUTs are committed in groups, each in one round
# trip and one transaction (`PgPool.execute_pipeline`): the keys' locks; then per PUT the seq,
# the guarded write, the insert and the NOTIFY in one statement, so an event exists exactly
# when its write happened (`EventBus._commit_next`).
#
# A NOTIFY payload (< 8000 bytes) holds lines separated by ``\n``: a watch line as it will be
# sent (``{"seq":...}``), or, for a line too long to fit, its seq in decimal; the listening
# proxy reads such rows back from the table. Lines are packed into as few payloads as fit,
# planned here (`payload_codes`) with the longest seq (19 digits) and built by PostgreSQL.
#
# Each proxy has one LISTEN connection outside the pool (`PgPool.listen`) on a channel named
# after its schema (``asya_events_<hash of current_schema()>``), so proxies of other schemas on
# the same database never see each other's events. One task reads it and appends every batch of
# lines, as one shared chunk, to each watcher's queue; each watch stream writes what is queued
# in one write. When the LISTEN connection breaks every watch stream ends (the client re-reads
# its snapshots) and the task LISTENs again with backoff; a watch asked for meanwhile waits for
# it. A watcher more than `MAX_BEHIND` bytes behind is ended too, rather than buffered forever.
#
# Pruning runs every `PRUNE_INTERVAL` on each proxy, one proxy at a time (a try-lock; the loser
# keeps its work for the next turn): rows older than the age limit, and beyond the newest
# `buffer` rows of every key this proxy published to since its last turn (found through the
# (key, seq) index, never a scan of the table). Trims older than `TRIM_KEEP` are dropped now
# and then, after which a replay that far behind can no longer say "gap".

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from mesh_proto import MAX_EVENTS, BadRequest, is_origin

from ._errors import PgError, StoreUnavailable
from ._pg import PgPool, Rows
from ._store import ROW_GUARDS, client_error, text_array, write_statement

logger = logging.getLogger("mesh_trio.stateproxy")

#: NOTIFY payloads must be shorter than this many bytes (PostgreSQL's limit).
NOTIFY_LIMIT = 8000
#: Longest silence on a watch stream: an empty line is sent after it.
KEEPALIVE = 15.0
#: Pause between pruning turns, in seconds.
PRUNE_INTERVAL = 1.0
#: How long the highest pruned seq of a key is remembered (for "gap"), in seconds.
TRIM_KEEP = 3600.0
#: A watcher with this many bytes queued and unsent is ended.
MAX_BEHIND = 64 * 1024 * 1024
#: Longest wait of a new watch for the LISTEN connection, in seconds (then 503).
LISTEN_WAIT = 5.0
_BACKOFF = (0.1, 5.0)
#: Publishing PUTs committed in one transaction at most, and such transactions at once.
MAX_GROUP = 32
MAX_COMMITS = 4
_TRIM_SWEEP_TURNS = 60
_SEQ_DIGITS = 19  # the most a bigint takes in decimal

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

_SEQUENCE = "event_seq"
_SCHEMA = f"""
CREATE SEQUENCE IF NOT EXISTS {_SEQUENCE};
CREATE UNLOGGED TABLE IF NOT EXISTS events (
    seq        bigint PRIMARY KEY DEFAULT nextval('{_SEQUENCE}'),
    key        text NOT NULL,
    origin     text NOT NULL,
    event      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS events_key_seq ON events (key, seq);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
CREATE UNLOGGED TABLE IF NOT EXISTS event_trims (
    key  text PRIMARY KEY,
    upto bigint NOT NULL,
    at   timestamptz NOT NULL DEFAULT now()
)"""
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('asya-state-proxy events schema'))"
_SCHEMA_STATE = (
    b"SELECT current_schema() || '/' || (to_regclass('events_created') IS NOT NULL "
    b"AND to_regclass('event_trims') IS NOT NULL AND to_regclass('events_key_seq') IS NOT NULL)"
)
# A stored row as its watch line, built by PostgreSQL.
_LINE = (
    "'{\"seq\":' || seq || ',\"key\":' || to_json(key)::text || ',\"origin\":' "
    "|| to_json(origin)::text || ',\"event\":' || event || '}'"
)


def _payloads(origin_json: bytes) -> bytes:
    """The CTE `payloads` of a publishing statement: the watch lines of the rows of `items`
    (seq, key JSON `k`, event `e`, payload code `c`, position `i`), joined per NOTIFY payload
    (`payload_codes`); `origin_json` names the parameter holding the origin as JSON."""
    return (
        b"payloads AS (SELECT c / 2 AS g, string_agg(CASE WHEN c % 2 = 1 THEN seq::text ELSE "
        b"'{\"seq\":' || seq || ',\"key\":' || k::text || ',\"origin\":' || "
        + origin_json
        + b" || ',\"event\":' || e::text || '}' END, E'\\n' ORDER BY i) AS p FROM items "
        b"GROUP BY c / 2 ORDER BY c / 2) "
    )


# $1 lock namespace, $2 lock ids, $3 key JSON, $4 event JSON, $5 payload codes, $6 origin,
# $7 origin JSON, $8 channel. Locks before any `nextval` (a join on the one-row `locks`);
# `nextval` after the sort on the position, so seqs follow the order given.
_PUBLISH = (
    b"WITH locks AS MATERIALIZED (SELECT count(pg_advisory_xact_lock($1::int, h::int)) AS n "
    b"FROM json_array_elements_text($2::json) AS h), "
    b"items AS MATERIALIZED (SELECT nextval('event_seq') AS seq, k, e, c::int AS c, i "
    b"FROM locks, ROWS FROM (json_array_elements($3::json), json_array_elements($4::json), "
    b"json_array_elements_text($5::json)) WITH ORDINALITY AS t(k, e, c, i) "
    b"WHERE locks.n >= 0 ORDER BY i), "
    b"ins AS (INSERT INTO events (seq, key, origin, event) "
    b"SELECT seq, k #>> '{}', $6, e::text FROM items), "
    + _payloads(b"$7")
    + b"SELECT (SELECT json_agg(seq ORDER BY i) FROM items)::text, count(pg_notify($8, p)) "
    b"FROM payloads"
)
# Guarded publishing PUTs of distinct keys in one statement (`put_publish_many`): the locks of
# the keys, then each write (its value is the `value` of its body), then a seq for each write
# that happened, in the order given, its event stored and NOTIFYed as `_PUBLISH` does. $1 lock
# namespace, $2 lock ids, $3 key JSON, $4 bodies (text[]), $5 status guards, $6 revision guards
# (JSON, null where none), $7 event JSON, $8 payload codes, $9 origin, $10 origin JSON,
# $11 channel. Returns [[position, seq], ...] of the writes made.
_PUT_PUBLISH_MANY = (
    (
        "WITH locks AS MATERIALIZED (SELECT count(pg_advisory_xact_lock($1::int, h::int)) AS n "
        "FROM json_array_elements_text($2::json) AS h), "
        "w AS MATERIALIZED (SELECT k, k #>> '{}' AS key, b, s, r, e, c::int AS c, i "
        "FROM locks, ROWS FROM (json_array_elements($3::json), unnest($4::text[]), "
        "json_array_elements_text($5::json), json_array_elements_text($6::json), "
        "json_array_elements($7::json), json_array_elements_text($8::json)) "
        "WITH ORDINALITY AS t(k, b, s, r, e, c, i) WHERE locks.n >= 0), "
        "up AS (UPDATE kv SET value = w.b::jsonb -> 'value', updated_at = now() FROM w "
        f"WHERE kv.key = w.key AND {ROW_GUARDS} RETURNING w.i), "
        f"items AS MATERIALIZED (SELECT nextval('{_SEQUENCE}') AS seq, w.k, w.key, w.e, w.c, w.i "
        "FROM w JOIN up ON up.i = w.i ORDER BY w.i), "
        "ins AS (INSERT INTO events (seq, key, origin, event) SELECT seq, key, $9, e::text "
        "FROM items), "
    ).encode()
    + _payloads(b"$10")
    + b"SELECT coalesce((SELECT json_agg(json_build_array(i, seq) ORDER BY i) FROM items), "
    b"'[]')::text, count(pg_notify($11, p)) FROM payloads"
)
# A group of publishing PUTs starts with the locks of its keys, held to the commit (see
# `EventBus._commit_next`): $1 the lock namespace, $2 the sorted lock ids.
_LOCK_KEYS = (
    b"SELECT count(pg_advisory_xact_lock($1::int, h::int)) "
    b"FROM json_array_elements_text($2::json) AS h"
)
_REPLAY = (
    f"SELECT '{{\"events\":[' || coalesce((SELECT string_agg({_LINE}, ',' ORDER BY seq) "
    "FROM events WHERE key = $1 AND seq > $2::bigint), '') || '],\"gap\":' || "
    "(EXISTS (SELECT 1 FROM event_trims WHERE key = $1 AND upto > $2::bigint) "
    # A seq no proxy has handed out yet (a made-up or foreign id) is a gap too: a stream that
    # took it as its position would drop every live event below it.
    f"OR $2::bigint > (SELECT last_value FROM {_SEQUENCE}))::text || '}}'"
).encode()
_LINES = (
    f"SELECT {_LINE} FROM events "
    "WHERE seq IN (SELECT json_array_elements_text($1::json)::bigint) ORDER BY seq"
).encode()
_TURN = "WITH turn AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($1::int, $2::int) AS mine)"
_CUTOFF = "now() - $3::float8 * interval '1 second'"
_PRUNE = (
    f"{_TURN}, "
    f"aged AS (DELETE FROM events WHERE (SELECT mine FROM turn) AND created_at < {_CUTOFF} "
    "RETURNING key, seq), "
    # The newest seq past the buffer of each touched key, found once per key (a walk of at most
    # `buffer` index entries), then everything of that key up to it.
    "over_buffer AS (SELECT k, (SELECT s.seq FROM events s WHERE s.key = k ORDER BY s.seq "
    "DESC OFFSET $5::int LIMIT 1) AS upto FROM json_array_elements_text($4::json) AS t(k)), "
    "over AS (DELETE FROM events e USING over_buffer o WHERE (SELECT mine FROM turn) "
    f"AND e.key = o.k AND e.seq <= o.upto AND e.created_at >= {_CUTOFF} "
    "RETURNING e.key, e.seq), "
    "trimmed AS (INSERT INTO event_trims AS t (key, upto, at) SELECT key, max(seq), now() FROM "
    "(SELECT * FROM aged UNION ALL SELECT * FROM over) g GROUP BY key ORDER BY key "
    "ON CONFLICT (key) DO UPDATE SET upto = GREATEST(t.upto, EXCLUDED.upto), at = EXCLUDED.at) "
    "SELECT (SELECT mine FROM turn)::text"
).encode()
_SWEEP_TRIMS = (
    f"{_TURN} DELETE FROM event_trims WHERE (SELECT mine FROM turn) AND at < {_CUTOFF}"
).encode()

Write = Callable[[bytes], Awaitable[None]]


def _int4(data: bytes) -> int:
    """A signed 32-bit integer from the first 4 bytes of a digest (an advisory lock key)."""
    return int.from_bytes(data[:4], "big", signed=True)


def _lock_id(key: str) -> int:
    return zlib.crc32(key.encode()) - (1 << 31)


def _line(seq: int, key_json: str, origin_json: str, event_json: str) -> str:
    return f'{{"seq":{seq},"key":{key_json},"origin":{origin_json},"event":{event_json}}}'


def _json_list(items: Sequence[str]) -> bytes:
    """A JSON array of items that are JSON texts already."""
    return ("[" + ",".join(items) + "]").encode()


def _payload_plan(origin_json: str, keys: Sequence[str], events: Sequence[str]) -> bytes:
    """The `payload_codes` of the watch lines of these events (keys and events as JSON), as
    a JSON array: each line is counted with the longest seq."""
    fixed = len(_line(0, "", origin_json, "")) - 1 + _SEQ_DIGITS
    sizes = [fixed + len(k) + len(e) for k, e in zip(keys, events, strict=True)]
    return _encode(payload_codes(sizes)).encode()


def payload_codes(sizes: Sequence[int]) -> list[int]:
    """Plan the NOTIFY payloads of lines of at most these `sizes` (bytes), in order: for each,
    twice the number of its payload, plus 1 if it goes as a reference (its seq) because it
    cannot fit. Payloads are filled in order and each stays under `NOTIFY_LIMIT`."""
    codes = []
    payload, used = 0, 0
    for size in sizes:
        ref = size >= NOTIFY_LIMIT
        item = _SEQ_DIGITS if ref else size
        if used and used + 1 + item >= NOTIFY_LIMIT:
            payload, used = payload + 1, 0
        used += item + (1 if used else 0)
        codes.append(2 * payload + ref)
    return codes


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest("invalid JSON body") from None


def _key_json(key: object) -> str:
    if not isinstance(key, str) or not key or "\x00" in key:
        raise BadRequest("bad key: want a non-empty string without NUL")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise BadRequest("bad key: not valid Unicode") from None
    return _encode(key)


def _event_json(event: object) -> str:
    if not isinstance(event, dict):
        raise BadRequest("event must be a JSON object")
    return _encode(event)


@attrs.frozen
class Batch:
    """A checked `POST /events` body: the origin and each event's key, key JSON, event JSON."""

    origin: str
    items: tuple[tuple[str, str, str], ...]

    @classmethod
    def parse(cls, body: bytes) -> Batch:
        """Check ``{"origin": O, "events": [{"key": K, "event": E}, ...]}``.

        Raises:
            BadRequest: not JSON, no valid origin, not 1 to `MAX_EVENTS` events, a bad key,
                an event that is not an object.
        """
        doc = _load(body)
        if not isinstance(doc, dict):
            raise BadRequest("body must be {origin, events}")
        origin = doc.get("origin")
        if not is_origin(origin):
            raise BadRequest("origin must be 1 to 64 characters of [A-Za-z0-9_.-]")
        events = doc.get("events")
        if not isinstance(events, list) or not 0 < len(events) <= MAX_EVENTS:
            raise BadRequest(f"events must be a list of 1 to {MAX_EVENTS} events")
        items = []
        for item in events:
            if not isinstance(item, dict):
                raise BadRequest("each event must be {key, event}")
            key = item.get("key")
            key_json = _key_json(key)
            assert isinstance(key, str)
            items.append((key, key_json, _event_json(item.get("event"))))
        return cls(origin, tuple(items))


def parse_publish(body: bytes) -> str:
    """Check a publishing PUT's ``{"value": V, "event": E}``; the event as compact JSON.

    The value is left in the body, which PostgreSQL reads it from (`EventBus.put_publish`):
    an envelope of megabytes is not encoded again here.

    Raises:
        BadRequest: not JSON, no `value`, or an `event` that is not an object.
    """
    doc = _load(body)
    if not isinstance(doc, dict) or "value" not in doc:
        raise BadRequest("body must be {value, event}")
    return _event_json(doc.get("event"))


@attrs.define(eq=False)
class _Watcher:
    """One watch stream's queue: chunks of lines, written out in one write when it can."""

    pending: list[bytes] = attrs.field(factory=list)
    size: int = 0
    ended: bool = False
    wakeup: trio.Event = attrs.field(factory=trio.Event)

    def push(self, chunk: bytes) -> None:
        if self.ended:
            return
        self.size += len(chunk)
        if self.size > MAX_BEHIND:
            logger.info("a watch stream fell %d bytes behind: ending it", self.size)
            self.pending.clear()
            self.end()
            return
        self.pending.append(chunk)
        self.wakeup.set()

    def end(self) -> None:
        self.ended = True
        self.wakeup.set()

    async def run(self, write: Write, keepalive: float) -> None:
        while True:
            if self.pending:
                chunk = b"".join(self.pending)
                self.pending, self.size = [], 0
                await write(chunk)
            elif self.ended:
                return
            else:
                self.wakeup = trio.Event()
                with trio.move_on_after(keepalive) as idle:
                    await self.wakeup.wait()
                if idle.cancelled_caught:
                    await write(b"\n")


@attrs.frozen
class PublishWrite:
    """A publishing PUT: its key, its body (``{"value": V, "event": E}``, checked by
    `parse_publish`), the replica that publishes, the event's JSON, and the PUT's guards."""

    key: str
    body: bytes
    origin: str
    event: str
    status: str | None = None
    revision: str | None = None
    absent: bool = False


@attrs.define(eq=False)
class _Write:
    """A publishing PUT waiting for its commit (`EventBus.put_publish`), and its outcome."""

    key: str
    step: tuple[bytes, Sequence[bytes], bytes]  # its statement, parameters and name
    done: trio.Event = attrs.field(factory=trio.Event)
    seq: int | None = None
    error: Exception | None = None


@attrs.define(eq=False)
class EventBus:
    """The event bus of one proxy over `pool` (module comment).

    Attributes:
        buffer: events kept per key (``STATE_PROXY_EVENT_BUFFER``).
        age: seconds an event is kept (``STATE_PROXY_EVENT_AGE``).
        keepalive: longest silence on a watch stream, in seconds.
    """

    pool: PgPool
    buffer: int = 256
    age: float = 60.0
    keepalive: float = KEEPALIVE
    channel: str = attrs.field(default="", init=False)
    published: int = attrs.field(default=0, init=False)
    _lock_ns: int = attrs.field(default=0, init=False)
    _prune_lock: tuple[bytes, bytes] = attrs.field(default=(b"0", b"0"), init=False)
    _watchers: set[_Watcher] = attrs.field(factory=set, init=False)
    _live: bool = attrs.field(default=False, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _touched: set[str] = attrs.field(factory=set, init=False)
    # Publishing PUTs waiting to be committed, commits in flight, and the event set as one ends.
    _writes: list[_Write] = attrs.field(factory=list, init=False)
    _committing: int = attrs.field(default=0, init=False)
    _turn: trio.Event = attrs.field(factory=trio.Event, init=False)
    groups: int = attrs.field(default=0, init=False)

    @property
    def watchers(self) -> int:
        """Watch streams open now."""
        return len(self._watchers)

    async def ensure_schema(self) -> None:
        """Create the tables if missing and name the channel after the current schema.

        Raises:
            StoreUnavailable: PostgreSQL cannot be used.
        """
        state = await self.pool.execute(_SCHEMA_STATE, retry=True)
        schema, _, ready = (state.values[0] or b"").decode().rpartition("/")
        if ready != "true":
            await self.pool.execute_script(f"BEGIN; {_SCHEMA_LOCK}; {_SCHEMA}; COMMIT".encode())
        digest = hashlib.sha256(schema.encode()).digest()
        self.channel = f"asya_events_{digest[:8].hex()}"
        self._lock_ns = _int4(digest[8:])
        self._prune_lock = (str(_int4(digest[12:])).encode(), b"0")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """LISTEN (again after every break) and prune, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._prune_forever)
            task_status.started()
            await self._listen_forever()

    def close(self) -> None:
        """End every watch stream and refuse new ones (the proxy is shutting down)."""
        self._closed = True
        self._end_all()

    async def publish(self, batch: Batch) -> list[int]:
        """Store and NOTIFY the events of `batch` in one transaction; their seqs, in order.

        Raises:
            StoreUnavailable: PostgreSQL cannot answer now (nothing was published, or, if the
                connection broke in the commit, perhaps everything).
            BadRequest: PostgreSQL refused a key (e.g. too long for the index).
        """
        origin_json = _encode(batch.origin)
        keys = [k for _, k, _ in batch.items]
        events = [e for _, _, e in batch.items]
        params = (
            *self._locks(key for key, _, _ in batch.items),
            _json_list(keys),
            _json_list(events),
            _payload_plan(origin_json, keys, events),
            batch.origin.encode(),
            origin_json.encode(),
            self.channel.encode(),
        )
        try:
            rows = await self.pool.execute(_PUBLISH, params, name=b"sp_events_publish")
        except PgError as exc:
            raise client_error(exc, "invalid event") from None
        seqs: list[int] = json.loads(rows.values[0] or b"[]")
        self._touched.update(key for key, _, _ in batch.items)
        self.published += len(seqs)
        return seqs

    async def put_publish(self, write: PublishWrite) -> int | None:
        """Write the `value` of `write.body` (checked by `parse_publish`) at `write.key` as a
        PUT with its guards would and, only if written, publish its event, in one transaction.
        The event's seq, or None if a guard failed (nothing written, nothing published).

        Raises:
            StoreUnavailable, BadRequest: as for `publish` (BadRequest also for a value
                PostgreSQL refuses).
        """
        job = self._job(write)
        self._writes.append(job)
        try:
            while not job.done.is_set():
                if self._writes and self._committing < MAX_COMMITS:
                    await self._commit_next()
                elif self._writes:
                    await self._turn.wait()  # every commit slot is busy: wait for one
                else:
                    await job.done.wait()  # in a commit another request leads
        finally:
            if not job.done.is_set() and job in self._writes:
                self._writes.remove(job)  # cancelled while it waited: never sent
        if job.error is not None:
            raise job.error
        if job.seq is None:
            return None  # a guard failed: nothing written, nothing published
        self._touched.add(write.key)
        self.published += 1
        return job.seq

    async def put_publish_many(self, writes: Sequence[PublishWrite]) -> list[int | None]:
        """`put_publish` for each of `writes` (distinct keys, each with a status or revision
        guard, none `absent`) in one statement: each one's seq, in the order given, or None.

        Raises:
            StoreUnavailable: as for `publish` (nothing was written).
            BadRequest: PostgreSQL refused a value or a key (nothing was written).
        """
        if not writes:
            return []
        origin = writes[0].origin
        assert all(w.origin == origin and not w.absent for w in writes), "one origin, guards"
        origin_json = _encode(origin)
        keys = [_key_json(w.key) for w in writes]
        events = [w.event for w in writes]
        params = (
            *self._locks(w.key for w in writes),
            _json_list(keys),
            text_array(w.body for w in writes),
            _encode([w.status for w in writes]).encode(),
            _encode([w.revision for w in writes]).encode(),
            _json_list(events),
            _payload_plan(origin_json, keys, events),
            origin.encode(),
            origin_json.encode(),
            self.channel.encode(),
        )
        try:
            rows = await self.pool.execute(_PUT_PUBLISH_MANY, params, name=b"sp_put_publish_many")
        except PgError as exc:
            raise client_error(exc, "invalid JSON body") from None
        seqs: dict[int, int] = dict(json.loads(rows.values[0] or b"[]"))
        self._touched.update(writes[i - 1].key for i in seqs)
        self.published += len(seqs)
        return [seqs.get(i) for i in range(1, len(writes) + 1)]

    def _job(self, write: PublishWrite) -> _Write:
        key = write.key
        statement, name, guards = write_statement(
            status=write.status, revision=write.revision, absent=write.absent
        )
        first = 3 + len(guards)
        # The seq is drawn after the key's lock (the first statement), in the same transaction
        # as the write; the watch line is built around it by PostgreSQL, or is just the seq
        # when a line with the longest seq would not fit a NOTIFY.
        rest = _line(0, _key_json(key), _encode(write.origin), write.event)[len('{"seq":0') :]
        ref = len(rest) + len('{"seq":') + _SEQ_DIGITS >= NOTIFY_LIMIT
        sql = (
            f"WITH s AS MATERIALIZED (SELECT nextval('{_SEQUENCE}') AS seq), "
            f"w AS ({value_of_body(statement)} RETURNING 1), ins AS (INSERT INTO events "
            f"(seq, key, origin, event) SELECT s.seq, $1, ${first}, ${first + 1} FROM w, s) "
            f"SELECT s.seq::text, pg_notify(${first + 2}, CASE WHEN ${first + 3}::bool "
            f"THEN s.seq::text ELSE '{{\"seq\":' || s.seq || ${first + 4} END) FROM w, s"
        ).encode()
        params = (key.encode(), write.body, *guards, write.origin.encode(), write.event.encode())
        params += (self.channel.encode(), b"true" if ref else b"false", rest.encode())
        return _Write(key, (sql, params, name + b"_publish"))

    async def _commit_next(self) -> None:
        """Commit the oldest waiting writes (at most `MAX_GROUP`) in one transaction, in one
        round trip: every key's lock first (sorted, as `publish` takes them), then each write
        in the order the requests came, so the seqs of one key follow that order. A guard
        that fails fails its own write only. A write PostgreSQL refuses would roll back the
        whole group: then each write of the group is committed alone, so that only the one
        refused fails. Whatever else goes wrong fails the whole group."""
        group, self._writes = self._writes[:MAX_GROUP], self._writes[MAX_GROUP:]
        self._committing += 1
        try:
            if len(group) > 1:
                self.groups += 1
            try:
                await self._commit(group)
            except PgError as exc:
                if len(group) == 1:
                    group[0].error = client_error(exc, "invalid JSON body")
                else:
                    for write in group:
                        try:
                            await self._commit([write])
                        except PgError as alone:
                            write.error = client_error(alone, "invalid JSON body")
                        except StoreUnavailable as unavailable:
                            write.error = unavailable
            except StoreUnavailable as exc:
                for write in group:
                    write.error = exc
        except BaseException:
            for write in group:  # cancelled midway: the transaction is rolled back
                if write.error is None and write.seq is None:
                    write.error = StoreUnavailable("the state proxy is shutting down")
            raise
        finally:
            self._committing -= 1
            for write in group:
                write.done.set()
            self._turn.set()
            self._turn = trio.Event()

    def _locks(self, keys: Iterable[str]) -> tuple[bytes, bytes]:
        """The parameters of taking the advisory locks of `keys`: the namespace and the
        sorted lock ids (so that every taker locks in one order and none deadlocks)."""
        return str(self._lock_ns).encode(), _encode(sorted({_lock_id(k) for k in keys})).encode()

    async def _commit(self, group: list[_Write]) -> None:
        lock = self._locks(write.key for write in group)
        results = await self.pool.execute_pipeline(
            [(_LOCK_KEYS, lock, b"sp_events_lock_keys"), *(write.step for write in group)]
        )
        for write, written in zip(group, results[1:], strict=True):
            write.seq = int(written.values[0] or b"0") if written.values else None

    async def replay(self, key: str, after: int) -> bytes:
        """The reply body of ``GET /events/{key}?after=N``: ``{"events": [...], "gap": G}``."""
        params = (key.encode(), str(after).encode())
        try:
            rows = await self.pool.execute(_REPLAY, params, name=b"sp_events_replay", retry=True)
        except PgError as exc:
            raise client_error(exc, "invalid key") from None
        return rows.values[0] or b""

    async def watch(self) -> Callable[[Write], Awaitable[None]]:
        """Wait (bounded) for the LISTEN connection; the stream to serve as the watch reply.

        Raises:
            StoreUnavailable: not listening within `LISTEN_WAIT`, or shutting down.
        """
        with trio.move_on_after(LISTEN_WAIT):
            while not (self._live or self._closed):
                await self._changed.wait()
        if self._closed:
            raise StoreUnavailable("the state proxy is shutting down")
        if not self._live:
            raise StoreUnavailable("the event bus is not listening to PostgreSQL")
        return self._stream

    async def _stream(self, write: Write) -> None:
        if not self._live or self._closed:
            return  # the connection broke since `watch`: end at once, the client comes back
        watcher = _Watcher()
        self._watchers.add(watcher)
        try:
            await write(b"")  # the reply head: from now on every commit reaches this watcher
            await watcher.run(write, self.keepalive)
        finally:
            self._watchers.discard(watcher)

    def _set_live(self, live: bool) -> None:
        self._live = live
        self._changed.set()
        self._changed = trio.Event()

    def _end_all(self) -> None:
        for watcher in self._watchers:
            watcher.end()

    async def _listen_forever(self) -> None:
        delay = _BACKOFF[0]
        while True:
            try:
                listener = await self.pool.listen(self.channel)
            except StoreUnavailable as exc:
                if delay == _BACKOFF[0]:
                    logger.info("event bus cannot LISTEN (retrying): %s", exc.message)
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF[1])
                continue
            if delay != _BACKOFF[0]:
                logger.info("event bus listening again")
            delay = _BACKOFF[0]
            self._set_live(True)
            try:
                while True:
                    await self._deliver(await listener.receive())
            except StoreUnavailable as exc:
                logger.info(
                    "event bus lost its LISTEN connection (%s): ending %d watch streams",
                    exc.message,
                    len(self._watchers),
                )
            finally:
                listener.close()
                self._set_live(False)
                self._end_all()
            await trio.sleep(delay)

    async def _deliver(self, payloads: list[bytes]) -> None:
        """Queue the lines of `payloads` for every watcher, reading referenced rows back."""
        if not self._watchers:
            return  # nobody to tell: not even a read of a referenced row
        lines: list[bytes] = []
        refs: list[int] = []
        for payload in payloads:
            for item in payload.split(b"\n"):
                if item.startswith(b"{"):
                    lines.append(item)
                else:
                    refs.append(int(item))
                    lines.append(b"")  # a place for the row read back
        if refs:
            rows = await self.pool.execute(_LINES, (_encode(refs).encode(),), retry=True)
            found = {_seq_of(line): line for line in rows.values if line is not None}
            if len(found) != len(refs):
                raise StoreUnavailable("an event was pruned before it could be read back")
            places = iter(refs)
            lines = [line or found[next(places)] for line in lines]
        chunk = b"\n".join(lines) + b"\n"
        for watcher in self._watchers:
            watcher.push(chunk)

    async def _prune_forever(self) -> None:
        failing = False
        turns = 0
        while True:
            await trio.sleep(PRUNE_INTERVAL)
            try:
                turns = turns + 1 if await self._prune_turn(turns) else turns
            except (StoreUnavailable, PgError) as exc:
                if not failing:
                    logger.warning(
                        "event pruning failed (retrying every %gs): %s", PRUNE_INTERVAL, exc
                    )
                failing = True
            else:
                failing = False

    async def _prune_turn(self, turns: int) -> bool:
        """One pruning pass, if no other proxy is pruning; whether it was our turn."""
        keys, self._touched = self._touched, set()
        params = (*self._prune_lock, repr(float(self.age)).encode())
        try:
            rows: Rows = await self.pool.execute(
                _PRUNE, (*params, _encode(sorted(keys)).encode(), str(self.buffer).encode())
            )
        except BaseException:
            self._touched |= keys
            raise
        if rows.values[0] != b"true":
            self._touched |= keys
            return False
        if turns % _TRIM_SWEEP_TURNS == _TRIM_SWEEP_TURNS - 1:
            trim_keep = (*self._prune_lock, repr(max(TRIM_KEEP, self.age)).encode())
            await self.pool.execute(_SWEEP_TRIMS, trim_keep)
        return True


def value_of_body(write: bytes) -> str:
    """A write of `write_statement` that stores the `value` member of its ``$2``."""
    assert write.count(b"$2::jsonb") == 1
    return write.decode().replace("$2::jsonb", "($2::jsonb -> 'value')")


def _seq_of(line: bytes) -> int:
    """The seq of a watch line built by `_LINE` (``{"seq":N,...``)."""
    return int(line[7 : line.index(b",")])
