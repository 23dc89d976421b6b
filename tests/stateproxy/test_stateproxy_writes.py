"""`POST /writes`: many PUTs in one request, each answered as it would have been alone."""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import pytest
import trio

from mesh_proto import MAX_WRITES, WRITES, encode_writes
from mesh_proto._wire import key_target as target_of
from tests.test_stateproxy_events import scrape

from .conftest import HttpClient, Reply
from .test_stateproxy_keys import HOSTILE_KEYS
from .test_stateproxy_resilience import Forwarder, forwarded, start_proxy

pytestmark = pytest.mark.postgres


def rev(value: dict[str, object], n: int) -> bytes:
    return json.dumps({**value, "_rev": n}).encode()


async def writes(client: HttpClient, *puts: tuple[str, bytes]) -> list[tuple[int, object]]:
    reply = await client.request("POST", "/writes", encode_writes(puts))
    assert reply.status == 200, reply.body
    return [(r["status"], r.get("body")) for r in reply.json()["results"]]


async def stored(client: HttpClient, key: str) -> object:
    reply = await client.get(target_of(key))
    return reply.json()["value"] if reply.status == 200 else None


async def test_health_lists_writes(client: HttpClient) -> None:
    reply = await client.get("/healthz")
    assert WRITES in reply.headers["asya-state-proxy-features"].split(",")


async def test_guarded_writes_of_many_keys_answer_as_each_put_would(client: HttpClient) -> None:
    for n in range(4):
        assert (await client.put(f"e/{n}", {"status": "running", "_rev": 1})).status == 204
    results = await writes(
        client,
        (target_of("e/0", if_status="running", if_rev="1"), rev({"status": "paused"}, 2)),
        (target_of("e/1", if_status="pending", if_rev="1"), rev({"status": "x"}, 2)),
        (target_of("e/2", if_rev="7"), rev({"status": "x"}, 8)),
        (target_of("e/3", if_status="running"), rev({"status": "failed"}, 2)),
        (target_of("e/missing", if_rev="0"), rev({"status": "x"}, 1)),
    )
    assert [status for status, _ in results] == [204, 409, 409, 204, 409]
    assert results[1][1] == {
        "error": "condition failed: no record with status 'pending' and revision 1"
    }
    assert await stored(client, "e/0") == {"status": "paused", "_rev": 2}
    assert await stored(client, "e/1") == {"status": "running", "_rev": 1}
    assert await stored(client, "e/3") == {"status": "failed", "_rev": 2}
    assert await stored(client, "e/missing") is None


async def test_writes_of_one_key_apply_in_order(client: HttpClient) -> None:
    assert (await client.put("k", {"_rev": 0})).status == 204
    results = await writes(
        client,
        (target_of("k", if_rev="0"), rev({}, 1)),
        (target_of("k", if_rev="1"), rev({}, 2)),
        (target_of("k", if_rev="1"), rev({}, 9)),  # stale by now
        (target_of("k"), rev({"plain": True}, 3)),
        (target_of("k", if_rev="3"), rev({}, 4)),
    )
    assert [status for status, _ in results] == [204, 204, 409, 204, 204]
    assert await stored(client, "k") == {"_rev": 4}


async def test_every_kind_of_put_is_answered_as_alone(client: HttpClient) -> None:
    assert (await client.put("taken", {"a": 1})).status == 204
    results = await writes(
        client,
        (target_of("new", if_absent="1"), b'{"b":2}'),
        (target_of("taken", if_absent="1"), b'{"b":2}'),
        (target_of("plain"), b"[1,2]"),
        (target_of("bad", if_rev="x1"), b"{}"),
        (target_of("bad", if_absent="2"), b"{}"),
        (target_of("plain", if_status=""), b"null"),  # empty if_status: unconditional
    )
    assert results == [
        (204, None),
        (409, {"error": "condition failed: the key exists"}),
        (204, None),
        (400, {"error": "if_rev must be a non-negative decimal integer"}),
        (400, {"error": "if_absent must be 1, and takes no other guard"}),
        (204, None),
    ]
    assert await stored(client, "new") == {"b": 2}
    assert await stored(client, "taken") == {"a": 1}
    plain = await client.get(target_of("plain"))
    assert (plain.status, plain.json()["value"]) == (200, None)
    assert (await client.get(target_of("bad"))).status == 404


async def test_a_refused_value_fails_only_its_own_write(client: HttpClient) -> None:
    for key in ("a", "b", "c"):
        assert (await client.put(key, {"_rev": 0})).status == 204
    results = await writes(
        client,
        (target_of("a", if_rev="0"), rev({"ok": 1}, 1)),
        (target_of("b", if_rev="0"), b'{"_rev": 1, "s": "\\u0000"}'),
        (target_of("c", if_rev="0"), b'{"_rev":1,"x":'),
        (target_of("a", if_rev="1"), rev({"ok": 2}, 2)),
    )
    assert [status for status, _ in results] == [204, 400, 400, 204]
    assert await stored(client, "a") == {"ok": 2, "_rev": 2}
    assert await stored(client, "b") == await stored(client, "c") == {"_rev": 0}


