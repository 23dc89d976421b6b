# Harness of the state-proxy tests: a real PostgreSQL, a real Unix socket, a small h11 client.
#
# One schema per test session (``sp_test_<random>``, dropped at the end) isolates these tests
# from other runs sharing the server; the proxy reaches it through the search path in its URL,
# and the kv table is emptied before each test. If PostgreSQL is unreachable the `pg_schema`
# fixture raises, so every test depending on it errors (fails) instead of skipping.
#
# `proxy` starts `serve_state_proxy` in the test's nursery on a socket in a short temporary
# directory (AF_UNIX paths are limited to ~107 bytes, pytest's tmp_path can be longer).
# `client` gives an `HttpClient`: keep-alive HTTP/1.1 over that socket, one request at a time,
# plus `raw` to write bytes and read what comes back, for pipelining and partial writes.

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import quote

import attrs
import h11
import psycopg
import pytest
import trio
import trio.testing

from mesh_trio.stateproxy import serve_state_proxy

PG_ADMIN_URL = os.environ.get(
    "STATE_PROXY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def key_path(key: str) -> str:
    """The path of `key`, every reserved character percent-encoded (as the connectors do)."""
    return "/keys/" + quote(key, safe="")


class HttpClient:
    """A keep-alive HTTP/1.1 client over a Unix socket, built on h11."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        self.connections_opened = 0

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | object | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Reply:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        if self._conn is None or self._conn.our_state is not h11.IDLE:
            await self.close()
            self._stream = await trio.open_unix_socket(self.socket_path)
            self._conn = h11.Connection(h11.CLIENT)
            self.connections_opened += 1
        assert self._stream is not None
        conn, stream = self._conn, self._stream
        hdrs = [("host", "state-proxy"), *(headers or [])]
        if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in hdrs):
            hdrs.append(("content-length", str(len(body))))
        out = conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        status, reply_headers, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                reply_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"unexpected {event!r}")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.close()
        return Reply(status, reply_headers, b"".join(chunks))

    async def get(self, target: str) -> Reply:
        return await self.request("GET", target)

    async def put(self, key: str, value: object, if_status: str | None = None) -> Reply:
        target = key_path(key) + ("" if if_status is None else "?if_status=" + quote(if_status))
        return await self.request("PUT", target, json.dumps(value).encode())

    async def query(self, body: object) -> Reply:
        return await self.request("POST", "/query", body)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self._stream, self._conn = None, None


async def raw_exchange(socket_path: str, *pieces: bytes) -> list[Reply]:
    """Write `pieces`, each once the server has read the previous one and blocked for more,
    then read until the server closes the connection, and parse the responses.

    The last request should carry ``Connection: close``; responses must not answer HEAD.
    """
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        for piece in pieces:
            await stream.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    return parse_responses(bytes(data))


def parse_responses(data: bytes) -> list[Reply]:
    """Split a stream of Content-Length framed (or 204) responses."""
    replies = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        length = int(headers.get("content-length", "0"))
        replies.append(Reply(status, headers, rest[:length]))
        data = rest[length:]
    return replies


def pg_url_for(schema: str, application_name: str) -> str:
    return f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}&application_name={application_name}"


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    """A fresh schema for this test session; raises (fails the tests) if PostgreSQL is down."""
    schema = f"sp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_admin(pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A direct connection to the test schema, for setup and for checking what was stored."""
    with psycopg.connect(
        PG_ADMIN_URL, autocommit=True, options=f"-csearch_path={pg_schema}"
    ) as conn:
        conn.execute(
            "DO $$ BEGIN IF to_regclass('kv') IS NOT NULL THEN TRUNCATE kv; END IF; END $$"
        )
        yield conn


@pytest.fixture
def app_name() -> str:
    """The application_name of this test's proxy connections (to find and kill them)."""
    return f"sp_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_url(pg_schema: str, pg_admin: object, app_name: str) -> str:
    return pg_url_for(pg_schema, app_name)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sp", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "proxy.sock")


@pytest.fixture
async def proxy(nursery: trio.Nursery, socket_path: str, pg_url: str) -> AsyncIterator[str]:
    """A running proxy on `socket_path`, indexes on status and deadline_at; yields the path."""
    await nursery.start(
        lambda task_status: serve_state_proxy(
            socket_path,
            pg_url,
            indexes=("status", "deadline_at"),
            pool_size=4,
            task_status=task_status,
        )
    )
    yield socket_path


@pytest.fixture
async def client(proxy: str) -> AsyncIterator[HttpClient]:
    c = HttpClient(proxy)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[[str], HttpClient]]:
    """Makes more clients (each its own connection); all are closed at teardown."""
    made: list[HttpClient] = []

    def make(socket_path: str) -> HttpClient:
        made.append(HttpClient(socket_path))
        return made[-1]

    yield make
    for c in made:
        await c.close()


@pytest.fixture
def raw() -> object:
    """`raw_exchange`: write bytes in pieces, read every response until the server closes."""
    return raw_exchange


@pytest.fixture
def path_of() -> object:
    """`key_path`: the percent-encoded path of a key."""
    return key_path
