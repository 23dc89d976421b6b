"""The legacy sidecar routes of the internal port, as a lean ASGI app.

`mesh_trio.InternalApp` handles the new routes itself and hands every request its router does
not resolve to this app (its `fallback`), together with the ASGI lifespan. This app:

1. answers the lifespan protocol (startup/shutdown complete; it owns nothing that needs it);
2. resolves legacy routes with `LegacyRouter` (pure): `/progress`, `/final`, `/fly`;
3. answers anything else exactly as `InternalApp` would have without a fallback, by asking the
   new router again: the contract's JSON 404 `{"error": "not found"}`, or 405 with `Allow` for
   a new path with a wrong method.

It speaks ASGI directly for the same reason `InternalApp` does: legacy sidecars post every
progress report and every streamed token here, the hot path of the mesh, and quart would add
about 2 ms of CPU to each. The handlers only read the body, call the pure translators and a
`Mesh` operation, and write the reply with the legacy `Deprecation`/`Link` headers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mesh_proto import (
    MAX_BODY,
    NotFound,
    ProtocolError,
    Role,
    Router,
    dumps,
)
from mesh_trio import Mesh, log_error, read_body, send_response, serve_lifespan

from ._translate import (
    FLY_LIMIT,
    OK,
    LegacyMatch,
    LegacyOp,
    LegacyProgress,
    LegacyRouter,
    parse_final,
    parse_fly,
    progress_reply,
)

log = logging.getLogger("mesh_compat")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

Headers = Iterable[tuple[str, str]]


class LegacyInternalApp:
    """The fallback ASGI app of the internal port (see the module comment)."""

    def __init__(self, mesh: Mesh, router: Router) -> None:
        self.mesh = mesh
        self.router = router
        self.legacy = LegacyRouter(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(scope, receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover - hypercorn only sends these
            return
        method, path = scope["method"], scope["path"]
        try:
            match = self.legacy.resolve(Role.INTERNAL, method, path)
        except ProtocolError as exc:  # a legacy path, another method: 405 with legacy headers
            await send_response(send, exc.status_hint, exc.body(), exc.headers)
            return
        if match is None:
            await self._not_legacy(send, method, path)
            return
        headers = self.legacy.headers(match.route, match.id)
        try:
            payload = await self._run(match, scope, receive)
            status = 200
        except ProtocolError as exc:
            log_error(exc)
            status, payload, headers = exc.status_hint, exc.body(), (*headers, *exc.headers)
        await send_response(send, status, payload, headers)

    async def _not_legacy(self, send: Send, method: str, path: str) -> None:
        """What `InternalApp` answers without a fallback: the new router's 404 or 405."""
        try:
            self.router.resolve(Role.INTERNAL, method, path)
        except ProtocolError as exc:
            error: ProtocolError = exc
        else:  # only when mounted on its own: InternalApp serves what its router resolves
            error = NotFound("not found")
        await send_response(send, error.status_hint, error.body(), error.headers)

    async def _run(self, match: LegacyMatch, scope: Scope, receive: Receive) -> bytes:
        envelope_id = match.id
        op = match.route.op
        if op is LegacyOp.FLY:
            data = parse_fly(await read_body(scope, receive, FLY_LIMIT))
            await self.mesh.publish_fly(envelope_id, data)
            return dumps(OK)
        body = await read_body(scope, receive, MAX_BODY)
        if op is LegacyOp.PROGRESS:
            progress = LegacyProgress.parse(envelope_id, body)
            stored = await self.mesh.get(envelope_id)
            outcome = await self.mesh.apply(envelope_id, progress.event(stored))
            return dumps(progress_reply(outcome.envelope))
        if op is LegacyOp.FINAL:
            await self.mesh.apply(envelope_id, parse_final(envelope_id, body))
            return dumps(OK)
        raise AssertionError(f"not an internal legacy route: {op}")  # pragma: no cover
