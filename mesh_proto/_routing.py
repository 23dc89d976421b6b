"""Routing: (port role, method, path) → operation, with the configurable prefix.

The route table is data (`ROUTES`), so the docs' route table is generated from it. 404 versus
405 (with `Allow`) is decided here, not by a web framework: a path that matches a route
pattern for this port but not with this method is a 405.

A runtime extension (the legacy routes of `mesh_compat`) adds rows of its own: a `Router`
built with `extra` specs, whose `op` is any enum member the extension names. Extra routes only
take what the core leaves: they are tried only when no core route has the path (with any
method), so a path the core serves is the core's for every method (`shadowed()` lists the extra
routes a prefix hides). And their `{id}` only matches an envelope id: with anything else in
that segment the path is not theirs, and the core's own answer (404 "not found") stands.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

import attrs

from ._errors import MethodNotAllowed, NotFound
from ._requests import _CANONICAL_ID, parse_id

# Any envelope id: where a route's path is needed without a particular envelope.
_SAMPLE_ID: Final = "00000000-0000-4000-8000-000000000000"


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
    """One row of the route table; `pattern` is relative to the prefix unless `bare`.

    `op` is an `Op` for the core's routes, a member of an extension's own enum for its rows.
    """

    role: Role
    method: str
    pattern: str
    op: enum.Enum
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

    op: enum.Enum
    id: str | None = None


def normalize_prefix(prefix: str) -> str:
    """`api/v1/` → `/api/v1`; `""` and `/` → `""`."""
    prefix = prefix.strip().strip("/")
    return "/" + prefix if prefix else ""


def _specs(specs: Iterable[RouteSpec]) -> tuple[RouteSpec, ...]:
    return tuple(specs)


def _shapes(specs: Iterable[RouteSpec]) -> dict[tuple[Role, str, str], enum.Enum]:
    """`(role, method, what follows "/mesh/{id}")` of the prefixed `/mesh/{id}...` routes."""
    return {
        (spec.role, spec.method, spec.pattern.removeprefix("/mesh/{id}")): spec.op
        for spec in specs
        if not spec.bare and spec.pattern.startswith("/mesh/{id}")
    }


@attrs.frozen
class Router:
    """Resolves requests for one prefix; build once, call `resolve` per request.

    `extra` holds an extension's route rows, after the core's (see the module comment).
    """

    prefix: str = attrs.field(converter=normalize_prefix)
    extra: tuple[RouteSpec, ...] = attrs.field(default=(), kw_only=True, converter=_specs)
    # The core's per-envelope routes by (role, method, pattern past the id), for `resolve`'s
    # fast path; the table, not this, decides everything else.
    _by_shape: dict[tuple[Role, str, str], enum.Enum] = attrs.field(
        init=False, eq=False, repr=False, factory=lambda: _shapes(ROUTES)
    )

    def resolve(self, role: Role, method: str, path: str) -> Route:
        """Resolve a request.

        Raises:
            NotFound: no route of this port has this path (or the id is not an envelope id).
            MethodNotAllowed: the path is known, the method is not; carries `Allow`.
        """
        # Fast path: `{prefix}/mesh/{id}[/...]` with a canonical id and a method its route
        # has (the requests of the hot paths); whatever it does not find takes the table walk.
        prefix = self.prefix
        if path.startswith(prefix) and path.startswith("/mesh/", len(prefix)):
            envelope_id, slash, rest = path[len(prefix) + 6 :].partition("/")
            op = self._by_shape.get((role, method, slash + rest))
            if op is not None and _CANONICAL_ID.fullmatch(envelope_id) is not None:
                return Route(op=op, id=envelope_id)
        route = self._lookup(ROUTES, role, method, path, strict=False)
        if route is None and self.extra:
            route = self._lookup(self.extra, role, method, path, strict=True)
        if route is None:
            raise NotFound("not found")
        return route

    def match(self, role: Role, path: str) -> Route | None:
        """The route whose path this is, whatever the method (None when no route has it).

        For a 405, this says whose path it was (so an extension can add its own headers);
        the id is the path's segment, not checked for core routes.
        """
        for specs, strict in ((ROUTES, False), (self.extra, True)):
            for spec in specs:
                if spec.role is role:
                    envelope_id = self._match(spec, path, strict=strict)
                    if envelope_id is not None:
                        return Route(op=spec.op, id=envelope_id or None)
        return None

    def path(self, spec: RouteSpec, envelope_id: str = _SAMPLE_ID) -> str:
        """The path of `spec` under this prefix, for one envelope."""
        base = "" if spec.bare else self.prefix
        return base + spec.pattern.replace("{id}", envelope_id)

    def shadowed(self) -> tuple[RouteSpec, ...]:
        """The extra routes this prefix hides: a core route has their path, so they never
        resolve."""
        return tuple(
            spec
            for spec in self.extra
            if any(
                core.role is spec.role
                and self._match(core, self.path(spec), strict=False) is not None
                for core in ROUTES
            )
        )

    def _lookup(
        self, specs: Iterable[RouteSpec], role: Role, method: str, path: str, *, strict: bool
    ) -> Route | None:
        """The route of `specs` for this request; None when none of them has the path."""
        allowed: list[str] = []
        for spec in specs:
            if spec.role is not role:
                continue
            envelope_id = self._match(spec, path, strict=strict)
            if envelope_id is None:
                continue
            if spec.method == method or (method == "HEAD" and spec.method == "GET"):
                if envelope_id:
                    parse_id(envelope_id)
                return Route(op=spec.op, id=envelope_id or None)
            allowed.append(spec.method)
        if allowed:
            raise MethodNotAllowed(tuple(sorted(set(allowed))))
        return None

    def _match(self, spec: RouteSpec, path: str, *, strict: bool) -> str | None:
        """The id for a matching path ("" for routes without one), None for no match.

        With `strict`, a segment that is not an envelope id is no match.
        """
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
        if "/" in segment:
            return None
        if strict:
            try:
                parse_id(segment)
            except NotFound:
                return None
        return segment
