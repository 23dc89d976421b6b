"""Parsers of untrusted input (docs/contract.md: "HTTP: common rules", "External port").

Every parser either returns a typed value or raises a `ClientError` that carries its reply;
the property tests at the end feed them garbage to prove nothing else escapes.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_proto import (
    MAX_BODY,
    BadRequest,
    ClientError,
    CreateRequest,
    FlyEvent,
    ListQuery,
    NotFound,
    PayloadTooLarge,
    Status,
    StatusEvent,
    check_body_size,
    parse_event,
    parse_id,
    parse_query,
    parse_wait,
)
from mesh_proto._requests import MAX_TIMEOUT, Cursor

from ._support import ID, OTHER_ID, T0, envelope, later

CURSOR = Cursor(created_at=T0, id=ID).encode()


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- create -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "raw", "expected"),
    [
        ("actor=echo", b"", CreateRequest(actor="echo")),
        ("actor=echo", b" \r\n\t", CreateRequest(actor="echo")),
        (b"actor=echo", b"{}", CreateRequest(actor="echo")),
        ("actor=echo&namespace=prod", b"{}", CreateRequest(actor="echo", namespace="prod")),
        ("namespace=prod&actor=a.b_c-d9", b"{}", CreateRequest(actor="a.b_c-d9", namespace="prod")),
        ("actor=" + "a" * 63, b"{}", CreateRequest(actor="a" * 63)),
        ("actor=x&actor=echo", b"{}", CreateRequest(actor="echo")),
        (
            "actor=echo",
            body({"payload": [1, "x"], "headers": {"h": "v"}, "timeout": 1.5}),
            CreateRequest(actor="echo", payload=[1, "x"], headers={"h": "v"}, timeout=1.5),
        ),
        ("actor=echo", body({"payload": None}), CreateRequest(actor="echo")),
        ("actor=echo", body({"payload": "s"}), CreateRequest(actor="echo", payload="s")),
        ("actor=echo", body({"timeout": 0}), CreateRequest(actor="echo")),
        ("actor=echo", body({"timeout": 30}), CreateRequest(actor="echo", timeout=30.0)),
        ("actor=echo", body({"timeout": 1e-3}), CreateRequest(actor="echo", timeout=0.001)),
        ("actor=echo", body({"timeout": -0.0}), CreateRequest(actor="echo")),
        ("actor=echo", body({"timeout": None}), CreateRequest(actor="echo")),
        ("actor=echo", body({"headers": None}), CreateRequest(actor="echo")),
        (
            "actor=echo",
            body({"timeout": MAX_TIMEOUT}),
            CreateRequest(actor="echo", timeout=MAX_TIMEOUT),
        ),
        ("actor=echo", body({"other": 1}), CreateRequest(actor="echo")),
    ],
    ids=[
        "empty-body",
        "blank-body",
        "bytes-query",
        "namespace",
        "name-charset",
        "name-63-chars",
        "last-actor-wins",
        "all-fields",
        "payload-null",
        "payload-string",
        "timeout-0",
        "timeout-int",
        "timeout-fractional",
        "timeout-minus-zero",
        "timeout-null",
        "headers-null",
        "timeout-max",
        "unknown-key-ignored",
    ],
)
def test_create_accepts(query: str | bytes, raw: bytes, expected: CreateRequest) -> None:
    parsed = CreateRequest.parse(query, raw)
    assert parsed == expected
    assert type(parsed.timeout) is float


CREATE_ERRORS = [
    # (id, query, body, message fragment)
    ("no-actor", "", b"{}", "missing actor"),
    ("empty-actor", "actor=", b"{}", "missing actor"),
    ("other-params-only", "namespace=prod", b"{}", "missing actor"),
    ("actor-space", "actor=a%20b", b"{}", "invalid actor 'a b'"),
    ("actor-leading-dash", "actor=-a", b"{}", "invalid actor"),
    ("actor-trailing-dot", "actor=a.", b"{}", "invalid actor"),
    ("actor-64-chars", "actor=" + "a" * 64, b"{}", "invalid actor"),
    ("actor-slash", "actor=a%2Fb", b"{}", "invalid actor"),
    ("actor-non-ascii", "actor=%C3%A9", b"{}", "invalid actor"),
    ("empty-namespace", "actor=a&namespace=", b"{}", "missing namespace"),
    ("bad-namespace", "actor=a&namespace=a_", b"{}", "invalid namespace"),
    ("query-not-utf8", "actor=%FF", b"{}", "invalid query string"),
    ("json-truncated", "actor=a", b"{", "invalid JSON body"),
    ("json-word", "actor=a", b"nope", "invalid JSON body"),
    ("json-not-utf8", "actor=a", b'{"payload": "\xff"}', "invalid JSON body: not UTF-8"),
    ("json-nan", "actor=a", b'{"timeout": NaN}', "NaN is not valid JSON"),
    ("json-infinity", "actor=a", b'{"payload": Infinity}', "Infinity is not valid JSON"),
    ("json-minus-infinity", "actor=a", b'{"payload": -Infinity}', "-Infinity is not valid"),
    ("json-overflow", "actor=a", b'{"payload": 1e400}', "number 1e400 is out of range"),
    ("json-deep", "actor=a", b"[" * 100_000 + b"]" * 100_000, "body is nested deeper than 128"),
    ("json-trailing", "actor=a", b"{} {}", "invalid JSON body: Extra data"),
    ("body-array", "actor=a", b"[]", "body must be a JSON object"),
    ("body-string", "actor=a", b'"x"', "body must be a JSON object"),
    ("body-null", "actor=a", b"null", "body must be a JSON object"),
    ("body-number", "actor=a", b"1", "body must be a JSON object"),
    ("headers-array", "actor=a", body({"headers": []}), "headers must be a JSON object"),
    ("headers-string", "actor=a", body({"headers": "h"}), "headers must be a JSON object"),
    ("headers-true", "actor=a", body({"headers": True}), "headers must be a JSON object"),
    ("timeout-negative", "actor=a", body({"timeout": -1}), "non-negative number"),
    ("timeout-negative-fraction", "actor=a", body({"timeout": -0.5}), "non-negative number"),
    ("timeout-true", "actor=a", body({"timeout": True}), "non-negative number"),
    ("timeout-false", "actor=a", body({"timeout": False}), "non-negative number"),
    ("timeout-string", "actor=a", body({"timeout": "5"}), "non-negative number"),
    ("timeout-array", "actor=a", body({"timeout": [5]}), "non-negative number"),
    ("timeout-object", "actor=a", body({"timeout": {}}), "non-negative number"),
    ("timeout-inf", "actor=a", b'{"timeout": 1e999}', "out of range"),
    ("timeout-too-large", "actor=a", body({"timeout": MAX_TIMEOUT + 1}), "at most 315360000"),
    ("timeout-huge-int", "actor=a", b'{"timeout": 1' + b"0" * 400 + b"}", "at most"),
    ("timeout-huge-negative", "actor=a", b'{"timeout": -1' + b"0" * 400 + b"}", "non-negative"),
    ("route", "actor=a", body({"route": {"prev": []}}), "field 'route' is not allowed"),
    ("route-null", "actor=a", body({"route": None}), "field 'route' is not allowed"),
    ("route_next-null", "actor=a", body({"route_next": None}), "field 'route_next' is not"),
    ("next", "actor=a", body({"next": ["b"]}), "field 'next' is not allowed"),
    ("next-null", "actor=a", body({"next": None}), "field 'next' is not allowed"),
]


@pytest.mark.parametrize(
    ("query", "raw", "message"), [pytest.param(*case[1:], id=case[0]) for case in CREATE_ERRORS]
)
def test_create_rejects(query: str, raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        CreateRequest.parse(query, raw)
    assert caught.value.status_hint == 400
    assert message in caught.value.message
    assert json.loads(caught.value.body()) == {"error": caught.value.message}


def test_create_body_limit() -> None:
    filler = b'{"payload":"' + b"a" * (MAX_BODY - 14) + b'"}'
    assert len(filler) == MAX_BODY
    assert CreateRequest.parse("actor=a", filler).payload == "a" * (MAX_BODY - 14)
    with pytest.raises(PayloadTooLarge) as caught:
        CreateRequest.parse("actor=a", filler + b" ")
    assert caught.value.status_hint == 413


def test_check_body_size() -> None:
    check_body_size(0)
    check_body_size(MAX_BODY)
    with pytest.raises(PayloadTooLarge, match="body larger than 10485760 bytes"):
        check_body_size(MAX_BODY + 1)


# --- list ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param(q, e, id=f"bytes:{q.decode()}" if isinstance(q, bytes) else q or "empty")
        for q, e in [
            ("", ListQuery(statuses=(), limit=100, offset=0)),
            (b"", ListQuery()),
            ("status=pending", ListQuery(statuses=(Status.PENDING,))),
            ("status=running", ListQuery(statuses=(Status.RUNNING,))),
            ("status=paused", ListQuery(statuses=(Status.PAUSED,))),
            ("status=succeeded", ListQuery(statuses=(Status.SUCCEEDED,))),
            ("status=failed", ListQuery(statuses=(Status.FAILED,))),
            ("status=canceled", ListQuery(statuses=(Status.CANCELED,))),
            ("limit=1", ListQuery(limit=1)),
            ("limit=1000", ListQuery(limit=1000)),
            ("limit=007", ListQuery(limit=7)),
            ("offset=0", ListQuery()),
            ("offset=123456789", ListQuery(offset=123456789)),
            ("limit=5&limit=7", ListQuery(limit=7)),
            (
                "status=failed&limit=10&offset=20&x=y",
                ListQuery(statuses=(Status.FAILED,), limit=10, offset=20),
            ),
            (
                "status=running,paused,running",
                ListQuery(statuses=(Status.PAUSED, Status.RUNNING)),
            ),
            ("actor=echo", ListQuery(actor="echo")),
            (
                "created_after=0001-01-01T00:00:00%2B01:00&created_before=9999-12-31T23:00:00-02:00",
                ListQuery(
                    created_after=datetime.min.replace(tzinfo=UTC),
                    created_before=datetime.max.replace(tzinfo=UTC),
                ),
            ),
            (
                "created_after=2026-11-28T14:24:06.123456Z&created_before=2026-11-28T15:24:06%2B01:00",
                ListQuery(created_after=T0, created_before=T0.replace(microsecond=0)),
            ),
            (
                f"cursor={CURSOR}&limit=3",
                ListQuery(cursor=Cursor(created_at=T0, id=ID), limit=3),
            ),
            (f"cursor={CURSOR}&offset=0", ListQuery(cursor=Cursor(created_at=T0, id=ID))),
        ]
    ],
)
def test_list_accepts(query: str | bytes, expected: ListQuery) -> None:
    assert ListQuery.parse(query) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param(q, m, id=q)
        for q, m in [
            ("status=Running", "invalid status 'Running': one of pending, running, paused,"),
            ("status=RUNNING", "invalid status"),
            ("status=", "invalid status ''"),
            ("status=received", "invalid status 'received'"),
            ("status=running%20", "invalid status"),
            ("limit=0", "limit must be from 1 to 1000"),
            ("limit=1001", "limit must be from 1 to 1000"),
            ("limit=-1", "limit must be an integer"),
            ("limit=", "limit must be an integer"),
            ("limit=1.5", "limit must be an integer"),
            ("limit=1e3", "limit must be an integer"),
            ("limit=+5", "limit must be an integer"),
            ("limit=%205", "limit must be an integer"),
            ("limit=abc", "limit must be an integer"),
            ("limit=%D9%A3", "limit must be an integer"),
            ("limit=" + "9" * 19, "limit must be an integer"),
            ("offset=-1", "offset must be an integer"),
            ("offset=x", "offset must be an integer"),
            ("offset=", "offset must be an integer"),
            ("offset=0x10", "offset must be an integer"),
            ("limit=%FF", "invalid query string"),
            ("status=running,", "invalid status ''"),
            ("status=running,Paused", "invalid status 'Paused'"),
            ("actor=", "missing actor"),
            ("actor=a%20b", "invalid actor"),
            ("created_after=yesterday", "created_after must be an RFC 3339 timestamp"),
            ("created_after=2026-02-30T00:00:00Z", "created_after must be an RFC 3339"),
            ("created_before=2026-11-28T14:24:06", "created_before must be an RFC 3339"),
            ("cursor=", "invalid cursor"),
            ("cursor=%%%", "invalid cursor"),
            ("cursor=!!!!", "invalid cursor"),
            ("cursor=_w", "invalid cursor"),  # not UTF-8 once decoded
            ("cursor=eA", "invalid cursor"),  # one field
            ("cursor=eCB5", "invalid cursor"),  # `x y`: not a timestamp
            (f"cursor={CURSOR}&offset=1", "cursor and offset cannot be used together"),
        ]
    ],
)
def test_list_rejects(query: str, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        ListQuery.parse(query)
    assert message in caught.value.message


# --- events -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"type":"fly","data":{"token":"hi"}}', FlyEvent(data={"token": "hi"})),
        (b'{"type":"fly","data":[1,2]}', FlyEvent(data=[1, 2])),
        (b'{"type":"fly","data":"text"}', FlyEvent(data="text")),
        (b'{"type":"fly","data":null}', FlyEvent(data=None)),
        (b'{"type":"fly"}', FlyEvent()),
        (b'{"type":"fly","status":"bogus"}', FlyEvent()),
        (b'{"type":"status","status":"paused"}', StatusEvent(status=Status.PAUSED)),
        (
            b'{"type":"status","status":"failed","data":{"error":"boom"}}',
            StatusEvent(status=Status.FAILED, data={"error": "boom"}),
        ),
        (b'{"type":"status","status":"completed"}', StatusEvent(status=Status.RUNNING)),
    ],
    ids=["fly-object", "fly-array", "fly-string", "fly-null", "fly-no-data", "fly-extra-keys",
         "status", "status-data", "status-alias"],
)  # fmt: skip
def test_event_accepts(raw: bytes, expected: object) -> None:
    assert parse_event(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "event type must be 'status' or 'fly'"),
        (b"{}", "event type must be 'status' or 'fly'"),
        (b'{"type":"Status","status":"running"}', "event type must be"),
        (b'{"type":"FLY"}', "event type must be"),
        (b'{"type":null}', "event type must be"),
        (b'{"type":["fly"]}', "event type must be"),
        (b'{"type":"status"}', "status must be one of pending, running, paused, succeeded, "
                                "failed, canceled, received, processing, completed"),
        (b'{"type":"status","status":null}', "status must be one of"),
        (b'{"type":"status","status":"Running"}', "status must be one of"),
        (b'{"type":"status","status":"done"}', "status must be one of"),
        (b'{"type":"status","status":1}', "status must be one of"),
        (b'{"type":"status","status":"running","data":[]}', "data must be a JSON object"),
        (b'{"type":"status","status":"running","data":"x"}', "data must be a JSON object"),
        (b'{"type":"status","status":"running","data":1}', "data must be a JSON object"),
        (b"[]", "event must be a JSON object"),
        (b"{", "invalid JSON event"),
        (b'{"type":"fly","data":NaN}', "invalid JSON event: NaN is not valid JSON"),
    ],
    ids=["empty", "no-type", "type-case", "fly-case", "type-null", "type-array", "no-status",
         "status-null", "status-case", "status-unknown", "status-number", "data-array",
         "data-string", "data-number", "not-object", "invalid-json", "nan"],
)  # fmt: skip
def test_event_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_event(raw)
    assert message in caught.value.message


def test_event_body_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_event(b" " * (MAX_BODY + 1))


# --- ids and query strings ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [ID, str(uuid.UUID(int=0)), str(uuid.uuid1(node=1, clock_seq=1))],
    ids=["uuid4", "nil", "uuid1"],
)
def test_id_accepts_canonical_uuids(raw: str) -> None:
    assert parse_id(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "x",
        ID.upper(),
        ID.replace("-", ""),
        "{" + ID + "}",
        "urn:uuid:" + ID,
        " " + ID,
        ID + "\n",
        ID + "0",
        ID[:-1],
        ID.replace("-", "_"),
        "\u0661" * 32,
        "../" + ID,
    ],
    ids=["empty", "word", "upper", "hex", "braces", "urn", "leading-space", "newline",
         "too-long", "too-short", "underscores", "arabic-digits", "dot-dot"],
)  # fmt: skip
def test_id_rejects_everything_else(raw: str) -> None:
    with pytest.raises(NotFound) as caught:
        parse_id(raw)
    assert caught.value.status_hint == 404
    assert caught.value.body() == b'{"error": "envelope not found"}'


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {}),
        ("a=1&b=2", {"a": "1", "b": "2"}),
        ("a=1&a=2", {"a": "2"}),
        ("a", {"a": ""}),
        ("a=", {"a": ""}),
        ("a=%20+b%2B", {"a": "  b+"}),
        (b"a=%C3%A9&b=\xc3\xa9", {"a": "é", "b": "é"}),
        ("a=1;b=2", {"a": "1;b=2"}),
        ("&&a=1&&", {"a": "1"}),
    ],
    ids=["empty", "two", "last-wins", "bare-key", "blank", "plus-and-percent", "utf8",
         "semicolon-is-data", "empty-pairs"],
)  # fmt: skip
def test_parse_query(query: str | bytes, expected: dict[str, str]) -> None:
    assert parse_query(query) == expected


@pytest.mark.parametrize("query", [b"a=\xff", "a=%FF", "a=%C3", b"\xc3\xa9=%e9"], ids=repr)
def test_parse_query_rejects_non_utf8(query: str | bytes) -> None:
    with pytest.raises(BadRequest, match="invalid query string"):
        parse_query(query)


# --- nothing but ClientError escapes ------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
interesting = st.sampled_from(
    ["type", "status", "data", "payload", "headers", "timeout", "route", "next", "prev",
     "progress", "progress_percent", "actor", "limit", "offset"]
)  # fmt: skip
json_objects = st.dictionaries(
    interesting,
    json_values | st.sampled_from(["status", "fly", "running", "received", "Running"]),
    max_size=5,
)
json_bodies = (json_values | json_objects).map(lambda v: json.dumps(v).encode())
bodies = st.binary(max_size=64) | json_bodies
queries = (
    st.binary(max_size=40)
    | st.text(max_size=40)
    | st.lists(
        st.tuples(
            st.sampled_from(["actor", "namespace", "status", "limit", "offset", "x"]),
            st.text(max_size=8) | st.sampled_from(["running", "5", "1000", "0", "-1", "echo"]),
        ),
        max_size=4,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
)


def only_client_errors(parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except ClientError as exc:
        assert exc.status_hint in (400, 404, 413)
        assert json.loads(exc.body()) == {"error": exc.message}
        return exc


FUZZ = settings(max_examples=200, deadline=None)


@FUZZ
@given(query=queries, raw=bodies)
def test_fuzz_create(query: str | bytes, raw: bytes) -> None:
    result = only_client_errors(CreateRequest.parse, query, raw)
    assert isinstance(result, CreateRequest | ClientError)
    if isinstance(result, CreateRequest):
        assert 0 <= result.timeout <= MAX_TIMEOUT
        assert isinstance(result.headers, dict)


@FUZZ
@given(query=queries)
def test_fuzz_list(query: str | bytes) -> None:
    result = only_client_errors(ListQuery.parse, query)
    assert isinstance(result, ListQuery | ClientError)
    if isinstance(result, ListQuery):
        assert 1 <= result.limit <= 1000 and result.offset >= 0


@FUZZ
@given(raw=bodies)
def test_fuzz_event(raw: bytes) -> None:
    result = only_client_errors(parse_event, raw)
    assert isinstance(result, StatusEvent | FlyEvent | ClientError)
    if isinstance(result, StatusEvent):
        assert isinstance(result.data, dict)


@FUZZ
@given(raw=st.text(max_size=45) | st.uuids().map(str))
def test_fuzz_id(raw: str) -> None:
    result = only_client_errors(parse_id, raw)
    assert result == raw or isinstance(result, NotFound)


@FUZZ
@given(query=queries)
def test_fuzz_query(query: str | bytes) -> None:
    result = only_client_errors(parse_query, query)
    assert isinstance(result, dict | BadRequest)


def test_cursor_token_is_opaque_urlsafe_and_round_trips() -> None:
    assert CURSOR.isascii() and "=" not in CURSOR and "+" not in CURSOR and "/" not in CURSOR
    assert Cursor.decode(CURSOR) == Cursor(created_at=T0, id=ID)


def test_next_cursor_names_the_last_row_of_a_page_only_when_another_follows() -> None:
    rows = [envelope(envelope_id=ID, created_at=later(2)), envelope(envelope_id=OTHER_ID)]
    assert ListQuery(limit=2).next_cursor(rows) is None
    assert ListQuery(limit=2).next_cursor(rows[:1]) is None
    token = ListQuery(limit=1).next_cursor(rows)
    assert token is not None and Cursor.decode(token) == Cursor(created_at=later(2), id=ID)


@pytest.mark.parametrize(
    ("query", "matched"),
    [
        (ListQuery(), True),
        (ListQuery(actor="echo"), True),
        (ListQuery(actor="other"), False),
        (ListQuery(statuses=(Status.PENDING, Status.RUNNING)), True),
        (ListQuery(statuses=(Status.RUNNING,)), False),
        (ListQuery(created_after=later(-1), created_before=later(1)), True),
        (ListQuery(created_after=T0), False),
        (ListQuery(created_before=T0), False),
    ],
)
def test_list_query_matches_its_filters(query: ListQuery, matched: bool) -> None:
    assert query.matches(envelope()) is matched


@pytest.mark.parametrize(
    ("query", "seconds"),
    [
        ("", 0.0),
        ("wait=0", 0.0),
        ("wait=0.25", 0.25),
        ("wait=60", 60.0),
        ("x=1&wait=1.5", 1.5),
        ("wait=1e1", 10.0),
        ("wait=1.5e-07", 1.5e-07),
        ("wait=.5", 0.5),
        ("", 0.0),
        (b"", 0.0),
        ("x=1", 0.0),
        (b"wait=2", 2.0),
    ],
)
def test_parse_wait_accepts(query: str | bytes, seconds: float) -> None:
    assert parse_wait(query) == seconds


@pytest.mark.parametrize(
    "query",
    ["wait=", "wait=-1", "wait=60.001", "wait=61", "wait=1e2", "wait=inf", "wait=nan", "wait=x",
     "wait=" + "0" * 41],
)  # fmt: skip
def test_parse_wait_rejects(query: str) -> None:
    with pytest.raises(BadRequest, match="wait must be a number of seconds from 0 to 60"):
        parse_wait(query)
