# Load generator for any server of the mesh API contract (docs/contract.md) on 127.0.0.1.
#
# Written with trio and h11 over plain `trio.open_tcp_stream` keep-alive connections: one h11
# client state machine per connection, no pooling layer, no HTTP library. SSE response heads go
# through h11 too; their endless bodies are read straight from the socket (`SseBody` says why).
# Each scenario runs `--runs` times and prints the median of every figure, with the CPU this
# process used (`resource.getrusage`) and, given `--server-pid`, the server's CPU
# (`/proc/PID/stat`), both as a share of one core over the measured window. A loadgen near 100 %
# would mean the figure measures the loadgen, not the server.
#
#   create   POST {prefix}/mesh/?actor=bench on C connections for a fixed time: requests/s
#   events   K envelopes, then POST {prefix}/mesh/{id}/events on the INTERNAL port, half status
#            (running, progress) and half FLY events, C connections: requests/s
#   fanout   N SSE subscribers on one envelope; FLY events published open-loop at a steady
#            rate carry the publisher's `time.perf_counter()` at the moment each was due;
#            latency = receive time - that time, p50/p99 over every (event, subscriber)
#   tokens   10 envelopes, one subscriber and one publisher each, FLY tokens posted back to
#            back (one request at a time per stream): tokens received/s; then a terminal
#            status per envelope, and every stream must end
#   memory   server RSS (VmRSS) before and after opening N idle SSE streams: KiB per stream
#
# Subscribers and publishers live in this one process, so perf_counter timestamps compare.
# Every run is bounded by a deadline; only 127.0.0.1 is ever contacted.
#
# Run: python bench/loadgen.py --external-port 8080 --internal-port 8081 [--server-pid PID]
#      [--scenarios create,events,fanout,tokens,memory] [--quick] [--json out.json]

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any

import attrs
import h11
import trio

HOST = "127.0.0.1"
RECV = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")

Figures = dict[str, float]


class LoadError(Exception):
    """The server answered something the scenario cannot go on with."""


# What a request can fail with when the server drops or garbles a connection (an overloaded
# hypercorn closes a connection whose request it did not read within keep_alive_timeout).
REQUEST_ERRORS = (LoadError, h11.ProtocolError, trio.BrokenResourceError, OSError)


