# The state proxy: the routes of docs/stateproxy.md on the HTTP server, over the kv store.
#
# `serve_state_proxy` owns everything and in this order: the PostgreSQL pool, the schema (made
# before anything listens), the metrics port if one is set (`_metrics.py`), the Unix socket (a
# stale socket file is removed, a live one is left alone), then the HTTP server. It reports
# `started` once requests can be served and runs until cancelled; with a `shutdown_trigger` it
# drains instead (stop accepting, finish requests in flight for up to `grace_period`, close idle
# connections), then closes the socket and the pool.
#
# `Router.handle` maps a request to a store operation. Everything the client must agree on is
# mesh_proto's wire protocol, shared with the client side: the key is the rest of the path after
# ``/keys/`` decoded by `decode_key` (exactly once, so ``/keys/msg%2Fabc`` is the key ``msg/abc``
# and a key holding ``?``, ``#``, ``%`` or ``..`` round-trips), query strings by
# `decode_query_string`, guards by `parse_revision`, bodies of `/query` by `Query`. Errors come
# back as ``{"error": "..."}`` (`error_body`); a `ProtocolError` carries its own status.
#
# A write may be guarded by the stored status (``if_status=S``, the Asya protocol) and by the
# stored revision (``if_rev=N``, ours), or both. The health reply lists our additions in the
# `FEATURES_HEADER`, so that a client can tell this proxy from one that would ignore ``if_rev``.
# ``if_absent=1`` (ours too) writes only if the key does not exist (409 if it does), one
# ``INSERT ... ON CONFLICT DO NOTHING``: the atomic claim of an idempotency key.
#
# The event bus (feature `events`, `_events.py`) adds ``POST /events``, ``GET /events/watch``
# (a streamed reply), ``GET /events/{key}?after=N`` and ``PUT /keys/{key}?publish=1&origin=O``
# (the write and its event in one transaction). A key named ``watch`` is replayed as
# ``/events/%77atch`` or with ``after`` given: ``/events/watch`` without ``after`` is the watch.

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from mesh_proto import (
    COLUMN_BOUNDS,
    DELETE_QUERY,
    EVENTS,
    FEATURES_HEADER,
    IF_ABSENT,
    REV_GUARD,
    WRITES,
    BadRequest,
    ProtocolError,
    decode_key,
    decode_query_string,
    decode_writes,
    error_body,
    is_origin,
    parse_after,
    parse_revision,
)

from ._errors import Conflict, StartupError, StoreUnavailable
from ._events import Batch, EventBus, PublishWrite, parse_publish
from ._http import HttpServer, Request, Response
from ._metrics import ProxyMetrics, serve_metrics
from ._pg import PgPool
from ._query import compile_delete, compile_query
from ._settings import check_indexes, check_pg_url
from ._store import Database, GuardedWrite, KvStore

logger = logging.getLogger("mesh_trio.stateproxy")

#: Largest request body accepted by default; larger ones are answered 413. Above the mesh API's
#: own 10 MiB body limit (the Go proxy has 10 MiB), because a create body just under that limit
#: becomes a larger stored envelope (see docs/stateproxy.md, "Limits").
MAX_BODY = 16 * 1024 * 1024
#: Connections to PostgreSQL kept by default.
DEFAULT_POOL_SIZE = 10
#: Longest wait for one statement by default, in seconds.
DEFAULT_PG_TIMEOUT = 30.0

#: Events kept per key by default (``STATE_PROXY_EVENT_BUFFER``).
DEFAULT_EVENT_BUFFER = 256
#: Seconds an event is kept by default (``STATE_PROXY_EVENT_AGE``).
DEFAULT_EVENT_AGE = 60.0

#: What this proxy adds to the Asya protocol, as its health reply lists them (`EVENTS` only
#: over PostgreSQL through our own pool, which the bus needs).
FEATURES = (REV_GUARD, DELETE_QUERY, IF_ABSENT, COLUMN_BOUNDS, WRITES, EVENTS)

