"""Revision-guarded writes (`PUT /keys/{key}?if_rev=N`) and the feature list of `/healthz`."""

from __future__ import annotations

import json

import pytest
import trio

from mesh_proto import (
    FEATURES_HEADER,
    REV_GUARD,
    StoreReply,
    StoreRequest,
    check_health,
    check_write,
    health_request,
    put_request,
    query_request,
)

pytestmark = pytest.mark.postgres


async def put(client, key: str, value: object, query: str) -> int:
    return (await client.request("PUT", f"/keys/{key}?{query}", value)).status


async def stored(client, key: str) -> object:
    reply = await client.get(f"/keys/{key}")
    return reply.json()["value"] if reply.status == 200 else None


async def test_healthz_lists_the_revision_guard(client) -> None:
    for method in ("GET", "HEAD"):
        reply = await client.request(method, "/healthz")
        assert reply.status == 200
        features = {f.strip() for f in reply.headers[FEATURES_HEADER].split(",")}
        assert REV_GUARD in features


async def test_matching_revision_writes_and_others_conflict(client) -> None:
    await client.put("r", {"status": "running", "_rev": 3})
    assert await put(client, "r", {"status": "running", "_rev": 4}, "if_rev=2") == 409
    assert await put(client, "r", {"status": "running", "_rev": 4}, "if_rev=4") == 409
    assert await stored(client, "r") == {"status": "running", "_rev": 3}
    assert await put(client, "r", {"status": "running", "_rev": 4}, "if_rev=3") == 204
    assert await stored(client, "r") == {"status": "running", "_rev": 4}
    conflict = await client.request("PUT", "/keys/r?if_rev=3", {"_rev": 9})
    assert conflict.status == 409
    assert "revision 3" in conflict.json()["error"]


async def test_leading_zeros_and_large_revisions(client) -> None:
    big = 10**30
    await client.put("z", {"_rev": big})
    assert await put(client, "z", {"_rev": 1}, f"if_rev=000{big}") == 204
    assert await put(client, "z", {"_rev": 2}, "if_rev=01") == 204
    assert await stored(client, "z") == {"_rev": 2}


async def test_missing_key_is_409_and_creates_nothing(client) -> None:
    assert await put(client, "absent", {"_rev": 1}, "if_rev=0") == 409
    assert await stored(client, "absent") is None


@pytest.mark.parametrize(
    "value",
    [
        {"status": "pending"},
        {"_rev": "7"},
        {"_rev": 1.5},
        {"_rev": 2.0},
        {"_rev": None},
        {"_rev": True},
        {"_rev": [1]},
        ["an", "array"],
        "a string",
        12,
    ],
)
async def test_no_integer_revision_counts_as_zero(client, value: object) -> None:
    await client.put("n", value)
    assert await put(client, "n", {"v": 1}, "if_rev=1") == 409
    assert await put(client, "n", {"v": 1}, "if_rev=0") == 204
    assert await stored(client, "n") == {"v": 1}


async def test_negative_stored_revision_matches_no_guard(client) -> None:
    await client.put("neg", {"_rev": -1})
    assert await put(client, "neg", {}, "if_rev=0") == 409
    assert await put(client, "neg", {}, "if_rev=1") == 409


@pytest.mark.parametrize(
    "query",
    ["if_rev=", "if_rev=-1", "if_rev=%2B1", "if_rev=1.0", "if_rev=x", "if_rev=1+", "if_rev"],
)
async def test_bad_revisions_are_400(client, query: str) -> None:
    await client.put("b", {"_rev": 1})
    reply = await client.request("PUT", f"/keys/b?{query}", {"_rev": 2})
    assert reply.status == 400, query
    assert "if_rev" in reply.json()["error"]
    assert await stored(client, "b") == {"_rev": 1}


async def test_status_and_revision_must_both_hold(client) -> None:
    await client.put("both", {"status": "running", "_rev": 5})
    new = {"status": "paused", "_rev": 6}
    assert await put(client, "both", new, "if_status=pending&if_rev=5") == 409
    assert await put(client, "both", new, "if_status=running&if_rev=4") == 409
    assert await put(client, "both", new, "if_status=pending&if_rev=4") == 409
    assert await stored(client, "both") == {"status": "running", "_rev": 5}
    assert await put(client, "both", new, "if_rev=5&if_status=running") == 204
    assert await stored(client, "both") == new


async def test_empty_status_with_revision_is_revision_only(client) -> None:
    await client.put("e", {"status": "running", "_rev": 1})
    assert await put(client, "e", {"_rev": 2}, "if_status=&if_rev=1") == 204
    assert await put(client, "e", {"_rev": 3}, "if_status=&if_rev=1") == 409


async def test_guarded_write_with_bad_json_is_400(client) -> None:
    await client.put("j", {"_rev": 0})
    assert (await client.request("PUT", "/keys/j?if_rev=0", b"{nope")).status == 400


async def test_twenty_concurrent_guarded_writers_have_one_winner(client, make_client) -> None:
    await client.put("race", {"status": "running", "_rev": 7})
    results: dict[int, int] = {}

    async def contender(i: int) -> None:
        c = make_client(client.socket_path)
        value = {"status": "running", "_rev": 8, "winner": i}
        results[i] = await put(c, "race", value, "if_rev=7")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(contender, i)
    winners = [i for i, status in results.items() if status == 204]
    assert sorted(results.values()) == [204] + [409] * 19
    assert await stored(client, "race") == {"status": "running", "_rev": 8, "winner": winners[0]}


async def test_the_client_builders_speak_this_proxy(client) -> None:
    # mesh_proto's requests, sent as built, and its readers applied to the proxy's replies.
    async def send(request: StoreRequest) -> StoreReply:
        reply = await client.request(
            request.method, request.target, request.body or None, list(request.headers)
        )
        headers = tuple((k.lower(), v) for k, v in reply.headers.items())
        return StoreReply(status=reply.status, body=reply.body, headers=headers)

    assert REV_GUARD in check_health(await send(health_request()))
    key = "msg/x?y#z"
    assert check_write(await send(put_request(key, {"status": "running", "_rev": 1})))
    stale = put_request(key, {"status": "running", "_rev": 2}, if_status="running", if_rev=0)
    assert not check_write(await send(stale))
    fresh = put_request(key, {"status": "running", "_rev": 2}, if_status="running", if_rev=1)
    assert check_write(await send(fresh))
    listed = query_request(prefix="msg/", filter={"_rev": {"$gte": 2}}, count=True)
    reply = await send(listed)
    assert reply.status == 200
    assert [row["key"] for row in json.loads(reply.body)["rows"]] == [key]
