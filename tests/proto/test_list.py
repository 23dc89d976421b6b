"""The list procedure over a fake state proxy: filters, keyset pages and the count.

The fake answers `POST /query` the way docs/stateproxy.md says (the filters the list builds,
including bounds on the `created_at` column; newest first, ties by key), so paging through it
with cursors must give every matching row exactly once, in order, whatever the ties.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_proto import (
    BadRequest,
    Envelope,
    ListQuery,
    Query,
    Status,
    StoreReply,
    StoreRequest,
    dumps,
    format_time,
    list_envelopes,
    list_filter,
    list_request,
    parse_time,
)
from mesh_proto._requests import Cursor

from ._support import T0, drive, envelope


@attrs.define
class FakeProxy:
    rows: list[Envelope]
    requests: list[Query] = attrs.field(factory=list)

    def _matches(self, e: Envelope, query: Query) -> bool:
        for c in query.filter:
            if c.field == "created_at":
                bound = parse_time(c.operand)
                ok = {
                    "$gt": e.created_at > bound,
                    "$lt": e.created_at < bound,
                    "$lte": e.created_at <= bound,
                    "$gte": e.created_at >= bound,
                }[str(c.op)]
            elif c.field == "status":
                ok = str(e.status) in c.operand if c.op == "$in" else str(e.status) == c.operand
            else:
                assert (c.field, c.op) == ("actor", None)
                ok = e.data.get("actor") == c.operand
            if not ok:
                return False
        return True

    def __call__(self, request: StoreRequest) -> StoreReply:
        assert (request.method, request.target) == ("POST", "/query")
        query = Query.parse(request.body)
        self.requests.append(query)
        assert query.prefix == "msg/"
        found = [e for e in self.rows if self._matches(e, query)]
        if query.sort:
            assert [k.to_json() for k in query.sort] == ["-created_at", "-key"]
            found.sort(key=lambda e: (e.created_at, e.id), reverse=True)
        page = found[query.offset :][: query.limit or None]
        body: dict[str, Any] = {
            "rows": [
                {
                    "key": f"msg/{e.id}",
                    "value": e.to_value(),
                    "created_at": format_time(e.created_at),
                    "updated_at": format_time(e.updated_at),
                }
                for e in page
            ]
        }
        body["total"] = len(found) if query.count else None
        return StoreReply(status=200, body=dumps(body))


def rows(instants: list[int], actors: str = "ab") -> list[Envelope]:
    statuses = [Status.PENDING, Status.RUNNING, Status.SUCCEEDED]
    return [
        envelope(
            statuses[n % 3],
            {"actor": actors[n % len(actors)]},
            envelope_id=f"{n:08x}-0000-4000-8000-000000000000",
            created_at=T0 + timedelta(seconds=second),
        )
        for n, second in enumerate(instants)
    ]


def newest_first(envelopes: list[Envelope], query: ListQuery) -> list[Envelope]:
    found = [e for e in envelopes if query.matches(e)]
    return sorted(found, key=lambda e: (e.created_at, e.id), reverse=True)


def page_through(proxy: FakeProxy, query: ListQuery) -> list[Envelope]:
    seen: list[Envelope] = []
    while True:
        probe = attrs.evolve(query, limit=query.limit + 1)
        page, total = drive(list_envelopes(probe), proxy)
        assert total == len(newest_first(proxy.rows, query))
        seen.extend(page[: query.limit])
        token = query.next_cursor(page)
        if token is None:
            return seen
        query = attrs.evolve(query, cursor=Cursor.decode(token))


def test_the_list_filter() -> None:
    query = ListQuery(
        actor="a",
        statuses=(Status.PAUSED, Status.RUNNING),
        created_after=T0,
        created_before=T0 + timedelta(hours=1),
    )
    assert list_filter(query) == {
        "actor": "a",
        "status": {"$in": ["paused", "running"]},
        "created_at": {
            "$gt": "2026-11-28T14:24:06.123456+00:00",
            "$lt": "2026-11-28T15:24:06.123456+00:00",
        },
    }
    assert list_filter(ListQuery(statuses=(Status.PAUSED,))) == {"status": "paused"}
    assert list_filter(ListQuery()) == {}


def test_a_cursor_page_asks_for_rows_up_to_its_instant_and_counts_apart() -> None:
    query = ListQuery(
        cursor=Cursor(created_at=T0, id="x"), created_after=T0 - timedelta(1), limit=5
    )
    body = json.loads(list_request(query, extra=1).body)
    assert body["filter"] == {
        "created_at": {
            "$gt": "2026-11-27T14:24:06.123456+00:00",
            "$lte": "2026-11-28T14:24:06.123456+00:00",
        }
    }
    assert (body["limit"], "count" in body) == (6, False)


def test_without_a_cursor_one_request_pages_and_counts() -> None:
    proxy = FakeProxy(rows([1, 2, 3]))
    page, total = drive(list_envelopes(ListQuery(limit=2, offset=1)), proxy)
    assert ([e.id[:8] for e in page], total) == (["00000001", "00000000"], 3)
    assert len(proxy.requests) == 1


def test_a_proxy_without_a_total_counts_what_it_sent() -> None:
    def no_total(request: StoreRequest) -> StoreReply:
        reply = FakeProxy(rows([1, 2]))(request)
        return attrs.evolve(reply, body=reply.body.replace(b'"total":2', b'"total":null'))

    assert drive(list_envelopes(ListQuery(offset=1)), no_total)[1] == 2
    cursor = Cursor(created_at=T0 + timedelta(seconds=2), id="00000001-0000-4000-8000-000000000000")
    assert drive(list_envelopes(ListQuery(cursor=cursor)), no_total)[1] == 1


def test_a_cursor_whose_row_is_gone_continues_by_id() -> None:
    proxy = FakeProxy(rows([5, 5, 5, 4]))
    gone = Cursor(created_at=T0 + timedelta(seconds=5), id="00000001-ffff")
    page, _ = drive(list_envelopes(ListQuery(cursor=gone)), proxy)
    assert [e.id[:8] for e in page] == ["00000001", "00000000", "00000003"]


def test_many_rows_at_the_cursor_instant_widen_the_page() -> None:
    proxy = FakeProxy(rows([7] * 20 + [6]))
    seen = page_through(proxy, ListQuery(limit=3))
    assert seen == newest_first(proxy.rows, ListQuery())
    assert max(q.limit or 0 for q in proxy.requests) > 4


@settings(max_examples=100, deadline=None)
@given(
    instants=st.lists(st.integers(0, 6), max_size=30),
    limit=st.integers(1, 5),
    actor=st.sampled_from([None, "a"]),
    statuses=st.sampled_from([(), (Status.RUNNING,), (Status.PENDING, Status.SUCCEEDED)]),
    after=st.sampled_from([None, 1]),
    before=st.sampled_from([None, 5]),
)
def test_cursor_pages_hold_every_match_once_in_order(
    instants: list[int],
    limit: int,
    actor: str | None,
    statuses: tuple[Status, ...],
    after: int | None,
    before: int | None,
) -> None:
    def at(second: int | None) -> datetime | None:
        return None if second is None else T0 + timedelta(seconds=second)

    query = ListQuery(
        actor=actor,
        statuses=statuses,
        created_after=at(after),
        created_before=at(before),
        limit=limit,
    )
    proxy = FakeProxy(rows(instants))
    assert page_through(proxy, query) == newest_first(proxy.rows, query)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"created_at": "2026-11-28T14:24:06Z"}, "needs $gt, $gte, $lt, $lte"),
        ({"key": {}}, "needs $gt"),
        ({"updated_at": {"$in": ["x"]}}, "'$in' is not allowed on the column 'updated_at'"),
        ({"key": {"$gt": 5}}, "$gt on 'key' needs a string"),
        ({"key": {"$gt": "a\x00"}}, "NUL"),
        ({"created_at": {"$lt": "yesterday"}}, "$lt on 'created_at' needs an RFC 3339 timestamp"),
        ({"created_at": {"$lt": "2026-01-01T00:00:00"}}, "needs an RFC 3339 timestamp"),
    ],
)
def test_column_filters_are_bounds_only(selector: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        Query.build(filter=selector)
    assert message in caught.value.message


def test_column_bounds_keep_one_canonical_timestamp() -> None:
    query = Query.build(
        filter={"created_at": {"$gte": "2026-11-28T15:24:06.5+01:00"}, "key": {"$lt": "msg/b"}}
    )
    assert query.to_json()["filter"] == {
        "created_at": {"$gte": "2026-11-28T14:24:06.500000+00:00"},
        "key": {"$lt": "msg/b"},
    }
    assert Query.parse(query.to_body()) == query
