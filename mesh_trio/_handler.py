"""`MeshHandler`: everything one port of the mesh API does with a request, as a lean `Handler`.

The lean listener (`_lean.py`) parses HTTP and hands over a `Request` with its body read; the
handler answers with a `Reply`. It holds all of a port's behaviour, for both ports: the request
id (`X-Request-Id` taken or made, and echoed), the OpenAPI document, `/metrics` (internal port),
routing with `mesh_proto.Router` (404 versus 405 + `Allow` is the core's decision), the `Mesh`
operations, extension routes (their headers on every response of their paths, errors included,
and their lower body limits), SSE streams, `Location` on create, CORS (external port), metrics
and the debug line per request, and errors as the contract's JSON body.

The internal port's ASGI app on hypercorn (`_asgi.InternalApp`) calls the same handler, so the
internal port has one implementation whichever listener serves it. The external port on
hypercorn is the quart app of `_web.py`, which answers with the same bytes.

Why so plain: the internal port's `POST /mesh/{id}/events` is the mesh's hot path, so a publish
costs one routing call, one `Mesh.publish`, one tuple of reply headers and two clock reads;
every constant header is encoded once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from time import perf_counter

from mesh_proto import (
    IDEMPOTENCY_HEADER,
    MAX_BODY,
    Op,
    PayloadTooLarge,
    ProtocolError,
    Role,
    Route,
    dumps,
    openapi_document,
)

from ._asgi import log_error
from ._extension import ExtensionRequest, Extensions
from ._lean import Reply, Request
from ._mesh import Mesh
from ._metrics import CONTENT_TYPE, NO_OP, is_metrics, route_label
from ._observability import fresh_request_id, request_id, request_id_in
from ._web import is_openapi, last_event_id, run_operation

log = logging.getLogger("mesh_trio.http")
# One INFO line per request with `ASYA_MESH_ACCESS_LOG=1` (the same line as the debug one).
access_log = logging.getLogger("mesh_trio.access")

Header = tuple[bytes, bytes]

_REQUEST_ID = b"x-request-id"
_JSON: Header = (b"content-type", b"application/json")
_METRICS: Header = (b"content-type", CONTENT_TYPE.encode())
_SSE: tuple[Header, ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
_PREFLIGHT: tuple[Header, ...] = (
    (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
    (b"access-control-max-age", b"600"),
)
_VARY: Header = (b"vary", b"Origin")
_IDEMPOTENCY = IDEMPOTENCY_HEADER.lower().encode()
_NO_CONTENT = Reply(204)


def _encode(headers: Iterable[tuple[str, str]]) -> list[Header]:
    return [(name.lower().encode(), value.encode()) for name, value in headers]


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


class MeshHandler:
    """The `Handler` of one port (`role`): see the module comment.

    `cors_origins` (external port only) answers preflights and adds `Access-Control-Allow-Origin`
    for a listed `Origin` (or any, with `*`). With `access_log`, every request is logged at
    INFO on `mesh_trio.access`; without it, at DEBUG on `mesh_trio.http`.
    """

    def __init__(
        self,
        mesh: Mesh,
        routes: Extensions,
        role: Role,
        *,
        cors_origins: tuple[str, ...] = (),
        access_log: bool = False,
    ) -> None:
        self.mesh = mesh
        self.routes = routes
        self.router = routes.router
        self.role = role
        self.port = "external" if role is Role.EXTERNAL else "internal"
        self.cors_origins = cors_origins
        self.access_log = access_log
        self.document = dumps(openapi_document(self.router.prefix, role=role))

    async def __call__(self, request: Request, refused: ProtocolError | None = None) -> Reply:
        """Answer `request`; with `refused` (the body could not be read), answer that error."""
        started = perf_counter()
        rid = request_id_in(request.headers)
        request_id.set(rid)
        label: str | None
        try:
            if refused is not None:
                raise refused
            label, reply = await self._respond(request)
        except ProtocolError as exc:
            log_error(exc)
            label = route_label(self.router, self.role, request.method, request.path)
            headers = (*self.routes.error_headers(self.role, request.path), *exc.headers)
            reply = Reply(exc.status_hint, (*_encode(headers), _JSON), exc.body())
        extra: tuple[Header, ...] = ((_REQUEST_ID, rid.encode()),)
        if self.cors_origins:
            extra += self._cors(request.header(b"origin"))
        reply = Reply(reply.status, (*reply.headers, *extra), reply.body, reply.stream)
        if label is not None:  # None: a metrics scrape, not counted
            self.mesh.metrics.request(self.port, label, reply.status, perf_counter() - started)
        if self.access_log:
            self._log(access_log, logging.INFO, request, reply.status, started)
        elif log.isEnabledFor(logging.DEBUG):
            self._log(log, logging.DEBUG, request, reply.status, started)
        return reply

    async def _respond(self, request: Request) -> tuple[str | None, Reply]:
        """The reply and the `op` label of its metrics (None: not counted)."""
        method, path = request.method, request.path
        if method == "OPTIONS" and self.cors_origins:
            return NO_OP, self._preflight(request)
        if is_openapi(method, path):
            return "openapi", Reply(200, (_JSON,), self.document)
        if self.role is Role.INTERNAL and is_metrics(method, path):
            return None, Reply(200, (_METRICS,), self.mesh.metrics.render())
        route = self.router.resolve(self.role, method, path)
        op = route.op
        label = str(op.value)
        if op is Op.PUBLISH:  # the hot path, without run_operation's dispatch
            assert route.id is not None
            await self.mesh.publish(route.id, request.body)
            return label, _NO_CONTENT
        if not isinstance(op, Op):
            return label, await self._extension(route, request)
        if op is Op.CREATE:
            envelope_id = await self.mesh.create(
                request.query,
                request.body,
                traceparent=_text(request.header(b"traceparent")),
                idempotency_key=_text(request.header(_IDEMPOTENCY)),
            )
            location = f"{self.router.prefix}/mesh/{envelope_id}".encode()
            return label, Reply(201, (_JSON, (b"location", location)), dumps({"id": envelope_id}))
        if op is Op.STREAM:
            assert route.id is not None
            await self.mesh.get(route.id)  # a 404 before any byte of the stream
            resume = last_event_id(_text(request.header(b"last-event-id")), request.query)
            return label, Reply(200, _SSE, stream=self.mesh.stream(route.id, last_event_id=resume))

        async def body() -> bytes:
            return request.body

        status, payload = await run_operation(
            self.mesh,
            op,
            route.id,
            request.query,
            body,
            _text(request.header(b"traceparent")),
            _text(request.header(_IDEMPOTENCY)),
        )
        return label, Reply(status, (_JSON,) if payload else (), payload)

    async def _extension(self, route: Route, request: Request) -> Reply:
        owner = self.routes.routes[route.op]

        async def read(limit: int) -> bytes:
            # The listener has refused a body over MAX_BODY already; a route may want less.
            if len(request.body) > min(limit, MAX_BODY):
                raise PayloadTooLarge(f"body larger than {limit} bytes")
            return request.body

        reply = await owner.handler(
            ExtensionRequest(
                method=request.method,
                path=request.path,
                id=route.id,
                query=request.query,
                read=read,
            )
        )
        headers = _encode({**dict(owner.headers(route.id)), **dict(reply.headers)}.items())
        if reply.stream is not None:
            if self.role is Role.INTERNAL:
                raise AssertionError("extension streams are for the external port only")
            return Reply(reply.status, (*_SSE, *headers), stream=reply.stream)
        if reply.body:
            headers.append(_JSON)
        return Reply(reply.status, headers, reply.body)

    def refusal_headers(self, status: int) -> tuple[Header, ...]:
        """For a reply the lean listener writes itself (a malformed request, a body over the
        limit, a slow client): a fresh `X-Request-Id`, the request counted (op `refused`) and,
        with the access log on, its line."""
        rid = fresh_request_id()
        self.mesh.metrics.request(self.port, "refused", status, 0.0)
        if self.access_log:
            access_log.info(
                "request port=%s refused status=%d request_id=%s",
                self.port,
                status,
                rid,
                extra={"port": self.port, "status": status},
            )
        return ((_REQUEST_ID, rid.encode()),)

    def _cors(self, origin: bytes | None) -> tuple[Header, ...]:
        if origin is None:
            return ()
        text = origin.decode("latin-1")
        if text not in self.cors_origins and "*" not in self.cors_origins:
            return ()
        return ((b"access-control-allow-origin", origin), _VARY)

    def _preflight(self, request: Request) -> Reply:
        # The allowed origin itself is added with every reply's CORS headers.
        if not self._cors(request.header(b"origin")):
            return _NO_CONTENT
        asked = request.header(b"access-control-request-headers") or b"Content-Type"
        return Reply(204, (*_PREFLIGHT, (b"access-control-allow-headers", asked)))

    def _log(
        self, logger: logging.Logger, level: int, request: Request, status: int, started: float
    ) -> None:
        ms = round((perf_counter() - started) * 1000, 1)
        logger.log(
            level,
            "request port=%s method=%s path=%s status=%d ms=%.1f",
            self.port,
            request.method,
            request.path,
            status,
            ms,
            extra={
                "port": self.port,
                "method": request.method,
                "path": request.path,
                "status": status,
                "ms": ms,
            },
        )
