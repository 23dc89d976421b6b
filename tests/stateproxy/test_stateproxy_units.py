"""Pure parts of the state proxy: settings, the public surface, and the query compiler."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mesh_trio.stateproxy as stateproxy
from mesh_trio.stateproxy import (
    BadRequest,
    CompiledQuery,
    Settings,
    SettingsError,
    compile_query,
    parse_index_spec,
)
from mesh_trio.stateproxy._query import escape_like

GOOD_ENV = {
    "CONNECTOR_SOCKET": "/var/run/asya/state.sock",
    "STATE_PROXY_PG_URL": "postgresql://postgres@db:5432/asya",
}


def test_public_surface_is_exactly_all() -> None:
    public = {name for name in dir(stateproxy) if not name.startswith("_")}
    assert set(stateproxy.__all__) == public
    for name in stateproxy.__all__:
        assert getattr(stateproxy, name) is not None


def test_settings_from_env() -> None:
    got = Settings.from_env({**GOOD_ENV, "STATE_PROXY_PG_INDEXES": " status, deadline_at ,,"})
    assert got == Settings(
        socket_path="/var/run/asya/state.sock",
        pg_url="postgresql://postgres@db:5432/asya",
        indexes=("status", "deadline_at"),
    )
    assert Settings.from_env(GOOD_ENV).indexes == ()


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"CONNECTOR_SOCKET": ""}, "CONNECTOR_SOCKET"),
        ({"CONNECTOR_SOCKET": None}, "CONNECTOR_SOCKET"),
        ({"STATE_PROXY_PG_URL": None}, "STATE_PROXY_PG_URL"),
        ({"STATE_PROXY_PG_URL": "  "}, "STATE_PROXY_PG_URL"),
        ({"STATE_PROXY_PG_URL": "host=a port"}, "STATE_PROXY_PG_URL"),
        ({"STATE_PROXY_PG_URL": "postgresql://a/b?nosuchoption=1"}, "STATE_PROXY_PG_URL"),
        ({"STATE_PROXY_PG_INDEXES": "status,bad-name"}, "STATE_PROXY_PG_INDEXES"),
        ({"STATE_PROXY_PG_INDEXES": "x" * 60}, "STATE_PROXY_PG_INDEXES"),
        ({"STATE_PROXY_PG_INDEXES": "value->>'x'"}, "STATE_PROXY_PG_INDEXES"),
    ],
)
def test_bad_settings_name_the_variable(change: dict, variable: str) -> None:
    env = {**GOOD_ENV, **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert message.startswith(variable)
    assert "\n" not in message


def test_index_spec_accepts_the_go_cast_form() -> None:
    assert parse_index_spec("status, (deadline_at)::timestamptz, status") == (
        "status",
        "deadline_at",
    )
    with pytest.raises(ValueError):
        parse_index_spec("(bad-name)::text")


def test_escape_like() -> None:
    assert escape_like("a%b_c\\d") == "a\\%b\\_c\\\\d%"
    assert escape_like("") == "%"


def test_values_are_parameters_never_sql_text() -> None:
    hostile = "'; DROP TABLE kv; --"
    compiled = compile_query(
        json.dumps(
            {
                "prefix": hostile,
                "filter": {"a": hostile, "b": {"$gt": hostile, "$in": [hostile, 1]}},
                "limit": 5,
                "offset": 10,
                "count": True,
            }
        ).encode()
    )
    assert hostile not in compiled.page.sql.decode()
    assert compiled.count is not None
    assert hostile not in compiled.count.sql.decode()
    assert compiled.page.params[-2:] == (b"5", b"10")
    assert compiled.count.params == compiled.page.params[:-2]


# Garbage and near-miss query bodies: anything either compiles or is a BadRequest.
NAMES = st.sampled_from(["status", "n", "_x", "a1", "a-b", "", "1a", "$or", "a b", "ü", "key"])
OPERATORS = st.sampled_from(
    ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$contains", "$x", "eq"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
CONDITIONS = st.one_of(JSON, st.dictionaries(OPERATORS, JSON, min_size=1, max_size=3))
QUERIES = st.fixed_dictionaries(
    {},
    optional={
        "prefix": st.one_of(st.text(max_size=10), JSON),
        "filter": st.one_of(st.dictionaries(NAMES, CONDITIONS, max_size=4), JSON),
        "sort": st.one_of(
            st.lists(st.one_of(NAMES, NAMES.map(lambda n: "-" + n), JSON), max_size=3), JSON
        ),
        "limit": st.one_of(st.integers(min_value=-5, max_value=2**64), JSON),
        "offset": st.one_of(st.integers(min_value=-5, max_value=2**64), JSON),
        "count": JSON,
        "other": JSON,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), QUERIES.map(lambda q: json.dumps(q).encode())))
def test_compile_query_raises_only_bad_request(body: bytes) -> None:
    try:
        compiled = compile_query(body)
    except BadRequest as exc:
        assert exc.status_hint == 400
        assert exc.message
    else:
        assert isinstance(compiled, CompiledQuery)
        assert compiled.page.sql.count(b"$") >= len(compiled.page.params)
