"""Extensions: route rows and handlers that a module adds to the two ports.

An extension is a module, loaded by name at start (`Config.extensions`; `ASYA_MESH_COMPAT=1`
names `mesh_compat`), that has a function `routes(mesh, router)` returning `ExtensionRoute`s.
The runtime never imports an extension otherwise, and an extension needs nothing of the runtime
but this API, `Mesh` and `mesh_proto`:

- each route's `spec` is a `mesh_proto.RouteSpec` whose `op` is a member of the extension's own
  enum; the runtime builds one `mesh_proto.Router` from the core's routes and every
  extension's rows, so 404 versus 405 stays the core's decision, and an extension row only
  takes a path the core's routes leave free (`Router.shadowed()` lists the ones a prefix hides);
- both apps (the quart app of the external port, the lean ASGI app of the internal one) resolve
  with that router and hand an extension route's request to its `handler` as an
  `ExtensionRequest` (the path's id, the query, the body read with the handler's own limit),
  then send its `ExtensionReply` (JSON or empty, or an SSE byte stream);
- `headers(id)` go on every response of the route's path, errors included: a `ProtocolError`
  the handler raises (answered with its `status_hint` and `body()`, logged when it is not a
  client error), and a 405 for another method.

Handlers on the internal port run on the mesh's hot path: the lean app adds no task and no
framework to them.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Protocol, cast

import attrs

from mesh_proto import Op, Role, Router, RouteSpec

from ._config import ConfigError
from ._mesh import Mesh

Headers = tuple[tuple[str, str], ...]


@attrs.frozen(kw_only=True)
class ExtensionRequest:
    """What an extension handler gets: the resolved route's id, and the request's parts.

    `read(limit)` returns the whole body, raising `PayloadTooLarge` over `limit` bytes (or over
    the port's own 10 MiB limit, whichever is lower).
    """

    method: str
    path: str
    id: str | None
    query: bytes
    read: Callable[[int], Awaitable[bytes]] = attrs.field(eq=False, repr=False)


@attrs.frozen(kw_only=True)
class ExtensionReply:
    """An extension handler's answer: JSON `body` (or none), or an SSE `stream`.

    A `body` is sent as `application/json` with its exact length; a `stream` (external port
    only: the internal one serves sidecars, which do not stream) as `text/event-stream` with
    `Cache-Control: no-cache` and `X-Accel-Buffering: no`, chunk by chunk, until it ends.
    `headers` are added to the route's own `headers(id)`.
    """

    status: int = 200
    body: bytes = b""
    headers: Headers = ()
    stream: AsyncIterator[bytes] | None = attrs.field(default=None, eq=False, repr=False)


Handler = Callable[[ExtensionRequest], Awaitable[ExtensionReply]]


def no_headers(envelope_id: str | None) -> Headers:
    return ()


@attrs.frozen(kw_only=True)
class ExtensionRoute:
    """One route of an extension: its row in the route table, its handler, and the headers
    every response of its path carries (given the id from the path)."""

    spec: RouteSpec
    handler: Handler = attrs.field(eq=False)
    headers: Callable[[str | None], Headers] = attrs.field(default=no_headers, eq=False)


class Extension(Protocol):
    """What a module loaded as an extension has (see the module comment)."""

    def routes(self, mesh: Mesh, router: Router) -> Iterable[ExtensionRoute]:
        """The extension's routes, given the mesh and the core's router (its prefix names the
        new routes); called once by `serve()` before the ports listen."""
        ...


@attrs.frozen
class Extensions:
    """The routes of both ports: the core's and every loaded extension's.

    `router` resolves them all; `routes` maps each extension op to its route.
    """

    router: Router
    routes: Mapping[enum.Enum, ExtensionRoute] = attrs.field(factory=dict)

    @classmethod
    def load(cls, names: Iterable[str], mesh: Mesh, router: Router) -> Extensions:
        """Import each named extension module and collect its routes.

        Raises:
            ConfigError: a module that cannot be imported or has no `routes`, or a route whose
                op is a core `Op` or another route's.
        """
        routes: dict[enum.Enum, ExtensionRoute] = {}
        for name in names:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"extension {name}: cannot be imported ({exc})") from None
            if not callable(getattr(module, "routes", None)):
                raise ConfigError(f"extension {name}: has no routes(mesh, router)")
            extension = cast(Extension, module)
            for route in extension.routes(mesh, router):
                if isinstance(route.spec.op, Op) or route.spec.op in routes:
                    raise ConfigError(f"extension {name}: op {route.spec.op} is taken")
                routes[route.spec.op] = route
        extra = tuple(route.spec for route in routes.values())
        return cls(Router(router.prefix, extra=extra), routes)

    def error_headers(self, role: Role, path: str) -> Headers:
        """For an error answer: the headers of the extension route whose path this is (its
        handler raised, or the method is not its), else none."""
        route = self.router.match(role, path) if self.routes else None
        if route is None or route.op not in self.routes:
            return ()
        return self.routes[route.op].headers(route.id)
