"""The legacy routes bound to the mesh: this package's extension entry point, `routes()`.

`mesh_trio` loads `mesh_compat` by name when `ASYA_MESH_COMPAT=1` and calls
`routes(mesh, router)` (the `mesh_trio.Extension` API). The answer is one `ExtensionRoute` per
row of `LEGACY_ROUTES`: the row itself, which the runtime adds to the core's `Router` (so the
core decides 404 versus 405, and which route wins where paths overlap), a handler, and the
`Deprecation`/`Link` headers that every response of the path carries, errors included.

Handlers only bind the pure translators of `_translate` to `Mesh` operations: read the body
(with the legacy limit: 1 MiB for `/fly`), translate, run the operation, translate the answer.
They raise the core's `ProtocolError`s, which the runtime answers with the contract's body.
"""

from __future__ import annotations

from functools import partial

import attrs

from mesh_proto import MAX_BODY, Router, dumps
from mesh_trio import ExtensionReply, ExtensionRequest, ExtensionRoute, Mesh

from ._stream import legacy_stream
from ._translate import (
    FLY_LIMIT,
    LEGACY_ROUTES,
    OK,
    LegacyOp,
    LegacyProgress,
    active_reply,
    deprecation_headers,
    parse_final,
    parse_fly,
    progress_reply,
    task_json,
)


def _envelope_id(request: ExtensionRequest) -> str:
    assert request.id is not None  # every legacy route has an id in its path
    return request.id


@attrs.frozen
class LegacyHandlers:
    """One handler per legacy op, over one mesh."""

    mesh: Mesh

    async def progress(self, request: ExtensionRequest) -> ExtensionReply:
        envelope_id = _envelope_id(request)
        report = LegacyProgress.parse(envelope_id, await request.read(MAX_BODY))
        stored = await self.mesh.get(envelope_id)
        outcome = await self.mesh.apply(envelope_id, report.event(stored))
        return ExtensionReply(body=dumps(progress_reply(outcome.envelope)))

    async def final(self, request: ExtensionRequest) -> ExtensionReply:
        envelope_id = _envelope_id(request)
        await self.mesh.apply(envelope_id, parse_final(envelope_id, await request.read(MAX_BODY)))
        return ExtensionReply(body=dumps(OK))

    async def fly(self, request: ExtensionRequest) -> ExtensionReply:
        data = parse_fly(await request.read(FLY_LIMIT))
        await self.mesh.publish_fly(_envelope_id(request), data)
        return ExtensionReply(body=dumps(OK))

    async def stream(self, request: ExtensionRequest) -> ExtensionReply:
        envelope_id = _envelope_id(request)
        await self.mesh.get(envelope_id)  # a 404 before any stream bytes
        return ExtensionReply(stream=legacy_stream(self.mesh, envelope_id))

    async def active(self, request: ExtensionRequest) -> ExtensionReply:
        status, reply = active_reply(await self.mesh.get(_envelope_id(request)))
        return ExtensionReply(status=status, body=dumps(reply))

    async def task(self, request: ExtensionRequest) -> ExtensionReply:
        return ExtensionReply(body=dumps(task_json(await self.mesh.get(_envelope_id(request)))))


def _headers(prefix: str, op: LegacyOp, envelope_id: str | None) -> tuple[tuple[str, str], ...]:
    return deprecation_headers(prefix, op, envelope_id or "")


def routes(mesh: Mesh, router: Router) -> tuple[ExtensionRoute, ...]:
    """The legacy routes of both ports over `mesh`; `router` is the new API's (its prefix goes
    into the `Link` headers)."""
    handlers = LegacyHandlers(mesh)
    mounted = []
    for spec in LEGACY_ROUTES:
        assert isinstance(spec.op, LegacyOp)
        mounted.append(
            ExtensionRoute(
                spec=spec,
                handler=getattr(handlers, spec.op.value),
                headers=partial(_headers, router.prefix, spec.op),
            )
        )
    return tuple(mounted)