@pytest.mark.parametrize("key", HOSTILE_KEYS)
async def test_hostile_keys_and_values_travel_intact(client: HttpClient, key: str) -> None:
    value = {"status": 'q"uo\\te', "text": key, "_rev": 0}
    assert (await client.request("PUT", target_of(key), json.dumps(value).encode())).status == 204
    new = {**value, "_rev": 1, "more": '\\"{},NULL'}
    results = await writes(
        client, (target_of(key, if_status='q"uo\\te', if_rev="0"), json.dumps(new).encode())
    )
    assert results == [(204, None)]
    assert await stored(client, key) == new


@pytest.mark.parametrize(
    "body",
    [
        b"/keys/a 3\n{}",  # shorter than its length
        b"/keys/a 2",  # no line feed
        b"/keys/a x\n{}",
        b"/other/a 2\n{}",
        b"/keys/ 2\n{}",
        b"/keys/a 2\n{}garbage",
        b"/keys/a 2\n{}" * (MAX_WRITES + 1),
    ],
)
async def test_a_broken_frame_is_a_400_and_writes_nothing(client: HttpClient, body: bytes) -> None:
    reply = await client.request("POST", "/writes", body)
    assert reply.status == 400
    assert "error" in reply.json()
    assert await stored(client, "a") is None


async def test_writes_takes_only_post(client: HttpClient) -> None:
    reply = await client.get("/writes")
    assert (reply.status, reply.headers["allow"]) == (405, "POST")
    assert await writes(client) == []


KINDS = ("plain", "if_rev", "if_status", "both", "if_absent")


def put(prefix: str, key: str, kind: str, n: int, status: str) -> tuple[str, bytes]:
    guards = {
        "plain": {},
        "if_rev": {"if_rev": str(n)},
        "if_status": {"if_status": status},
        "both": {"if_status": status, "if_rev": str(n)},
        "if_absent": {"if_absent": "1"},
    }[kind]
    value = {"status": "paused" if status == "running" else "running", "_rev": n + 1}
    return target_of(prefix + key, **guards), json.dumps(value).encode()


@pytest.mark.parametrize("seed", range(30))
async def test_a_batch_answers_and_stores_as_the_same_puts_one_by_one(
    client: HttpClient, seed: int
) -> None:
    """Random PUTs on three keys, as one batch on keys `b:*` and one at a time on `s:*`: the
    same replies, the same records."""
    rng = random.Random(seed)
    puts = [
        (rng.choice("pqr"), rng.choice(KINDS), rng.randrange(3), rng.choice(["running", "paused"]))
        for _ in range(rng.randrange(13))
    ]
    for prefix in ("b:", "s:"):
        await client.request("PUT", target_of(prefix + "p"), b'{"status":"running","_rev":0}')
    batched = await writes(client, *(put("b:", *p) for p in puts))
    alone: list[Reply] = []
    for p in puts:
        target, body = put("s:", *p)
        alone.append(await client.request("PUT", target, body))
    assert [status for status, _ in batched] == [r.status for r in alone], puts
    for key in "pqr":
        assert await stored(client, "b:" + key) == await stored(client, "s:" + key), puts


def publish(key: str, rev: int, n: int, origin: str = "o1") -> tuple[str, bytes]:
    target = target_of(key, if_status="running", if_rev=str(rev), publish="1", origin=origin)
    value = {"status": "running", "_rev": rev + 1}
    return target, json.dumps({"value": value, "event": {"n": n}}).encode()


async def test_publishing_writes_answer_with_their_seqs_in_order(client: HttpClient) -> None:
    for key in ("a", "b"):
        assert (await client.put(key, {"status": "running", "_rev": 0})).status == 204
    results = await writes(
        client,
        publish("a", 0, 1),
        publish("b", 0, 2),
        publish("a", 1, 3),
        publish("b", 5, 4),
        publish("a", 2, 5, origin="not an origin"),
        (target_of("b", if_rev="1"), b'{"status":"paused","_rev":2}'),
    )
    assert [status for status, _ in results] == [200, 200, 200, 409, 400, 204]
    seqs = [body["seq"] for status, body in results if status == 200]  # type: ignore[index]
    assert seqs[0] < seqs[2]
    replay = (await client.get("/events/a?after=0")).json()
    assert [e["event"] for e in replay["events"]] == [{"n": 1}, {"n": 3}]  # type: ignore[index]
    assert await stored(client, "a") == {"status": "running", "_rev": 2}
    assert await stored(client, "b") == {"status": "paused", "_rev": 2}


async def test_once_postgres_is_gone_the_rest_of_a_batch_is_503_untried(
    nursery: trio.Nursery, socket_path: str, pg_url: str, make_client: Any
) -> None:
    """The first write that finds PostgreSQL unavailable ends the batch: it and every later
    write are answered 503 and no later one is tried (one failed statement, not one each)."""
    forwarder = Forwarder()
    await forwarder.start(nursery)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    url = forwarded(pg_url, forwarder.port)
    await start_proxy(nursery, socket_path, url, pool_size=2, metrics_port=port)
    client = make_client(socket_path)
    assert (await client.put("a", {"_rev": 0})).status == 204
    forwarder.stop()
    results = await writes(
        client,
        (target_of("x"), b"{}"),
        (target_of("y", if_absent="1"), b"{}"),
        (target_of("a", if_rev="0"), rev({}, 1)),
    )
    assert [status for status, _ in results] == [503, 503, 503]
    samples = await scrape(port)
    assert samples["asya_state_proxy_pg_failures_total"] == 1
