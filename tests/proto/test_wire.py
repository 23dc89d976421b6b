"""The state-proxy wire protocol, both sides: keys, query strings, guards, the `/query` model.

The client builds with these functions and the proxy decodes and validates with the same ones,
so the properties here are the agreement between the two: every key round-trips through
`encode_key` / `decode_key`, and every query the client builds is one the proxy accepts, equal
to what was built.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_proto import (
    COLUMNS,
    MAX_FIELD_NAME,
    MAX_PAGE,
    OPERATORS,
    BadRequest,
    Condition,
    Query,
    SortKey,
    decode_key,
    decode_query_string,
    encode_key,
    error_body,
    is_field_name,
    parse_revision,
    query_request,
)
from mesh_proto._store import key_target

# Keys the proxy can store: any text without NUL or lone surrogates.
KEYS = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40
)


@settings(max_examples=500, deadline=None)
@given(KEYS)
def test_every_key_round_trips_through_the_path(key: str) -> None:
    segment = encode_key(key)
    assert segment.isascii()
    assert "/" not in segment and "?" not in segment and "#" not in segment
    assert segment not in (".", "..")
    assert decode_key(segment.encode()) == key
    assert key_target(key).removeprefix("/keys/") == segment


@pytest.mark.parametrize(
    ("key", "segment"),
    [
        ("msg/abc", "msg%2Fabc"),
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("a b+c", "a%20b%2Bc"),
        ("100%", "100%25"),
        ("ü", "%C3%BC"),
    ],
)
def test_encode_key(key: str, segment: str) -> None:
    assert encode_key(key) == segment


def test_key_target_with_params() -> None:
    assert key_target("m/1", if_status="a b", if_rev="3") == "/keys/m%2F1?if_status=a+b&if_rev=3"


# Mostly the characters the encoders leave as they are, so both of `key_target`'s paths are hit.
PLAIN_OR_NOT = st.text(alphabet=st.sampled_from("aZ09_.~- /+%?&=ü"), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    PLAIN_OR_NOT, st.dictionaries(st.sampled_from(["if_rev", "if_status", "publish"]), PLAIN_OR_NOT)
)
def test_key_target_is_what_the_urllib_encoders_give(key: str, params: dict[str, str]) -> None:
    segment = urllib.parse.quote(key, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    query = "?" + urllib.parse.urlencode(params) if params else ""
    assert key_target(key, **params) == "/keys/" + segment + query


def test_decode_key_decodes_exactly_once_and_keeps_raw_slashes() -> None:
    assert decode_key(b"a%252Fb") == "a%2Fb"
    assert decode_key(b"x/y") == "x/y"
    assert decode_key(b"%2e%2E") == ".."


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"%zz", "malformed"),
        (b"a%", "malformed"),
        (b"a%4", "malformed"),
        (b"%ff%fe", "UTF-8"),
        (b"a%00b", "NUL"),
    ],
)
def test_undecodable_keys(raw: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why) as info:
        decode_key(raw)
    assert info.value.status_hint == 400


PIECES = [b"%2F", b"%2f", b"%", b"/", b"=", b"&", b"+", b"a", b"Z", b"0", b"_", b"\x00",
          b"\xc3\xa9", b"%41", b" "]  # fmt: skip
RAW = st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join)


def _reference_key(raw: bytes) -> str | None:
    """`decode_key` by its definition; None where it must refuse."""
    if re.search(rb"%(?![0-9A-Fa-f]{2})", raw):
        return None
    try:
        key = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in key else key


@settings(max_examples=500)
@given(RAW)
def test_decode_key_and_query_string_agree_with_urllib(raw: bytes) -> None:
    """The fast paths (nothing to decode) answer as the decoders they skip."""
    key = _reference_key(raw)
    if key is None:
        with pytest.raises(BadRequest):
            decode_key(raw)
    else:
        assert decode_key(raw) == key
    try:
        text = raw.decode("utf-8")
        params = dict(urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        with pytest.raises(BadRequest):
            decode_query_string(raw)
    else:
        assert decode_query_string(raw) == params


def test_decode_query_string() -> None:
    assert decode_query_string(b"prefix=msg%2F&x=1&x=2&flag") == {
        "prefix": "msg/",
        "x": "2",
        "flag": "",
    }
    assert decode_query_string(b"s=a+b%26c") == {"s": "a b&c"}
    assert decode_query_string(b"") == {}
    with pytest.raises(BadRequest):
        decode_query_string(b"s=%ff")
    with pytest.raises(BadRequest):
        decode_query_string(b"s=\xff")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("0", "0"), ("7", "7"), ("007", "7"), ("000", "0"), ("1" * 5000, "1" * 5000)],
)
def test_parse_revision(text: str, canonical: str) -> None:
    assert parse_revision(text) == canonical


@pytest.mark.parametrize(
    "text", ["", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "1_000", "\u0661", "a"]
)
def test_bad_revisions(text: str) -> None:
    with pytest.raises(BadRequest, match="if_rev"):
        parse_revision(text)


def test_error_body() -> None:
    assert error_body('no "such" key') == b'{"error":"no \\"such\\" key"}'
    assert json.loads(error_body("é")) == {"error": "é"}


def test_field_names() -> None:
    assert is_field_name("status") and is_field_name("_x1") and is_field_name("a" * MAX_FIELD_NAME)
    for bad in ("", "1a", "a-b", "a b", "ü", "$or", "a" * (MAX_FIELD_NAME + 1), 5, None):
        assert not is_field_name(bad)


def test_query_parse_builds_the_model() -> None:
    body = json.dumps(
        {
            "prefix": "msg/",
            "filter": {"status": "pending", "n": {"$gt": 1, "$lte": 5}, "o": {}},
            "sort": ["-created_at", "n"],
            "limit": 10,
            "offset": 20,
            "count": True,
        }
    ).encode()
    assert Query.parse(body) == Query(
        prefix="msg/",
        filter=(
            Condition(field="status", op=None, operand="pending"),
            Condition(field="n", op="$gt", operand=1),
            Condition(field="n", op="$lte", operand=5),
            Condition(field="o", op=None, operand={}),
        ),
        sort=(SortKey(field="created_at", descending=True), SortKey(field="n")),
        limit=10,
        offset=20,
        count=True,
    )


def test_empty_and_null_members_mean_absent() -> None:
    assert Query.parse(b"") == Query.parse(b"  ") == Query.parse(b"{}") == Query()
    nulls = b'{"prefix": null, "filter": null, "sort": null, "limit": null, "offset": null}'
    assert Query.parse(nulls) == Query()
    assert Query.parse(b'{"limit": 0}') == Query(limit=0)
    assert Query().to_json() == {"prefix": "", "filter": {}, "sort": []}


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ([], "JSON object"),
        ({"other": 1}, "unknown query key 'other'"),
        ({"prefix": 1}, "prefix must be a string"),
        ({"prefix": "a\x00"}, "NUL"),
        ({"prefix": "\ud800"}, "valid Unicode"),
        ({"filter": []}, "filter must be a JSON object"),
        ({"filter": {"a-b": 1}}, "invalid field name"),
        ({"filter": {"a": {"$gt": 1, "b": 2}}}, "mixes operators"),
        ({"filter": {"a": {"$regex": "x"}}}, "unknown operator"),
        ({"filter": {"a": {"$gt": [1]}}}, "a number, a string or a boolean"),
        ({"filter": {"a": {"$in": "x"}}}, "a list"),
        ({"filter": {"a": {"$nin": {}}}}, "a list"),
        ({"filter": {"a": {"$exists": 1}}}, "true or false"),
        ({"filter": {"a": {"$eq": ["\x00"]}}}, "NUL"),
        ({"filter": {"a": {"k\x00": 1}}}, "NUL"),
        ({"filter": {"a": math.nan}}, "finite"),
        ({"filter": {"a": {"$lt": math.inf}}}, "finite"),
        ({"sort": "a"}, "sort must be a list"),
        ({"sort": [1]}, "sort must be a list"),
        ({"sort": ["-"]}, "invalid sort field"),
        ({"sort": ["--a"]}, "invalid sort field"),
        ({"limit": -1}, "limit must be"),
        ({"limit": True}, "limit must be"),
        ({"limit": 1.0}, "limit must be"),
        ({"offset": MAX_PAGE + 1}, "offset must be"),
        ({"count": 1}, "count must be a boolean"),
    ],
)
def test_invalid_queries(doc: object, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        Query.from_json(doc)


@pytest.mark.parametrize("body", [b"{bad", b"NaN", b'{"limit": Infinity}', b"\xff", b"[1e400]"])
def test_query_bodies_must_be_strict_json(body: bytes) -> None:
    with pytest.raises(BadRequest, match="invalid JSON"):
        Query.parse(body)


def test_query_request_is_the_encoded_model() -> None:
    request = query_request(prefix="msg/", filter={"status": {"$in": ["pending"]}}, limit=5)
    assert (
        request.body
        == Query.build(prefix="msg/", filter={"status": {"$in": ["pending"]}}, limit=5).to_body()
    )
    with pytest.raises(BadRequest):
        query_request(prefix="msg/", filter={"bad name": 1})


# What a client may put in a query: valid names, every operator with operands of its type,
# any JSON for plain values (an all-`$` object would be an operator map, so keys avoid `$`).
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(TEXT.filter(lambda k: not k.startswith("$")), inner, max_size=3)
    ),
    max_leaves=8,
)
ORDERED = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT
)
OPERANDS: dict[str, st.SearchStrategy[Any]] = {
    op: {None: JSON, (list,): st.lists(JSON, max_size=3), (bool,): st.booleans()}.get(
        types, ORDERED
    )
    for op, types in OPERATORS.items()
}
OPERATOR_MAPS = st.dictionaries(
    st.sampled_from(sorted(OPERATORS)), st.just(None), min_size=1, max_size=3
).flatmap(lambda ops: st.fixed_dictionaries({op: OPERANDS[op] for op in ops}))
# (Column names take bounds only; `test_list.py` covers them.)
FIELDS = NAMES.filter(lambda name: name not in COLUMNS)
FILTERS = st.dictionaries(FIELDS, st.one_of(JSON, OPERATOR_MAPS), max_size=4)


@settings(max_examples=400, deadline=None)
@given(
    prefix=TEXT,
    selector=st.one_of(st.none(), FILTERS),
    sort=st.lists(st.builds(lambda d, n: d + n, st.sampled_from(["", "-"]), NAMES), max_size=3),
    limit=st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_PAGE)),
    offset=st.integers(min_value=0, max_value=MAX_PAGE),
    count=st.booleans(),
)
def test_every_query_the_client_builds_is_accepted_as_built(
    prefix: str,
    selector: dict[str, Any] | None,
    sort: list[str],
    limit: int | None,
    offset: int,
    count: bool,
) -> None:
    request = query_request(
        prefix=prefix, filter=selector, sort=sort, limit=limit, offset=offset, count=count
    )
    built = Query.build(
        prefix=prefix, filter=selector, sort=sort, limit=limit, offset=offset, count=count
    )
    received = Query.parse(request.body)  # what the proxy does with the body
    assert received == built
    assert received.to_body() == request.body
    assert [k.to_json() for k in received.sort] == sort
