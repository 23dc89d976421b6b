"""The state-proxy wire protocol (docs/stateproxy.md), one definition for the client and the proxy.

Everything both sides must agree on lives here, and nowhere else: how a key travels in the
path (`encode_key` / `decode_key`), how a query string is decoded, what a revision guard
(``if_rev=N``) may say, the error body ``{"error": "..."}``, and the `POST /query` model
(`Query`, its `Condition`s and `SortKey`s) with every rule the proxy enforces on it. The client
builds its requests through these (`mesh_proto._store.key_target`, `query_request`); the proxy
decodes and validates through the same functions, and only then compiles SQL of its own.

The event bus (feature `EVENTS`: `POST /events`, `PUT ?publish=1`, `GET /events/watch`,
`GET /events/{key}?after=N`) carries events that are opaque JSON objects to the proxy. Ours are
the frames of `Published` in a wire form (`event_bytes`, `published_of`)::

    {"kind": "fly", "data": D}
    {"kind": "status", "data": {...}, "rev": N, "rank": R, "terminal": bool}

spliced from the frame's data line on the way out (no second encoding of a large payload) and
encoded into a frame once on the receiving replica. A bus record (`BusEvent`) is that event
with its `seq`, `key` and `origin` (the replica that published it).

A query is validated once, when it is made (`Query.from_json`, `Query.parse`): field names match
`FIELD_NAME` and are at most `MAX_FIELD_NAME` characters; each filter entry is either a plain
value (containment) or an operator map whose keys all start with ``$``; each operator has an
operand of its type; strings hold no NUL and no lone surrogate (PostgreSQL's ``jsonb`` and
``text`` hold neither); numbers are finite; `limit` and `offset` fit a signed 64-bit integer. A
valid `Query` therefore always compiles, and ``Query.parse(q.to_body()) == q`` for every valid
`q` (a property test holds both sides to that). Anything else raises `BadRequest`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeGuard
from urllib.parse import quote, unquote_to_bytes, urlencode

import attrs

from ._errors import BadRequest, StoreProtocolError
from ._json import dumps, loads
from ._requests import parse_query
from ._sse import Published, encode_frame
from ._time import parse_time

#: A field of the stored value that a filter, a sort or an index may name.
FIELD_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Longest field name: the proxy names its indexes ``kv_value_<field>`` and PostgreSQL cuts
#: identifiers at 63 bytes, so a longer name could silently collide with another index.
MAX_FIELD_NAME: Final = 63 - len("kv_value_")
#: The filter operators, and the type their operand must have (None: any JSON value).
OPERATORS: Final[Mapping[str, tuple[type, ...] | None]] = {
    "$eq": None,
    "$ne": None,
    "$gt": (bool, int, float, str),
    "$gte": (bool, int, float, str),
    "$lt": (bool, int, float, str),
    "$lte": (bool, int, float, str),
    "$in": (list,),
    "$nin": (list,),
    "$exists": (bool,),
    "$contains": None,
}
#: The record's columns: `sort` and `filter` name them directly (any other name is a field of
#: the value). A filter on a column takes only `COLUMN_OPERATORS`, each with a string operand:
#: an RFC 3339 timestamp with a time zone for the time columns.
COLUMNS: Final = frozenset({"key", "created_at", "updated_at"})
COLUMN_OPERATORS: Final = ("$gt", "$gte", "$lt", "$lte")
#: Largest `limit` / `offset` (PostgreSQL's bigint).
MAX_PAGE: Final = 2**63 - 1
# The health reply's header listing what the proxy supports beyond the Asya protocol, and the
# feature name of the revision guard (`PUT /keys/{key}?if_rev=N`).
FEATURES_HEADER: Final = "asya-state-proxy-features"
REV_GUARD: Final = "if_rev"
# The feature (and parameter) of the create-if-absent write, `PUT /keys/{key}?if_absent=1`.
IF_ABSENT: Final = "if_absent"
#: The feature name of the bounded delete-by-query (`POST /delete`).
DELETE_QUERY: Final = "delete"
#: The feature name of filters on the `key` / `created_at` / `updated_at` columns (`COLUMNS`):
#: a proxy without it (the Go one) would read them as value fields and answer wrong pages.
COLUMN_BOUNDS: Final = "columns"
#: The feature name of the event bus (module comment); `MAX_EVENTS` bounds one `POST /events`.
EVENTS: Final = "events"
MAX_EVENTS: Final = 1000
#: The feature name of batched writes (`POST /writes`, `encode_writes`); `MAX_WRITES` bounds one.
WRITES: Final = "writes"
MAX_WRITES: Final = 1000
WRITES_TYPE: Final = "application/x-asya-writes"
#: What names a replica on the bus (``origin=``).
ORIGIN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_QUERY_KEYS: Final = frozenset({"prefix", "filter", "sort", "limit", "offset", "count"})
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DIGITS: Final = re.compile(r"[0-9]+")
_DIGITS_BYTES: Final = re.compile(rb"[0-9]{1,9}")
_SORT_HINT: Final = "sort must be a list of field names, each optionally prefixed by '-'"


def is_field_name(name: object) -> TypeGuard[str]:
    """Tell whether `name` is a string that may name a field (in SQL text, on the proxy)."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_FIELD_NAME
        and FIELD_NAME.fullmatch(name) is not None
    )


