# The bare app: the HTTP stack's own limit, against which the real server's figures are read.
#
# A plain ASGI callable (no framework, no store, no validation) served by `hypercorn.trio.serve`
# with the settings the real server uses (keep-alive connections that are never cut, backlog
# 4096, no access log, a short graceful timeout). It answers the routes of the contract in their
# shape only, so `bench/loadgen.py` can drive it exactly like the real server:
#
#   external port  POST {prefix}/mesh/?actor=A     read the body, 201 {"id": "<uuid4 hex>"}
#                  GET  {prefix}/mesh/{id}/events  SSE: a canned catch-up frame, then live frames
#   internal port  POST {prefix}/mesh/{id}/events  read + json-decode the body, publish, 204
#                  POST /bench/fly/{id}            publish the raw body as one FLY frame, 204
#   both           GET  /health, GET /ready        200
#                  GET  /bench/stats               hub counters: publishes, writes, frames
#
# Fan-out follows docs/contract.md (SSE): a frame is encoded once; each subscriber owns a
# list of waiting frames and a parking lot its writer sleeps in; publishing appends and unparks,
# never awaits; a woken writer sends all its waiting frames in one body message. A terminal
# status frame ends the stream after it is written. One timer sends `:keepalive` to quiet
# streams. Nothing is stored, so ids are never 404.
#
# Run: python bench/bare_app.py --external-port 18080 --internal-port 18081
# (or env ASYA_MESH_EXTERNAL_PORT / ASYA_MESH_INTERNAL_PORT / ASYA_MESH_API_PREFIX).
# SIGINT/SIGTERM shut it down.

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
KEEPALIVE_SECONDS = 15.0
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
JSON_HEADERS = [(b"content-type", b"application/json")]


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@attrs.define(eq=False)
class Subscriber:
    """One open SSE stream: frames waiting to be written and where its writer parks."""

    frames: list[bytes] = attrs.field(factory=list)
    parked: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    ended: bool = False
    quiet: bool = True

    def push(self, frame: bytes, *, last: bool = False) -> None:
        if self.ended:
            return
        self.frames.append(frame)
        self.ended = last
        if self.parked:
            self.parked.unpark_all()


