"""Create-if-absent writes (`PUT /keys/{key}?if_absent=1`): the atomic claim of an idempotency
key, advertised in the features of `/healthz`."""

from __future__ import annotations

import pytest
import trio

from mesh_proto import FEATURES_HEADER, IF_ABSENT

pytestmark = pytest.mark.postgres


async def stored(client, key: str) -> object:
    reply = await client.get(f"/keys/{key}")
    return reply.json()["value"] if reply.status == 200 else None


async def test_healthz_lists_if_absent(client) -> None:
    reply = await client.request("GET", "/healthz")
    assert IF_ABSENT in {f.strip() for f in reply.headers[FEATURES_HEADER].split(",")}


async def test_writes_only_when_the_key_is_absent(client) -> None:
    first = await client.request("PUT", "/keys/idem%2Fk?if_absent=1", {"n": 1})
    assert first.status == 204
    again = await client.request("PUT", "/keys/idem%2Fk?if_absent=1", {"n": 2})
    assert again.status == 409
    assert again.json() == {"error": "condition failed: the key exists"}
    assert await stored(client, "idem%2Fk") == {"n": 1}
    assert (await client.request("DELETE", "/keys/idem%2Fk")).status == 204
    assert (await client.request("PUT", "/keys/idem%2Fk?if_absent=1", {"n": 3})).status == 204
    assert await stored(client, "idem%2Fk") == {"n": 3}


@pytest.mark.parametrize(
    "query", ["if_absent=0", "if_absent=", "if_absent=1&if_rev=0", "if_absent=1&if_status=x"]
)
async def test_bad_or_combined_if_absent_is_400(client, query: str) -> None:
    reply = await client.request("PUT", f"/keys/a?{query}", {"n": 1})
    assert reply.status == 400 and "if_absent" in reply.json()["error"]
    assert await stored(client, "a") is None


async def test_invalid_json_is_400(client) -> None:
    reply = await client.request("PUT", "/keys/a?if_absent=1", b"{nope")
    assert reply.status == 400


async def test_concurrent_writers_one_wins(proxy: str, make_client) -> None:
    statuses: list[int] = []

    async def attempt(n: int) -> None:
        client = make_client(proxy)
        statuses.append((await client.request("PUT", "/keys/race?if_absent=1", {"n": n})).status)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(attempt, n)
    assert sorted(statuses) == [204] + [409] * 9
