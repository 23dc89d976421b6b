# The key-value operations of the state proxy, as SQL over a `Database` (normally `PgPool`).
#
# Every operation is one statement, so each is atomic on its own; in particular the conditional
# write is a single `UPDATE ... WHERE key = $1 AND <guards>` whose row lock makes concurrent
# writers with the same expectation serialise, and all but the first find the record changed.
# The guards are the stored status (``value->>'status' = S``) and the stored revision (the
# integer member `_rev` of the value, 0 when absent or not an integer, compared as canonical
# decimal text so that no number of digits overflows). PostgreSQL builds the JSON replies
# (`ROW_JSON`), so a stored value goes to the client as PostgreSQL printed it, without a
# decode/encode round in Python.
#
# Schema: `kv(key, value jsonb, created_at, updated_at)`, a GIN index on `value` (containment
# filters), and one expression index per configured field on exactly the expression that
# string filters compare (`_query.field_text`). `ensure_schema` creates what is missing under
# an advisory lock, so replicas starting together do not race on the catalog, and skips index
# statements entirely when the indexes exist, so a restart takes no table lock.

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeAlias

import attrs

from mesh_proto import REVISION_KEY

from ._errors import BadRequest, PgError
from ._pg import Rows
from ._query import ROW_JSON, CompiledQuery, Statement, escape_like, field_text

_GET = f"SELECT {ROW_JSON} FROM kv WHERE key = $1".encode()
_EXISTS = b"SELECT 1 FROM kv WHERE key = $1"
_PUT = (
    b"INSERT INTO kv (key, value) VALUES ($1, $2::jsonb) "
    b"ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
)
_PUT_IF_ABSENT = b"INSERT INTO kv (key, value) VALUES ($1, $2::jsonb) ON CONFLICT (key) DO NOTHING"
_UPDATE = "UPDATE kv SET value = $2::jsonb, updated_at = now() WHERE key = $1"
_STATUS_IS = "value->>'status' = $3"
# The stored revision as canonical decimal text: jsonb prints an integer without leading zeros
# or fraction (3.0 stays "3.0", not an integer, as in mesh_proto's reading of `_rev`).
_REVISION = (
    f"(CASE WHEN jsonb_typeof(value->'{REVISION_KEY}') = 'number' "
    f"AND (value->>'{REVISION_KEY}') ~ '^-?[0-9]+$' THEN value->>'{REVISION_KEY}' ELSE '0' END)"
)
_PUT_IF_STATUS = f"{_UPDATE} AND {_STATUS_IS}".encode()
_PUT_IF_REV = f"{_UPDATE} AND {_REVISION} = $3".encode()
_PUT_IF_BOTH = f"{_UPDATE} AND {_STATUS_IS} AND {_REVISION} = $4".encode()
# Many guarded writes of distinct keys in one statement (`POST /writes`): keys, values and guards
# travel as four text arrays (NULL where a write has no such guard), each value is parsed as
# jsonb on its own, and the statement returns the (1-based) position of each write it applied.
# The guards of a batched write `w` on its row of kv: `w.s` the status, `w.r` the revision, each
# NULL when the write has none (`_PUT_MANY_IF`; the bus's publishing batch, `_events.py`).
_STATUS_OF_ROW = "(w.s IS NULL OR value->>'status' = w.s)"
ROW_GUARDS = f"{_STATUS_OF_ROW} AND (w.r IS NULL OR {_REVISION} = w.r)"
_PUT_MANY_IF = (
    "UPDATE kv SET value = w.v::jsonb, updated_at = now() FROM unnest($1::text[], "
    "$2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS w(k, v, s, r, n) "
    f"WHERE kv.key = w.k AND {ROW_GUARDS} RETURNING w.n::text"
).encode()
_DELETE = b"DELETE FROM kv WHERE key = $1"
_LIST = b"SELECT coalesce(json_agg(key ORDER BY key), '[]')::text FROM kv WHERE key LIKE $1"

