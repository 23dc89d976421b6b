"""Routing (docs/contract.md): the prefix, 404 versus 405 with `Allow`, and the two port roles."""

from __future__ import annotations

import enum

import pytest

from mesh_proto import ROUTES, MethodNotAllowed, NotFound, Op, Role, Route, Router, RouteSpec

from ._support import ID

EXT, INT = Role.EXTERNAL, Role.INTERNAL
ROUTER = Router("/api/v1")


def case_id(role: Role, method: str, path: str, *_: object) -> str:
    return f"{role.value}-{method}-{path.replace(ID, '{id}') or 'empty'}"


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("/api/v1", "/api/v1"), ("api/v1/", "/api/v1"), ("/api/v1/", "/api/v1"),
     (" /gw ", "/gw"), ("", ""), ("/", ""), ("//", "")],
    ids=repr,
)  # fmt: skip
def test_prefix_normalisation(raw: str, normalised: str) -> None:
    assert Router(raw).prefix == normalised
    assert Router(raw) == Router(normalised)


RESOLVED = [
    # role, method, path, op, with id
    (EXT, "POST", "/api/v1/mesh/", Op.CREATE, False),
    (EXT, "POST", "/api/v1/mesh", Op.CREATE, False),
    (EXT, "GET", "/api/v1/mesh/", Op.LIST, False),
    (EXT, "HEAD", "/api/v1/mesh/", Op.LIST, False),
    (EXT, "GET", f"/api/v1/mesh/{ID}", Op.GET, True),
    (EXT, "HEAD", f"/api/v1/mesh/{ID}", Op.GET, True),
    (EXT, "DELETE", f"/api/v1/mesh/{ID}", Op.CANCEL, True),
    (EXT, "GET", f"/api/v1/mesh/{ID}/events", Op.STREAM, True),
    (EXT, "GET", "/health", Op.HEALTH, False),
    (EXT, "HEAD", "/health", Op.HEALTH, False),
    (EXT, "GET", "/ready", Op.READY, False),
    (INT, "POST", f"/api/v1/mesh/{ID}/events", Op.PUBLISH, True),
    (INT, "GET", f"/api/v1/mesh/{ID}", Op.GET, True),
    (INT, "HEAD", f"/api/v1/mesh/{ID}", Op.GET, True),
    (INT, "GET", "/health", Op.HEALTH, False),
    (INT, "GET", "/ready", Op.READY, False),
]


@pytest.mark.parametrize(
    ("role", "method", "path", "op", "with_id"),
    [pytest.param(*row, id=case_id(*row[:3])) for row in RESOLVED],
)
def test_resolves(role: Role, method: str, path: str, op: Op, with_id: bool) -> None:
    assert ROUTER.resolve(role, method, path) == Route(op=op, id=ID if with_id else None)


@pytest.mark.parametrize(
    ("role", "method", "path", "allow"),
    [
        pytest.param(*case, id=case_id(*case))
        for case in [
            (EXT, "PUT", "/api/v1/mesh/", "GET, POST"),
            (EXT, "DELETE", "/api/v1/mesh", "GET, POST"),
            (EXT, "POST", f"/api/v1/mesh/{ID}", "DELETE, GET"),
            (EXT, "PATCH", f"/api/v1/mesh/{ID}", "DELETE, GET"),
            (EXT, "POST", f"/api/v1/mesh/{ID}/events", "GET"),
            (EXT, "POST", "/health", "GET"),
            (EXT, "DELETE", "/ready", "GET"),
            (EXT, "get", "/health", "GET"),
            (INT, "DELETE", f"/api/v1/mesh/{ID}", "GET"),
            (INT, "GET", f"/api/v1/mesh/{ID}/events", "POST"),
            (INT, "PUT", "/health", "GET"),
            # The path has the shape of a route, so the method is what is wrong.
            (EXT, "PUT", "/api/v1/mesh/not-an-id", "DELETE, GET"),
        ]
    ],
)
def test_known_path_wrong_method_is_405_with_allow(
    role: Role, method: str, path: str, allow: str
) -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        ROUTER.resolve(role, method, path)
    error = caught.value
    assert error.status_hint == 405
    assert error.headers == (("allow", allow),)
    assert error.allowed == tuple(allow.split(", "))
    assert error.body() == b'{"error": "method not allowed"}'


