"""The HTTP edge: a quart-trio app for the external port, a lean ASGI app for the internal one.

Both resolve requests with `mesh_proto.Router` (so 404 versus 405 + `Allow` is the core's
decision), call a `Mesh` operation, and answer with the core's reply; neither holds any logic
of its own.

Why two shapes: the external port serves people and dashboards (create, list, SSE, CORS), where
quart's request/response model earns its keep. The internal port carries every sidecar event,
the hot path of the mesh; quart-trio costs about 2 ms of CPU per request before our code runs,
more than the whole request costs hypercorn itself, so the internal port speaks ASGI directly
(see docs/performance.md). Anything the internal app does not route itself (the legacy routes of
`mesh_compat`) goes to an optional fallback ASGI app.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from mesh_proto import (
    MAX_BODY,
    ClientError,
    Op,
    PayloadTooLarge,
    ProtocolError,
    Role,
    Router,
    dumps,
)

from ._asgi import Receive, Scope, Send, log_error, read_body, send_response, serve_lifespan
from ._mesh import Mesh

log = logging.getLogger("mesh_trio.http")

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def run_operation(
    mesh: Mesh,
    op: Op,
    envelope_id: str | None,
    query: bytes,
    body: Callable[[], Awaitable[bytes]],
    traceparent: str | None = None,
) -> tuple[int, bytes]:
    """Run a non-streaming operation; returns (status, JSON body or b"")."""
    if op is Op.CREATE:
        envelope_id = await mesh.create(query, await body(), traceparent=traceparent)
        return 201, dumps({"id": envelope_id})
    if op is Op.LIST:
        return 200, dumps(await mesh.list(query))
    if op is Op.HEALTH:
        return 200, dumps({"status": "ok"})
    if op is Op.READY:
        await mesh.ready()
        return 200, dumps({"status": "ready"})
    assert envelope_id is not None
    if op is Op.GET:
        return 200, dumps((await mesh.get(envelope_id)).to_json())
    if op is Op.CANCEL:
        await mesh.cancel(envelope_id)
        return 204, b""
    if op is Op.PUBLISH:
        await mesh.publish(envelope_id, await body())
        return 204, b""
    raise AssertionError(f"not a plain operation: {op}")  # pragma: no cover


def _cors_headers(origins: Iterable[str], origin: str | None) -> dict[str, str]:
    if origin is None or (origin not in origins and "*" not in origins):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def external_app(mesh: Mesh, router: Router, *, cors_origins: tuple[str, ...] = ()) -> QuartTrio:
    """The client-facing app: create / list / get / cancel / SSE, health and ready."""
    app = QuartTrio("mesh_trio.external")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    def error_response(exc: ProtocolError) -> Response:
        log_error(exc)
        return Response(exc.body(), exc.status_hint, dict(exc.headers), content_type=JSON)

    @app.errorhandler(ProtocolError)
    async def protocol_error(exc: ProtocolError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        if exc.code == 413:
            return error_response(PayloadTooLarge(f"body larger than {MAX_BODY} bytes"))
        return error_response(ClientError(exc.name.lower(), status_hint=exc.code or 400))

    @app.after_request
    async def cors(response: Response) -> Response:
        if cors_origins:
            response.headers.update(_cors_headers(cors_origins, request.headers.get("Origin")))
        return response

    async def body() -> bytes:
        # Over MAX_CONTENT_LENGTH (by Content-Length or while reading a chunked body), quart
        # raises a 413 that `http_error` turns into the contract's error body.
        data = await request.get_data(cache=False, as_text=False)
        return data if isinstance(data, bytes) else data.encode()

    async def handle(path: str = "") -> Response:
        started = time.perf_counter()
        if request.method == "OPTIONS" and cors_origins:
            return _preflight()
        route = router.resolve(Role.EXTERNAL, request.method, request.path)
        if route.op is Op.STREAM:
            assert route.id is not None
            await mesh.get(route.id)
            response = Response(
                mesh.stream(route.id), 200, SSE_HEADERS, content_type="text/event-stream"
            )
            response.timeout = None
        else:
            status, payload = await run_operation(
                mesh,
                route.op,
                route.id,
                request.query_string,
                body,
                request.headers.get("traceparent"),
            )
            response = Response(payload, status, content_type=JSON if payload else None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request port=external method=%s path=%s status=%d ms=%.1f",
                request.method,
                request.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
        return response

    def _preflight() -> Response:
        headers = _cors_headers(cors_origins, request.headers.get("Origin"))
        if headers:
            headers.update(
                {
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": request.headers.get(
                        "Access-Control-Request-Headers", "Content-Type"
                    ),
                    "Access-Control-Max-Age": "600",
                }
            )
        return Response(b"", 204, headers)

    app.add_url_rule("/", "root", handle, methods=METHODS)
    app.add_url_rule("/<path:path>", "any", handle, methods=METHODS)
    return app


class InternalApp:
    """The sidecar-facing ASGI app: event publishing and the heartbeat GET, health and ready.

    Bodies are read with the 10 MiB limit enforced on `Content-Length` and on chunked bodies
    alike. Paths the core router does not know go to `fallback` when one is given.
    """

    def __init__(self, mesh: Mesh, router: Router, fallback: ASGIApp | None = None) -> None:
        self.mesh = mesh
        self.router = router
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await (self.fallback or serve_lifespan)(scope, receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover - hypercorn only sends these
            return
        started = time.perf_counter()
        try:
            route = self.router.resolve(Role.INTERNAL, scope["method"], scope["path"])
        except ProtocolError as exc:
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
                return
            status, headers, payload = exc.status_hint, exc.headers, exc.body()
        else:
            try:
                status, payload = await run_operation(
                    self.mesh,
                    route.op,
                    route.id,
                    scope["query_string"],
                    lambda: read_body(scope, receive),
                )
                headers = ()
            except ProtocolError as exc:
                log_error(exc)
                status, headers, payload = exc.status_hint, exc.headers, exc.body()
        await send_response(send, status, payload, headers)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request port=internal method=%s path=%s status=%d ms=%.1f",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )
