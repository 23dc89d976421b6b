# Trio-native PostgreSQL access: libpq in non-blocking mode, waited on by trio.
#
# Each connection is a `psycopg.pq.PGconn` (the libpq wrapper that ships with psycopg) switched to
# non-blocking mode. Sending never blocks: `flush` pushes what the socket takes and we
# `wait_writable` for the rest; results are read with `consume_input` after `wait_readable` until
# libpq is no longer busy. A statement costs a few task switches, never a thread hop (the
# alternative, sync psycopg through `trio.to_thread`, was measured slower: docs/stateproxy.md).
#
# `PgPool` keeps up to `max_size` connections and hands out the most recently used idle one,
# checked without a round trip: an idle connection whose socket is readable has been told
# something by the server, typically the FATAL a backend sends before it exits
# (`pg_terminate_backend`, shutdown, restart), so it is dropped (a pooled session LISTENs to
# nothing: the server has nothing else to tell it). With no idle connection a new one is opened;
# while PostgreSQL is down that fails at once and the request answers 503. Nothing runs in the
# background: the next request simply connects again, which is how service resumes after a
# restart without restarting the proxy. Every wait is bounded
# (a free slot, connecting, each statement), so a request can fail but never hang.
#
# Statements use the extended protocol with every parameter sent as binary `text` (so a NUL in a
# value is an SQL error, never a silent truncation) and text results. A named statement is
# prepared once per connection.
#
# Two additions serve the event bus. `PgPool.execute_pipeline` sends several prepared statements
# with one Sync (libpq's pipeline mode): one round trip and one implicit transaction, committed
# at the Sync or rolled back whole when a statement fails; whatever else goes wrong (a lost
# connection, a timeout, a cancellation) closes the connection, so no half of it is ever
# committed. `PgPool.listen` opens a connection
# outside the pool that only LISTENs: its notifications are read with `notifies()` after
# `consume_input` whenever the socket is readable, and a broken connection raises
# `StoreUnavailable` to the one task reading it.

from __future__ import annotations

import logging
import re
import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import attrs
import psycopg
import trio
from psycopg import pq

from ._errors import PgError, StoreUnavailable

logger = logging.getLogger("mesh_trio.stateproxy")

_TEXT_OID = 25
_BINARY = 1
# SQLSTATE classes meaning "not now" rather than "not this": connection exception, operator
# intervention (shutdown, restart, terminated backend), insufficient resources.
_UNAVAILABLE_CLASSES = ("08", "57", "53")
_RETRYABLE_STATES = ("40001", "40P01")  # serialization failure, deadlock
_CHANNEL = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@attrs.frozen
class Rows:
    """What a statement returned: the first column of each row, and the affected row count."""

    values: tuple[bytes | None, ...]
    affected: int


@attrs.frozen(kw_only=True)
class PoolStatistics:
    """A snapshot of a `PgPool`.

    Attributes:
        idle: connections open and waiting for a statement.
        in_use: slots taken by statements in flight (or waiting to connect).
        opened: connections opened since the pool was made.
        failures: statements that ended in `StoreUnavailable`.
    """

    idle: int
    in_use: int
    opened: int
    failures: int


