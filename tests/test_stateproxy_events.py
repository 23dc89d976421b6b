"""The state proxy's event bus (feature `events`) over real sockets and the real PostgreSQL.

Two proxies on one schema stand for two replicas: what one publishes, the other's watch stream
carries. A watcher "sees nothing" of an action when the first line it gets after the action is a
sentinel published after it (NOTIFY delivers in commit order). Keys are unique per test, since
the events table outlives a test in the session's schema.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import h11
import psycopg
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from mesh_proto import EVENTS, FEATURES_HEADER, BadRequest, encode_key
from mesh_trio.stateproxy import Settings, SettingsError, _events, serve_state_proxy
from mesh_trio.stateproxy._errors import PgError
from mesh_trio.stateproxy._events import NOTIFY_LIMIT, PublishWrite, payload_codes
from mesh_trio.stateproxy._pg import PgPool

pytestmark = pytest.mark.postgres

WAIT = 10.0


@attrs.frozen
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(path: str, method: str, target: str, body: object = None) -> Reply:
    """One request on a connection of its own; `body` bytes as they are, else as JSON."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "proxy"), ("content-length", str(len(data))), ("connection", "close")]
    async with await trio.open_unix_socket(path) as stream:
        out = conn.send(h11.Request(method=method, target=target, headers=headers))
        await stream.send_all(out + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
        status, head, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 20))
            elif isinstance(event, h11.Response):
                status, head = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, head, b"".join(chunks))