@attrs.define(eq=False)
class Hub:
    """Subscribers by envelope id; shared by the two listeners."""

    by_id: dict[str, set[Subscriber]] = attrs.field(factory=dict)
    published: int = 0
    writes: int = 0
    frames_written: int = 0

    def statistics(self) -> dict[str, int]:
        return {
            "subscribers": sum(len(subs) for subs in self.by_id.values()),
            "published": self.published,
            "writes": self.writes,
            "frames_written": self.frames_written,
        }

    def subscribe(self, envelope_id: str) -> Subscriber:
        sub = Subscriber()
        self.by_id.setdefault(envelope_id, set()).add(sub)
        return sub

    def unsubscribe(self, envelope_id: str, sub: Subscriber) -> None:
        subs = self.by_id.get(envelope_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.by_id[envelope_id]

    async def keepalive(self, interval: float) -> None:
        """Every `interval`, a `:keepalive` comment to each stream that wrote nothing since the
        last tick: one timer for all streams instead of a timeout per wait."""
        while True:
            await trio.sleep(interval)
            for subs in self.by_id.values():
                for sub in subs:
                    if sub.quiet:
                        sub.push(b":keepalive\n\n")
                    sub.quiet = True

    def publish(self, envelope_id: str, frame: bytes, *, last: bool = False) -> None:
        self.published += 1
        for sub in self.by_id.get(envelope_id, ()):
            sub.push(frame, last=last)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ConnectionError("client left before the body was read")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _reply(send: Send, status: int, body: bytes = b"", headers: Any = ()) -> None:
    head = [*headers, (b"content-length", b"%d" % len(body))] if status != 204 else list(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def _stream(hub: Hub, envelope_id: str, receive: Receive, send: Send) -> None:
    sub = hub.subscribe(envelope_id)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        catch_up = _compact({"id": envelope_id, "status": "pending"})
        await send(
            {
                "type": "http.response.body",
                "body": b"event: status\ndata: " + catch_up + b"\n\n",
                "more_body": True,
            }
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            while True:
                if not sub.frames:
                    await sub.parked.park()
                batch = b"".join(sub.frames)
                hub.writes += 1
                hub.frames_written += len(sub.frames)
                sub.frames.clear()
                sub.quiet = False
                await send(
                    {"type": "http.response.body", "body": batch, "more_body": not sub.ended}
                )
                if sub.ended:
                    nursery.cancel_scope.cancel()
                    return
    finally:
        hub.unsubscribe(envelope_id, sub)


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _event_frame(body: bytes) -> tuple[bytes, bool]:
    event = json.loads(body)
    if event.get("type") == "fly":
        return b"event: fly\ndata: " + _compact(event.get("data")) + b"\n\n", False
    status = event.get("status", "")
    data = dict(event.get("data") or {})
    data["status"] = status
    return b"event: status\ndata: " + _compact(data) + b"\n\n", status in TERMINAL


def make_app(hub: Hub, *, prefix: str, internal: bool) -> Callable[..., Awaitable[None]]:
    """The ASGI callable of one listener (`internal` selects the internal port's routes)."""
    mesh = prefix + "/mesh/"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        path: str = scope["path"]
        method: str = scope["method"]
        if path in ("/health", "/ready"):
            await _reply(send, 200, b"ok")
            return
        if path.startswith(mesh) or path == mesh[:-1]:
            rest = path[len(mesh) :]
            if rest == "" and method == "POST" and not internal:
                await _read_body(receive)
                await _reply(send, 201, _compact({"id": uuid.uuid4().hex}), JSON_HEADERS)
                return
            envelope_id, _, tail = rest.partition("/")
            if envelope_id and tail == "events":
                if method == "GET" and not internal:
                    await _stream(hub, envelope_id, receive, send)
                    return
                if method == "POST" and internal:
                    try:
                        frame, last = _event_frame(await _read_body(receive))
                    except (ValueError, AttributeError, TypeError):
                        await _reply(send, 400, b'{"error":"invalid body"}', JSON_HEADERS)
                        return
                    hub.publish(envelope_id, frame, last=last)
                    await _reply(send, 204)
                    return
        if path == "/bench/stats" and method == "GET":
            await _reply(send, 200, _compact(hub.statistics()), JSON_HEADERS)
            return
        if path.startswith("/bench/fly/") and method == "POST" and internal:
            body = await _read_body(receive)
            hub.publish(path[len("/bench/fly/") :], b"event: fly\ndata: " + body + b"\n\n")
            await _reply(send, 204)
            return
        await _reply(send, 404, b'{"error":"not found"}', JSON_HEADERS)

    return app


def hypercorn_config(port: int) -> Config:
    """The hypercorn settings the real server uses, bound to 127.0.0.1:`port`."""
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.keep_alive_max_requests = 10**9
    config.backlog = 4096
    config.accesslog = None
    config.graceful_timeout = 0.5
    return config


async def main(external_port: int, internal_port: int, prefix: str) -> None:
    hub = Hub()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(on_signal)
        nursery.start_soon(hub.keepalive, KEEPALIVE_SECONDS)
        async with trio.open_nursery() as servers:
            for port, internal in ((external_port, False), (internal_port, True)):
                app = make_app(hub, prefix=prefix, internal=internal)
                await servers.start(
                    partial(serve, app, hypercorn_config(port), shutdown_trigger=stop.wait)
                )
            print(f"bare app ready on {external_port}/{internal_port}", file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="bare ASGI app: the stack's own limit")
    parser.add_argument(
        "--external-port", type=int, default=int(os.environ.get("ASYA_MESH_EXTERNAL_PORT", 8080))
    )
    parser.add_argument(
        "--internal-port", type=int, default=int(os.environ.get("ASYA_MESH_INTERNAL_PORT", 8081))
    )
    parser.add_argument("--prefix", default=os.environ.get("ASYA_MESH_API_PREFIX", "/api/v1"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args()
    trio.run(main, args.external_port, args.internal_port, args.prefix.rstrip("/"))
