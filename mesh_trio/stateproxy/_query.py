# Translation of a `POST /query` body into parameterised SQL. No I/O here: bytes in, SQL out.
#
# `compile_query` parses the untrusted body and either returns a `CompiledQuery` (a page
# statement and, when asked, a count statement) or raises `BadRequest`; nothing else escapes it
# (a hypothesis test feeds it garbage to hold it to that). Values only ever travel as parameters
# (``$1``, ``$2``, ... sent as text); a field name is spliced into the SQL text only after it
# matched ``^[A-Za-z_][A-Za-z0-9_]*$``.
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
#
# Comparisons never cast: a string stored where a number is compared is simply not matched, so no
# stored value can turn a query into a 500. Strings compare bytewise, which orders fixed-format
# RFC 3339 UTC timestamps chronologically whatever the database collation; the expression indexes
# made from `STATE_PROXY_PG_INDEXES` are built on exactly T, so `$in`, `$lt`... on strings use them.

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import attrs

from ._errors import BadRequest
from ._settings import is_field_name

#: Columns of the kv table that `sort` may name directly; any other name is a field of `value`.
COLUMNS = frozenset({"key", "created_at", "updated_at"})

_RFC3339 = '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\''

#: One stored record as the JSON object the protocol returns, built by PostgreSQL as text.
ROW_JSON = (
    "json_build_object("
    "'key', key, 'value', value, "
    f"'created_at', to_char(created_at AT TIME ZONE 'UTC', {_RFC3339}), "
    f"'updated_at', to_char(updated_at AT TIME ZONE 'UTC', {_RFC3339})"
    ")::text"
)

_QUERY_KEYS = frozenset({"prefix", "filter", "sort", "limit", "offset", "count"})
_COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_SCALARS = (str, int, float, bool, type(None))
_BIGINT_MAX = 2**63 - 1


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


def parse_json(body: bytes) -> object:
    """Parse a request body as strict JSON (UTF-8, finite numbers only).

    Raises:
        BadRequest: the body is not valid JSON.
    """
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None


def compile_query(body: bytes) -> CompiledQuery:
    """Compile a `POST /query` body (``{"prefix","filter","sort","limit","offset","count"}``).

    An empty body means ``{}``: every record, ordered by key.

    Raises:
        BadRequest: the body is not a JSON object, has an unknown key, a field name does not
            match the pattern, an operator is unknown or its operand has the wrong type, or
            `limit`/`offset`/`count` are not what they should be.
    """
    doc = parse_json(body) if body.strip() else {}
    if not isinstance(doc, dict):
        raise BadRequest("query body must be a JSON object")
    unknown = sorted(set(doc) - _QUERY_KEYS)
    if unknown:
        raise BadRequest(f"unknown query key {unknown[0]!r}")

    params = _Params()
    conditions: list[str] = []
    prefix = doc.get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise BadRequest("prefix must be a string")
    if prefix:
        conditions.append(f"key LIKE {params.text(escape_like(prefix))}")
    selector = doc.get("filter")
    if selector is not None and not isinstance(selector, dict):
        raise BadRequest("filter must be a JSON object")
    for field, condition in (selector or {}).items():
        conditions.extend(_field_conditions(params, field, condition))
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    where_params = tuple(params.values)

    order = _order_by(doc.get("sort"))
    limit = _non_negative_int(doc, "limit")
    offset = _non_negative_int(doc, "offset")
    count = doc.get("count")
    if count is not None and not isinstance(count, bool):
        raise BadRequest("count must be a boolean")

    paging = ""
    if limit:
        paging += f" LIMIT {params.text(str(limit))}::bigint"
    if offset:
        paging += f" OFFSET {params.text(str(offset))}::bigint"
    page = Statement(
        f"SELECT {ROW_JSON} FROM kv{where} ORDER BY {order}{paging}".encode(),
        tuple(params.values),
    )
    counter = None
    if count:
        counter = Statement(f"SELECT count(*)::text FROM kv{where}".encode(), where_params)
    return CompiledQuery(page=page, count=counter)