@attrs.define(eq=False)
class _Conn:
    pgconn: pq.abc.PGconn
    prepared: set[bytes] = attrs.field(factory=set)

    @property
    def fileno(self) -> int:
        return self.pgconn.socket

    def reusable(self) -> bool:
        return (
            self.pgconn.status == pq.ConnStatus.OK
            and self.pgconn.transaction_status == pq.TransactionStatus.IDLE
        )

    def alive(self) -> bool:
        """The connection is usable, inside a transaction or not."""
        return self.pgconn.status == pq.ConnStatus.OK

    def looks_alive(self) -> bool:
        """Check an idle connection without a round trip (see the module comment)."""
        if not self.reusable():
            return False
        # Readable means the server said something to an idle session, or hung up. libpq's
        # `consume_input` would only buffer a FATAL (it parses later), and the EOF behind it may
        # not have arrived yet, so the connection would still look fine: drop it either way.
        poller = select.poll()
        poller.register(self.fileno, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        self.pgconn.finish()

    async def run(self, sql: bytes, params: Sequence[bytes], name: bytes | None) -> pq.abc.PGresult:
        pg = self.pgconn
        formats = [_BINARY] * len(params)
        if name is not None:
            refused = await self._prepare(name, sql, len(params))
            if refused is not None:
                return refused
            pg.send_query_prepared(name, params, param_formats=formats)
        else:
            types = [_TEXT_OID] * len(params)
            pg.send_query_params(sql, params, param_types=types, param_formats=formats)
        await self._flush()
        return await self._collect()

    async def _prepare(self, name: bytes, sql: bytes, count: int) -> pq.abc.PGresult | None:
        """Prepare `sql` as `name` (`count` text parameters) unless this connection has; the
        error result if PostgreSQL refused it, else None. A round trip, once per connection."""
        if name in self.prepared:
            return None
        self.pgconn.send_prepare(name, sql, param_types=[_TEXT_OID] * count)
        await self._flush()
        result = await self._collect()
        if result.status != pq.ExecStatus.COMMAND_OK:
            return result
        self.prepared.add(name)
        return None

    async def run_pipeline(
        self, steps: Sequence[tuple[bytes, Sequence[bytes], bytes]]
    ) -> list[pq.abc.PGresult]:
        """Prepared statements `steps` (sql, params, name) sent together with one Sync: one
        round trip and one implicit transaction (committed at the Sync, or rolled back whole
        if a statement fails: the rest are then skipped). Each step's result, as `run`'s."""
        pg = self.pgconn
        for sql, params, name in steps:
            refused = await self._prepare(name, sql, len(params))
            if refused is not None:
                return [refused]
        # On an error or cancellation midway the caller closes the connection (`_connection`),
        # so only a complete exchange leaves pipeline mode.
        pg.enter_pipeline_mode()
        for _, params, name in steps:
            pg.send_query_prepared(name, params, param_formats=[_BINARY] * len(params))
        pg.pipeline_sync()
        await self._flush()
        results = [await self._collect() for _ in steps]
        while True:
            sync = await self._next_result()
            if sync is None:
                raise psycopg.OperationalError("no result from the server")
            if sync.status == pq.ExecStatus.PIPELINE_SYNC:
                break
        pg.exit_pipeline_mode()
        return results

    async def _next_result(self) -> pq.abc.PGresult | None:
        """The next result, read as it arrives (None: the statement's results are over)."""
        pg = self.pgconn
        while pg.is_busy():
            await trio.lowlevel.wait_readable(self.fileno)
            pg.consume_input()
        return pg.get_result()

    async def run_script(self, sql: bytes) -> pq.abc.PGresult:
        self.pgconn.send_query(sql)
        await self._flush()
        return await self._collect()

    async def _flush(self) -> None:
        while self.pgconn.flush():
            await trio.lowlevel.wait_writable(self.fileno)

    async def _collect(self) -> pq.abc.PGresult:
        """Read every result of the statement; return the first error, else the last result."""
        kept: pq.abc.PGresult | None = None
        while True:
            result = await self._next_result()
            if result is None:
                break
            if kept is None or kept.status != pq.ExecStatus.FATAL_ERROR:
                kept = result
        if kept is None:
            raise psycopg.OperationalError("no result from the server")
        return kept


@attrs.define(eq=False)
class PgPool:
    """A bounded pool of trio-native libpq connections.

    Attributes:
        conninfo: libpq connection string or URI.
        max_size: most connections open at once (and statements in flight).
        acquire_timeout: longest wait for a free connection before answering 503.
        connect_timeout: longest wait to open a connection.
        statement_timeout: longest wait for one statement's result; also set as the server-side
            ``statement_timeout`` so that PostgreSQL gives up on it too.
    """

    conninfo: str
    max_size: int = 10
    acquire_timeout: float = 5.0
    connect_timeout: float = 5.0
    statement_timeout: float = 30.0
    _idle: list[_Conn] = attrs.field(factory=list, init=False)
    _slots: trio.Semaphore = attrs.field(init=False)
    _params: bytes = attrs.field(init=False, default=b"")
    _available: bool = attrs.field(init=False, default=True)
    _closed: bool = attrs.field(init=False, default=False)
    _opened: int = attrs.field(init=False, default=0)
    _failures: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._slots = trio.Semaphore(self.max_size)

    def describe(self) -> str:
        """Where the pool connects, for log lines: host, port and database, never a password."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.conninfo)
        except psycopg.Error:
            return "?"
        host = info.get("host") or info.get("hostaddr") or "local socket"
        port = info.get("port") or "5432"
        return f"{host}:{port}/{info.get('dbname') or info.get('user') or ''}"

    def statistics(self) -> PoolStatistics:
        """Counters for tests and debugging: idle, in use, opened so far, failed requests."""
        return PoolStatistics(
            idle=len(self._idle),
            in_use=self.max_size - self._slots.value,
            opened=self._opened,
            failures=self._failures,
        )

    async def execute(
        self,
        sql: bytes,
        params: Sequence[bytes] = (),
        *,
        name: bytes | None = None,
        retry: bool = False,
    ) -> Rows:
        """Run one statement and return its rows.

        Args:
            sql: the statement, with ``$1``-style placeholders.
            params: one UTF-8 text value per placeholder.
            name: prepare the statement under this name, once per connection.
            retry: the statement is a read (or otherwise safe to run twice): when the connection
                breaks under it, run it once more on a fresh connection.

        Raises:
            StoreUnavailable: no connection could be had or it broke, or the statement timed out.
            PgError: PostgreSQL rejected the statement.
        """

        async def run(conn: _Conn) -> list[pq.abc.PGresult]:
            return [await conn.run(sql, params, name)]

        try:
            (rows,) = await self._execute(run, retry)
            return rows
        except StoreUnavailable as exc:
            self._unavailable(exc)
            raise

    async def listen(self, channel: str) -> Listener:
        """A connection outside the pool that LISTENs on `channel` (lower-case identifier).

        Raises:
            StoreUnavailable: it cannot connect, or LISTEN failed.
            ValueError: `channel` is not a lower-case identifier.
        """
        if _CHANNEL.fullmatch(channel) is None:
            raise ValueError(f"bad channel name {channel!r}")
        conn = await self._connect()
        try:
            with _deadline(self.statement_timeout):
                result = await conn.run_script(b"LISTEN " + channel.encode())
            self._check(result)
        except psycopg.OperationalError as exc:
            conn.close()
            raise StoreUnavailable(
                f"connection to PostgreSQL lost: {_first_line(str(exc))}"
            ) from None
        except BaseException:
            conn.close()
            raise
        return Listener(conn)

    def _unavailable(self, exc: StoreUnavailable) -> None:
        self._failures += 1
        if self._available:
            self._available = False
            logger.info("PostgreSQL at %s unavailable: %s", self.describe(), exc.message)

    def _recovered(self) -> None:
        if not self._available:
            self._available = True
            logger.info("PostgreSQL at %s available again", self.describe())

    async def execute_pipeline(
        self, steps: Sequence[tuple[bytes, Sequence[bytes], bytes]]
    ) -> list[Rows]:
        """Run prepared statements (sql, params, name) as one transaction in one round trip
        (`_Conn.run_pipeline`) and return the rows of each. Never retried.

        Raises:
            StoreUnavailable: as for `execute`.
            PgError: a statement failed (none of them took effect).
        """
        try:
            return await self._execute(lambda conn: conn.run_pipeline(steps), retry=False)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            raise

    async def execute_script(self, sql: bytes) -> None:
        """Run statements separated by semicolons (simple protocol, no parameters).

        Raises:
            StoreUnavailable: as for `execute`.
            PgError: a statement failed; the rest were skipped.
        """
        async with self._connection() as conn:
            try:
                with _deadline(self.statement_timeout):
                    result = await conn.run_script(sql)
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"connection to PostgreSQL lost: {exc}") from None
        self._check(result)

    async def _execute(
        self, run: Callable[[_Conn], Awaitable[list[pq.abc.PGresult]]], retry: bool
    ) -> list[Rows]:
        """The rows of each result `run` gets on a pooled connection (once more on a fresh
        one with `retry`, if the connection broke under it)."""
        for attempt in (1, 2):
            async with self._connection() as conn:
                try:
                    with _deadline(self.statement_timeout):
                        results = await run(conn)
                except psycopg.OperationalError as exc:
                    lost: str | None = _first_line(str(exc))
                else:
                    # A FATAL result on a connection that went bad: the backend died under us.
                    lost = None if conn.reusable() else _first_line(_message(results[-1]))
            if lost is None:
                break
            if not (retry and attempt == 1):
                raise StoreUnavailable(f"connection to PostgreSQL lost: {lost}")
        for result in results:
            self._check(result)
        self._recovered()
        return [_rows(result) for result in results]

    def close(self) -> None:
        """Close every idle connection; connections in use close when they come back."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _check(self, result: pq.abc.PGresult) -> None:
        if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            return
        sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
        message = primary.decode("utf-8", "replace") if primary else _first_line(_message(result))
        if sqlstate[:2] in _UNAVAILABLE_CLASSES or sqlstate in _RETRYABLE_STATES or not sqlstate:
            raise StoreUnavailable(f"PostgreSQL: {message}")
        raise PgError(sqlstate, message)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        """A slot, an alive connection, and its return or disposal.

        A connection goes back to the pool only when the block completed and left it idle; a
        cancelled or failed statement leaves it in an unknown state, so it is closed.
        """
        if self._closed:
            raise StoreUnavailable("the state proxy is shutting down")
        with trio.move_on_after(self.acquire_timeout) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            wait = self.acquire_timeout
            raise StoreUnavailable(f"no PostgreSQL connection free within {wait:g}s")
        try:
            conn = await self._checkout()
            done = False
            try:
                yield conn
                done = True
            finally:
                if done:
                    self._checkin(conn)
                else:
                    conn.close()
        finally:
            self._slots.release()

    async def _checkout(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.looks_alive():
                return conn
            conn.close()
        return await self._connect()

    def _checkin(self, conn: _Conn) -> None:
        if self._closed or not conn.reusable():
            conn.close()
        else:
            self._idle.append(conn)

    async def _connect(self) -> _Conn:
        conninfo = await self._conninfo()
        pgconn = pq.PGconn.connect_start(conninfo)
        try:
            with trio.move_on_after(self.connect_timeout) as scope:
                await _poll_connect(pgconn)
            if scope.cancelled_caught:
                raise StoreUnavailable(
                    f"connecting to PostgreSQL timed out after {self.connect_timeout:g}s"
                )
            pgconn.nonblocking = 1
        except psycopg.OperationalError as exc:
            pgconn.finish()
            reason = _first_line(str(exc))
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {reason}") from None
        except BaseException:
            pgconn.finish()
            raise
        pgconn.notice_handler = _log_notice
        self._opened += 1
        return _Conn(pgconn)

    async def _conninfo(self) -> bytes:
        """The connection string, with our defaults, and the host resolved without blocking.

        libpq resolves host names synchronously inside `connect_start`; resolving through trio's
        thread-backed `getaddrinfo` first and passing `hostaddr` keeps a slow DNS off the event
        loop. The resolution is redone on every connect, so a moved database is followed.
        """
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.conninfo)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"bad PostgreSQL URL: {exc}") from None
        info.setdefault("application_name", "asya-state-proxy")
        timeout_ms = int(self.statement_timeout * 1000)
        info["options"] = f"{info.get('options') or ''} -c statement_timeout={timeout_ms}".strip()
        host = str(info.get("host") or "")
        if host and "hostaddr" not in info and not host.startswith("/") and "," not in host:
            try:
                addrs = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise StoreUnavailable(f"cannot resolve PostgreSQL host {host!r}: {exc}") from None
            info["hostaddr"] = str(addrs[0][4][0])
        return psycopg.conninfo.make_conninfo("", **info).encode()


