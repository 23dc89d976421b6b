"""`install()`: mounts the legacy routes on both ports.

External port: a quart blueprint registered on the external app. Its rules are specific
(`/mesh/<id>/stream`, ...), and werkzeug matches rules with more static parts and no `path`
converter before the app's catch-all `/<path:path>`, so they take precedence over it without
touching the app (`tests/test_compat.py` checks it over a socket). The envelope id segment only
matches a canonical UUID: any other id falls through to the catch-all, which answers as the new
API does. Per legacy path there are two rules: the legacy method (GET, with HEAD), and the
other methods answering 405 with `Allow`; OPTIONS is left to the catch-all (CORS preflights).
A legacy path the new API also serves (with `ASYA_MESH_API_PREFIX=""`, `GET /mesh/{id}`) is not
mounted, so the new route wins (`LegacyRouter`).

Internal port: `install` returns the lean ASGI app of `_internal`, which `mesh_trio` uses as the
internal app's fallback for paths its router does not know.

The handlers here only bind quart's request/response to the pure translators and the `Mesh`
operations; each legacy response carries `Deprecation: true` and a `Link` to its successor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from quart import Blueprint, Response, request
from quart_trio import QuartTrio
from werkzeug.routing import BaseConverter

from mesh_proto import ProtocolError, Role, Router, dumps
from mesh_trio import Mesh, log_error

from ._internal import LegacyInternalApp
from ._stream import legacy_stream
from ._translate import UUID_PATTERN, LegacyOp, LegacyRoute, LegacyRouter, active_reply, task_json

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Every method the external app routes except OPTIONS, which stays with its catch-all.
OTHER_METHODS = ("POST", "PUT", "PATCH", "DELETE")
CONVERTER = "mesh_id"


class EnvelopeIdConverter(BaseConverter):
    """A path segment holding a canonical (lower-case) UUID, the only form of envelope ids."""

    regex = UUID_PATTERN


def _rule(route: LegacyRoute) -> str:
    return route.pattern.replace("{id}", f"<{CONVERTER}:envelope_id>")


def legacy_blueprint(mesh: Mesh, legacy: LegacyRouter) -> Blueprint:
    """The legacy external routes left free by the new API's prefix (see the module comment)."""
    blueprint = Blueprint("mesh_compat", __name__)

    def reply(route: LegacyRoute, envelope_id: str, status: int, payload: Any) -> Response:
        headers = dict(legacy.headers(route, envelope_id))
        return Response(dumps(payload), status, headers, content_type=JSON)

    def error_reply(exc: ProtocolError, headers: Iterable[tuple[str, str]] = ()) -> Response:
        log_error(exc)
        merged = {**dict(headers), **dict(exc.headers)}
        return Response(exc.body(), exc.status_hint, merged, content_type=JSON)

    def view(route: LegacyRoute) -> Any:
        async def handle(envelope_id: str) -> Response:
            headers = legacy.headers(route, envelope_id)
            try:
                envelope = await mesh.get(envelope_id)
            except ProtocolError as exc:
                return error_reply(exc, headers)
            if route.op is LegacyOp.TASK:
                return reply(route, envelope_id, 200, task_json(envelope))
            if route.op is LegacyOp.ACTIVE:
                return reply(route, envelope_id, *active_reply(envelope))
            assert route.op is LegacyOp.STREAM
            response = Response(
                legacy_stream(mesh, envelope_id),
                200,
                {**SSE_HEADERS, **dict(headers)},
                content_type="text/event-stream",
            )
            response.timeout = None
            return response

        return handle

    async def wrong_method(envelope_id: str) -> Response:
        try:
            legacy.resolve(Role.EXTERNAL, request.method, request.path)
        except ProtocolError as exc:
            return error_reply(exc)
        raise AssertionError("a legacy rule took a method it serves")  # pragma: no cover

    for route in legacy.for_role(Role.EXTERNAL):
        blueprint.add_url_rule(
            _rule(route), f"{route.op.value}", view(route), methods=[route.method]
        )
        blueprint.add_url_rule(
            _rule(route), f"{route.op.value}_other", wrong_method, methods=list(OTHER_METHODS)
        )
    return blueprint


def install(external_app: QuartTrio, mesh: Mesh, router: Router) -> LegacyInternalApp:
    """Mount the legacy routes: external ones on `external_app`, internal ones returned.

    Registers the legacy blueprint on the external app (call before it serves), and returns
    the ASGI app that serves the legacy internal routes; `mesh_trio` makes it the internal
    app's fallback, so it also answers the lifespan protocol and every unknown path (404).
    """
    legacy = LegacyRouter(router)
    external_app.url_map.converters[CONVERTER] = EnvelopeIdConverter
    external_app.register_blueprint(legacy_blueprint(mesh, legacy))
    return LegacyInternalApp(mesh, router)
