"""Shared fixtures: a running mesh API with the embedded defaults, and the state proxy over the
real PostgreSQL (127.0.0.1:5432) for tests that need it.

PostgreSQL is required, not optional: if it cannot be reached, `pg_schema` raises and every test
that depends on it errors instead of skipping. Each test session works in a schema of its own
(dropped at the end); the proxy reaches it through the search path in its URL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial

import psycopg
import pytest
import trio

from mesh_trio._config import LISTENERS
from mesh_trio._proxy_store import ProxyStore, open_proxy_store
from mesh_trio.stateproxy import serve_state_proxy
from tests.harness import TEST_ENV, MeshClient, start_mesh

PG_URL = os.environ.get("MESH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["memory", "proxy"])
async def mesh(request: pytest.FixtureRequest, nursery: trio.Nursery, short_dir: str) -> MeshClient:
    """A running mesh API, once with the embedded store and once through the state proxy."""
    if request.param == "proxy":
        pg_url = request.getfixturevalue("pg_url")  # a sync fixture: PostgreSQL is required
        path = os.path.join(short_dir, "proxy.sock")
        await nursery.start(partial(serve_state_proxy, path, pg_url))
        return await start_mesh(nursery, ASYA_STATEPROXY_SOCKET=path)
    return await start_mesh(nursery)


@pytest.fixture(params=LISTENERS)
def listener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every mesh the test starts uses this HTTP listener: a module whose behaviour depends on
    the listener runs on each (`pytestmark = pytest.mark.usefixtures("listener")`)."""
    monkeypatch.setitem(TEST_ENV, "ASYA_MESH_HTTP", request.param)
    return str(request.param)


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    schema = f"mesh_api_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL at {PG_URL} is required by this test: {exc}") from exc
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield schema
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def app_name(pg_schema: str) -> str:
    """The application_name of this test's state-proxy connections: what fault tests may kill."""
    return f"asya-test-{pg_schema}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def pg_url(pg_schema: str, app_name: str) -> str:
    """A URL whose search path is the session's schema (kv table emptied) and whose
    application_name is this test's own."""
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {pg_schema}.kv")
    return f"{PG_URL}?options=-csearch_path%3D{pg_schema}&application_name={app_name}"


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for Unix sockets (AF_UNIX paths are limited to ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="mesh-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def proxy_socket(nursery: trio.Nursery, pg_url: str, short_dir: str) -> str:
    """A state proxy serving the session schema on a Unix socket."""
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    return path


@pytest.fixture
async def proxy_store(proxy_socket: str) -> AsyncIterator[ProxyStore]:
    async with open_proxy_store(proxy_socket) as store:
        yield store