_KEYS = b"/keys/"
_EVENTS = b"/events"
_WATCH = b"/events/watch"
_EVENTS_OF = b"/events/"
_WRITES = b"/writes"
_NO_CONTENT = Response(status=204)
_OK_HEAD = Response(status=200)
_NDJSON = b"application/x-ndjson"


def _healthy(features: Sequence[str]) -> Response:
    return Response(
        status=200,
        body=b"ok",
        content_type=b"text/plain; charset=utf-8",
        headers=((FEATURES_HEADER.encode(), ",".join(features).encode()),),
    )


_HEALTHY = _healthy(FEATURES)
_HEALTHY_WITHOUT_BUS = _healthy(tuple(f for f in FEATURES if f != EVENTS))


@attrs.define(eq=False)
class Router:
    """Answers the state-proxy protocol over a `KvStore` and, if given, an `EventBus`."""

    store: KvStore
    metrics: ProxyMetrics | None = None
    bus: EventBus | None = None

    async def handle(self, request: Request) -> Response:
        """Answer one request (counted in `metrics`, if any); never raises for anything the
        client or PostgreSQL did."""
        if self.metrics is None:
            return await self._answer(request)
        started = time.perf_counter()
        response = await self._answer(request)
        self.metrics.request(request, response.status, time.perf_counter() - started)
        return response

    async def _answer(self, request: Request) -> Response:
        path, _, query = request.target.partition(b"?")
        method = request.method
        try:
            if path.startswith(_KEYS) and len(path) > len(_KEYS):
                allowed = (b"GET", b"HEAD", b"PUT", b"DELETE")
                if method not in allowed:
                    return _not_allowed(allowed)
                key = decode_key(path[len(_KEYS) :])
                return await self._key(method, key, query, request.body)
            if path == _KEYS:
                if method != b"GET":
                    return _not_allowed((b"GET",))
                prefix = decode_query_string(query).get("prefix", "")
                keys = await self.store.list_keys(prefix)
                return Response(status=200, body=b'{"keys":' + keys + b"}")
            if path == b"/query":
                if method != b"POST":
                    return _not_allowed((b"POST",))
                rows, total = await self.store.query(compile_query(request.body))
                tail = b"null" if total is None else str(total).encode()
                body = b'{"rows":[' + b",".join(rows) + b'],"total":' + tail + b"}"
                return Response(status=200, body=body)
            if path == b"/delete":
                if method != b"POST":
                    return _not_allowed((b"POST",))
                deleted = await self.store.delete_matching(compile_delete(request.body))
                return Response(status=200, body=b'{"deleted":%d}' % deleted)
            if path == _WRITES:
                if method != b"POST":
                    return _not_allowed((b"POST",))
                writes = decode_writes(request.body)
                if self.metrics is not None:
                    self.metrics.batched_writes.inc(len(writes))
                return await self._writes(writes)
            if path == b"/healthz":
                if method not in (b"GET", b"HEAD"):
                    return _not_allowed((b"GET", b"HEAD"))
                return _HEALTHY_WITHOUT_BUS if self.bus is None else _HEALTHY
            if path.startswith(_EVENTS) and self.bus is not None:
                return await self._events(self.bus, method, path, query, request.body)
            return Response(status=404, body=error_body("not found"))
        except StoreUnavailable as exc:
            return Response(
                status=503, body=error_body(exc.message), headers=((b"retry-after", b"1"),)
            )
        except ProtocolError as exc:
            return _refusal(exc)

    async def _key(self, method: bytes, key: str, query: bytes, body: bytes) -> Response:
        store = self.store
        if method == b"GET":
            record = await store.get(key)
            if record is None:
                return Response(status=404, body=error_body("not found"))
            return Response(status=200, body=record)
        if method == b"HEAD":
            return _OK_HEAD if await store.exists(key) else Response(status=404)
        if method == b"DELETE":
            if await store.delete(key):
                return _NO_CONTENT
            return Response(status=404, body=error_body("not found"))
        return await self._put(key, *_put_guards(query), body)

    async def _put(
        self,
        key: str,
        params: dict[str, str],
        if_status: str | None,
        if_rev: str | None,
        body: bytes,
    ) -> Response:
        store = self.store
        if "publish" in params:
            write = self._publish_write(key, params, body, if_status, if_rev)
            assert self.bus is not None
            return self._published(write, await self.bus.put_publish(write))
        if IF_ABSENT in params:
            if not await store.put_if_absent(key, body):
                raise Conflict("condition failed: the key exists")
            return _NO_CONTENT
        if if_status is None and if_rev is None:
            await store.put(key, body)
            return _NO_CONTENT
        guarded = (key, body, if_status, if_rev)
        return self._written(guarded, await self._alone(guarded))

    async def _writes(self, writes: list[tuple[bytes, bytes, bytes]]) -> Response:
        """`POST /writes`: each PUT answered as it would have been alone, in order.

        A run of guarded writes of distinct keys (no if_absent) is one statement: a run of
        plain ones, or a run of publishing ones of one origin. A repeated key or another kind
        of write ends a run, so the writes of one key apply in their order. Once PostgreSQL is
        unavailable, that write and every later one is answered 503.
        """
        results: list[bytes] = [b""] * len(writes)
        run: list[tuple[int, GuardedWrite | PublishWrite]] = []
        keys: set[str] = set()  # of the run
        for index, (raw_key, query, body) in enumerate(writes):
            write: GuardedWrite | PublishWrite | None = None
            try:
                key = decode_key(raw_key)
                params, if_status, if_rev = _put_guards(query)
                guarded = (if_status, if_rev) != (None, None) and IF_ABSENT not in params
                if "publish" in params:
                    publish = self._publish_write(key, params, body, if_status, if_rev)
                    write = publish if guarded else None
                elif guarded:
                    write = (key, body, if_status, if_rev)
            except ProtocolError as exc:
                results[index] = _result(_refusal(exc))
                continue
            if run and (write is None or _kind(write) != _kind(run[0][1]) or key in keys):
                if not await self._write_run(run, results):
                    break
                run, keys = [], set()
            if write is not None:
                run.append((index, write))
                keys.add(key)
                continue
            try:
                response = await self._put(key, params, if_status, if_rev, body)
            except StoreUnavailable:
                break
            except ProtocolError as exc:
                response = _refusal(exc)
            results[index] = _result(response)
        else:
            if run:
                await self._write_run(run, results)
        unavailable = _result(_refusal(StoreUnavailable("the state store is unavailable")))
        body = b",".join(result or unavailable for result in results)
        return Response(status=200, body=b'{"results":[' + body + b"]}")

    async def _write_run(
        self, run: list[tuple[int, GuardedWrite | PublishWrite]], results: list[bytes]
    ) -> bool:
        """Apply a run of `_writes` in one statement and fill in its results; False if
        PostgreSQL is down. A value PostgreSQL refuses fails the statement: then each write
        of the run is made alone, so that only the refused one fails."""
        writes = [write for _, write in run]
        try:
            try:
                outcomes: list[object] = await self._many(writes)
            except BadRequest:
                outcomes = []
                for write in writes:
                    try:
                        outcomes.append(await self._alone(write))
                    except BadRequest as exc:
                        outcomes.append(exc)
        except StoreUnavailable:
            return False
        for (index, write), outcome in zip(run, outcomes, strict=True):
            try:
                if isinstance(outcome, BadRequest):
                    raise outcome
                response = self._written(write, outcome)
            except ProtocolError as exc:
                response = _refusal(exc)
            results[index] = _result(response)
        return True

    async def _many(self, writes: list[GuardedWrite | PublishWrite]) -> list[object]:
        published = [w for w in writes if isinstance(w, PublishWrite)]
        if published:
            assert self.bus is not None and len(published) == len(writes)
            return list(await self.bus.put_publish_many(published))
        return list(await self.store.put_many_if([w for w in writes if isinstance(w, tuple)]))

    async def _alone(self, write: GuardedWrite | PublishWrite) -> object:
        if isinstance(write, PublishWrite):
            assert self.bus is not None
            return await self.bus.put_publish(write)
        key, body, status, revision = write
        return await self.store.put_if(key, body, status=status, revision=revision)

    def _publish_write(
        self,
        key: str,
        params: dict[str, str],
        body: bytes,
        if_status: str | None,
        if_rev: str | None,
    ) -> PublishWrite:
        """The publishing PUT of these parameters, checked.

        Raises:
            BadRequest: no bus, a bad ``publish`` or ``origin``, or a body that is not
                ``{"value": V, "event": E}``.
        """
        if self.bus is None:
            raise BadRequest("this state proxy has no event bus")
        if params["publish"] != "1":
            raise BadRequest("publish must be 1")
        origin = params.get("origin")
        if not is_origin(origin):
            raise BadRequest("origin must be 1 to 64 characters of [A-Za-z0-9_.-]")
        event = parse_publish(body)
        absent = IF_ABSENT in params
        return PublishWrite(key, body, origin, event, if_status, if_rev, absent)

    def _written(self, write: GuardedWrite | PublishWrite, outcome: object) -> Response:
        """The reply to a guarded write, given what `_alone` or `_many` made of it.

        Raises:
            Conflict: a guard failed (nothing written).
        """
        if isinstance(write, PublishWrite):
            assert outcome is None or isinstance(outcome, int)
            return self._published(write, outcome)
        if not outcome:
            raise Conflict(f"condition failed: {_guards(write[2], write[3])}")
        return _NO_CONTENT

    def _published(self, write: PublishWrite, seq: int | None) -> Response:
        if seq is None:
            reason = "the key exists" if write.absent else _guards(write.status, write.revision)
            raise Conflict(f"condition failed: {reason}")
        if self.metrics is not None:
            self.metrics.events_published.inc()
        return Response(status=200, body=b'{"seq":%d}' % seq)

    async def _events(
        self, bus: EventBus, method: bytes, path: bytes, query: bytes, body: bytes
    ) -> Response:
        params = decode_query_string(query) if query else {}
        if path == _EVENTS:
            if method != b"POST":
                return _not_allowed((b"POST",))
            seqs = await bus.publish(Batch.parse(body))
            if self.metrics is not None:
                self.metrics.events_published.inc(len(seqs))
            return Response(
                status=200, body=b'{"seqs":[' + ",".join(map(str, seqs)).encode() + b"]}"
            )
        if not path.startswith(_EVENTS_OF) or len(path) == len(_EVENTS_OF):
            return Response(status=404, body=error_body("not found"))
        if method != b"GET":
            return _not_allowed((b"GET",))
        if path == _WATCH and "after" not in params:
            stream = await bus.watch()
            if self.metrics is not None:
                self.metrics.watch_streams.inc()
            return Response(status=200, content_type=_NDJSON, stream=stream)
        key = decode_key(path[len(_EVENTS_OF) :])
        after = parse_after(params.get("after", ""))
        return Response(status=200, body=await bus.replay(key, after))