class Watch:
    """A `GET /events/watch` stream, read line by line (keepalive lines skipped)."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream, self.conn = stream, conn
        self.buffer = b""
        self.ended = False

    @classmethod
    async def open(cls, path: str) -> Watch:
        stream = await trio.open_unix_socket(path)
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method="GET", target="/events/watch", headers=[("host", "p")]))
        await stream.send_all(out + conn.send(h11.EndOfMessage()))
        watch = cls(stream, conn)
        response = await watch._event()
        assert isinstance(response, h11.Response), response
        assert response.status_code == 200
        assert dict(response.headers)[b"content-type"] == b"application/x-ndjson"
        assert dict(response.headers)[b"transfer-encoding"] == b"chunked"
        return watch

    async def _event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)
                return event
            self.conn.receive_data(await self.stream.receive_some(1 << 20))

    async def line(self) -> dict[str, Any] | None:
        """The next record, or None once the stream has ended."""
        while True:
            line, found, rest = self.buffer.partition(b"\n")
            if found:
                self.buffer = rest
                if line:
                    record: dict[str, Any] = json.loads(line)
                    return record
                continue
            if self.ended:
                return None
            event = await self._event()
            if isinstance(event, h11.Data):
                self.buffer += bytes(event.data)
            else:
                assert isinstance(event, h11.EndOfMessage | h11.ConnectionClosed), event
                self.ended = True

    async def records(self, count: int, keys: set[str]) -> list[dict[str, Any]]:
        """The next `count` records of `keys` (others, of earlier tests, are skipped)."""
        found: list[dict[str, Any]] = []
        with trio.fail_after(WAIT):
            while len(found) < count:
                record = await self.line()
                assert record is not None, "the stream ended"
                if record["key"] in keys:
                    found.append(record)
        return found

    async def end(self) -> None:
        """Wait for the stream to end."""
        with trio.fail_after(WAIT):
            while await self.line() is not None:
                pass

    async def aclose(self) -> None:
        await self.stream.aclose()


def key_target(key: str) -> str:
    return "/keys/" + encode_key(key)


def unique(name: str) -> str:
    return f"{name}/{uuid.uuid4().hex[:8]}"


def batch(origin: str, *items: tuple[str, object]) -> dict[str, object]:
    return {"origin": origin, "events": [{"key": k, "event": e} for k, e in items]}


async def publish(path: str, origin: str, *items: tuple[str, object]) -> list[int]:
    reply = await request(path, "POST", "/events", batch(origin, *items))
    assert reply.status == 200, reply
    seqs: list[int] = reply.json()["seqs"]
    return seqs


async def replay(path: str, key: str, after: int) -> tuple[list[dict[str, Any]], bool]:
    reply = await request(path, "GET", f"/events/{encode_key(key)}?after={after}")
    assert reply.status == 200, reply
    body = reply.json()
    return body["events"], body["gap"]


async def pruned(path: str, key: str, left: int) -> None:
    """Wait (bounded) until a pruning turn left at most `left` events of `key`."""
    with trio.fail_after(WAIT):
        while True:
            if len((await replay(path, key, 0))[0]) <= left:
                return
            await trio.sleep(0.05)


Start = Callable[..., Awaitable[str]]


@pytest.fixture
def start_proxy(nursery: trio.Nursery, pg_url: str, short_dir: str) -> Start:
    """Starts a proxy on a socket of its own (same database and schema unless `url` says)."""
    made = iter(range(100))

    async def start(url: str = pg_url, **options: Any) -> str:
        path = os.path.join(short_dir, f"p{next(made)}.sock")
        await nursery.start(partial(serve_state_proxy, path, url, **options))
        return path

    return start


@pytest.fixture
async def watch() -> AsyncIterator[Callable[[str], Awaitable[Watch]]]:
    opened: list[Watch] = []

    async def open_watch(path: str) -> Watch:
        opened.append(await Watch.open(path))
        return opened[-1]

    yield open_watch
    for each in opened:
        await each.aclose()


async def expect_only_sentinel(path: str, watcher: Watch, keys: set[str]) -> None:
    """Publish a sentinel on `path`: it must be the next record of `keys` the watcher gets."""
    sentinel = unique("sentinel")
    (seq,) = await publish(path, "test", (sentinel, {"sentinel": True}))
    (record,) = await watcher.records(1, {*keys, sentinel})
    assert record == {"seq": seq, "key": sentinel, "origin": "test", "event": {"sentinel": True}}


async def test_health_lists_events(start_proxy: Start) -> None:
    path = await start_proxy()
    reply = await request(path, "GET", "/healthz")
    assert EVENTS in reply.headers[FEATURES_HEADER.encode()].decode().split(",")


async def test_a_batch_is_watched_in_order_with_its_seqs(start_proxy: Start, watch: Any) -> None:
    path = await start_proxy()
    watcher = await watch(path)
    keys = [unique(f"k{i}") for i in range(5)]
    items = [
        (keys[i % 5], {"kind": "fly", "data": {"i": i, "text": "é" * (i % 7)}}) for i in range(500)
    ]
    seqs = await publish(path, "replica-1", *items)
    assert len(seqs) == 500
    assert seqs == sorted(seqs) and len(set(seqs)) == 500
    records = await watcher.records(500, set(keys))
    assert records == [
        {"seq": seq, "key": key, "origin": "replica-1", "event": event}
        for seq, (key, event) in zip(seqs, items, strict=True)
    ]
    events, gap = await replay(path, keys[0], 0)
    assert [e["seq"] for e in events] == seqs[::5] and not gap
    assert (await replay(path, keys[0], seqs[-5]))[0] == []


def test_lines_are_planned_into_few_payloads_under_the_limit() -> None:
    codes = payload_codes([120] * 500)  # 60 500 bytes with the separators
    assert codes == sorted(codes) and codes[-1] == 2 * 7  # 8 payloads, none a reference
    for payload in set(codes):
        assert sum(121 for code in codes if code == payload) - 1 < NOTIFY_LIMIT
    assert payload_codes([10, NOTIFY_LIMIT, 10, NOTIFY_LIMIT - 1, 10]) == [0, 1, 0, 2, 4]


async def test_a_large_event_arrives_whole_on_another_proxy(start_proxy: Start, watch: Any) -> None:
    one, other = await start_proxy(), await start_proxy()
    watcher = await watch(other)
    key = unique("big")
    large = {"kind": "fly", "data": secrets.token_hex(512 * 1024)}  # 1 MiB of text
    edge = {"kind": "fly", "data": "z" * (NOTIFY_LIMIT - 80)}  # its line is just under the limit
    seqs = await publish(one, "a", (key, {"small": 1}), (key, large), (key, edge), (key, {"n": 2}))
    records = await watcher.records(4, {key})
    assert [r["seq"] for r in records] == seqs
    assert [r["event"] for r in records] == [{"small": 1}, large, edge, {"n": 2}]


async def test_publishing_put_on_two_proxies(start_proxy: Start, watch: Any) -> None:
    one, other = await start_proxy(), await start_proxy()
    watcher = await watch(other)
    key = unique("msg")
    target = key_target(key)
    assert (await request(one, "PUT", target, {"status": "pending", "_rev": 1})).status == 204

    failed = await request(
        one,
        "PUT",
        target + "?if_status=running&publish=1&origin=r1",
        {"value": {"status": "done"}, "event": {"kind": "status"}},
    )
    assert failed.status == 409 and "error" in failed.json()
    await expect_only_sentinel(other, watcher, {key})
    assert json.loads((await request(one, "GET", target)).body)["value"]["status"] == "pending"

    value = {"status": "running", "_rev": 2}
    event = {"kind": "status", "data": {"status": "running"}, "rev": 2, "terminal": False}
    ok = await request(
        one,
        "PUT",
        target + "?if_status=pending&if_rev=1&publish=1&origin=r1",
        {"value": value, "event": event},
    )
    assert ok.status == 200
    seq = ok.json()["seq"]
    (record,) = await watcher.records(1, {key})
    assert record == {"seq": seq, "key": key, "origin": "r1", "event": event}
    assert json.loads((await request(other, "GET", target)).body)["value"] == value
    assert (await replay(other, key, 0))[0] == [record]

    claim = key_target(unique("idem"))
    first = await request(
        one, "PUT", claim + "?if_absent=1&publish=1&origin=r1", {"value": 1, "event": {}}
    )
    again = await request(
        one, "PUT", claim + "?if_absent=1&publish=1&origin=r1", {"value": 2, "event": {}}
    )
    assert (first.status, again.status) == (200, 409)
    plain = await request(
        one, "PUT", target + "?publish=1&origin=r2", {"value": {"x": 1}, "event": {"y": 2}}
    )
    assert plain.status == 200
    (record,) = await watcher.records(1, {key})
    assert record["event"] == {"y": 2} and record["seq"] == plain.json()["seq"] > seq


@pytest.mark.parametrize("which", ["LISTEN %", "%"])
async def test_the_listen_connection_killed_ends_every_stream(
    start_proxy: Start, watch: Any, pg_url: str, app_name: str, which: str
) -> None:
    """Only this test's backends: the LISTEN one, or all (the pool's too)."""
    path = await start_proxy()
    watchers = [await watch(path), await watch(path)]
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND query LIKE %s",
            (app_name, which),
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    for watcher in watchers:
        await watcher.end()
    with trio.fail_after(WAIT):
        again = await watch(path)  # waits for the proxy to LISTEN again
    key = unique("after")
    with trio.fail_after(WAIT):
        while (
            reply := await request(path, "POST", "/events", batch("a", (key, {})))
        ).status != 200:
            assert reply.status == 503  # a pooled connection found dead: the client retries
    assert [r["seq"] for r in await again.records(1, {key})] == reply.json()["seqs"]


def test_settings_of_the_bus() -> None:
    base = {"CONNECTOR_SOCKET": "/s", "STATE_PROXY_PG_URL": "postgresql://h/db"}
    settings = Settings.from_env(base)
    assert (settings.event_buffer, settings.event_age) == (256, 60.0)
    settings = Settings.from_env(
        {**base, "STATE_PROXY_EVENT_BUFFER": "3", "STATE_PROXY_EVENT_AGE": "2.5s"}
    )
    assert (settings.event_buffer, settings.event_age) == (3, 2.5)
    for name, bad in [
        ("BUFFER", "0"),
        ("BUFFER", "-1"),
        ("BUFFER", "2.5"),
        ("AGE", "0"),
        ("AGE", "inf"),
        ("AGE", "x"),
    ]:
        env = {**base, f"STATE_PROXY_EVENT_{name}": bad}
        with pytest.raises(SettingsError, match=f"^STATE_PROXY_EVENT_{name} is invalid"):
            Settings.from_env(env)


async def test_pruning_to_the_buffer_reports_a_gap(start_proxy: Start) -> None:
    path = await start_proxy(event_buffer=3)
    key, other = unique("pruned"), unique("kept")
    seqs = await publish(path, "a", *[(key, {"n": n}) for n in range(5)], (other, {}))
    await pruned(path, key, 3)
    events, gap = await replay(path, key, 0)
    assert [e["event"]["n"] for e in events] == [2, 3, 4] and gap
    assert await replay(path, key, seqs[0]) == (events, True)  # the 2nd event is lost
    assert await replay(path, key, seqs[1]) == (events, False)
    assert await replay(path, key, seqs[2]) == (events[1:], False)
    assert await replay(path, other, 0) == (
        [{"seq": seqs[5], "key": other, "origin": "a", "event": {}}],
        False,
    )


async def test_pruning_by_age_reports_a_gap(start_proxy: Start) -> None:
    path = await start_proxy(event_age=0.2)
    key = unique("aged")
    (seq,) = await publish(path, "a", (key, {}))
    await pruned(path, key, 0)
    assert await replay(path, key, 0) == ([], True)
    assert await replay(path, key, seq) == ([], False)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"origin": "a", "events": [{"key": "k", "event": {"x": NaN}}]}',
        [],
        {"events": [{"key": "k", "event": {}}]},
        {"origin": "", "events": [{"key": "k", "event": {}}]},
        {"origin": "a b", "events": [{"key": "k", "event": {}}]},
        {"origin": "o" * 65, "events": [{"key": "k", "event": {}}]},
        {"origin": "a", "events": {"key": "k", "event": {}}},
        {"origin": "a", "events": []},
        {"origin": "a", "events": [{"key": "k", "event": {}}] * 1001},
        {"origin": "a", "events": [{"key": "k", "event": {}}, "x"]},
        {"origin": "a", "events": [{"key": "k", "event": {}}, {"key": 1, "event": {}}]},
        {"origin": "a", "events": [{"key": "k", "event": {}}, {"key": "", "event": {}}]},
        {"origin": "a", "events": [{"key": "k", "event": {}}, {"key": "a\x00", "event": {}}]},
        {"origin": "a", "events": [{"key": "k", "event": {}}, {"key": "k", "event": [1]}]},
        {"origin": "a", "events": [{"key": "k", "event": {}}, {"key": "k"}]},
        # PostgreSQL refuses the second key (too long for the index): the first is rolled back.
        {
            "origin": "a",
            "events": [{"key": "k", "event": {}}, {"key": secrets.token_hex(4000), "event": {}}],
        },
    ],
)
async def test_a_bad_publish_is_refused_and_publishes_nothing(
    start_proxy: Start, watch: Any, body: object
) -> None:
    path = await start_proxy()
    watcher = await watch(path)
    reply = await request(path, "POST", "/events", body)
    assert reply.status == 400, reply
    assert isinstance(reply.json()["error"], str)
    await expect_only_sentinel(path, watcher, {"k"})


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("?publish=2&origin=a", {"value": 1, "event": {}}),
        ("?publish=&origin=a", {"value": 1, "event": {}}),
        ("?publish=1", {"value": 1, "event": {}}),
        ("?publish=1&origin=a%20b", {"value": 1, "event": {}}),
        ("?publish=1&origin=a", {"event": {}}),
        ("?publish=1&origin=a", {"value": 1}),
        ("?publish=1&origin=a", {"value": 1, "event": "x"}),
        ("?publish=1&origin=a", [1]),
        ("?publish=1&origin=a", b"{"),
        ("?publish=1&origin=a", b'{"value": 1, "event": {"x": Infinity}}'),
        ("?publish=1&origin=a", {"value": "\udc00", "event": {}}),
        ("?publish=1&origin=a&if_absent=2", {"value": 1, "event": {}}),
        ("?publish=1&origin=a&if_rev=x", {"value": 1, "event": {}}),
    ],
)
async def test_a_bad_publishing_put_is_refused_and_changes_nothing(
    start_proxy: Start, watch: Any, query: str, body: object
) -> None:
    path = await start_proxy()
    watcher = await watch(path)
    key = unique("bad")
    assert (await request(path, "PUT", key_target(key), {"status": "pending"})).status == 204
    reply = await request(path, "PUT", key_target(key) + query, body)
    assert reply.status == 400, reply
    assert isinstance(reply.json()["error"], str)
    assert json.loads((await request(path, "GET", key_target(key))).body)["value"] == {
        "status": "pending"
    }
    await expect_only_sentinel(path, watcher, {key})


@pytest.mark.parametrize(
    "query", ["", "?after=", "?after=-1", "?after=1.5", "?after=x", "?after=%C2%B2"]
)
async def test_a_bad_replay_is_refused(start_proxy: Start, query: str) -> None:
    path = await start_proxy()
    reply = await request(path, "GET", "/events/k" + query)
    assert reply.status == 400 and "error" in reply.json()


async def test_routes_and_methods(start_proxy: Start) -> None:
    path = await start_proxy()
    assert (await request(path, "GET", "/events")).status == 405
    assert (await request(path, "POST", "/events/watch")).status == 405
    assert (await request(path, "GET", "/events/")).status == 404
    key = "watch"  # a key named like the route: replayed with after, or percent-encoded
    (seq,) = await publish(path, "a", (key, {"w": 1}))
    assert (await replay(path, key, seq - 1))[0][0]["seq"] == seq
    reply = await request(path, "GET", f"/events/%77atch?after={seq - 1}")
    assert reply.json()["events"][0]["seq"] == seq


async def test_watch_streams_end_when_the_proxy_drains(
    nursery: trio.Nursery, pg_url: str, short_dir: str, watch: Any
) -> None:
    path = os.path.join(short_dir, "drain.sock")
    stop = trio.Event()
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        await serve_state_proxy(path, pg_url, shutdown_trigger=stop.wait, task_status=task_status)
        done.set()

    await nursery.start(run)
    watcher = await watch(path)
    stop.set()
    await watcher.end()
    with trio.fail_after(WAIT):
        await done.wait()


async def test_proxies_on_other_schemas_see_nothing(
    start_proxy: Start, watch: Any, pg_url: str
) -> None:
    schema = f"ev_other_{uuid.uuid4().hex[:8]}"
    admin_url = pg_url.split("?")[0]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        ours = await start_proxy()
        theirs = await start_proxy(f"{admin_url}?options=-csearch_path%3D{schema}")
        watcher = await watch(ours)
        key = unique("elsewhere")
        await publish(theirs, "b", (key, {"x": 1}))
        assert (await replay(theirs, key, 0))[0] != []
        await expect_only_sentinel(ours, watcher, {key})
        assert await replay(ours, key, 0) == ([], False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def scrape(port: int) -> dict[str, float]:
    """The samples of the proxy's metrics port, by name with labels (``name{op=watch}``)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    text = data.partition(b"\r\n\r\n")[2].decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