_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('asya-state-proxy kv schema'))"
_TABLE = """
CREATE TABLE IF NOT EXISTS kv (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)"""
_INDEX_NAMES = (
    b"SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    b"WHERE i.indrelid = 'kv'::regclass"
)
GIN_INDEX = "kv_value_gin"
# Newest-first pages (the mesh API's list: `ORDER BY created_at DESC, key DESC LIMIT n`) walk
# this index backwards and stop after n rows, instead of sorting the whole table.
CREATED_INDEX = "kv_created_key"
# `POST /delete` with `updated_before` and sort `updated_at` (the retention sweep) walks this
# index from the oldest update and stops after `limit` matches (EXPLAIN in docs/stateproxy.md).
UPDATED_INDEX = "kv_updated_key"

# Client data that PostgreSQL refuses is the client's mistake: data exceptions (bad JSON, bad
# Unicode) and program limits (a value too large for an index row).
_CLIENT_CLASSES = ("22", "54")


#: One write of `KvStore.put_many_if`: key, value (JSON text), status guard, revision guard.
GuardedWrite: TypeAlias = tuple[str, bytes, str | None, str | None]


class Database(Protocol):
    """What the store needs from a driver (`PgPool`; the benchmark plugs in another)."""

    async def execute(
        self,
        sql: bytes,
        params: Sequence[bytes] = (),
        *,
        name: bytes | None = None,
        retry: bool = False,
    ) -> Rows: ...

    async def execute_script(self, sql: bytes) -> None: ...


def text_array(items: Iterable[bytes | None]) -> bytes:
    """A PostgreSQL text[] literal of `items` (None is NULL), every element quoted and escaped."""
    quoted = (
        b"NULL"
        if item is None
        else b'"' + item.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        for item in items
    )
    return b"{" + b",".join(quoted) + b"}"


def index_name(field: str) -> str:
    """The name of the expression index on `field` (a checked field name)."""
    return f"kv_value_{field}"


def write_statement(
    *, status: str | None = None, revision: str | None = None, absent: bool = False
) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    """The write a PUT with these guards makes: its SQL (``$1`` key, ``$2`` value, then the
    guards), the name it is prepared under, and the guards' parameters. No guard: the upsert.
    """
    guards = tuple(g.encode() for g in (status, revision) if g is not None)
    if absent:
        return _PUT_IF_ABSENT, b"sp_put_if_absent", ()
    if status is not None and revision is not None:
        return _PUT_IF_BOTH, b"sp_put_if_both", guards
    if revision is not None:
        return _PUT_IF_REV, b"sp_put_if_rev", guards
    if status is not None:
        return _PUT_IF_STATUS, b"sp_put_if", guards
    return _PUT, b"sp_put", ()


def client_error(exc: PgError, what: str) -> BadRequest | PgError:
    """`exc` as the client's mistake (`BadRequest`) when PostgreSQL refused its data."""
    if exc.sqlstate[:2] in _CLIENT_CLASSES:
        return BadRequest(f"{what}: {exc.message}")
    return exc


