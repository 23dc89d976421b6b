"""The internal port on hypercorn: an ASGI adapter around `_handler.MeshHandler`.

`InternalApp` reads the request body (with the 10 MiB limit enforced on `Content-Length` and on
chunked bodies alike), hands the request to the port's `MeshHandler` (the same one the lean
listener calls), and sends its reply with an exact `Content-Length`. Errors are logged only when
they are ours or a dependency's, never for a client's mistake.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mesh_proto import MAX_BODY, ClientError, PayloadTooLarge, ProtocolError

from ._lean import Request

if TYPE_CHECKING:
    from ._handler import MeshHandler

log = logging.getLogger("mesh_trio.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


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


async def serve_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol for an app that owns nothing needing it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class InternalApp:
    """The sidecar-facing ASGI app: the internal port's `MeshHandler` behind ASGI."""

    def __init__(self, handler: MeshHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(scope, receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover - hypercorn only sends these
            return
        refused: ProtocolError | None = None
        try:
            body = await read_body(scope, receive)
        except ProtocolError as exc:
            body, refused = b"", exc
        request = Request(
            scope["method"], scope["path"], scope["query_string"], scope["headers"], body
        )
        # Each request is its own task (hypercorn), so the request id needs no reset.
        reply = await self.handler(request, refused)
        headers = [*reply.headers, (b"content-length", b"%d" % len(reply.body))]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