# What `quote(text, safe="")` and `urlencode` leave as it is: when a key or a query value is
# only these (ids, statuses, numbers; a key's slashes aside), the encoders are skipped: they were
# 3 % of the mesh API's CPU per status event through the state proxy.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
_UNRESERVED_OR_SLASH = re.compile(r"[A-Za-z0-9_.~/-]*")


def encode_key(key: str) -> str:
    """A key as one path segment: every reserved character percent-encoded.

    ``.`` and ``..`` are encoded too: as literal segments an HTTP stack would resolve them as
    dot segments (``/keys/..`` is ``/``), and the request would name another resource.
    """
    if _UNRESERVED_OR_SLASH.fullmatch(key):
        segment = key.replace("/", "%2F")
    else:
        segment = quote(key, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def key_target(key: str, **params: str) -> str:
    """``/keys/{key}`` with the key encoded by `encode_key`, and an optional query string."""
    target = "/keys/" + encode_key(key)
    if not params:
        return target
    if all(_UNRESERVED.fullmatch(v) for v in params.values()):
        return target + "?" + "&".join(f"{k}={v}" for k, v in params.items())
    return target + "?" + urlencode(params)


def decode_key(raw: bytes) -> str:
    """The key of a path (everything after ``/keys/``), percent-decoded exactly once, as UTF-8.

    An unencoded ``/`` is part of the key.

    Raises:
        BadRequest: a malformed escape (``%zz``, a trailing ``%``), bytes that are not UTF-8
            once decoded, or a NUL.
    """
    if raw.isascii() and b"\x00" not in raw:  # the fast path: a plain key (an envelope's)
        plain = raw.replace(b"%2F", b"/")
        if b"%" not in plain:
            return plain.decode("ascii")
    if _BAD_ESCAPE.search(raw):
        raise BadRequest("invalid key: malformed percent-escape")
    try:
        key = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid key: not UTF-8 once percent-decoded") from None
    if "\x00" in key:
        raise BadRequest("invalid key: contains NUL")
    return key


def decode_query_string(raw: bytes) -> dict[str, str]:
    """The parameters of a query string, percent-decoded as UTF-8, ``+`` as a space: the
    mesh API's own `parse_query` (the last of repeated parameters wins; a parameter without
    ``=`` has the value ``""``; nothing to decode, and urllib is skipped).

    Raises:
        BadRequest: the query string is not UTF-8 once decoded.
    """
    return parse_query(raw)


def parse_revision(text: str) -> str:
    """The revision of an ``if_rev`` guard, in canonical decimal (no leading zeros).

    A text, not an int, so that no length of digits is too long to compare.

    Raises:
        BadRequest: `text` is not a non-negative decimal integer (ASCII digits only).
    """
    if not _DIGITS.fullmatch(text):
        raise BadRequest("if_rev must be a non-negative decimal integer")
    return text.lstrip("0") or "0"


def encode_writes(writes: Sequence[tuple[str, bytes]]) -> bytes:
    """The body of ``POST /writes``: each PUT as its target (as `key_target` builds it, so it
    holds no space), a space, its body's length in decimal and a line feed, then its body."""
    parts: list[bytes] = []
    for target, body in writes:
        if " " in target or "\n" in target:
            raise ValueError(f"a write target holds a space or a line feed: {target!r}")
        parts += (f"{target} {len(body)}\n".encode(), body)
    return b"".join(parts)


def decode_writes(body: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The PUTs of a ``POST /writes`` body (`encode_writes`): each one's encoded key (the path
    after ``/keys/``, for `decode_key`), query string (for `decode_query_string`) and body.

    Raises:
        BadRequest: the framing is broken (a header that is not ``/keys/{key}[?query] N``, a
            body shorter than its length), or more than `MAX_WRITES` writes.
    """
    writes: list[tuple[bytes, bytes, bytes]] = []
    at, end = 0, len(body)
    while at < end:
        if len(writes) == MAX_WRITES:
            raise BadRequest(f"more than {MAX_WRITES} writes in one request")
        line_end = body.find(b"\n", at)
        target, _, size = body[at : max(line_end, at)].rpartition(b" ")
        path, _, query = target.partition(b"?")
        if line_end < 0 or not _DIGITS_BYTES.fullmatch(size) or not path.startswith(b"/keys/"):
            raise BadRequest(f"write {len(writes)}: expected '/keys/{{key}}[?query] length\\n'")
        if len(path) == len(b"/keys/"):
            raise BadRequest(f"write {len(writes)}: the key is empty")
        at = line_end + 1 + int(size)
        if at > end:
            raise BadRequest(f"write {len(writes)}: the body is shorter than its length")
        writes.append((path[len(b"/keys/") :], query, body[line_end + 1 : at]))
    return writes


def error_body(message: str) -> bytes:
    """The protocol's error body, ``{"error": message}``."""
    return dumps({"error": message})


@attrs.frozen(kw_only=True)
class Condition:
    """One test on a field of the stored value.

    `op` is one of `OPERATORS`, or None for a plain value: the stored value contains
    ``{field: operand}``.
    """

    field: str
    op: str | None
    operand: Any


@attrs.frozen(kw_only=True)
class SortKey:
    """One sort key: a field (or the column ``key``, ``created_at``, ``updated_at``)."""

    field: str
    descending: bool = False

    @classmethod
    def parse(cls, item: object) -> SortKey:
        """``field`` (ascending) or ``-field`` (descending).

        Raises:
            BadRequest: not a string, or not a valid field name once the ``-`` is removed.
        """
        if not isinstance(item, str):
            raise BadRequest(_SORT_HINT)
        descending = item.startswith("-")
        name = item[1:] if descending else item
        if not is_field_name(name):
            raise BadRequest(f"invalid sort field {item!r}: want [-][A-Za-z_][A-Za-z0-9_]*")
        return cls(field=name, descending=descending)

    def to_json(self) -> str:
        return ("-" if self.descending else "") + self.field


@attrs.frozen(kw_only=True)
class Query:
    """A valid `POST /query` body (see the module comment for what valid means).

    `limit` None or 0 means no limit; `count` asks for the number of all matching records.
    """

    prefix: str = ""
    filter: tuple[Condition, ...] = ()
    sort: tuple[SortKey, ...] = ()
    limit: int | None = None
    offset: int = 0
    count: bool = False

    @classmethod
    def parse(cls, body: bytes) -> Query:
        """Parse a request body as strict JSON (an empty body is ``{}``) and validate it.

        Raises:
            BadRequest: the body is not JSON (NaN, Infinity, not UTF-8 included) or not a
                valid query.
        """
        return cls.from_json(loads(body, what="body") if body.strip() else {})

    @classmethod
    def from_json(cls, doc: object) -> Query:
        """Validate a decoded query ``{"prefix","filter","sort","limit","offset","count"}``.

        Every key is optional; None counts as absent.

        Raises:
            BadRequest: `doc` is not an object, has an unknown key, or breaks a rule.
        """
        if not isinstance(doc, dict):
            raise BadRequest("query body must be a JSON object")
        unknown = sorted(set(doc) - _QUERY_KEYS)
        if unknown:
            raise BadRequest(f"unknown query key {unknown[0]!r}")
        prefix = doc.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise BadRequest("prefix must be a string")
        _check_strings(prefix)
        selector = doc.get("filter")
        if selector is not None and not isinstance(selector, dict):
            raise BadRequest("filter must be a JSON object")
        conditions: list[Condition] = []
        for field, condition in (selector or {}).items():
            conditions.extend(_conditions(field, condition))
        sort = doc.get("sort")
        if sort is not None and not isinstance(sort, list):
            raise BadRequest(_SORT_HINT)
        count = doc.get("count")
        if count is not None and not isinstance(count, bool):
            raise BadRequest("count must be a boolean")
        return cls(
            prefix=prefix or "",
            filter=tuple(conditions),
            sort=tuple(SortKey.parse(item) for item in sort or ()),
            limit=None if doc.get("limit") is None else _page_number(doc, "limit"),
            offset=_page_number(doc, "offset"),
            count=bool(count),
        )

    @classmethod
    def build(
        cls,
        *,
        prefix: str = "",
        filter: Mapping[str, Any] | None = None,
        sort: Sequence[str] = (),
        limit: int | None = None,
        offset: int = 0,
        count: bool = False,
    ) -> Query:
        """A query from Python values, validated exactly as the proxy will validate it.

        Raises:
            BadRequest: as `from_json`.
        """
        doc: dict[str, Any] = {"prefix": prefix, "filter": dict(filter or {}), "sort": list(sort)}
        return cls.from_json({**doc, "limit": limit, "offset": offset, "count": count})

    def to_json(self) -> dict[str, Any]:
        """The body as a JSON object; `Query.from_json` of it is an equal query."""
        selector: dict[str, Any] = {}
        for c in self.filter:
            if c.op is None:
                selector[c.field] = c.operand
            else:
                selector.setdefault(c.field, {})[c.op] = c.operand
        doc: dict[str, Any] = {"prefix": self.prefix, "filter": selector}
        doc["sort"] = [key.to_json() for key in self.sort]
        if self.limit is not None:
            doc["limit"] = self.limit
        if self.offset:
            doc["offset"] = self.offset
        if self.count:
            doc["count"] = True
        return doc

    def to_body(self) -> bytes:
        """The request body (compact JSON)."""
        return dumps(self.to_json())


def _conditions(field: object, condition: object) -> list[Condition]:
    if not is_field_name(field):
        raise BadRequest(f"invalid field name {field!r}: want [A-Za-z_][A-Za-z0-9_]*")
    if field in COLUMNS:
        return _column(field, condition)
    if isinstance(condition, dict) and condition:
        operators = [isinstance(k, str) and k.startswith("$") for k in condition]
        if all(operators):
            return [_operator(field, op, arg) for op, arg in condition.items()]
        if any(operators):
            raise BadRequest(f"filter on {field!r} mixes operators and plain fields")
    _check_strings(condition)
    return [Condition(field=field, op=None, operand=condition)]


def _column(field: str, condition: object) -> list[Condition]:
    """Bounds on a column; a timestamp operand is kept in one canonical form (ISO 8601 with
    an offset, which PostgreSQL reads as is)."""
    if not isinstance(condition, dict) or not condition:
        raise BadRequest(f"a filter on the column {field!r} needs " + ", ".join(COLUMN_OPERATORS))
    conditions = []
    for op, arg in condition.items():
        if op not in COLUMN_OPERATORS:
            raise BadRequest(f"operator {op!r} is not allowed on the column {field!r}")
        if not isinstance(arg, str):
            raise BadRequest(f"{op} on {field!r} needs a string")
        _check_strings(arg)
        if field != "key":
            try:
                arg = parse_time(arg).isoformat()
            except (ValueError, OverflowError):
                raise BadRequest(f"{op} on {field!r} needs an RFC 3339 timestamp") from None
        conditions.append(Condition(field=field, op=op, operand=arg))
    return conditions


def _operator(field: str, op: str, arg: object) -> Condition:
    if op not in OPERATORS:
        raise BadRequest(f"unknown operator {op!r} on {field!r}")
    types = OPERATORS[op]
    if types is not None and not isinstance(arg, types):
        raise BadRequest(f"{op} on {field!r} needs {_needs(types)}")
    _check_strings(arg)
    return Condition(field=field, op=op, operand=arg)


def _needs(types: tuple[type, ...]) -> str:
    if types == (list,):
        return "a list"
    if types == (bool,):
        return "true or false"
    return "a number, a string or a boolean"


def _check_strings(value: object) -> None:
    """Refuse what PostgreSQL cannot hold or JSON cannot say: NUL, lone surrogates, NaN."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadRequest("strings in a query cannot contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("strings in a query must be valid Unicode") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest("numbers in a query must be finite")
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)


def _page_number(doc: Mapping[str, object], name: str) -> int:
    value = doc.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PAGE:
        raise BadRequest(f"{name} must be a non-negative integer")
    return value


def is_origin(text: object) -> TypeGuard[str]:
    """Tell whether `text` may name a replica on the bus (`ORIGIN`)."""
    return isinstance(text, str) and ORIGIN.fullmatch(text) is not None


def parse_after(text: str) -> int:
    """The ``after=N`` of a replay: a non-negative decimal integer.

    Raises:
        BadRequest: anything else (a sign, spaces, non-ASCII digits, empty).
    """
    if not _DIGITS.fullmatch(text):
        raise BadRequest("after must be a non-negative decimal integer")
    return int(text)


def event_bytes(published: Published) -> bytes:
    """The bus event of a frame, as JSON bytes (module comment).

    The data is taken from the frame as it is (compact one-line JSON), not encoded again.
    """
    _, found, rest = published.frame.partition(b"\ndata: ")
    if not found or not rest.endswith(b"\n\n"):
        raise ValueError("not a frame of encode_frame")
    data = rest[:-2]
    if published.is_fly:
        return b'{"kind":"fly","data":' + data + b"}"
    rev = b"null" if published.version is None else b"%d" % published.version
    terminal = b"true" if published.terminal else b"false"
    head = b'{"kind":"status","rev":%s,"terminal":%s' % (rev, terminal)
    if published.rank is not None:
        head += b',"rank":%d' % published.rank
    return head + b',"data":' + data + b"}"


def published_of(event: object, seq: int) -> Published:
    """The frame of a bus event (`event_bytes` read back), with its `seq`.

    Raises:
        StoreProtocolError: not an event in our wire form.
    """
    if isinstance(event, dict) and "data" in event:
        kind, data = event.get("kind"), event["data"]
        if kind == "fly":
            return Published(frame=encode_frame("fly", data), seq=seq)
        rev, rank, terminal = event.get("rev"), event.get("rank"), event.get("terminal")
        if (
            kind == "status"
            and isinstance(data, dict)
            and type(rev) is int
            and (rank is None or type(rank) is int)
            and type(terminal) is bool
        ):
            return Published(
                frame=encode_frame("status", data),
                terminal=terminal,
                version=rev,
                rank=rank,
                seq=seq,
            )
    raise StoreProtocolError("bus event is not a fly or status event of the mesh API")


@attrs.frozen(kw_only=True)
class BusEvent:
    """One record of the bus (a watch line, a replay row): an event as the proxy stored it."""

    seq: int
    key: str
    origin: str
    event: Any

    @classmethod
    def from_json(cls, doc: object) -> BusEvent:
        """A decoded ``{"seq","key","origin","event"}`` record.

        Raises:
            StoreProtocolError: a field is missing or of the wrong type.
        """
        if isinstance(doc, dict):
            seq, key, origin = doc.get("seq"), doc.get("key"), doc.get("origin")
            if type(seq) is int and isinstance(key, str) and isinstance(origin, str):
                return cls(seq=seq, key=key, origin=origin, event=doc.get("event"))
        raise StoreProtocolError("bus record is not {seq, key, origin, event}")

    def published(self) -> Published:
        """The frame to deliver (`published_of`); raises `StoreProtocolError`."""
        return published_of(self.event, self.seq)


_RECORD_HEAD: Final = re.compile(r'\{"seq":[0-9]+,"key":')
_ORIGIN_FIELD: Final = ',"origin":'
_scan_string = json.JSONDecoder().raw_decode


def peek_bus_record(line: str) -> tuple[str, str] | None:
    """The key and origin of a watch line, read without decoding its event, when the line
    starts as our proxy writes it (``{"seq":N,"key":K,"origin":O,...``); None otherwise (then
    decode it whole). A replica reading every line of the bus skips its own and those of keys
    it does not follow at the cost of this, not of the event's JSON."""
    head = _RECORD_HEAD.match(line)
    if head is None:
        return None
    try:
        key, at = _scan_string(line, head.end())
        if not line.startswith(_ORIGIN_FIELD, at):
            return None
        origin, _ = _scan_string(line, at + len(_ORIGIN_FIELD))
    except ValueError:
        return None
    if isinstance(key, str) and isinstance(origin, str):
        return key, origin
    return None
