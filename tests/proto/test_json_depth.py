"""The nesting bound on untrusted bodies (`MAX_DEPTH`): exactly at the bound is accepted, one
level over is refused before parsing, whatever the mix of arrays, objects and strings.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_proto import (
    MAX_DEPTH,
    BadRequest,
    CreateRequest,
    FlyEvent,
    StatusEvent,
    StoreProtocolError,
    loads,
    parse_event,
)


def depth(value: Any) -> int:
    """Arrays and objects on the deepest path (`[]` is 1, a scalar 0)."""
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def nested(levels: int, leaf: Any = 1) -> Any:
    """`levels` levels alternating arrays and objects around `leaf`."""
    value = leaf
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


def create_body(levels: int) -> bytes:
    """A create body nested exactly `levels` deep (the body object is one of them)."""
    return json.dumps({"payload": nested(levels - 1)}).encode()


def test_max_depth_is_128() -> None:
    assert MAX_DEPTH == 128
    assert depth(json.loads(create_body(MAX_DEPTH))) == MAX_DEPTH


def test_create_at_the_bound_is_accepted() -> None:
    request = CreateRequest.parse("actor=a", create_body(MAX_DEPTH))
    assert request.payload == nested(MAX_DEPTH - 1)


def test_create_one_over_is_refused() -> None:
    with pytest.raises(BadRequest) as info:
        CreateRequest.parse("actor=a", create_body(MAX_DEPTH + 1))
    assert info.value.status_hint == 400
    assert info.value.message == "body is nested deeper than 128 levels"


@pytest.mark.parametrize("kind", ["status", "fly"])
def test_event_at_the_bound_is_accepted_and_one_over_refused(kind: str) -> None:
    # {"type", "data": {"k": <levels - 2>}}: the body and `data` are two of the levels.
    def event(levels: int) -> bytes:
        fields = {"type": kind, "status": "running", "data": {"k": nested(levels - 2)}}
        return json.dumps(fields).encode()

    parsed = parse_event(event(MAX_DEPTH))
    assert isinstance(parsed, StatusEvent if kind == "status" else FlyEvent)
    assert parsed.data["k"] == nested(MAX_DEPTH - 2)
    with pytest.raises(BadRequest, match=r"^event is nested deeper than 128 levels$"):
        parse_event(event(MAX_DEPTH + 1))


@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        (b"[]", None),
        (b"[[]]", "nested deeper than 1 levels"),
        (b"[{}]", "nested deeper than 1 levels"),
        (b'{"a": 1, "b": "[{"}', None),
        (b'["[[[[", "{{{{"]', None),  # brackets in strings do not nest
        (b'[["]]]]"]]', "nested deeper"),  # nor do closing ones in strings hide real levels
        (b'["\\"[[[[", "\\\\"]', None),  # an escaped quote does not end the string
        (b'["\\\\", [[]]]', "nested deeper"),  # an escaped backslash does not escape the quote
        (b'["\\\\\\"[[", 1]', None),  # \\ then \" : still inside the string
        (b'["\\u005b[[["]', None),
        (b'[["", "", [""]]]', "nested deeper"),  # empty strings next to each other
        (b"[[[[", "invalid JSON body"),  # unbalanced: the parser refuses it
        (b"]]]][[", "invalid JSON body"),
    ],
)
def test_strings_and_escapes(raw: bytes, refused: str | None) -> None:
    if refused is None:
        assert loads(raw, max_depth=1) == json.loads(raw)
    else:
        with pytest.raises(BadRequest, match=refused):
            loads(raw, max_depth=1)


def test_strings_full_of_brackets_are_not_nesting() -> None:
    # Far more opening brackets than the bound, all of them in strings: parsed as usual.
    raw = json.dumps({"payload": ["[" * 1000, "{" * 1000, '"]]' * 10]}).encode()
    assert loads(raw, max_depth=MAX_DEPTH)["payload"][0] == "[" * 1000


def test_without_a_bound_the_recursion_limit_is_still_a_client_error() -> None:
    with pytest.raises(StoreProtocolError, match="invalid JSON store reply: nested too deeply"):
        loads(b"[" * 100_000 + b"]" * 100_000, error=StoreProtocolError, what="store reply")
    # ... and a shallower one than that parses: the bound is only where the caller asks for it.
    assert depth(loads(json.dumps(nested(MAX_DEPTH + 10)).encode())) == MAX_DEPTH + 10


_text = st.text(alphabet='[]{}"\\ab\n\u00e9', max_size=6)
_values = st.recursive(
    st.none() | st.integers() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=30,
)


@given(_values, st.integers(min_value=0, max_value=10), st.booleans())
def test_bound_matches_the_real_depth(value: Any, limit: int, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    if depth(value) > limit:
        with pytest.raises(BadRequest, match=rf"^body is nested deeper than {limit} levels$"):
            loads(raw, max_depth=limit)
    else:
        assert loads(raw, max_depth=limit) == value


@given(st.integers(min_value=1, max_value=3 * MAX_DEPTH))
def test_create_is_accepted_exactly_up_to_the_bound(levels: int) -> None:
    raw = create_body(levels)
    if levels <= MAX_DEPTH:
        assert CreateRequest.parse("actor=a", raw).payload == nested(levels - 1)
    else:
        with pytest.raises(BadRequest, match="nested deeper than 128 levels"):
            CreateRequest.parse("actor=a", raw)
