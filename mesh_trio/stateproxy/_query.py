# Translation of a `POST /query` body into parameterised SQL. No I/O here: bytes in, SQL out.
#
# The body is parsed and validated by `mesh_proto.Query`, the protocol's model that the client
# builds its queries with, so both sides hold the same rules (field names, operators and their
# operand types, NUL, NaN, paging bounds) and `compile_query` either returns a `CompiledQuery`
# (a page statement and, when asked, a count statement) or raises `BadRequest`; nothing else
# escapes it (a hypothesis test feeds it garbage to hold it to that). What is left here is SQL:
# values only ever travel as parameters (``$1``, ``$2``, ... sent as text); a field name is
# spliced into the SQL text only because `Query` checked it against ``^[A-Za-z_][A-Za-z0-9_]*$``.
#
# How each operator reads a field `f` of the stored value (J = ``value->'f'``, T = its text):
#
#   plain value, $eq on a scalar  value @> {"f": v}          containment, served by the GIN index
#   $eq on an array/object        J = v                      exact jsonb equality
#   $ne                           J <> v                     records without `f` never match
#   $gt $gte $lt $lte             type guard AND comparison  numbers/booleans compare as jsonb,
#                                                            strings bytewise (COLLATE "C")
#   $in                           T = ANY(text[]) if all operands are strings, else J = ANY(jsonb[])
#   $nin                          J present AND NOT J = ANY(jsonb[])
#   $exists                       value ? 'f'                (value must be an object)
#   $contains                     string operand: substring of a string field or element of an
#                                 array field; any other operand: J @> operand
#   a column (key, created_at,    $gt $gte $lt $lte only:    `created_at < $1::timestamptz`,
#   updated_at)                                              `key < $1` (database collation)
#
# `POST /delete` takes the same body and deletes what the page would list, in one statement:
# ``DELETE FROM kv WHERE key IN (SELECT key ... ORDER BY ... LIMIT n FOR UPDATE SKIP LOCKED)``,
# which needs a `limit` (at most `MAX_DELETE`) and takes no `offset` or `count`; without a
# `sort` it takes any `limit` matches, which lets the planner stop a scan early (with a sort it
# may have to sort every match first: PostgreSQL cannot see through ``LockRows``). The statement
# first tries a transaction-scoped advisory lock named after the prefix
# (``pg_try_advisory_xact_lock``, evaluated once as an InitPlan): while one client's delete on a
# prefix runs, another's deletes nothing and returns at once, so replicas sweeping together
# take turns instead of fighting over the same rows.
#
# Comparisons never cast: a string stored where a number is compared is simply not matched, so no
# stored value can turn a query into a 500. Strings compare bytewise, which orders fixed-format
# RFC 3339 UTC timestamps chronologically whatever the database collation; the expression indexes
# made from `STATE_PROXY_PG_INDEXES` are built on exactly T, so `$in`, `$lt`... on strings use them.

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs

import mesh_proto
from mesh_proto import BadRequest, Condition, Query, SortKey

#: Columns of the kv table that `sort` and `filter` name directly; any other name is a field of
#: `value`. (A bound on `key` compares in the database collation, as ``ORDER BY key`` does.)
COLUMNS = mesh_proto.COLUMNS

_RFC3339 = '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\''

#: One stored record as the JSON object the protocol returns, built by PostgreSQL as text.
ROW_JSON = (
    "json_build_object("
    "'key', key, 'value', value, "
    f"'created_at', to_char(created_at AT TIME ZONE 'UTC', {_RFC3339}), "
    f"'updated_at', to_char(updated_at AT TIME ZONE 'UTC', {_RFC3339})"
    ")::text"
)

#: Most records one `POST /delete` may remove: a bound on the statement's time and locks.
MAX_DELETE = 10_000

_COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_SCALARS = (str, int, float, bool, type(None))


@attrs.frozen
class Statement:
    """One SQL statement with its parameters, all sent as UTF-8 text.

    `name`, when set, lets the driver prepare the statement once per connection.
    """

    sql: bytes
    params: tuple[bytes, ...] = ()
    name: bytes | None = None


@attrs.frozen(kw_only=True)
class CompiledQuery:
    """The statements answering one `POST /query`.

    `page` returns one text column per matching record (`ROW_JSON`), in order; `count`, present
    when the body asked for ``"count": true``, returns the number of all matching records.
    """

    page: Statement
    count: Statement | None


def field_json(field: str) -> str:
    """SQL for the jsonb value of `field` (already checked with `is_field_name`)."""
    return f"(value->'{field}')"


def field_text(field: str) -> str:
    """SQL for the text of `field`, compared bytewise; also the expression indexes' expression."""
    return f"((value->>'{field}') COLLATE \"C\")"


def escape_like(prefix: str) -> str:
    """Turn `prefix` into a LIKE pattern matching exactly the strings that start with it.

    PostgreSQL's default LIKE escape character is the backslash.
    """
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def compile_query(body: bytes) -> CompiledQuery:
    """Compile a `POST /query` body (``{"prefix","filter","sort","limit","offset","count"}``).

    The body is parsed and validated by `mesh_proto.Query.parse`, the same rules the client
    builds its queries with; an empty body means ``{}``: every record, ordered by key.

    Raises:
        BadRequest: the body is not a valid query (see `mesh_proto.Query`).
    """
    return compile_model(Query.parse(body))