@attrs.define(eq=False)
class KvStore:
    """The state-proxy operations over the kv table.

    Every method raises `StoreUnavailable` when PostgreSQL cannot answer now, and `BadRequest`
    when PostgreSQL refuses the client's data; any other `PgError` is a bug of ours.
    """

    db: Database

    async def ensure_schema(self, indexes: Sequence[str] = ()) -> None:
        """Create the table, the GIN index and the expression indexes on `indexes` if missing."""
        await self.db.execute_script(f"BEGIN; {_SCHEMA_LOCK}; {_TABLE}; COMMIT".encode())
        rows = await self.db.execute(_INDEX_NAMES, retry=True)
        existing = {v.decode() for v in rows.values if v is not None}
        wanted = {
            GIN_INDEX: "USING gin (value)",
            CREATED_INDEX: "(created_at, key)",
            UPDATED_INDEX: "(updated_at, key)",
        }
        wanted.update({index_name(f): f"({field_text(f)})" for f in indexes})
        missing = [
            f"CREATE INDEX IF NOT EXISTS {name} ON kv {how}"
            for name, how in wanted.items()
            if name not in existing
        ]
        if missing:
            await self.db.execute_script(
                f"BEGIN; {_SCHEMA_LOCK}; {'; '.join(missing)}; COMMIT".encode()
            )

    async def get(self, key: str) -> bytes | None:
        """The record at `key` as JSON (``{"key","value","created_at","updated_at"}``), or None."""
        rows = await self._run(_GET, key, name=b"sp_get", retry=True)
        return rows.values[0] if rows.values else None

    async def exists(self, key: str) -> bool:
        """Whether a record is stored at `key`."""
        rows = await self._run(_EXISTS, key, name=b"sp_exists", retry=True)
        return bool(rows.values)

    async def put(self, key: str, value: bytes) -> None:
        """Store the JSON text `value` at `key`, keeping `created_at` if the key existed.

        Raises:
            BadRequest: `value` is not valid JSON (PostgreSQL parses it).
        """
        await self._run(_PUT, key, value, name=b"sp_put", what="invalid JSON body")

    async def put_if_absent(self, key: str, value: bytes) -> bool:
        """Store `value` at `key` only if no record is there, in one statement.

        Returns:
            True if written; False if the key exists.

        Raises:
            BadRequest: `value` is not valid JSON.
        """
        rows = await self._run(
            _PUT_IF_ABSENT, key, value, name=b"sp_put_if_absent", what="invalid JSON body"
        )
        return rows.affected == 1

    async def put_if(
        self, key: str, value: bytes, *, status: str | None = None, revision: str | None = None
    ) -> bool:
        """Replace the record at `key` only if every guard given holds, in one statement.

        Args:
            status: the stored ``value->>'status'`` must equal it.
            revision: canonical decimal (`mesh_proto.parse_revision`); the stored revision
                (``value->'_rev'`` if an integer, else 0) must equal it.

        Returns:
            True if written; False if the key is missing or a guard does not hold.
        """
        assert status is not None or revision is not None, "put_if needs a guard"
        sql, name, guards = write_statement(status=status, revision=revision)
        rows = await self._run(sql, key, value, *guards, name=name, what="invalid JSON body")
        return rows.affected == 1

    async def put_many_if(self, writes: Sequence[GuardedWrite]) -> list[bool]:
        """Each of `writes` (distinct keys, each with a guard) as `put_if` would, in one
        statement: whether each was written.

        Raises:
            BadRequest: PostgreSQL refused one of the values (none was written).
        """
        if not writes:
            return []
        keys, values, statuses, revisions = zip(*writes, strict=True)
        params = (
            text_array(k.encode() for k in keys),
            text_array(values),
            text_array(None if s is None else s.encode() for s in statuses),
            text_array(None if r is None else r.encode() for r in revisions),
        )
        rows = await self._execute(
            _PUT_MANY_IF, params, name=b"sp_put_many_if", retry=False, what="invalid JSON body"
        )
        written = {int(n) for n in rows.values if n is not None}
        return [n in written for n in range(1, len(writes) + 1)]

    async def delete(self, key: str) -> bool:
        """Delete the record at `key`; False if there was none."""
        rows = await self._run(_DELETE, key, name=b"sp_delete")
        return rows.affected > 0

    async def list_keys(self, prefix: str) -> bytes:
        """The keys starting with `prefix`, sorted, as a JSON array."""
        rows = await self._run(_LIST, escape_like(prefix), name=b"sp_list", retry=True)
        return rows.values[0] or b"[]"

    async def query(self, query: CompiledQuery) -> tuple[list[bytes], int | None]:
        """Run a compiled `/query`: the matching records as JSON, and their total if asked."""
        total = None
        if query.count is not None:
            counted = await self._execute(query.count.sql, query.count.params)
            total = int(counted.values[0] or b"0")
        page = await self._execute(query.page.sql, query.page.params)
        return [v for v in page.values if v is not None], total

    async def delete_matching(self, statement: Statement) -> int:
        """Run a compiled `/delete`; returns how many records it removed."""
        rows = await self._execute(statement.sql, statement.params, retry=False)
        return rows.affected

    async def _run(
        self,
        sql: bytes,
        key: str,
        *more: bytes,
        name: bytes,
        retry: bool = False,
        what: str = "invalid key",
    ) -> Rows:
        return await self._execute(sql, (key.encode(), *more), name=name, retry=retry, what=what)

    async def _execute(
        self,
        sql: bytes,
        params: Sequence[bytes],
        *,
        name: bytes | None = None,
        retry: bool = True,
        what: str = "invalid query",
    ) -> Rows:
        try:
            return await self.db.execute(sql, params, name=name, retry=retry)
        except PgError as exc:
            raise client_error(exc, what) from None
