"""Plain-ASGI helpers of the internal port's lean app.

Request bodies are read with a limit enforced on `Content-Length` and on chunked bodies alike;
replies are JSON (or empty) with an exact `Content-Length`; errors are logged only when they
are ours or a dependency's, never for a client's mistake.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mesh_proto import MAX_BODY, ClientError, PayloadTooLarge, ProtocolError

log = logging.getLogger("mesh_trio.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = b"application/json"


def log_error(exc: ProtocolError) -> None:
    """Faults of ours or of a dependency are logged; client mistakes are not."""
    if not isinstance(exc, ClientError):
        log.warning("%s (%d)", exc.message, exc.status_hint)


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_BODY) -> bytes:
    """The whole request body; `PayloadTooLarge` as soon as it is known to exceed `limit`."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientError("client disconnected", status_hint=499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_response(
    send: Send, status: int, payload: bytes, headers: Iterable[tuple[str, str]] = ()
) -> None:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    if payload:
        raw.append((b"content-type", JSON))
    raw.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def serve_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol for an app that owns nothing needing it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