def compile_model(query: Query) -> CompiledQuery:
    """The statements of a validated query; never raises."""
    params = _Params()
    conditions = _conditions(params, query)
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    where_params = tuple(params.values)
    paging = ""
    if query.limit:
        paging += f" LIMIT {params.text(str(query.limit))}::bigint"
    if query.offset:
        paging += f" OFFSET {params.text(str(query.offset))}::bigint"
    page = Statement(
        f"SELECT {ROW_JSON} FROM kv{where} ORDER BY {_order_by(query.sort)}{paging}".encode(),
        tuple(params.values),
    )
    counter = None
    if query.count:
        counter = Statement(f"SELECT count(*)::text FROM kv{where}".encode(), where_params)
    return CompiledQuery(page=page, count=counter)


def compile_delete(body: bytes) -> Statement:
    """Compile a `POST /delete` body: the statement deleting (at most `limit`) matching records.

    Raises:
        BadRequest: the body is not a valid query, has no `limit` or one above `MAX_DELETE`,
            or asks for an `offset` or a `count`.
    """
    query = Query.parse(body)
    if not query.limit or query.limit > MAX_DELETE:
        raise BadRequest(f"delete needs a limit from 1 to {MAX_DELETE}")
    if query.offset or query.count:
        raise BadRequest("delete takes no offset and no count")
    params = _Params()
    lock = params.text(f"asya-state-proxy delete {query.prefix}")
    conditions = ["(SELECT held FROM turn)", *_conditions(params, query)]
    limit = params.text(str(query.limit))
    order = f" ORDER BY {_order_by(query.sort)}" if query.sort else ""
    sql = (
        f"WITH turn AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(hashtext({lock})) AS held) "
        f"DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE {' AND '.join(conditions)}"
        f"{order} LIMIT {limit}::bigint FOR UPDATE SKIP LOCKED)"
    )
    return Statement(sql.encode(), tuple(params.values))


def _conditions(params: _Params, query: Query) -> list[str]:
    conditions: list[str] = []
    if query.prefix:
        conditions.append(f"key LIKE {params.text(escape_like(query.prefix))}")
    conditions.extend(_condition(params, c) for c in query.filter)
    return conditions


class _Params:
    """Collects parameter values (valid UTF-8 without NUL: `Query` checked) and placeholders."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def text(self, value: str) -> str:
        self.values.append(value.encode("utf-8"))
        return f"${len(self.values)}"

    def json(self, value: object) -> str:
        return f"{self.text(_dumps(value))}::jsonb"

    def array(self, items: Sequence[str], element_type: str) -> str:
        quoted = ",".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items)
        return f"{self.text('{' + quoted + '}')}::{element_type}[]"


def _condition(params: _Params, condition: Condition) -> str:
    field, op, arg = condition.field, condition.op, condition.operand
    if field in COLUMNS:  # `Query` admits only bounds, with a string operand
        cast = "" if field == "key" else "::timestamptz"
        assert op is not None, field
        return f"{field} {_COMPARE[op]} {params.text(arg)}{cast}"
    j, t = field_json(field), field_text(field)
    if op is None or (op == "$eq" and isinstance(arg, _SCALARS)):
        return f"value @> {params.json({field: arg})}"
    if op == "$eq":
        return f"{j} = {params.json(arg)}"
    if op == "$ne":
        return f"{j} <> {params.json(arg)}"
    if op in _COMPARE:
        sign = _COMPARE[op]
        if isinstance(arg, bool):
            return f"(jsonb_typeof({j}) = 'boolean' AND {j} {sign} {params.json(arg)})"
        if isinstance(arg, str):
            return f"(jsonb_typeof({j}) = 'string' AND {t} {sign} {params.text(arg)})"
        return f"(jsonb_typeof({j}) = 'number' AND {j} {sign} {params.json(arg)})"
    if op == "$in":
        if not arg:
            return "false"
        if all(isinstance(x, str) for x in arg):
            return f"(jsonb_typeof({j}) = 'string' AND {t} = ANY({params.array(arg, 'text')}))"
        return f"{j} = ANY({params.array([_dumps(x) for x in arg], 'jsonb')})"
    if op == "$nin":
        if not arg:
            return f"{j} IS NOT NULL"
        listed = params.array([_dumps(x) for x in arg], "jsonb")
        return f"({j} IS NOT NULL AND NOT ({j} = ANY({listed})))"
    if op == "$exists":
        present = f"(jsonb_typeof(value) = 'object' AND value ? {params.text(field)})"
        return present if arg else f"NOT {present}"
    assert op == "$contains", op  # `Query` admits no other operator
    if isinstance(arg, str):
        return (
            f"((jsonb_typeof({j}) = 'string' AND strpos(value->>'{field}', "
            f"{params.text(arg)}) > 0) OR (jsonb_typeof({j}) = 'array' AND "
            f"{j} @> {params.json(arg)}))"
        )
    return f"{j} @> {params.json(arg)}"


def _order_by(sort: Sequence[SortKey]) -> str:
    parts: list[str] = []
    for key in sort:
        way = " DESC" if key.descending else " ASC"
        if key.field in COLUMNS:
            parts.append(key.field + way)
        else:
            # Numbers first, in numeric order; then everything else by its text, bytewise;
            # records without the field last, whichever the direction.
            j = field_json(key.field)
            parts.append(f"(CASE WHEN jsonb_typeof({j}) = 'number' THEN {j} END){way} NULLS LAST")
            parts.append(f"{field_text(key.field)}{way} NULLS LAST")
    if not any(key.field == "key" for key in sort):
        parts.append("key ASC")  # a total order, so that pages never overlap or skip
    return ", ".join(parts)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
