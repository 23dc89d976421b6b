"""Any query that compiles runs on PostgreSQL without an SQL error, whatever is stored.

The statements are sent the way the proxy sends them (libpq, every parameter binary `text`),
against records holding the awkward values a comparison could trip on: strings where numbers
are compared, numbers where strings are, nulls, arrays, objects, non-object values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import pq

from mesh_trio.stateproxy import BadRequest, compile_query
from mesh_trio.stateproxy._store import _TABLE

pytestmark = pytest.mark.postgres

AWKWARD = [
    {"status": "pending", "n": 1, "s": "2026-01-01T00:00:00Z", "b": True, "a": [1, "x"]},
    {"status": 7, "n": "seven", "s": 3.5, "b": "true", "a": {"k": [None]}},
    {"status": None, "n": None, "s": None, "b": None, "a": None},
    {"status": ["pending"], "n": [1, 2], "s": {"x": 1}, "b": [False], "a": "a"},
    {"n": 1e300, "s": "", "b": False, "a": []},
    {},
    ["status", "n"],
    "status",
    12,
    None,
]

FIELDS = st.sampled_from(["status", "n", "s", "b", "a", "missing"])
VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["pending", "2026-01-01T00:00:00Z", "seven", "", "%", "\\", "'"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
OPERATORS = st.sampled_from(
    ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$contains"]
)
CONDITIONS = st.one_of(
    VALUES,
    st.dictionaries(OPERATORS, st.one_of(VALUES, st.lists(VALUES, max_size=4)), min_size=1),
)
SORTS = st.lists(
    st.sampled_from(["status", "-n", "s", "-b", "a", "key", "-created_at", "updated_at"]),
    max_size=3,
)
QUERIES = st.fixed_dictionaries(
    {"filter": st.dictionaries(FIELDS, CONDITIONS, max_size=3)},
    optional={
        "prefix": st.sampled_from(["", "p/", "p/%", "p_", "\\"]),
        "sort": SORTS,
        "limit": st.integers(min_value=0, max_value=5),
        "offset": st.integers(min_value=0, max_value=5),
        "count": st.booleans(),
    },
)


@pytest.fixture(scope="module")
def conn(pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(
        "postgresql://postgres@127.0.0.1:5432/test",
        autocommit=True,
        options=f"-csearch_path={pg_schema}",
    ) as c:
        c.execute(_TABLE)
        c.execute("TRUNCATE kv")
        for i, value in enumerate(AWKWARD):
            c.execute(
                "INSERT INTO kv (key, value) VALUES (%s, %s::jsonb)", (f"p/{i}", json.dumps(value))
            )
        yield c
        c.execute("TRUNCATE kv")


def run(conn: psycopg.Connection[tuple[object, ...]], sql: bytes, params: tuple[bytes, ...]) -> int:
    n = len(params)
    result = conn.pgconn.exec_params(sql, list(params), [25] * n, [1] * n)
    assert result.status == pq.ExecStatus.TUPLES_OK, (
        sql.decode(),
        params,
        result.error_message.decode(),
    )
    return result.ntuples


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(QUERIES)
def test_every_compiled_query_runs(conn, query: dict) -> None:
    try:
        compiled = compile_query(json.dumps(query).encode())
    except BadRequest:
        return
    rows = run(conn, compiled.page.sql, compiled.page.params)
    if compiled.count is not None:
        assert run(conn, compiled.count.sql, compiled.count.params) == 1
    assert rows <= len(AWKWARD)
