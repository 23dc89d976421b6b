# The Starlette yardstick: the contract as a Python team would write it on asyncio.
#
# Written from docs/contract.md alone (no `mesh_proto`, no `mesh_trio`): a Starlette app per
# port, an in-memory dict store, an in-process fan-out with one bounded `asyncio.Queue` per SSE
# subscriber, both apps served by uvicorn (`uvloop` + `httptools`, from `uvicorn[standard]`) in
# one process, like the real server's two listeners. `bench/run.py` runs it as target
# `starlette`, so the real server's figures can be read against what the usual stack gives.
#
#   external port  POST {prefix}/mesh/?actor=A      create: 201 {"id"}
#                  GET {prefix}/mesh/?status&limit&offset  newest first, with the total
#                  GET / DELETE {prefix}/mesh/{id}  envelope / cancel (a `canceled` status event)
#                  GET {prefix}/mesh/{id}/events    SSE: catch-up frame, live frames, keepalive,
#                                                   ends after a terminal status
#   internal port  POST {prefix}/mesh/{id}/events   status (rank rules, aliases, progress_percent)
#                                                   and FLY events, 204
#                  GET {prefix}/mesh/{id}           the sidecar's heartbeat
#   both           GET /health, GET /ready
#
# Left out, as they do not bear on the measured paths: dispatch to a queue, the deadline
# backstop, the 10 MiB body limit and strict-JSON checks, CORS. So it does a little less per
# create than the real server; a ratio against it flatters it, not us.
#
# Run: python bench/starlette_app.py --external-port 18080 --internal-port 18081
# (or env ASYA_MESH_EXTERNAL_PORT / ASYA_MESH_INTERNAL_PORT / ASYA_MESH_API_PREFIX /
# ASYA_MESH_SSE_KEEPALIVE in seconds). SIGINT/SIGTERM shut both servers down.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