async def test_the_metrics_count_events_and_streams(start_proxy: Start, watch: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    path = await start_proxy(metrics_port=port)
    watcher = await watch(path)
    key = unique("counted")
    await publish(path, "a", (key, {}), (key, {}))
    await watcher.records(2, {key})
    samples = await scrape(port)
    assert samples["asya_state_proxy_events_published_total"] == 2
    assert samples["asya_state_proxy_watch_streams_total"] == 1
    assert samples["asya_state_proxy_watch_streams_open"] == 1
    assert samples["asya_state_proxy_requests_total{op=publish,status=200}"] == 1
    assert samples["asya_state_proxy_requests_total{op=watch,status=200}"] == 1


async def test_a_pipeline_commits_whole_or_not_at_all(pg_url: str) -> None:
    pool = PgPool(pg_url, max_size=1)
    key = unique("tx").encode()
    insert = (b"INSERT INTO tx_probe (key) VALUES ($1) RETURNING key", b"tx_probe_insert")
    divide = (b"SELECT 1 / $1::int", b"tx_probe_divide")
    try:
        await pool.execute_script(b"CREATE TABLE IF NOT EXISTS tx_probe (key text PRIMARY KEY)")

        async def stored() -> tuple[bytes | None, ...]:
            rows = await pool.execute(b"SELECT key FROM tx_probe WHERE key LIKE $1", [key + b"%"])
            return tuple(sorted(v for v in rows.values if v is not None))

        with pytest.raises(PgError):  # the second statement fails: the first is undone
            await pool.execute_pipeline(
                [(insert[0], [key + b"1"], insert[1]), (divide[0], [b"0"], divide[1])]
            )
        with pytest.raises(PgError):  # the first fails: the second is skipped
            await pool.execute_pipeline(
                [(divide[0], [b"0"], divide[1]), (insert[0], [key + b"2"], insert[1])]
            )
        assert await stored() == ()
        first, second = await pool.execute_pipeline(
            [(insert[0], [key + b"3"], insert[1]), (insert[0], [key + b"4"], insert[1])]
        )
        assert (first.values, second.values) == ((key + b"3",), (key + b"4",))
        assert await stored() == (key + b"3", key + b"4")
        # One connection all along: a failed pipeline leaves it usable.
        assert pool.statistics().in_use == 0 and pool.statistics().opened == 1
    finally:
        pool.close()


async def test_concurrent_publishers_of_one_key_are_watched_in_seq_order(
    start_proxy: Start, watch: Any
) -> None:
    proxies = [await start_proxy(), await start_proxy()]
    watcher = await watch(proxies[1])
    key = unique("contended")

    async def publisher(n: int) -> None:
        for round_ in range(20):
            await publish(proxies[n % 2], f"p{n}", *[(key, {"n": n, "r": round_})] * 3)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(publisher, n)
    seqs = [record["seq"] for record in await watcher.records(240, {key})]
    assert seqs == sorted(seqs) and len(set(seqs)) == 240
    assert [e["seq"] for e in (await replay(proxies[0], key, 0))[0]] == seqs[-240:]


async def test_a_seq_not_handed_out_yet_is_a_gap(start_proxy: Start) -> None:
    # A stream resuming from a made-up id must not take that seq as its position (it would
    # drop every live event below it): the replay says gap, so the stream starts afresh.
    path = await start_proxy()
    key = unique("future")
    (seq,) = await publish(path, "a", (key, {"n": 1}))
    assert await replay(path, key, seq) == ([], False)
    assert await replay(path, key, seq + 10**6) == ([], True)


async def test_concurrent_publishing_puts_commit_in_groups_and_fail_alone(
    start_proxy: Start, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One commit at a time: while the first request's commit is out, the other nine queue up
    # and go as one group, which holds a write PostgreSQL refuses (a NUL in jsonb) and one
    # whose guard fails. Only those two fail; the others commit, in the order they came.
    monkeypatch.setattr(_events, "MAX_COMMITS", 1)
    await start_proxy()  # the tables
    bus = _events.EventBus(PgPool(pg_url, max_size=2))
    await bus.ensure_schema()
    shared, guarded, refused = unique("shared"), unique("guarded"), unique("refused")
    outcomes: dict[int, object] = {}
    arrived: list[int] = []  # the order the calls were made (trio starts tasks in any order)

    async def put(index: int, key: str, value: object, status: str | None = None) -> None:
        body = json.dumps({"value": value, "event": {"n": index}}).encode()
        arrived.append(index)
        try:
            write = PublishWrite(key, body, "o1", f'{{"n":{index}}}', status=status)
            outcomes[index] = await bus.put_publish(write)
        except BadRequest as exc:
            outcomes[index] = exc

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, 0, unique("first"), {"n": 0})
            await trio.testing.wait_all_tasks_blocked()
            for index in range(1, 8):
                nursery.start_soon(put, index, shared, {"n": index})
            nursery.start_soon(put, 8, guarded, {"n": 8}, "running")  # no such key: no write
            nursery.start_soon(put, 9, refused, "\u0000")
        assert bus.groups == 1
        assert outcomes[8] is None
        assert isinstance(outcomes[9], BadRequest)
        seqs = [outcomes[index] for index in arrived if index < 8]
        assert all(isinstance(seq, int) for seq in seqs) and seqs == sorted(seqs)
        rows = await bus.pool.execute(
            b"SELECT value::text FROM kv WHERE key = $1", [shared.encode()]
        )
        last = [index for index in arrived if 1 <= index < 8][-1]
        assert json.loads(rows.values[0] or b"") == {"n": last}  # the last one came last
        missing = await bus.pool.execute(b"SELECT 1 FROM kv WHERE key = $1", [refused.encode()])
        assert missing.values == ()
    finally:
        bus.pool.close()