@pytest.mark.parametrize(
    ("role", "method", "path", "message"),
    [
        pytest.param(*case, id=case_id(*case))
        for case in [
            (EXT, "GET", "/", "not found"),
            (EXT, "GET", "", "not found"),
            (EXT, "GET", "/api/v1", "not found"),
            (EXT, "GET", "/api/v1/", "not found"),
            (EXT, "GET", "/mesh/", "not found"),
            (EXT, "GET", "/api/v2/mesh/", "not found"),
            (EXT, "GET", "/api/v1x/mesh/", "not found"),
            (EXT, "GET", "/api/v1/mesh//events", "not found"),
            (EXT, "GET", f"/api/v1/mesh/{ID}/", "not found"),
            (EXT, "GET", f"/api/v1/mesh/{ID}/events/", "not found"),
            (EXT, "GET", f"/api/v1/mesh/{ID}/other", "not found"),
            (EXT, "GET", f"/api/v1/mesh/a/{ID}", "not found"),
            (EXT, "GET", "/api/v1/health", "not found"),
            (EXT, "GET", "/health/", "not found"),
            (EXT, "GET", "/healthz", "not found"),
            (EXT, "GET", "/api/v1/mesh/not-an-id", "envelope not found"),
            (EXT, "DELETE", f"/api/v1/mesh/{ID.upper()}", "envelope not found"),
            (INT, "GET", f"/api/v1/mesh/{ID}\n", "envelope not found"),
            (INT, "POST", f"/api/v1/mesh/{{{ID}}}/events", "envelope not found"),
            (INT, "POST", f"/api/v1/mesh/urn:uuid:{ID}/events", "envelope not found"),
            (INT, "GET", f"/api/v1/mesh/{ID.replace('-', '')}", "envelope not found"),
            (EXT, "GET", "/api/v1/mesh/../events", "envelope not found"),
            (INT, "GET", "/api/v1/mesh/", "not found"),
            (INT, "POST", "/api/v1/mesh/", "not found"),
            (INT, "POST", "/api/v1/mesh/x/events", "envelope not found"),
        ]
    ],
)
def test_unknown_path_is_404(role: Role, method: str, path: str, message: str) -> None:
    with pytest.raises(NotFound) as caught:
        ROUTER.resolve(role, method, path)
    assert caught.value.message == message
    assert caught.value.headers == ()


@pytest.mark.parametrize("prefix", ["", "/", "api/v1/", "/gw/mesh-api"], ids=repr)
def test_every_route_under_any_prefix(prefix: str) -> None:
    router = Router(prefix)
    for spec in ROUTES:
        base = "" if spec.bare else router.prefix
        path = base + spec.pattern.replace("{id}", ID)
        route = router.resolve(spec.role, spec.method, path)
        assert route == Route(op=spec.op, id=ID if "{id}" in spec.pattern else None)


def test_empty_prefix_puts_the_api_under_mesh() -> None:
    router = Router("")
    assert router.resolve(EXT, "GET", "/mesh/") == Route(op=Op.LIST)
    assert router.resolve(EXT, "GET", f"/mesh/{ID}/events") == Route(op=Op.STREAM, id=ID)
    assert router.resolve(INT, "GET", "/ready") == Route(op=Op.READY)
    with pytest.raises(NotFound):
        router.resolve(EXT, "GET", "/api/v1/mesh/")


def test_route_table_shape() -> None:
    by_role = {
        role: sorted((s.method, s.pattern, s.op.value) for s in ROUTES if s.role is role)
        for role in Role
    }
    assert by_role[EXT] == [
        ("DELETE", "/mesh/{id}", "cancel"),
        ("GET", "/health", "health"),
        ("GET", "/mesh/", "list"),
        ("GET", "/mesh/{id}", "get"),
        ("GET", "/mesh/{id}/events", "stream"),
        ("GET", "/ready", "ready"),
        ("POST", "/mesh/", "create"),
    ]
    assert by_role[INT] == [
        ("GET", "/health", "health"),
        ("GET", "/mesh/{id}", "get"),
        ("GET", "/ready", "ready"),
        ("POST", "/mesh/{id}/events", "publish"),
    ]
    assert all(s.bare == (s.op in (Op.HEALTH, Op.READY)) for s in ROUTES)


# --- extra routes (an extension's rows) -------------------------------------------------------


class Extra(enum.Enum):
    POKE = "poke"
    PEEK = "peek"
    SHADOWED = "shadowed"
    TOP = "top"


