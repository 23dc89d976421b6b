"""An extension that claims a core op (tests/test_extension.py): the start must refuse it."""

from __future__ import annotations

from mesh_proto import Op, Role, Router, RouteSpec
from mesh_trio import ExtensionReply, ExtensionRequest, ExtensionRoute, Mesh


async def _never(request: ExtensionRequest) -> ExtensionReply:
    raise AssertionError("never called")  # pragma: no cover


def routes(mesh: Mesh, router: Router) -> list[ExtensionRoute]:
    spec = RouteSpec(role=Role.EXTERNAL, method="GET", pattern="/x", op=Op.GET, summary="")
    return [ExtensionRoute(spec=spec, handler=_never)]