def _not_allowed(allowed: Sequence[bytes]) -> Response:
    return Response(
        status=405,
        body=error_body("method not allowed"),
        headers=((b"allow", b", ".join(allowed)),),
    )


def _put_guards(query: bytes) -> tuple[dict[str, str], str | None, str | None]:
    """A PUT's parameters and its status and revision guards (None: not given).

    Raises:
        BadRequest: a malformed revision, or ``if_absent`` other than 1 or with a guard.
    """
    params = decode_query_string(query) if query else {}
    if_status = params.get("if_status") or None  # empty: unconditional, as in the Go proxy
    raw_rev = params.get(REV_GUARD)
    if_rev = None if raw_rev is None else parse_revision(raw_rev)
    if_absent = params.get(IF_ABSENT)
    if if_absent is not None and (if_absent != "1" or if_status or if_rev):
        raise BadRequest("if_absent must be 1, and takes no other guard")
    return params, if_status, if_rev


def _kind(write: GuardedWrite | PublishWrite) -> str | None:
    """What a write may share a run with: the writes of its kind (publishing ones: of its
    origin)."""
    return write.origin if isinstance(write, PublishWrite) else None


def _refusal(exc: ProtocolError) -> Response:
    """The reply to a request refused with `exc`: its status and ``{"error": ...}``."""
    return Response(status=exc.status_hint, body=error_body(exc.message))