class _Params:
    """Collects parameter values and hands out their placeholders."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def text(self, value: str) -> str:
        if "\x00" in value:
            raise BadRequest("strings in a query cannot contain NUL characters")
        try:
            self.values.append(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadRequest("strings in a query must be valid Unicode") from None
        return f"${len(self.values)}"

    def json(self, value: object) -> str:
        if _has_nul(value):  # jsonb cannot hold \u0000, which is how json.dumps writes it
            raise BadRequest("strings in a query cannot contain NUL characters")
        return f"{self.text(_dumps(value))}::jsonb"

    def array(self, items: Sequence[str], element_type: str) -> str:
        quoted = ",".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items)
        return f"{self.text('{' + quoted + '}')}::{element_type}[]"


def _field_conditions(params: _Params, field: object, condition: object) -> list[str]:
    if not isinstance(field, str) or not is_field_name(field):
        raise BadRequest(f"invalid field name {field!r}: want [A-Za-z_][A-Za-z0-9_]*")
    if isinstance(condition, dict) and condition:
        operators = [k.startswith("$") for k in condition]
        if all(operators):
            return [_operator(params, field, op, arg) for op, arg in condition.items()]
        if any(operators):
            raise BadRequest(f"filter on {field!r} mixes operators and plain fields")
    return [f"value @> {params.json({field: condition})}"]


def _operator(params: _Params, field: str, op: str, arg: object) -> str:
    j, t = field_json(field), field_text(field)
    if op == "$eq":
        if isinstance(arg, _SCALARS):
            return f"value @> {params.json({field: arg})}"
        return f"{j} = {params.json(arg)}"
    if op == "$ne":
        return f"{j} <> {params.json(arg)}"
    if op in _COMPARE:
        sign = _COMPARE[op]
        if isinstance(arg, bool):
            return f"(jsonb_typeof({j}) = 'boolean' AND {j} {sign} {params.json(arg)})"
        if isinstance(arg, int | float):
            return f"(jsonb_typeof({j}) = 'number' AND {j} {sign} {params.json(arg)})"
        if isinstance(arg, str):
            return f"(jsonb_typeof({j}) = 'string' AND {t} {sign} {params.text(arg)})"
        raise BadRequest(f"{op} on {field!r} needs a number, a string or a boolean")
    if op in ("$in", "$nin"):
        if not isinstance(arg, list):
            raise BadRequest(f"{op} on {field!r} needs a list")
        if op == "$in":
            if not arg:
                return "false"
            if all(isinstance(x, str) for x in arg):
                return f"(jsonb_typeof({j}) = 'string' AND {t} = ANY({params.array(arg, 'text')}))"
            if _has_nul(arg):
                raise BadRequest("strings in a query cannot contain NUL characters")
            return f"{j} = ANY({params.array([_dumps(x) for x in arg], 'jsonb')})"
        if not arg:
            return f"{j} IS NOT NULL"
        if _has_nul(arg):
            raise BadRequest("strings in a query cannot contain NUL characters")
        listed = params.array([_dumps(x) for x in arg], "jsonb")
        return f"({j} IS NOT NULL AND NOT ({j} = ANY({listed})))"
    if op == "$exists":
        if not isinstance(arg, bool):
            raise BadRequest(f"$exists on {field!r} needs true or false")
        present = f"(jsonb_typeof(value) = 'object' AND value ? {params.text(field)})"
        return present if arg else f"NOT {present}"
    if op == "$contains":
        if isinstance(arg, str):
            return (
                f"((jsonb_typeof({j}) = 'string' AND strpos(value->>'{field}', "
                f"{params.text(arg)}) > 0) OR (jsonb_typeof({j}) = 'array' AND "
                f"{j} @> {params.json(arg)}))"
            )
        return f"{j} @> {params.json(arg)}"
    raise BadRequest(f"unknown operator {op!r} on {field!r}")


def _order_by(sort: object) -> str:
    if sort is None:
        sort = []
    if not isinstance(sort, list):
        raise BadRequest("sort must be a list of field names, each optionally prefixed by '-'")
    parts: list[str] = []
    for item in sort:
        if not isinstance(item, str):
            raise BadRequest("sort must be a list of field names, each optionally prefixed by '-'")
        descending = item.startswith("-")
        name = item[1:] if descending else item
        if not is_field_name(name):
            raise BadRequest(f"invalid sort field {item!r}: want [-][A-Za-z_][A-Za-z0-9_]*")
        way = " DESC" if descending else " ASC"
        if name in COLUMNS:
            parts.append(name + way)
        else:
            # Numbers first, in numeric order; then everything else by its text, bytewise;
            # records without the field last, whichever the direction.
            j = field_json(name)
            parts.append(f"(CASE WHEN jsonb_typeof({j}) = 'number' THEN {j} END){way} NULLS LAST")
            parts.append(f"{field_text(name)}{way} NULLS LAST")
    if not any(p.startswith("key ") for p in parts):
        parts.append("key ASC")  # a total order, so that pages never overlap or skip
    return ", ".join(parts)


def _non_negative_int(doc: dict[str, object], name: str) -> int:
    value = doc.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _BIGINT_MAX:
        raise BadRequest(f"{name} must be a non-negative integer")
    return value


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value
