"""The external port on hypercorn (`ASYA_MESH_HTTP=hypercorn`): a quart-trio app, and the
operation helpers both listeners share.

The app resolves requests with `mesh_proto.Router` (so 404 versus 405 + `Allow` is the core's
decision), calls a `Mesh` operation, and answers with the core's reply, holding no logic of its
own. Its replies are the same as `_handler.MeshHandler`'s, which serves both ports on the lean
listener and the internal port on hypercorn too (`_asgi.InternalApp`): quart-trio costs about
2 ms of CPU per request before our code runs (see docs/performance.md), too much for the
internal port's sidecar events.

Extension routes (`_extension.py`: the legacy routes of `mesh_compat`) are rows of the same
router: the app hands them to the extension's handler and adds its headers to every response
of its paths, errors included.
"""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from mesh_proto import (
    IDEMPOTENCY_HEADER,
    MAX_BODY,
    OPENAPI_PATH,
    ClientError,
    MethodNotAllowed,
    Op,
    PayloadTooLarge,
    ProtocolError,
    Role,
    Route,
    dumps,
    loads,
    openapi_document,
)

from ._asgi import log_error
from ._extension import ExtensionRequest, Extensions
from ._mesh import Mesh
from ._metrics import route_label
from ._observability import REQUEST_ID_HEADER, new_request_id, request_id

