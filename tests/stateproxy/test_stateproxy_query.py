"""`POST /query`: every filter operator, sort, paging and count, against a real PostgreSQL."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.postgres

JAN, JUN = "2026-01-01T00:00:00.000000Z", "2026-06-01T12:00:00.000000Z"

# A small population with awkward values: a string where numbers are expected, nulls, arrays,
# nested objects, missing fields, fixed-format RFC 3339 deadlines.
RECORDS = {
    "msg/1": {
        "status": "pending",
        "n": 1,
        "tags": ["a", "b"],
        "deadline_at": "2026-01-01T00:00:00.000000Z",
    },
    "msg/2": {
        "status": "running",
        "n": 2,
        "tags": ["b"],
        "deadline_at": "2026-06-01T12:00:00.000000Z",
    },
    "msg/3": {"status": "paused", "n": 10, "meta": {"team": "x", "level": 2}},
    "msg/4": {"status": "succeeded", "n": "not a number", "error": None},
    "msg/5": {"status": "failed", "n": 2.5, "deadline_at": "2025-12-31T23:59:59.999999Z"},
    "msg/6": {"status": "pending", "flag": True, "note": "the quick brown fox"},
    "other/1": {"status": "pending", "n": 3},
    "other/2": ["an", "array", "value"],
}


@pytest.fixture
async def seeded(client):
    for key, value in RECORDS.items():
        assert (await client.put(key, value)).status == 204
    return client


async def keys_of(client, body: dict) -> list[str]:
    reply = await client.query(body)
    assert reply.status == 200, reply.body
    return [row["key"] for row in reply.json()["rows"]]


async def test_empty_query_returns_everything_by_key_and_null_total(seeded) -> None:
    reply = await seeded.request("POST", "/query", b"")
    assert reply.status == 200
    doc = reply.json()
    assert [r["key"] for r in doc["rows"]] == sorted(RECORDS)
    assert doc["total"] is None
    row = doc["rows"][0]
    assert set(row) == {"key", "value", "created_at", "updated_at"}
    assert row["value"] == RECORDS[row["key"]]


async def test_prefix(seeded) -> None:
    assert await keys_of(seeded, {"prefix": "other/"}) == ["other/1", "other/2"]
    assert await keys_of(seeded, {"prefix": "msg/%"}) == []
    assert await keys_of(seeded, {"prefix": "msg_"}) == []


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"status": "pending"}, ["msg/1", "msg/6", "other/1"]),
        ({"status": "pending", "n": 1}, ["msg/1"]),
        ({"tags": ["b"]}, ["msg/1", "msg/2"]),  # containment: arrays holding "b"
        ({"meta": {"team": "x"}}, ["msg/3"]),  # containment of a sub-object
        ({"error": None}, ["msg/4"]),
        ({"flag": True}, ["msg/6"]),
        ({"status": {"$eq": "running"}}, ["msg/2"]),
        ({"n": {"$eq": 2}}, ["msg/2"]),
        ({"n": {"$eq": 2.0}}, ["msg/2"]),
        ({"tags": {"$eq": ["b"]}}, ["msg/2"]),  # $eq on an array is exact
        ({"meta": {"$eq": {"team": "x"}}}, []),
        (
            {"status": {"$ne": "pending"}, "n": {"$exists": True}},
            ["msg/2", "msg/3", "msg/4", "msg/5"],
        ),
        (
            {"n": {"$ne": 2}},
            ["msg/1", "msg/3", "msg/4", "msg/5", "other/1"],
        ),  # absent never matches
        ({"n": {"$gt": 2}}, ["msg/3", "msg/5", "other/1"]),  # the string "not a number" is skipped
        ({"n": {"$gte": 2}}, ["msg/2", "msg/3", "msg/5", "other/1"]),
        ({"n": {"$lt": 2}}, ["msg/1"]),
        ({"n": {"$lte": 2.5}}, ["msg/1", "msg/2", "msg/5"]),
        ({"n": {"$gt": 1, "$lt": 3}}, ["msg/2", "msg/5"]),
        ({"n": {"$gt": "m"}}, ["msg/4"]),  # strings compare with strings only
        ({"status": {"$lt": "q"}}, ["msg/1", "msg/3", "msg/5", "msg/6", "other/1"]),
        ({"flag": {"$gte": True}}, ["msg/6"]),
        ({"status": {"$in": ["paused", "failed"]}}, ["msg/3", "msg/5"]),
        ({"n": {"$in": [1, 3, "not a number"]}}, ["msg/1", "msg/4", "other/1"]),
        ({"n": {"$in": []}}, []),
        ({"status": {"$nin": ["pending", "running"]}}, ["msg/3", "msg/4", "msg/5"]),
        ({"n": {"$nin": []}}, ["msg/1", "msg/2", "msg/3", "msg/4", "msg/5", "other/1"]),
        ({"deadline_at": {"$exists": True}}, ["msg/1", "msg/2", "msg/5"]),
        ({"deadline_at": {"$exists": False}}, ["msg/3", "msg/4", "msg/6", "other/1", "other/2"]),
        ({"error": {"$exists": True}}, ["msg/4"]),  # a JSON null still exists
        ({"tags": {"$contains": "a"}}, ["msg/1"]),
        ({"tags": {"$contains": ["b"]}}, ["msg/1", "msg/2"]),
        ({"note": {"$contains": "brown"}}, ["msg/6"]),
        ({"meta": {"$contains": {"level": 2}}}, ["msg/3"]),
    ],
)
async def test_filters(seeded, selector: dict, expected: list[str]) -> None:
    assert await keys_of(seeded, {"filter": selector}) == expected


async def test_the_mesh_api_deadline_query(seeded) -> None:
    # What the backstop asks: not terminal and past the deadline (RFC 3339 strings compared).
    body = {
        "prefix": "msg/",
        "filter": {
            "deadline_at": {"$lt": "2026-03-01T00:00:00.000000Z"},
            "status": {"$in": ["pending", "running", "paused"]},
        },
    }
    assert await keys_of(seeded, body) == ["msg/1"]  # msg/5 is failed, msg/2 is not due yet


async def test_sort_on_columns_and_fields(seeded) -> None:
    assert await keys_of(seeded, {"sort": ["-key"]}) == sorted(RECORDS, reverse=True)
    by_n = await keys_of(seeded, {"prefix": "msg/", "sort": ["n"]})
    # numbers in numeric order, then the string, then records without `n`
    assert by_n == ["msg/1", "msg/2", "msg/5", "msg/3", "msg/4", "msg/6"]
    by_n_desc = await keys_of(seeded, {"prefix": "msg/", "sort": ["-n"]})
    assert by_n_desc == ["msg/3", "msg/5", "msg/2", "msg/1", "msg/4", "msg/6"]
    by_status = await keys_of(seeded, {"prefix": "msg/", "sort": ["status", "-key"]})
    assert by_status == ["msg/5", "msg/3", "msg/6", "msg/1", "msg/2", "msg/4"]
    assert await keys_of(seeded, {"sort": ["created_at"]}) == list(RECORDS)
    newest_first = await keys_of(seeded, {"sort": ["-updated_at"]})
    assert newest_first == list(reversed(RECORDS))


async def test_paging_and_count(seeded) -> None:
    body = {"prefix": "msg/", "sort": ["key"], "limit": 2, "count": True}
    pages = []
    for offset in (0, 2, 4, 6):
        reply = await seeded.query({**body, "offset": offset})
        assert reply.status == 200
        doc = reply.json()
        assert doc["total"] == 6
        pages.append([r["key"] for r in doc["rows"]])
    assert pages == [["msg/1", "msg/2"], ["msg/3", "msg/4"], ["msg/5", "msg/6"], []]
    counted = (
        await seeded.query({"filter": {"status": "pending"}, "count": True, "limit": 1})
    ).json()
    assert (len(counted["rows"]), counted["total"]) == (1, 3)
    uncounted = (await seeded.query({"limit": 1, "count": False})).json()
    assert uncounted["total"] is None


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b'{"filter": {"a-b": 1}}',
        b'{"filter": {"a.b": 1}}',
        b'{"filter": {"1abc": 1}}',
        b'{"filter": {"": 1}}',
        b'{"filter": {"x\'; DROP TABLE kv; --": 1}}',
        b'{"filter": {"$or": [{"a": 1}]}}',
        b'{"filter": {"n": {"$regex": "x"}}}',
        b'{"filter": {"n": {"$gt": 1, "plain": 2}}}',
        b'{"filter": {"n": {"$gt": [1]}}}',
        b'{"filter": {"n": {"$gt": null}}}',
        b'{"filter": {"n": {"$in": "abc"}}}',
        b'{"filter": {"n": {"$nin": 3}}}',
        b'{"filter": {"n": {"$exists": "yes"}}}',
        b'{"filter": {"s": "nul\\u0000"}}',
        b'{"filter": {"s": "\\ud800"}}',
        b'{"filter": {"n": 1e999}}',
        b'{"filter": [1]}',
        b'{"sort": ["-"]}',
        b'{"sort": ["bad-name"]}',
        b'{"sort": "key"}',
        b'{"sort": [1]}',
        b'{"sort": ["--key"]}',
        b'{"limit": -1}',
        b'{"limit": 1.5}',
        b'{"limit": "10"}',
        b'{"limit": true}',
        b'{"offset": -5}',
        b'{"count": "yes"}',
        b'{"prefix": 5}',
        b'{"filters": {"a": 1}}',
        b'{"a": 1}' + b"x" * 10,
    ],
)
async def test_bad_queries_are_400(seeded, body: bytes) -> None:
    reply = await seeded.request("POST", "/query", body)
    assert reply.status == 400, (body, reply.body)
    assert isinstance(reply.json()["error"], str)


async def test_string_comparisons_are_bytewise(client) -> None:
    for key, word in (("w/1", "apple"), ("w/2", "Banana"), ("w/3", "cherry"), ("w/4", "Éclair")):
        await client.put(key, {"word": word})
    # bytewise: uppercase before lowercase, non-ASCII after ASCII, whatever the collation
    assert await keys_of(client, {"sort": ["word"]}) == ["w/2", "w/1", "w/3", "w/4"]
    assert await keys_of(client, {"filter": {"word": {"$lt": "a"}}}) == ["w/2"]
    assert await keys_of(client, {"filter": {"word": {"$gt": "z"}}}) == ["w/4"]


async def test_indexes_match_the_query_expressions(client, pg_admin) -> None:
    # The proxy was started with indexes on status and deadline_at; with sequential scans off,
    # the planner must be able to use them for the mesh API's queries.
    await client.put("msg/x", {"status": "pending", "deadline_at": "2026-01-01T00:00:00Z"})
    names = {
        r[0]
        for r in pg_admin.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'kv'"
            " AND schemaname = current_schema()"
        )
    }
    assert {"kv_value_gin", "kv_value_status", "kv_value_deadline_at"} <= names
    pg_admin.execute("SET enable_seqscan = off")
    plans = {}
    for field, sql in (
        (
            "status",
            """SELECT key FROM kv WHERE jsonb_typeof(value->'status') = 'string'
                      AND ((value->>'status') COLLATE "C") = ANY('{pending,running}'::text[])""",
        ),
        (
            "deadline_at",
            """SELECT key FROM kv WHERE jsonb_typeof(value->'deadline_at') = 'string'
                           AND ((value->>'deadline_at') COLLATE "C") < '2026-02-01'""",
        ),
        ("gin", """SELECT key FROM kv WHERE value @> '{"status": "pending"}'"""),
    ):
        plans[field] = "\n".join(r[0] for r in pg_admin.execute("EXPLAIN " + sql))
    assert "kv_value_status" in plans["status"]
    assert "kv_value_deadline_at" in plans["deadline_at"]
    assert "kv_value_gin" in plans["gin"]


async def test_compiled_sql_is_what_the_indexes_serve() -> None:
    from mesh_trio.stateproxy import compile_query

    compiled = compile_query(
        b'{"filter": {"status": {"$in": ["pending"]}, "deadline_at": {"$lt": "2026"}}}'
    )
    sql = compiled.page.sql.decode()
    assert """((value->>'status') COLLATE "C") = ANY($1::text[])""" in sql
    assert """((value->>'deadline_at') COLLATE "C") < $2""" in sql
    assert compiled.page.params == (b'{"pending"}', b"2026")