EXTRA = tuple(
    RouteSpec(role=role, method=method, pattern=pattern, op=op, summary="", bare=bare)
    for role, method, pattern, op, bare in (
        (INT, "POST", "/mesh/{id}/poke", Extra.POKE, True),
        (EXT, "GET", "/mesh/{id}/peek", Extra.PEEK, True),
        (EXT, "GET", "/mesh/{id}", Extra.SHADOWED, True),
        (EXT, "PUT", "/top", Extra.TOP, False),
    )
)


@pytest.mark.parametrize("prefix", ["/api/v1", ""], ids=repr)
def test_extra_routes_resolve_next_to_the_core(prefix: str) -> None:
    router = Router(prefix, extra=EXTRA)
    assert router.resolve(INT, "POST", f"/mesh/{ID}/poke") == Route(op=Extra.POKE, id=ID)
    assert router.resolve(EXT, "HEAD", f"/mesh/{ID}/peek") == Route(op=Extra.PEEK, id=ID)
    assert router.resolve(EXT, "PUT", f"{router.prefix}/top") == Route(op=Extra.TOP)
    # The core's routes are unchanged.
    for spec in ROUTES:
        route = router.resolve(spec.role, spec.method, router.path(spec, ID))
        assert route.op is spec.op
    with pytest.raises(MethodNotAllowed) as caught:
        router.resolve(EXT, "DELETE", f"/mesh/{ID}/peek")
    assert caught.value.allowed == ("GET",)
    with pytest.raises(NotFound):
        router.resolve(EXT, "POST", f"/mesh/{ID}/poke")  # another port's extra route


def test_a_path_the_core_serves_is_the_cores_for_every_method() -> None:
    router = Router("", extra=EXTRA)
    assert router.shadowed() == (EXTRA[2],)
    assert router.resolve(EXT, "GET", f"/mesh/{ID}") == Route(op=Op.GET, id=ID)
    with pytest.raises(MethodNotAllowed) as caught:
        router.resolve(EXT, "PUT", f"/mesh/{ID}")
    assert caught.value.allowed == ("DELETE", "GET")
    with pytest.raises(NotFound) as not_found:
        router.resolve(EXT, "GET", "/mesh/not-an-id")
    assert not_found.value.message == "envelope not found"
    assert Router("/api/v1", extra=EXTRA).shadowed() == ()
    assert Router("/api/v1", extra=EXTRA).resolve(EXT, "GET", f"/mesh/{ID}").op is Extra.SHADOWED


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        (INT, "POST", "/mesh/task-1/poke"),
        (INT, "GET", f"/mesh/{ID.upper()}/poke"),
        (EXT, "GET", "/mesh/a/b/peek"),
        (EXT, "GET", "/mesh//peek"),
        (EXT, "GET", "/nope"),
    ],
)
def test_extra_routes_take_only_envelope_ids(role: Role, method: str, path: str) -> None:
    """Anything else in the id segment is not an extra route's path: the core's 404 stands."""
    router = Router("/api/v1", extra=EXTRA)
    with pytest.raises(NotFound) as caught:
        router.resolve(role, method, path)
    assert caught.value.message == "not found"
    assert router.match(role, path) is None


def test_match_names_the_route_of_a_path_whatever_the_method() -> None:
    router = Router("/api/v1", extra=EXTRA)
    assert router.match(EXT, f"/mesh/{ID}/peek") == Route(op=Extra.PEEK, id=ID)
    assert router.match(INT, f"/mesh/{ID}/poke") == Route(op=Extra.POKE, id=ID)
    assert router.match(EXT, f"/api/v1/mesh/{ID}") == Route(op=Op.GET, id=ID)
    assert router.match(EXT, "/api/v1/mesh/not-an-id") == Route(op=Op.GET, id="not-an-id")
    assert router.match(EXT, "/health") == Route(op=Op.HEALTH)
    assert router.match(INT, "/api/v1/top") is None
    assert Router("/api/v1").match(EXT, f"/mesh/{ID}/peek") is None


def test_extra_routes_are_part_of_the_routers_value() -> None:
    assert Router("/api/v1", extra=list(EXTRA)) == Router("api/v1", extra=EXTRA)
    assert Router("/api/v1", extra=EXTRA) != Router("/api/v1")
    assert Router("/api/v1").path(ROUTES[2], ID) == f"/api/v1/mesh/{ID}"
    assert Router("/gw").path(EXTRA[0], ID) == f"/mesh/{ID}/poke"
