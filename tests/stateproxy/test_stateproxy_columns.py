"""Filters on the record's columns compile to plain column comparisons (the rest of the
behaviour runs through PostgreSQL in tests/test_store.py and tests/test_list_and_wait.py)."""

from __future__ import annotations

from mesh_trio.stateproxy._query import compile_query


def test_column_bounds_compile_to_column_comparisons() -> None:
    compiled = compile_query(
        b'{"filter": {"created_at": {"$gt": "2026-11-28T14:24:06Z",'
        b' "$lte": "2026-11-28T15:00:00+01:00"}, "key": {"$lt": "msg/b"},'
        b' "updated_at": {"$gte": "2026-01-01T00:00:00Z"}}, "count": true}'
    )
    sql = compiled.page.sql.decode()
    assert (
        "WHERE created_at > $1::timestamptz AND created_at <= $2::timestamptz"
        " AND key < $3 AND updated_at >= $4::timestamptz"
    ) in sql
    assert compiled.page.params == (
        b"2026-11-28T14:24:06+00:00",
        b"2026-11-28T14:00:00+00:00",
        b"msg/b",
        b"2026-01-01T00:00:00+00:00",
    )
    assert compiled.count is not None and b"created_at > $1::timestamptz" in compiled.count.sql