def _result(response: Response) -> bytes:
    """One result of a `POST /writes` reply: the status and JSON body of a PUT's own reply."""
    if response.body:
        return b'{"status":%d,"body":%s}' % (response.status, response.body)
    return b'{"status":%d}' % response.status


def _guards(status: str | None, revision: str | None) -> str:
    wanted = [f"status {status!r}"] if status is not None else []
    wanted += [f"revision {revision}"] if revision is not None else []
    return "no record with " + " and ".join(wanted)


async def serve_state_proxy(
    socket_path: str,
    pg_url: str,
    *,
    indexes: Sequence[str] = (),
    pool_size: int = DEFAULT_POOL_SIZE,
    pg_timeout: float = DEFAULT_PG_TIMEOUT,
    max_body: int = MAX_BODY,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    grace_period: float = 10.0,
    metrics_port: int | None = None,
    event_buffer: int = DEFAULT_EVENT_BUFFER,
    event_age: float = DEFAULT_EVENT_AGE,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the state-proxy protocol on `socket_path`, backed by PostgreSQL at `pg_url`.

    Creates the kv table and its indexes if missing, listens on the Unix socket (mode 0666),
    calls ``task_status.started()`` and serves until cancelled, or until `shutdown_trigger`
    returns, after which it drains for at most `grace_period` seconds and returns. The socket
    file is removed on the way out.

    Args:
        socket_path: where to listen; a stale socket file there is replaced.
        pg_url: libpq URL or connection string. Tests isolate themselves with a search path:
            ``...?options=-csearch_path%3Dmy_schema``.
        indexes: fields of the stored value to give an expression index (see docs/stateproxy.md).
        pool_size: most PostgreSQL connections (and statements in flight) at once.
        pg_timeout: longest wait for PostgreSQL to answer one statement (also set as its
            server-side ``statement_timeout``); connecting waits at most 5 s or this, if less.
        max_body: largest request body in bytes; larger ones are answered 413.
        shutdown_trigger: awaited after start; when it returns the proxy drains and stops.
        grace_period: longest drain, in seconds.
        metrics_port: TCP port (all interfaces) answering ``GET /metrics`` in the Prometheus
            text format (docs/operations.md); None: no metrics, and no cost per request.
        event_buffer: events the bus keeps per key for replays (at least 1).
        event_age: seconds the bus keeps an event for replays.
        task_status: for ``nursery.start``.

    Raises:
        ValueError: an index field name is invalid, `pg_url` cannot be parsed, or
            `event_buffer` / `event_age` is not positive.
        StartupError: PostgreSQL cannot be used (``setting == "pg_url"``), the socket cannot
            be served (``setting == "socket"``) or the metrics port cannot be bound
            (``setting == "metrics_port"``).
    """
    fields = check_indexes(indexes)
    check_pg_url(pg_url)
    if event_buffer < 1 or not event_age > 0:
        raise ValueError("event_buffer and event_age must be positive")
    pool = PgPool(
        pg_url,
        max_size=pool_size,
        connect_timeout=min(5.0, pg_timeout),
        statement_timeout=pg_timeout,
    )
    await _serve(
        socket_path,
        pool,
        fields,
        shutdown_trigger,
        grace_period,
        task_status,
        max_body=max_body,
        metrics_port=metrics_port,
        bus=EventBus(pool, buffer=event_buffer, age=event_age),
    )


async def _serve(
    socket_path: str,
    db: Database,
    indexes: Sequence[str],
    shutdown_trigger: Callable[[], Awaitable[object]] | None,
    grace_period: float,
    task_status: trio.TaskStatus[None],
    *,
    max_body: int = MAX_BODY,
    metrics_port: int | None = None,
    bus: EventBus | None = None,
) -> None:
    """`serve_state_proxy` over any `Database` (the benchmark plugs in other drivers; only
    our `PgPool` carries a `bus`)."""
    where = db.describe() if isinstance(db, PgPool) else type(db).__name__
    try:
        store = KvStore(db)
        try:
            await store.ensure_schema(indexes)
            if bus is not None:
                await bus.ensure_schema()
        except StoreUnavailable as exc:
            raise StartupError("pg_url", f"cannot use PostgreSQL at {where}: {exc}") from None
        metrics = (
            None
            if metrics_port is None
            else ProxyMetrics(db if isinstance(db, PgPool) else None, bus)
        )
        # Bound before the nursery opens, so that a failure is a plain `StartupError`.
        metrics_listeners = [] if metrics_port is None else await _listen_tcp(metrics_port)
        try:
            listener, inode = await _listen(socket_path)
        except StartupError:
            for each in metrics_listeners:
                await each.aclose()
            raise
        server = HttpServer(Router(store, metrics, bus).handle, max_body)
        try:
            async with trio.open_nursery() as nursery:
                if bus is not None:
                    await nursery.start(bus.run)
                await nursery.start(server.serve, listener)
                if metrics is not None:
                    metrics.servers.append(server)
                    await nursery.start(serve_metrics, metrics, metrics_listeners)
                    logger.info("asya-state-proxy metrics on port %s", metrics_port)
                logger.info(
                    "asya-state-proxy listening on %s (PostgreSQL %s, indexes: %s)",
                    socket_path,
                    where,
                    ", ".join(indexes) or "none",
                )
                task_status.started()
                if shutdown_trigger is None:
                    await trio.sleep_forever()
                await shutdown_trigger()
                connections = server.statistics().connections
                logger.info("asya-state-proxy draining (%d connections open)", connections)
                if bus is not None:
                    bus.close()  # watch streams end, so their connections can close
                server.begin_drain()
                with trio.move_on_after(grace_period):
                    await server.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            _unlink_if_ours(socket_path, inode)
    finally:
        close = getattr(db, "close", None)
        if close is not None:
            close()
        logger.info("asya-state-proxy stopped")


async def _listen(path: str) -> tuple[trio.SocketListener, int]:
    """Bind and listen on a Unix socket at `path`; returns the listener and the file's inode."""
    _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o666)  # every container of the pod may connect; the volume is private
        sock.listen(socket.SOMAXCONN)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        raise StartupError("socket", f"cannot listen on {path}: {exc.strerror or exc}") from None
    return trio.SocketListener(sock), inode


async def _listen_tcp(port: int) -> list[trio.SocketListener]:
    """Listen on `port` of every interface (the metrics port)."""
    try:
        return await trio.open_tcp_listeners(port)
    except OSError as exc:
        raise StartupError(
            "metrics_port", f"cannot listen on port {port}: {exc.strerror or exc}"
        ) from None


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError("socket", f"cannot inspect {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise StartupError("socket", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a leftover of a previous run
        return
    except BlockingIOError:
        pass  # accepted into a full backlog: someone listens
    except OSError as exc:
        raise StartupError("socket", f"cannot probe {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError("socket", f"another process is serving {path}")


def _unlink_if_ours(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