# --- CPU and memory probes -------------------------------------------------------------------


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LoadError(f"no VmRSS for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy so far (/proc/stat, not idle/iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user/nice)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def pids_cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each pid still alive (a process gone since is left out)."""
    out = {}
    for pid in pids:
        with suppress(OSError):
            out[pid] = proc_cpu_seconds(pid)
    return out


def pg_backend_pids(url: str, application_name: str) -> list[int]:
    """Pids of the PostgreSQL backends serving `application_name` (the state proxy's pool)."""
    import psycopg  # only when asked: the loadgen needs no driver otherwise

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
    return [int(row[0]) for row in rows]


@attrs.define
class Aux:
    """Other processes whose CPU a window reports: `name` -> pids, and the PostgreSQL backends
    of an application name (looked up when each window starts, once the pool has grown)."""

    pids: dict[str, list[int]] = attrs.field(factory=dict)
    pg_url: str | None = None
    pg_app: str | None = None

    def resolve(self) -> dict[str, list[int]]:
        out = dict(self.pids)
        if self.pg_url and self.pg_app:
            out["pg"] = pg_backend_pids(self.pg_url, self.pg_app)
        return out


@attrs.define
class CpuWindow:
    """CPU used by this process, the server, other named processes and the whole machine
    between `start()` and `stop()`, each as % of one core (the machine's can reach 100 x cores).
    `other_cpu_pct` is what the machine spent on anything else (other jobs on a shared host)."""

    server_pid: int | None
    aux: Aux | None = None
    wall: float = 0.0
    own: float = 0.0
    server: float = 0.0
    machine: float = 0.0
    aux_pids: dict[str, list[int]] = attrs.field(factory=dict)
    aux_start: dict[str, dict[int, float]] = attrs.field(factory=dict)

    def start(self) -> None:
        self.aux_pids = self.aux.resolve() if self.aux else {}
        self.aux_start = {name: pids_cpu_seconds(p) for name, p in self.aux_pids.items()}
        self.wall = time.perf_counter()
        self.own = own_cpu_seconds()
        self.server = proc_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        self.machine = machine_busy_seconds()

    def stop(self) -> Figures:
        wall = time.perf_counter() - self.wall
        machine = machine_busy_seconds() - self.machine
        own = own_cpu_seconds() - self.own
        figures = {"wall_s": wall, "loadgen_cpu_pct": 100 * own / wall}
        known = own
        if self.server_pid:
            used = proc_cpu_seconds(self.server_pid) - self.server
            figures["server_cpu_pct"] = 100 * used / wall
            figures["server_cpu_s"] = used
            known += used
        for name, pids in self.aux_pids.items():
            end = pids_cpu_seconds(pids)
            used = sum(end[p] - s for p, s in self.aux_start[name].items() if p in end)
            figures[f"{name}_cpu_pct"] = 100 * used / wall
            figures[f"{name}_cpu_s"] = used
            known += used
        figures["machine_cpu_pct"] = 100 * machine / wall
        figures["other_cpu_pct"] = max(0.0, 100 * (machine - known) / wall)
        return figures


def per_server_cpu(count: float, figures: Figures) -> Figures:
    """`count` per second of server CPU: a throughput that other load on the machine (which
    takes the core away from the server) does not change, unlike a rate per wall second.
    Also the CPU microseconds per unit of the server and of each other process measured."""
    out: Figures = {"count": count}
    used = figures.get("server_cpu_s")
    if used:
        out["per_server_cpu_s"] = count / used
    if count:
        for key, value in figures.items():
            if key.endswith("_cpu_s"):
                out[key[: -len("_cpu_s")] + "_us_per_req"] = 1e6 * value / count
    return out


# --- HTTP/1.1 client connection ------------------------------------------------------------


@attrs.define(eq=False)
class Conn:
    """One keep-alive HTTP/1.1 connection: an h11 client state machine over a trio stream."""

    port: int
    stream: trio.SocketStream
    h11: h11.Connection

    @classmethod
    async def open(cls, port: int) -> Conn:
        stream = await trio.open_tcp_stream(HOST, port)
        return cls(port=port, stream=stream, h11=h11.Connection(h11.CLIENT))

    async def reopen(self) -> Conn:
        """A fresh connection to the same port, after this one failed."""
        await self.aclose()
        return await Conn.open(self.port)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def send_request(self, method: bytes, target: bytes, body: bytes = b"") -> None:
        headers = [(b"host", HOST.encode()), (b"content-length", b"%d" % len(body))]
        if body:
            headers.append((b"content-type", b"application/json"))
        conn = self.h11
        data = conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def next_event(self) -> Any:
        """The next h11 event from the server, reading the socket as needed."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(RECV))
                continue
            if type(event) is h11.ConnectionClosed:
                raise LoadError("server closed the connection")
            return event

    async def request(self, method: bytes, target: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and read the whole response; keeps the connection for the next."""
        await self.send_request(method, target, body)
        status = 0
        chunks = []
        while True:
            event = await self.next_event()
            kind = type(event)
            if kind is h11.Response:
                status = event.status_code
            elif kind is h11.Data:
                chunks.append(event.data)
            elif kind is h11.EndOfMessage:
                break
        self.h11.start_next_cycle()
        return status, b"".join(chunks)

    async def open_events(self, target: bytes) -> SseBody:
        """Start an SSE request, read the response head; raises unless 200.

        h11 parses the head; the endless body is then read by `SseBody` straight from the socket
        (see there why).
        """
        await self.send_request(b"GET", target)
        while True:
            event = await self.next_event()
            if type(event) is h11.Response:
                if event.status_code != 200:
                    raise LoadError(f"GET {target.decode()} answered {event.status_code}")
                chunked = any(
                    name == b"transfer-encoding" and b"chunked" in value.lower()
                    for name, value in event.headers
                )
                pending, _ = self.h11.trailing_data
                return SseBody(fd=self.stream.socket.fileno(), chunked=chunked, pending=pending)


@attrs.define(eq=False)
class SseBody:
    """The body of one SSE response, read from the socket without h11.

    With 1000 subscribers at 100 events/s the loadgen reads 100 000 frames a second; going
    through h11's chunked reader and trio's `receive_some` (which first tries a `recv` that
    fails) cost ~60 us a frame and made the loadgen the bottleneck. Here a frame costs one
    `wait_readable`, one `read` and a few slices. Only the HTTP/1.1 framings a server can use
    for an endless body are handled: chunked, or delimited by the connection's end.
    """

    fd: int
    chunked: bool
    pending: bytes = b""
    ended: bool = False
    _buffer: bytes = b""
    _left: int = 0  # bytes of chunk data still to come; -1: the CRLF after the data

    async def receive(self) -> tuple[float, bytes]:
        """Wait for body bytes; returns (receive time, payload). `ended` is set at the end."""
        if self.pending:
            data, self.pending = self.pending, b""
        else:
            data = await self._read()
            if not data:
                if self.chunked:
                    raise LoadError("server closed an SSE stream without ending it")
                self.ended = True
                return time.perf_counter(), b""
        now = time.perf_counter()
        return now, self._dechunk(data) if self.chunked else data

    async def _read(self) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return os.read(self.fd, RECV)
            except BlockingIOError:
                continue

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._buffer + data if self._buffer else data
        out = []
        i = 0
        while True:
            if self._left > 0:
                piece = buf[i : i + self._left]
                out.append(piece)
                i += len(piece)
                self._left -= len(piece)
                if self._left:
                    break
                self._left = -1
            if self._left == -1:
                if len(buf) - i < 2:
                    break
                i += 2
                self._left = 0
            end = buf.find(b"\r\n", i)
            if end < 0:
                break
            size = int(buf[i:end].split(b";", 1)[0], 16)
            i = end + 2
            if size == 0:
                self.ended = True
                break
            self._left = size
        self._buffer = buf[i:]
        return b"".join(out)


# --- SSE framing ---------------------------------------------------------------------------


@attrs.define(eq=False)
class SseParser:
    """Splits a byte stream into SSE frames; yields (event name, data bytes) per data frame."""

    buffer: bytes = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buf = self.buffer + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[tuple[bytes, bytes]] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            frame = parse_frame(buf[start:end])
            if frame is not None:
                out.append(frame)
            start = end + 2
        self.buffer = buf[start:]
        return out


def parse_frame(frame: bytes) -> tuple[bytes, bytes] | None:
    """One SSE frame's event name and data; None for a comment-only frame (keepalive)."""
    event = b"message"
    data: list[bytes] = []
    for line in frame.split(b"\n"):
        if not line or line[0] == 0x3A:  # ":" starts a comment
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"event":
            event = value
        elif name == b"data":
            data.append(value)
    return (event, b"\n".join(data)) if data else None


def sent_at(data: bytes) -> float:
    """The publisher's timestamp in a FLY frame's data `{"t": <perf_counter>, "s": <seq>}`."""
    if data.startswith(b'{"t":'):
        return float(data[5 : data.index(b",", 5)])
    return float(json.loads(data)["t"])


# --- Shared plumbing -----------------------------------------------------------------------


@attrs.define
class Target:
    """Where the server listens, and how long a run may take."""

    external_port: int
    internal_port: int
    prefix: str
    server_pid: int | None
    aux: Aux | None = None

    def window(self) -> CpuWindow:
        return CpuWindow(self.server_pid, self.aux)

    def mesh(self, rest: str = "") -> bytes:
        return f"{self.prefix}/mesh/{rest}".encode()


async def create_envelopes(target: Target, count: int, conns: int = 4) -> list[str]:
    """Create `count` envelopes for actor `bench`; their ids in creation order."""
    ids: list[str] = []

    async def worker(n: int) -> None:
        conn = await Conn.open(target.external_port)
        try:
            for _ in range(n):
                status, body = await conn.request(
                    b"POST", target.mesh("?actor=bench"), b'{"payload":{"bench":true}}'
                )
                if status != 201:
                    raise LoadError(f"create answered {status}: {body[:200]!r}")
                ids.append(json.loads(body)["id"])
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(worker, count // conns + (1 if i < count % conns else 0))
    return ids


async def open_conns(port: int, count: int) -> list[Conn]:
    conns: list[Conn] = []

    async def one() -> None:
        conns.append(await Conn.open(port))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return conns


async def close_all(conns: list[Conn]) -> None:
    for conn in conns:
        await conn.aclose()


async def hammer(
    conns: list[Conn], duration: float, one: Callable[[int, Conn, int], Awaitable[bool]]
) -> tuple[int, int]:
    """Run `one(worker, conn, n)` back to back on every connection for `duration` seconds.

    Returns (requests that succeeded, requests that did not). A connection that fails is
    counted as one failed request and replaced in `conns`.
    """
    ok = [0] * len(conns)
    bad = [0] * len(conns)
    deadline = time.perf_counter() + duration

    async def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            try:
                good = await one(i, conns[i], n)
            except REQUEST_ERRORS:
                good = False
                conns[i] = await conns[i].reopen()
            if good:
                ok[i] += 1
            else:
                bad[i] += 1
            n += 1

    async with trio.open_nursery() as nursery:
        for i in range(len(conns)):
            nursery.start_soon(worker, i)
    return sum(ok), sum(bad)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- Scenarios -----------------------------------------------------------------------------


@attrs.define
class Settings:
    """The knobs of every scenario; `--quick` and the CLI options override the defaults."""

    runs: int = 3
    duration: float = 2.0
    connections: int = 16
    envelopes: int = 100
    subscribers: tuple[int, ...] = (1, 100, 1000)
    rate: float = 100.0
    publishers: int = 8
    max_publishers: int = 64
    token_streams: int = 10
    streams: tuple[int, ...] = (1000, 5000)
    preload: int = 0
    preload_connections: int = 32


async def measure_requests(
    target: Target, s: Settings, port: int, one: Callable[[int, Conn, int], Awaitable[bool]]
) -> Figures:
    """`one` back to back on `s.connections` connections to `port`: a 0.3 s warm-up (first
    requests, lazy imports, allocator, the state proxy's pool), then the measured window."""
    conns = await open_conns(port, s.connections)
    try:
        await hammer(conns, 0.3, one)
        window = target.window()
        window.start()
        ok, bad = await hammer(conns, s.duration, one)
        figures = window.stop()
    finally:
        await close_all(conns)
    return {
        "req_per_s": ok / figures["wall_s"],
        "errors": bad,
        **per_server_cpu(ok, figures),
        **figures,
    }


async def scenario_create(target: Target, s: Settings) -> Figures:
    path = target.mesh("?actor=bench")
    body = b'{"payload":{"n":1}}'

    async def one(_i: int, conn: Conn, _n: int) -> bool:
        status, _ = await conn.request(b"POST", path, body)
        return status == 201

    return await measure_requests(target, s, target.external_port, one)


FLY_BODY = b'{"type":"fly","data":{"token":"x"}}'
STATUS_BODY = b'{"type":"status","status":"running","data":{"progress_percent":%d}}'


async def scenario_events(target: Target, s: Settings, kind: str = "events") -> Figures:
    """Sidecar events on the internal port over `s.envelopes` fresh envelopes: `events`
    alternates a status (running, progress) and a FLY event on each connection, `status` and
    `fly` send only that kind."""
    ids = await create_envelopes(target, s.envelopes)
    paths = [target.mesh(f"{i}/events") for i in ids]
    fly_only, status_only = kind == "fly", kind == "status"

    async def one(i: int, conn: Conn, n: int) -> bool:
        path = paths[(i + n * s.connections) % len(paths)]
        fly = fly_only or (n % 2 == 1 and not status_only)
        body = FLY_BODY if fly else STATUS_BODY % (n % 100)
        status, _ = await conn.request(b"POST", path, body)
        return status == 204

    return await measure_requests(target, s, target.internal_port, one)


async def scenario_get(target: Target, s: Settings) -> Figures:
    """`GET {prefix}/mesh/{id}` on the internal port (a sidecar's heartbeat / pre-flight)."""
    paths = [target.mesh(i) for i in await create_envelopes(target, s.envelopes)]

    async def one(i: int, conn: Conn, n: int) -> bool:
        status, _ = await conn.request(b"GET", paths[(i + n * s.connections) % len(paths)])
        return status == 200

    return await measure_requests(target, s, target.internal_port, one)


async def scenario_list(target: Target, s: Settings) -> Figures:
    """`GET {prefix}/mesh/?limit=10` on the external port: the newest page and the total."""
    path = target.mesh("?limit=10")

    async def one(_i: int, conn: Conn, _n: int) -> bool:
        status, _ = await conn.request(b"GET", path)
        return status == 200

    return await measure_requests(target, s, target.external_port, one)


async def scenario_preload(target: Target, s: Settings) -> Figures:
    """Create `s.preload` envelopes through the API on `s.preload_connections` connections,
    as fast as the server takes them (not a measurement: the state before one)."""
    left = [s.preload]
    errors = [0]

    async def worker() -> None:
        conn = await Conn.open(target.external_port)
        path = target.mesh("?actor=bench")
        try:
            while left[0] > 0:
                left[0] -= 1
                try:
                    status, _ = await conn.request(b"POST", path, b'{"payload":{"n":0}}')
                except REQUEST_ERRORS:
                    status = 0
                    conn = await conn.reopen()
                if status != 201:
                    errors[0] += 1
                    if errors[0] > 100:
                        raise LoadError(f"preload: too many failed creates (last {status})")
        finally:
            await conn.aclose()

    window = target.window()
    window.start()
    async with trio.open_nursery() as nursery:
        for _ in range(s.preload_connections):
            nursery.start_soon(worker)
    figures = window.stop()
    created = s.preload - errors[0]
    return {"created": created, "req_per_s": created / figures["wall_s"], **figures}


async def open_subscribers(
    nursery: trio.Nursery,
    target: Target,
    envelope_ids: list[str],
    on_frames: Callable[[int, float, list[tuple[bytes, bytes]]], None] | None,
    on_end: Callable[[int], None] | None = None,
    connect_concurrency: int = 200,
) -> None:
    """Open one SSE stream per id in `envelope_ids`, in `nursery`; return once every stream has
    delivered its first (catch-up) frame, i.e. is subscribed.

    A stream with `on_frames` None stays idle after its first frame (it reads nothing more).
    Otherwise every later batch of data frames is passed as (stream index, receive time, frames),
    and `on_end(index)` is called when the server ends the stream.
    """
    limiter = trio.CapacityLimiter(connect_concurrency)
    remaining = len(envelope_ids)
    all_ready = trio.Event()
    if remaining == 0:
        return

    async def subscriber(index: int, envelope_id: str) -> None:
        nonlocal remaining
        async with limiter:
            conn = await Conn.open(target.external_port)
        try:
            body = await conn.open_events(target.mesh(f"{envelope_id}/events"))
            parser = SseParser()
            frames: list[tuple[bytes, bytes]] = []
            while not frames:
                if body.ended:
                    raise LoadError(f"SSE stream of {envelope_id} ended before its first frame")
                frames = parser.feed((await body.receive())[1])
            remaining -= 1
            if remaining == 0:
                all_ready.set()
            if on_frames is None:
                await trio.sleep_forever()
            if len(frames) > 1:
                on_frames(index, time.perf_counter(), frames[1:])
            while not body.ended:
                now, payload = await body.receive()
                if payload:
                    frames = parser.feed(payload)
                    if frames:
                        on_frames(index, now, frames)
            if on_end is not None:
                on_end(index)
        finally:
            await conn.aclose()

    for index, envelope_id in enumerate(envelope_ids):
        nursery.start_soon(subscriber, index, envelope_id)
    await all_ready.wait()


async def scenario_fanout(target: Target, s: Settings, subscribers: int) -> Figures:
    [envelope_id] = await create_envelopes(target, 1, conns=1)
    total = max(1, int(s.rate * s.duration))
    latencies: list[float] = []
    expected = [0]  # frames to wait for, known once publishing ended
    all_in = trio.Event()

    def on_frames(_index: int, now: float, frames: list[tuple[bytes, bytes]]) -> None:
        for event, data in frames:
            if event == b"fly":
                latencies.append(now - sent_at(data))
        if expected[0] and len(latencies) >= expected[0]:
            all_in.set()

    path = target.mesh(f"{envelope_id}/events")
    publish_errors = [0]
    published = [0]
    last_ok = [0.0]
    post_times: list[float] = []
    # An open-loop publisher: event `seq` is due at start + seq / rate whatever the server does.
    # An event due while every connection waits for a reply goes out on a new connection, up to
    # `max_publishers`; past that it waits for one. Its timestamp is the time it was due, so a
    # server that falls behind shows it in the latency (no coordinated omission).
    conns = await open_conns(target.internal_port, s.publishers)
    idle = list(conns)
    in_flight = trio.Semaphore(s.max_publishers)

    async def publish(seq: int) -> None:
        due = time.perf_counter()
        async with in_flight:
            if idle:
                conn = idle.pop()
            else:
                conn = await Conn.open(target.internal_port)
                conns.append(conn)
            sent = time.perf_counter()
            body = b'{"type":"fly","data":{"t":%r,"s":%d}}' % (due, seq)
            try:
                status, _ = await conn.request(b"POST", path, body)
            except REQUEST_ERRORS:
                publish_errors[0] += 1
                conns.remove(conn)
                await conn.aclose()
                return
            post_times.append(time.perf_counter() - sent)
            if status == 204:
                published[0] += 1
                last_ok[0] = time.perf_counter()
            else:
                publish_errors[0] += 1
            idle.append(conn)

    try:
        async with trio.open_nursery() as nursery:
            await open_subscribers(nursery, target, [envelope_id] * subscribers, on_frames)
            await trio.sleep(0.2)
            window = target.window()
            window.start()
            start = time.perf_counter()
            # Offered for `duration` seconds; posts still unanswered 5 s later are abandoned,
            # so a run stays bounded (delivered_pct and publish_rate then say the server lagged).
            offered = 0
            async with trio.open_nursery() as publishers:
                for seq in range(total):
                    await trio.sleep(max(0.0, start + seq / s.rate - time.perf_counter()))
                    publishers.start_soon(publish, seq)
                    offered += 1
                publishers.cancel_scope.deadline = trio.current_time() + 5.0
            expected[0] = offered * subscribers
            if len(latencies) >= expected[0]:
                all_in.set()
            with trio.move_on_after(3.0):
                await all_in.wait()
            figures = window.stop()
            nursery.cancel_scope.cancel()
    finally:
        await close_all(conns)
    latencies.sort()
    return {
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * (latencies[-1] if latencies else float("nan")),
        "delivered_pct": 100 * len(latencies) / max(1, expected[0]),
        "publish_rate": published[0] / max(s.duration, last_ok[0] - start),
        "errors": publish_errors[0],
        "publish_conns": len(conns),
        "post_p50_ms": 1000 * percentile(post_times, 0.5),
        "post_max_ms": 1000 * max(post_times, default=float("nan")),
        # Server CPU per delivered frame, the event POSTs included: encoding a frame once per
        # subscriber instead of once per event would show here (as it would against bare).
        **(
            {"server_us_per_frame": 1e6 * figures["server_cpu_s"] / len(latencies)}
            if latencies and "server_cpu_s" in figures
            else {}
        ),
        **figures,
    }


async def scenario_tokens(target: Target, s: Settings) -> Figures:
    ids = await create_envelopes(target, s.token_streams, conns=1)
    received = [0] * len(ids)
    ended: set[int] = set()
    all_ended = trio.Event()
    counting = [False]

    def on_frames(index: int, _now: float, frames: list[tuple[bytes, bytes]]) -> None:
        if counting[0]:
            received[index] += sum(1 for event, _ in frames if event == b"fly")

    def on_end(index: int) -> None:
        ended.add(index)
        if len(ended) == len(ids):
            all_ended.set()

    conns = await open_conns(target.internal_port, len(ids))
    token = b'{"type":"fly","data":{"token":"x"}}'
    terminal = b'{"type":"status","status":"succeeded","data":{"result":"done"}}'
    sent = [0] * len(ids)
    errors = [0]
    try:
        async with trio.open_nursery() as nursery:
            await open_subscribers(nursery, target, ids, on_frames, on_end)
            paths = [target.mesh(f"{i}/events") for i in ids]
            deadline = time.perf_counter() + s.duration

            async def publisher(i: int) -> None:
                while time.perf_counter() < deadline:
                    try:
                        status, _ = await conns[i].request(b"POST", paths[i], token)
                    except REQUEST_ERRORS:
                        errors[0] += 1
                        conns[i] = await conns[i].reopen()
                        continue
                    if status == 204:
                        sent[i] += 1
                    else:
                        errors[0] += 1

            counting[0] = True
            window = target.window()
            window.start()
            async with trio.open_nursery() as publishers:
                for i in range(len(ids)):
                    publishers.start_soon(publisher, i)
            await trio.sleep(0.05)  # frames already written but not yet read
            counting[0] = False
            figures = window.stop()
            for i in range(len(ids)):
                status, _ = await conns[i].request(b"POST", paths[i], terminal)
                if status != 204:
                    raise LoadError(f"terminal status answered {status}")
            with trio.move_on_after(5.0):
                await all_ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        await close_all(conns)
    return {
        "tokens_per_s": sum(received) / figures["wall_s"],
        **per_server_cpu(sum(received), figures),
        "sent_per_s": sum(sent) / figures["wall_s"],
        "streams_ended": len(ended),
        "errors": errors[0],
        **figures,
    }


async def scenario_memory(target: Target, s: Settings) -> Figures:
    """Single pass, not a median: memory freed by closed streams is reused by the next ones,
    so only the first opening on a fresh server is a true measure."""
    if not target.server_pid:
        raise LoadError("memory needs --server-pid")
    pid = target.server_pid
    [envelope_id] = await create_envelopes(target, 1, conns=1)
    figures: Figures = {}
    async with trio.open_nursery() as warm:
        await open_subscribers(warm, target, [envelope_id] * 20, None)
        warm.cancel_scope.cancel()
    await trio.sleep(0.5)
    before = proc_rss_kib(pid)
    figures["rss_before_mib"] = before / 1024
    opened = 0
    async with trio.open_nursery() as nursery:
        for count in sorted(s.streams):
            await open_subscribers(nursery, target, [envelope_id] * (count - opened), None)
            opened = count
            await trio.sleep(0.5)
            after = proc_rss_kib(pid)
            figures[f"kib_per_stream_{count}"] = (after - before) / count
            figures[f"rss_{count}_mib"] = after / 1024
        nursery.cancel_scope.cancel()
    return figures


# --- Driver ------------------------------------------------------------------------------


def median_figures(runs: list[Figures]) -> Figures:
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


@contextmanager
def bounded(seconds: float) -> Iterator[trio.CancelScope]:
    with trio.fail_after(seconds) as scope:
        yield scope


def _format(figures: Figures) -> str:
    parts = []
    for key, value in figures.items():
        if key in ("wall_s", "server_cpu_s"):
            continue
        parts.append(f"{key}={value:.0f}" if abs(value) >= 100 else f"{key}={value:.3g}")
    return "  ".join(parts)


async def run_all(target: Target, s: Settings, scenarios: list[str]) -> dict[str, Figures]:
    results: dict[str, Figures] = {}
    plan: list[tuple[str, Callable[[], Awaitable[Figures]], int]] = []
    for name in scenarios:
        if name == "create":
            plan.append(("create", lambda: scenario_create(target, s), s.runs))
        elif name in ("events", "status", "fly"):
            plan.append((name, partial(scenario_events, target, s, name), s.runs))
        elif name == "get":
            plan.append(("get", lambda: scenario_get(target, s), s.runs))
        elif name == "list":
            plan.append(("list", lambda: scenario_list(target, s), s.runs))
        elif name == "preload":
            plan.append(("preload", lambda: scenario_preload(target, s), 1))
        elif name == "fanout":
            for n in s.subscribers:
                plan.append((f"fanout_{n}", partial(scenario_fanout, target, s, n), s.runs))
        elif name == "tokens":
            plan.append(("tokens", lambda: scenario_tokens(target, s), s.runs))
        elif name == "memory":
            plan.append(("memory", lambda: scenario_memory(target, s), 1))
        else:
            raise SystemExit(f"unknown scenario {name!r}")
    for name, make, runs in plan:
        figures_of_runs = []
        for _ in range(runs):
            try:
                with bounded(s.duration + 90 + s.preload / 100 * (name == "preload")):
                    figures_of_runs.append(await make())
            except (*REQUEST_ERRORS, trio.TooSlowError) as exc:
                # One broken run should not cost the other scenarios their figures.
                print(f"{name:12} run failed: {exc!r}", flush=True)
            await trio.sleep(0.2)
        if figures_of_runs:
            results[name] = median_figures(figures_of_runs)
            results[name]["runs"] = len(figures_of_runs)
            print(f"{name:12} {_format(results[name])}", flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="load generator for the mesh API contract")
    parser.add_argument("--external-port", type=int, required=True)
    parser.add_argument("--internal-port", type=int, required=True)
    parser.add_argument("--prefix", default="/api/v1")
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--scenarios", default="create,events,fanout,tokens,memory")
    parser.add_argument("--quick", action="store_true", help="seconds, for a smoke check")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--duration", type=float, help="seconds per measured window")
    parser.add_argument("--connections", type=int, help="concurrent connections (create, events)")
    parser.add_argument("--subscribers", help="fan-out subscriber counts, e.g. 1,100,1000")
    parser.add_argument("--rate", type=float, help="fan-out publish rate, events/s")
    parser.add_argument("--streams", help="idle stream counts for memory, e.g. 1000,5000")
    parser.add_argument("--preload", type=int, help="envelopes the preload scenario creates")
    parser.add_argument("--preload-connections", type=int, help="connections of the preload")
    parser.add_argument(
        "--aux-pid",
        action="append",
        default=[],
        metavar="NAME:PID[,PID...]",
        help="also report the CPU of these processes as NAME_cpu_pct (e.g. proxy:1234)",
    )
    parser.add_argument("--pg-url", help="PostgreSQL to find the backends of --pg-app in")
    parser.add_argument(
        "--pg-app", help="report the CPU of the backends with this application_name as pg_cpu"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.quick:
        s = Settings(runs=1, duration=0.5, subscribers=(1, 100), streams=(200,))
    if args.runs is not None:
        s.runs = args.runs
    if args.duration is not None:
        s.duration = args.duration
    if args.connections is not None:
        s.connections = args.connections
    if args.subscribers:
        s.subscribers = tuple(int(n) for n in args.subscribers.split(","))
    if args.rate is not None:
        s.rate = args.rate
    if args.streams:
        s.streams = tuple(int(n) for n in args.streams.split(","))
    if args.preload is not None:
        s.preload = args.preload
    if args.preload_connections is not None:
        s.preload_connections = args.preload_connections
    return s


def aux_from(args: argparse.Namespace) -> Aux | None:
    pids: dict[str, list[int]] = {}
    for item in args.aux_pid:
        name, _, numbers = item.partition(":")
        pids.setdefault(name, []).extend(int(n) for n in numbers.split(",") if n)
    if not pids and not args.pg_app:
        return None
    return Aux(pids=pids, pg_url=args.pg_url, pg_app=args.pg_app)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = settings_from(args)
    target = Target(
        external_port=args.external_port,
        internal_port=args.internal_port,
        prefix=args.prefix.rstrip("/"),
        server_pid=args.server_pid,
        aux=aux_from(args),
    )
    limit = raise_fd_limit()
    if max(s.streams, default=0) + 100 > limit:
        sys.exit(f"RLIMIT_NOFILE {limit} is too low for {max(s.streams)} streams")
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    results = trio.run(run_all, target, s, scenarios)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": attrs.asdict(s), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