log = logging.getLogger("mesh_trio.http")

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def run_operation(
    mesh: Mesh,
    op: Op,
    envelope_id: str | None,
    query: bytes,
    body: Callable[[], Awaitable[bytes]],
    traceparent: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[int, bytes]:
    """Run a non-streaming operation; returns (status, JSON body or b"")."""
    if op is Op.CREATE:
        envelope_id = await mesh.create(
            query, await body(), traceparent=traceparent, idempotency_key=idempotency_key
        )
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
        return 200, (await mesh.wait(envelope_id, query)).encoded()
    if op is Op.CANCEL:
        await mesh.cancel(envelope_id)
        return 204, b""
    if op is Op.PUBLISH:
        await mesh.publish(envelope_id, await body())
        return 204, b""
    raise AssertionError(f"not a plain operation: {op}")  # pragma: no cover


def last_event_id(header: str | None, query: bytes) -> str | None:
    """Where a stream resumes: the `Last-Event-ID` header, else `?last_event_id=` (a browser's
    first connect cannot set the header); None for a fresh stream."""
    if header is not None:
        return header
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"last_event_id":
            return urllib.parse.unquote(value.decode("latin-1"))
    return None


def is_openapi(method: str, path: str) -> bool:
    """Whether a request asks for the port's OpenAPI document (a bare path beside the route
    table, answered for GET and HEAD).

    Raises:
        MethodNotAllowed: the document's path with another method.
    """
    if path != OPENAPI_PATH:
        return False
    if method not in ("GET", "HEAD"):
        raise MethodNotAllowed(("GET",))
    return True


def _cors_headers(origins: Iterable[str], origin: str | None) -> dict[str, str]:
    if origin is None or (origin not in origins and "*" not in origins):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def external_app(
    mesh: Mesh, routes: Extensions, *, cors_origins: tuple[str, ...] = ()
) -> QuartTrio:
    """The client-facing app: create / list / get / cancel / SSE, health and ready, and the
    external routes of extensions."""
    router = routes.router
    document = dumps(openapi_document(router.prefix, role=Role.EXTERNAL))
    app = QuartTrio("mesh_trio.external")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    def error_response(exc: ProtocolError) -> Response:
        log_error(exc)
        return Response(exc.body(), exc.status_hint, dict(exc.headers), content_type=JSON)

    @app.errorhandler(ProtocolError)
    async def protocol_error(exc: ProtocolError) -> Response:
        return error_response(exc)

    async def drain() -> None:
        # A reply sent before the request body was read (an error, a DELETE with a body) can
        # leave a kept-alive connection stalled on the unread bytes (quart-trio on hypercorn:
        # the next request on it got no answer). So read what is left, at most MAX_BODY; a
        # body over that is a 413 and its connection closes.
        with contextlib.suppress(HTTPException):
            await request.get_data(cache=False)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        if exc.code == 413:
            return error_response(PayloadTooLarge(f"body larger than {MAX_BODY} bytes"))
        await drain()
        if exc.code == 405:
            # A method outside METHODS (TRACE, ...) never reaches `handle`: route it here, so
            # the reply is the router's (404 for an unknown path, else 405 with `Allow`).
            try:
                is_openapi(request.method, request.path)
                router.resolve(Role.EXTERNAL, request.method, request.path)
            except ProtocolError as routed:
                return error_response(routed)
        return error_response(ClientError(exc.name.lower(), status_hint=exc.code or 400))

    @app.before_request
    async def take_request_id() -> None:
        request_id.set(new_request_id(request.headers.get(REQUEST_ID_HEADER)))

    @app.after_request
    async def echo_request_id(response: Response) -> Response:
        # Error replies pass here too (quart finalizes them like any response).
        response.headers[REQUEST_ID_HEADER] = request_id.get() or new_request_id()
        return response

    @app.before_request
    async def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    async def count(response: Response) -> Response:
        # Error replies pass here too; `started` is missing only if quart failed before
        # `before_request` ran.
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        op = route_label(router, Role.EXTERNAL, request.method, request.path)
        mesh.metrics.request("external", op, response.status_code, seconds)
        return response

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

    async def limited_body(limit: int) -> bytes:
        data = await body()
        if len(data) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        return data

    async def extension(route: Route) -> Response:
        owner = routes.routes[route.op]
        reply = await owner.handler(
            ExtensionRequest(
                method=request.method,
                path=request.path,
                id=route.id,
                query=request.query_string,
                read=limited_body,
            )
        )
        headers = {**dict(owner.headers(route.id)), **dict(reply.headers)}
        if reply.stream is not None:
            response = Response(
                reply.stream,
                reply.status,
                {**SSE_HEADERS, **headers},
                content_type="text/event-stream",
            )
            response.timeout = None
            return response
        return Response(
            reply.body, reply.status, headers, content_type=JSON if reply.body else None
        )

    async def respond() -> Response:
        if is_openapi(request.method, request.path):
            return Response(document, 200, content_type=JSON)
        route = router.resolve(Role.EXTERNAL, request.method, request.path)
        if not isinstance(route.op, Op):
            return await extension(route)
        if route.op is Op.STREAM:
            assert route.id is not None
            await mesh.get(route.id)
            resume = last_event_id(request.headers.get("Last-Event-ID"), request.query_string)
            response = Response(
                mesh.stream(route.id, last_event_id=resume),
                200,
                SSE_HEADERS,
                content_type="text/event-stream",
            )
            response.timeout = None
            return response
        status, payload = await run_operation(
            mesh,
            route.op,
            route.id,
            request.query_string,
            body,
            request.headers.get("traceparent"),
            request.headers.get(IDEMPOTENCY_HEADER),
        )
        headers = {}
        if route.op is Op.CREATE and status == 201:
            # Read back from the reply, so it names whatever id the create answered with.
            headers["Location"] = f"{router.prefix}/mesh/{loads(payload)['id']}"
        return Response(payload, status, headers, content_type=JSON if payload else None)

    async def handle(path: str = "") -> Response:
        started = time.perf_counter()
        if request.method == "OPTIONS" and cors_origins:
            return _preflight()
        try:
            response = await respond()
        except ProtocolError as exc:
            # On an extension's path, errors carry its headers too (`protocol_error` answers).
            exc.headers = (*routes.error_headers(Role.EXTERNAL, request.path), *exc.headers)
            await drain()
            raise
        await drain()
        if log.isEnabledFor(logging.DEBUG):
            ms = round((time.perf_counter() - started) * 1000, 1)
            log.debug(
                "request port=external method=%s path=%s status=%d ms=%.1f",
                request.method,
                request.path,
                response.status_code,
                ms,
                extra={
                    "port": "external",
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "ms": ms,
                },
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
