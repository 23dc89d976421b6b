"""The key routes and the HTTP framing of the state proxy, against a real PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import datetime
from urllib.parse import quote

import pytest
import trio

from mesh_trio.stateproxy import MAX_BODY

pytestmark = pytest.mark.postgres

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

HOSTILE_KEYS = [
    "msg/abc",
    "msg/a?b=c&d=e",
    "msg/a#frag",
    "a%2Fb",
    "100%",
    "%",
    "../../etc/passwd",
    "..",
    "with space",
    "plus+sign",
    "ünïcødé/日本語/🦆",
    "back\\slash",
    "quote'\"",
    "semi;colon,comma",
    "tab\tnewline\n",
    "//double//slash//",
    "under_score%percent",
]


def parse_time(text: str) -> datetime:
    assert RFC3339_Z.fullmatch(text), text
    return datetime.fromisoformat(text)


async def test_healthz(client) -> None:
    reply = await client.get("/healthz")
    assert (reply.status, reply.body) == (200, b"ok")


async def test_put_then_get_returns_record_with_rfc3339_times(client) -> None:
    assert (await client.put("msg/1", {"status": "pending", "n": [1, 2]})).status == 204
    reply = await client.get("/keys/msg%2F1")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    record = reply.json()
    assert set(record) == {"key", "value", "created_at", "updated_at"}
    assert record["key"] == "msg/1"
    assert record["value"] == {"status": "pending", "n": [1, 2]}
    assert parse_time(record["created_at"]) == parse_time(record["updated_at"])


async def test_any_json_value_is_stored(client) -> None:
    for value in ([1, "a"], "text", 3.5, None, True, {"nested": {"deep": [{}]}}):
        assert (await client.put("v", value)).status == 204
        assert (await client.get("/keys/v")).json()["value"] == value


async def test_upsert_keeps_created_at_and_bumps_updated_at(client) -> None:
    await client.put("k", {"status": "pending"})
    first = (await client.get("/keys/k")).json()
    await client.put("k", {"status": "running"})
    second = (await client.get("/keys/k")).json()
    assert second["value"] == {"status": "running"}
    assert second["created_at"] == first["created_at"]
    assert parse_time(second["updated_at"]) > parse_time(first["updated_at"])


async def test_get_missing_is_404_with_json_error(client) -> None:
    reply = await client.get("/keys/nope")
    assert reply.status == 404
    assert reply.headers["content-type"] == "application/json"
    assert isinstance(reply.json()["error"], str)


@pytest.mark.parametrize(
    "body",
    [
        b"{bad",
        b"",
        b"   ",
        b"NaN",
        b'{"a": Infinity}',
        b"\xff\xfe",
        b'{"a": 1} {"b": 2}',
        b'"nul \\u0000 inside"',
        b'{"a": 1}\x00{"b"',
    ],
)
async def test_put_bad_json_is_400(client, body: bytes) -> None:
    reply = await client.request("PUT", "/keys/k", body)
    assert reply.status == 400, reply.body
    assert "error" in reply.json()
    assert (await client.get("/keys/k")).status == 404


async def test_conditional_put(client) -> None:
    await client.put("c", {"status": "pending", "x": 1})
    assert (await client.put("c", {"status": "running"}, if_status="pending")).status == 204
    assert (await client.get("/keys/c")).json()["value"] == {"status": "running"}
    mismatch = await client.put("c", {"status": "failed"}, if_status="pending")
    assert mismatch.status == 409
    assert "error" in mismatch.json()
    assert (await client.get("/keys/c")).json()["value"] == {"status": "running"}


async def test_conditional_put_on_missing_key_is_409(client) -> None:
    assert (await client.put("absent", {"status": "x"}, if_status="pending")).status == 409
    assert (await client.get("/keys/absent")).status == 404


async def test_conditional_put_on_value_without_status_is_409(client) -> None:
    await client.put("s", ["not", "an", "object"])
    assert (await client.put("s", {"status": "x"}, if_status="not")).status == 409
    await client.put("s", {"status": 5})
    assert (await client.put("s", {"status": "x"}, if_status="5")).status == 204


async def test_conditional_put_with_bad_json_is_400(client) -> None:
    await client.put("b", {"status": "pending"})
    reply = await client.request("PUT", "/keys/b?if_status=pending", b"{nope")
    assert reply.status == 400


async def test_conditional_status_is_percent_decoded(client) -> None:
    await client.put("p", {"status": "a b&c=d/é"})
    status = quote("a b&c=d/é", safe="")
    reply = await client.request("PUT", f"/keys/p?if_status={status}", b'{"status": "z"}')
    assert reply.status == 204


async def test_head(client) -> None:
    await client.put("h", {"a": 1})
    present = await client.request("HEAD", "/keys/h")
    assert (present.status, present.body) == (200, b"")
    missing = await client.request("HEAD", "/keys/none")
    assert (missing.status, missing.body) == (404, b"")


async def test_delete(client) -> None:
    await client.put("d", {"a": 1})
    assert (await client.request("DELETE", "/keys/d")).status == 204
    assert (await client.get("/keys/d")).status == 404
    again = await client.request("DELETE", "/keys/d")
    assert again.status == 404
    assert "error" in again.json()


async def test_list_by_prefix(client) -> None:
    for key in ("msg/b", "msg/a", "other/x", "msg/c/d"):
        await client.put(key, {})
    assert (await client.get("/keys/?prefix=msg/")).json() == {
        "keys": ["msg/a", "msg/b", "msg/c/d"]
    }
    assert (await client.get("/keys/?prefix=msg%2Fc")).json() == {"keys": ["msg/c/d"]}
    assert (await client.get("/keys/?prefix=zzz")).json() == {"keys": []}
    everything = (await client.get("/keys/")).json()["keys"]
    assert everything == ["msg/a", "msg/b", "msg/c/d", "other/x"]


async def test_list_prefix_wildcards_are_literal(client) -> None:
    for key in ("a%b", "a_b", "axb", "a\\b", "aXYb"):
        await client.put(key, {})
    for prefix, expected in (("a%", ["a%b"]), ("a_", ["a_b"]), ("a\\", ["a\\b"]), ("a", None)):
        reply = await client.get("/keys/?prefix=" + quote(prefix, safe=""))
        keys = reply.json()["keys"]
        assert keys == (expected or sorted(["a%b", "a_b", "axb", "a\\b", "aXYb"]))


@pytest.mark.parametrize("key", HOSTILE_KEYS)
async def test_hostile_keys_round_trip(client, path_of, key: str) -> None:
    path = path_of(key)
    assert (await client.request("PUT", path, {"status": "pending", "k": key})).status == 204
    record = (await client.get(path)).json()
    assert record["key"] == key
    assert record["value"]["k"] == key
    assert (await client.request("HEAD", path)).status == 200
    assert (await client.put(key, {"status": "done"}, if_status="pending")).status == 204
    listed = (await client.get("/keys/?prefix=" + quote(key, safe=""))).json()["keys"]
    assert listed[0] == key
    assert (await client.request("DELETE", path)).status == 204
    assert (await client.get(path)).status == 404


async def test_keys_are_decoded_exactly_once(client) -> None:
    await client.request("PUT", "/keys/a%252Fb", {"v": 1})  # the key is "a%2Fb", not "a/b"
    assert (await client.get("/keys/a%2Fb")).status == 404
    assert (await client.get("/keys/a%252Fb")).json()["key"] == "a%2Fb"
    await client.request("PUT", "/keys/x/y", {"v": 2})  # an unencoded slash is part of the key
    assert (await client.get("/keys/x%2Fy")).json()["key"] == "x/y"


@pytest.mark.parametrize("path", ["/keys/%zz", "/keys/a%", "/keys/%ff%fe", "/keys/a%00b"])
async def test_undecodable_keys_are_400(client, path: str) -> None:
    for method, body in (("GET", None), ("PUT", b"{}"), ("DELETE", None)):
        reply = await client.request(method, path, body)
        assert reply.status == 400, (method, path, reply.body)
        assert "error" in reply.json()


async def test_unknown_path_is_404(client) -> None:
    for target in ("/", "/keys", "/key/x", "/healthz/x", "/query/x", "/keysx/a"):
        reply = await client.get(target)
        assert reply.status == 404, target
        assert "error" in reply.json()


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/keys/x", "GET, HEAD, PUT, DELETE"),
        ("PATCH", "/keys/x", "GET, HEAD, PUT, DELETE"),
        ("PUT", "/keys/", "GET"),
        ("DELETE", "/keys/", "GET"),
        ("GET", "/query", "POST"),
        ("PUT", "/query", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_with_allow(client, method: str, target: str, allow: str) -> None:
    reply = await client.request(method, target, b"{}")
    assert reply.status == 405
    assert reply.headers["allow"] == allow
    assert "error" in reply.json()


async def test_body_over_the_limit_is_413_by_content_length(client) -> None:
    reply = await client.request("PUT", "/keys/big", b"x" * (MAX_BODY + 1))
    assert reply.status == 413
    assert "error" in reply.json()
    assert (await client.get("/keys/big")).status == 404  # a new connection works


async def test_chunked_body_over_the_limit_is_413(client) -> None:
    chunk = b"y" * (1024 * 1024)
    count = MAX_BODY // len(chunk) + 1
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(count)) + b"0\r\n\r\n"
    reply = await client.request(
        "PUT", "/keys/big", body, headers=[("transfer-encoding", "chunked")]
    )
    assert reply.status == 413


async def test_envelope_of_a_10_mib_create_body_is_accepted(client) -> None:
    # The mesh API accepts create bodies just under 10 MiB; the stored envelope is larger.
    value = json.dumps({"blob": "z" * (10 * 1024 * 1024 - 100), "meta": "m" * 4096}).encode()
    assert 10 * 1024 * 1024 < len(value) < MAX_BODY
    assert (await client.request("PUT", "/keys/large", value)).status == 204
    assert len((await client.get("/keys/large")).body) > 10 * 1024 * 1024 - 100


async def test_many_requests_share_one_connection(client) -> None:
    for i in range(200):
        assert (await client.put(f"ka/{i}", {"i": i})).status == 204
    assert len((await client.get("/keys/?prefix=ka/")).json()["keys"]) == 200
    assert client.connections_opened == 1


async def test_pipelined_requests_are_answered_in_order(client, raw) -> None:
    await client.put("p1", {"n": 1})
    requests = (
        b"GET /keys/p1 HTTP/1.1\r\nhost: x\r\n\r\n"
        b'PUT /keys/p2 HTTP/1.1\r\nhost: x\r\ncontent-length: 8\r\n\r\n{"n": 2}'
        b"GET /keys/p2 HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    replies = await raw(client.socket_path, requests)
    assert [r.status for r in replies] == [200, 204, 200, 404, 200]
    assert json.loads(replies[0].body)["value"] == {"n": 1}
    assert json.loads(replies[2].body)["value"] == {"n": 2}


async def test_requests_split_across_many_writes(client, raw) -> None:
    request = (
        b"PUT /keys/split HTTP/1.1\r\nhost: x\r\ncontent-length: 17\r\n\r\n"
        b'{"status": "one"}'
        b"GET /keys/split HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    pieces = [request[i : i + 7] for i in range(0, len(request), 7)]
    replies = await raw(client.socket_path, *pieces)
    assert [r.status for r in replies] == [204, 200]
    assert json.loads(replies[1].body)["value"] == {"status": "one"}


async def test_garbage_request_is_400_and_closes(client, raw) -> None:
    replies = await raw(client.socket_path, b"THIS IS NOT HTTP\r\n\r\n")
    assert [r.status for r in replies] == [400]
    assert replies[0].headers["connection"] == "close"
    assert (await client.get("/healthz")).status == 200


async def test_requests_before_garbage_are_answered_first(client, raw) -> None:
    replies = await raw(
        client.socket_path,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        b"THIS IS NOT HTTP\r\n\r\n",
    )
    assert [r.status for r in replies] == [200, 200, 400]


async def test_100_continue_comes_after_the_replies_before_it(client, raw) -> None:
    replies = await raw(
        client.socket_path,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        b"PUT /keys/c HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
        b"{}GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    assert [r.status for r in replies] == [200, 100, 204, 200]


async def test_a_head_over_64_kib_is_431_and_closes(client, raw) -> None:
    huge = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (65 * 1024) + b"\r\n\r\n"
    replies = await raw(client.socket_path, huge)
    assert [r.status for r in replies] == [431]
    assert json.loads(replies[0].body) == {"error": "request head too large"}


async def test_an_http_1_0_request_is_answered_and_closed(client, raw) -> None:
    await client.put("old", {"n": 1})
    replies = await raw(
        client.socket_path,
        b"GET /keys/old HTTP/1.0\r\n\r\n",  # no keep-alive asked: the server closes
    )
    assert [r.status for r in replies] == [200]
    assert json.loads(replies[0].body)["value"] == {"n": 1}
    assert replies[0].headers["connection"] == "close"


async def test_client_eof_mid_request_and_between_requests(client) -> None:
    for partial in (b"", b"GET /keys/a HT", b"PUT /keys/a HTTP/1.1\r\ncontent-length: 10\r\n\r\n{"):
        stream = await trio.open_unix_socket(client.socket_path)
        await stream.send_all(partial) if partial else None
        await stream.aclose()
    assert (await client.get("/healthz")).status == 200


async def test_expect_100_continue(client, raw) -> None:
    replies = await raw(
        client.socket_path,
        b"PUT /keys/e HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
        b"{}",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    assert [r.status for r in replies] == [100, 204, 200]


async def test_the_body_limit_can_be_raised_or_lowered(nursery, socket_path, pg_url, make_client):
    from mesh_trio.stateproxy import serve_state_proxy

    await nursery.start(
        lambda task_status: serve_state_proxy(
            socket_path, pg_url, max_body=1000, task_status=task_status
        )
    )
    client = make_client(socket_path)
    fits = json.dumps({"s": "x" * 991}).encode()
    assert len(fits) == 1000
    assert (await client.request("PUT", "/keys/k", fits)).status == 204
    assert (await client.request("PUT", "/keys/k", fits + b" ")).status == 413