@attrs.define(eq=False)
class Listener:
    """A connection of its own that LISTENs (`PgPool.listen`); read by one task at a time."""

    _conn: _Conn

    async def receive(self) -> list[bytes]:
        """The payloads of the notifications that arrived, waiting for at least one.

        Raises:
            StoreUnavailable: the connection broke (backend terminated, server gone).
        """
        pg = self._conn.pgconn
        while True:
            payloads = []
            while (notify := pg.notifies()) is not None:
                payloads.append(notify.extra)
            if payloads:
                return payloads
            await trio.lowlevel.wait_readable(self._conn.fileno)
            try:
                pg.consume_input()
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"LISTEN connection lost: {_first_line(str(exc))}") from None
            if not self._conn.alive():
                raise StoreUnavailable("LISTEN connection lost")

    def close(self) -> None:
        """Close the connection (its LISTEN ends with it)."""
        self._conn.close()


def _rows(result: pq.abc.PGresult) -> Rows:
    values = tuple(result.get_value(i, 0) for i in range(result.ntuples))
    return Rows(values=values, affected=result.command_tuples or 0)


async def _poll_connect(pgconn: pq.abc.PGconn) -> None:
    # libpq's asynchronous connect: wait as told by connect_poll, starting with "writable".
    status = pq.PollingStatus.WRITING
    while True:
        if pgconn.status == pq.ConnStatus.BAD:
            status = pq.PollingStatus.FAILED
        if status == pq.PollingStatus.OK:
            return
        if status == pq.PollingStatus.READING:
            await trio.lowlevel.wait_readable(pgconn.socket)
        elif status == pq.PollingStatus.WRITING:
            await trio.lowlevel.wait_writable(pgconn.socket)
        elif status == pq.PollingStatus.FAILED:
            reason = pgconn.get_error_message().strip().splitlines()
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL: {reason[-1] if reason else 'connection failed'}"
            )
        status = pq.PollingStatus(pgconn.connect_poll())


def _log_notice(result: pq.abc.PGresult) -> None:
    # Without a handler libpq prints notices ("relation already exists, skipping") on stderr.
    logger.debug("PostgreSQL notice: %s", result.error_message.decode("utf-8", "replace").strip())


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise StoreUnavailable(f"PostgreSQL did not answer within {seconds:g}s") from None


def _message(result: pq.abc.PGresult) -> str:
    return result.error_message.decode("utf-8", "replace")


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "connection closed"
