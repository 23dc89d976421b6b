"""Routing: (port role, method, path) → operation, with the configurable prefix.

The route table is data (`ROUTES`), so the docs' route table is generated from it. 404 versus
405 (with `Allow`) is decided here, not by a web framework: a path that matches a route
pattern for this port but not with this method is a 405.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from ._errors import MethodNotAllowed, NotFound
from ._requests import parse_id


class Role(enum.Enum):
    EXTERNAL = "external"
    INTERNAL = "internal"


class Op(enum.Enum):
    CREATE = "create"
    LIST = "list"
    GET = "get"
    CANCEL = "cancel"
    STREAM = "stream"
    PUBLISH = "publish"
    HEALTH = "health"
    READY = "ready"


@attrs.frozen(kw_only=True)
class RouteSpec:
    """One row of the route table; `pattern` is relative to the prefix unless `bare`."""

    role: Role
    method: str
    pattern: str
    op: Op
    summary: str
    bare: bool = False


_E, _I = Role.EXTERNAL, Role.INTERNAL
ROUTES: Final[tuple[RouteSpec, ...]] = tuple(
    RouteSpec(role=role, method=method, pattern=pattern, op=op, summary=summary, bare=bare)
    for role, method, pattern, op, bare, summary in (
        (_E, "POST", "/mesh/", Op.CREATE, False, 'create and dispatch; 201 {"id"}'),
        (_E, "GET", "/mesh/", Op.LIST, False, 'list, newest first; 200 {"messages", "total"}'),
        (_E, "GET", "/mesh/{id}", Op.GET, False, "one envelope; 200, 404"),
        (_E, "DELETE", "/mesh/{id}", Op.CANCEL, False, "cancel; 204 (also when terminal), 404"),
        (_E, "GET", "/mesh/{id}/events", Op.STREAM, False, "SSE: catch-up, live, end on terminal"),
        (_I, "POST", "/mesh/{id}/events", Op.PUBLISH, False, "status or FLY event; 204, 400, 404"),
        (_I, "GET", "/mesh/{id}", Op.GET, False, "sidecar heartbeat; as the external GET"),
        (_E, "GET", "/health", Op.HEALTH, True, "200 while the process runs"),
        (_E, "GET", "/ready", Op.READY, True, "200 when the store answers, else 503"),
        (_I, "GET", "/health", Op.HEALTH, True, "200 while the process runs"),
        (_I, "GET", "/ready", Op.READY, True, "200 when the store answers, else 503"),
    )
)


@attrs.frozen(kw_only=True)
class Route:
    """A resolved request: the operation and, for per-envelope routes, the envelope id."""

    op: Op
    id: str | None = None


def normalize_prefix(prefix: str) -> str:
    """`api/v1/` → `/api/v1`; `""` and `/` → `""`."""
    prefix = prefix.strip().strip("/")
    return "/" + prefix if prefix else ""


@attrs.frozen
class Router:
    """Resolves requests for one prefix; build once, call `resolve` per request."""

    prefix: str = attrs.field(converter=normalize_prefix)

    def resolve(self, role: Role, method: str, path: str) -> Route:
        """Resolve a request.

        Raises:
            NotFound: no route of this port has this path (or the id is not an envelope id).
            MethodNotAllowed: the path is known, the method is not; carries `Allow`.
        """
        allowed: list[str] = []
        found: Route | None = None
        for spec in ROUTES:
            if spec.role is not role:
                continue
            envelope_id = self._match(spec, path)
            if envelope_id is None:
                continue
            if spec.method == method or (method == "HEAD" and spec.method == "GET"):
                found = Route(op=spec.op, id=envelope_id or None)
                break
            allowed.append(spec.method)
        if found is not None:
            if found.id is not None:
                parse_id(found.id)
            return found
        if allowed:
            raise MethodNotAllowed(tuple(sorted(set(allowed))))
        raise NotFound("not found")

    def _match(self, spec: RouteSpec, path: str) -> str | None:
        """The id for a matching path ("" for routes without one), None for no match."""
        if not spec.bare:
            if not path.startswith(self.prefix):
                return None
            path = path[len(self.prefix) :]
        pattern = spec.pattern
        if "{id}" not in pattern:
            return "" if path in (pattern, pattern.rstrip("/")) else None
        head, tail = pattern.split("{id}")
        if not (path.startswith(head) and path.endswith(tail)) or len(path) <= len(head + tail):
            return None
        segment = path[len(head) : len(path) - len(tail)]
        return None if "/" in segment else segment
