"""A small extension for tests/test_extension.py, loaded by name like `mesh_compat`.

One route per port: `POST /sample/{id}/echo` (internal) answers the body it read with an 8-byte
limit; `GET /sample/{id}` (external) answers the envelope's status, or streams it with
`?stream=1`. Every response of both paths carries `X-Sample: <id>`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator

from mesh_proto import Role, Router, RouteSpec, dumps
from mesh_trio import ExtensionReply, ExtensionRequest, ExtensionRoute, Mesh

LIMIT = 8


class SampleOp(enum.Enum):
    ECHO = "echo"
    STATUS = "status"


def _headers(envelope_id: str | None) -> tuple[tuple[str, str], ...]:
    return (("X-Sample", envelope_id or ""),)


def routes(mesh: Mesh, router: Router) -> list[ExtensionRoute]:
    async def echo(request: ExtensionRequest) -> ExtensionReply:
        body = await request.read(LIMIT)
        return ExtensionReply(
            body=dumps({"id": request.id, "body": body.decode()}), headers=(("X-Echo", "1"),)
        )

    async def status(request: ExtensionRequest) -> ExtensionReply:
        assert request.id is not None
        envelope = await mesh.get(request.id)
        if request.query == b"stream=1":

            async def chunks() -> AsyncIterator[bytes]:
                yield b"data: " + str(envelope.status).encode() + b"\n\n"
                yield b": done\n\n"

            return ExtensionReply(stream=chunks())
        return ExtensionReply(status=203, body=dumps({"status": str(envelope.status)}))

    return [
        ExtensionRoute(
            spec=RouteSpec(
                role=Role.INTERNAL,
                method="POST",
                pattern="/sample/{id}/echo",
                op=SampleOp.ECHO,
                summary="echo",
                bare=True,
            ),
            handler=echo,
            headers=_headers,
        ),
        ExtensionRoute(
            spec=RouteSpec(
                role=Role.EXTERNAL,
                method="GET",
                pattern="/sample/{id}",
                op=SampleOp.STATUS,
                summary="status",
            ),
            handler=status,
            headers=_headers,
        ),
    ]