RANK = {"pending": 0, "running": 1, "paused": 2, "succeeded": 3, "failed": 3, "canceled": 3}
ALIASES = {"received": "running", "processing": "running", "completed": "running"}
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
QUEUE_SIZE = 1024
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def frame(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def bad(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status, message)


class Subscriber:
    """One SSE stream: a bounded queue of (revision, frame, terminal); revision None = FLY."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int | None, bytes, bool]] = asyncio.Queue(QUEUE_SIZE)
        self.resync = False

    def offer(self, rev: int | None, data: bytes, terminal: bool) -> None:
        try:
            self.queue.put_nowait((rev, data, terminal))
        except asyncio.QueueFull:
            if rev is not None:  # a status is never lost: re-read the envelope instead
                self.resync = True
                while not self.queue.empty():
                    self.queue.get_nowait()
                self.queue.put_nowait((rev, b"", False))


class Mesh:
    """The store (id -> record, in creation order) and the subscribers by id."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.subscribers: dict[str, set[Subscriber]] = {}

    def envelope(self, envelope_id: str) -> dict[str, Any]:
        record = self.records.get(envelope_id)
        if record is None:
            raise bad("envelope not found", 404)
        return {k: record[k] for k in ("id", "status", "created_at", "updated_at", "data")}

    def create(self, actor: str, body: dict[str, Any]) -> str:
        envelope_id = str(uuid.uuid4())
        stamp = now()
        data = {"actor": actor, "payload": body.get("payload"), "headers": body["headers"]}
        if body.get("timeout"):
            deadline = datetime.now(UTC).timestamp() + body["timeout"]
            data["deadline_at"] = datetime.fromtimestamp(deadline, UTC).isoformat()[:-6] + "Z"
        self.records[envelope_id] = {
            "id": envelope_id,
            "status": "pending",
            "created_at": stamp,
            "updated_at": stamp,
            "data": data,
            "rev": 0,
        }
        return envelope_id

    def status_event(self, envelope_id: str, status: str, data: dict[str, Any]) -> None:
        record = self.records.get(envelope_id)
        if record is None:
            raise bad("envelope not found", 404)
        old, new = RANK[record["status"]], RANK[status]
        if not (new > old or (status == record["status"] and new < 3)):
            return  # stale: answered 204, neither stored nor published
        if "progress_percent" not in data:
            prev, nxt = data.get("prev"), data.get("next")
            if data.get("progress") == 1.0 and not isinstance(data.get("progress"), bool):
                data["progress_percent"] = 100
            elif isinstance(prev, list) and isinstance(nxt, list) and len(prev) + len(nxt) > 0:
                data["progress_percent"] = (len(prev) + 1) / (len(prev) + 1 + len(nxt)) * 100
        record["status"] = status
        record["data"].update(data)
        record["updated_at"] = now()
        record["rev"] += 1
        self.publish(
            envelope_id, record["rev"], frame("status", {**data, "status": status}), new == 3
        )

    def publish(self, envelope_id: str, rev: int | None, data: bytes, terminal: bool) -> None:
        for sub in self.subscribers.get(envelope_id, ()):
            sub.offer(rev, data, terminal)

    @contextlib.contextmanager
    def subscribe(self, envelope_id: str) -> Iterator[Subscriber]:
        sub = Subscriber()
        self.subscribers.setdefault(envelope_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self.subscribers[envelope_id]
            subs.discard(sub)
            if not subs:
                del self.subscribers[envelope_id]

    async def stream(self, envelope_id: str, keepalive: float) -> AsyncIterator[bytes]:
        with self.subscribe(envelope_id) as sub:
            while True:  # one pass per catch-up: the first, then one per resync
                sub.resync = False
                envelope = self.envelope(envelope_id)
                seen = self.records[envelope_id]["rev"]
                yield frame("status", envelope)
                if RANK[envelope["status"]] == 3:
                    return
                while not sub.resync:
                    try:
                        async with asyncio.timeout(keepalive):
                            rev, data, terminal = await sub.queue.get()
                    except TimeoutError:
                        yield b":keepalive\n\n"
                        continue
                    if sub.resync:
                        break
                    if not data or (rev is not None and rev <= seen):
                        continue  # a resync marker, or a status the catch-up already holds
                    yield data
                    if terminal:
                        return


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise bad("invalid JSON") from None


def apps(prefix: str, keepalive: float) -> tuple[Starlette, Starlette]:
    """The external and the internal app, sharing one `Mesh`."""
    mesh = Mesh()

    async def create(request: Request) -> Response:
        actor = request.query_params.get("actor", "")
        if not NAME.match(actor):
            raise bad("invalid actor")
        body = await read_json(request)
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise bad("body must be an object")
        if any(key in body for key in ("route", "route_next", "next")):
            raise bad("the route is the mesh's to set")
        headers = body.get("headers") or {}
        if not isinstance(headers, dict):
            raise bad("headers must be an object")
        timeout = body.get("timeout") or 0
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise bad("timeout must be a non-negative number")
        envelope_id = mesh.create(actor, {**body, "headers": headers, "timeout": timeout})
        return JSONResponse({"id": envelope_id}, status_code=201)

    async def list_envelopes(request: Request) -> Response:
        query = request.query_params
        status = query.get("status")
        if status is not None and status not in RANK:
            raise bad("invalid status")
        try:
            limit, offset = int(query.get("limit", 100)), int(query.get("offset", 0))
        except ValueError:
            raise bad("invalid limit or offset") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise bad("invalid limit or offset")
        records = reversed(mesh.records.values())
        matching = [r for r in records if status is None or r["status"] == status]
        page = [mesh.envelope(r["id"]) for r in matching[offset : offset + limit]]
        return JSONResponse({"messages": page, "total": len(matching)})

    async def get(request: Request) -> Response:
        return JSONResponse(mesh.envelope(request.path_params["id"]))

    async def cancel(request: Request) -> Response:
        mesh.status_event(request.path_params["id"], "canceled", {})
        return Response(status_code=204)

    # One route per path, so a wrong method is a 405 naming every allowed one.
    async def create_or_list(request: Request) -> Response:
        return await (create if request.method == "POST" else list_envelopes)(request)

    async def get_or_cancel(request: Request) -> Response:
        return await (cancel if request.method == "DELETE" else get)(request)

    async def events(request: Request) -> Response:
        envelope_id = request.path_params["id"]
        mesh.envelope(envelope_id)  # 404 before any stream bytes
        return StreamingResponse(
            mesh.stream(envelope_id, keepalive), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def post_event(request: Request) -> Response:
        envelope_id = request.path_params["id"]
        event = await read_json(request)
        if not isinstance(event, dict) or event.get("type") not in ("status", "fly"):
            raise bad("type must be status or fly")
        if event["type"] == "fly":
            if envelope_id not in mesh.records:
                raise bad("envelope not found", 404)
            mesh.publish(envelope_id, None, frame("fly", event.get("data")), False)
            return Response(status_code=204)
        status = event.get("status")
        status = ALIASES.get(status, status) if isinstance(status, str) else None
        data = event.get("data") or {}
        if status not in RANK or not isinstance(data, dict):
            raise bad("invalid status event")
        mesh.status_event(envelope_id, status, data)
        return Response(status_code=204)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        return JSONResponse({"status": "ready"})

    async def error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, exc.status_code, exc.headers)

    mesh_path = prefix + "/mesh"
    common = [Route("/health", health), Route("/ready", ready)]
    external = Starlette(
        routes=[
            *common,
            Route(mesh_path + "/", create_or_list, methods=["GET", "POST"]),
            Route(mesh_path + "/{id}", get_or_cancel, methods=["GET", "DELETE"]),
            Route(mesh_path + "/{id}/events", events, methods=["GET"]),
        ],
        exception_handlers={HTTPException: error},
    )
    internal = Starlette(
        routes=[
            *common,
            Route(mesh_path + "/{id}", get, methods=["GET"]),
            Route(mesh_path + "/{id}/events", post_event, methods=["POST"]),
        ],
        exception_handlers={HTTPException: error},
    )
    return external, internal


class Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `main` (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(external_port: int, internal_port: int, prefix: str, keepalive: float) -> None:
    servers = [
        Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                loop="uvloop",
                http="httptools",
                lifespan="off",
                access_log=False,
                log_level="warning",
                backlog=4096,
                timeout_keep_alive=3600,  # the real server never cuts an idle keep-alive either
                timeout_graceful_shutdown=1,
            )
        )
        for app, port in zip(apps(prefix, keepalive), (external_port, internal_port), strict=True)
    ]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    print(f"starlette app on {external_port}/{internal_port}", file=sys.stderr, flush=True)
    await asyncio.gather(*(s.serve() for s in servers))


def seconds(value: str) -> float:
    """`15`, `15s` or `500ms`, as the real server's duration settings."""
    if value.endswith("ms"):
        return float(value[:-2]) / 1000
    return float(value.removesuffix("s"))


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="the contract on Starlette + uvicorn")
    parser.add_argument(
        "--external-port", type=int, default=int(env("ASYA_MESH_EXTERNAL_PORT", 8080))
    )
    parser.add_argument(
        "--internal-port", type=int, default=int(env("ASYA_MESH_INTERNAL_PORT", 8081))
    )
    parser.add_argument("--prefix", default=env("ASYA_MESH_API_PREFIX", "/api/v1"))
    parser.add_argument(
        "--keepalive", type=seconds, default=seconds(env("ASYA_MESH_SSE_KEEPALIVE", "15"))
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    args = _parse_args()
    uvloop.run(
        main(args.external_port, args.internal_port, args.prefix.rstrip("/"), args.keepalive)
    )
