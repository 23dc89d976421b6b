"""mesh_compat: the pre-mesh-api gateway routes, translated onto the mesh API's core.

Off by default; `ASYA_MESH_COMPAT=1` makes `mesh_trio.serve` load this package by name and call
`install(external_app, mesh, router)`, which mounts the legacy client routes on the external
app and returns the ASGI app serving the legacy sidecar routes on the internal port (see
docs/compat.md). Translation is pure (`_translate`); `_routes`, `_internal` and `_stream` only
bind it to quart, ASGI and the hub. `mesh_trio` never imports this package.
"""

from ._internal import LegacyInternalApp
from ._routes import install
from ._stream import legacy_stream
from ._translate import (
    FLY_LIMIT,
    LEGACY_KEEPALIVE,
    LEGACY_ROUTES,
    PROGRESS_WEIGHTS,
    LegacyMatch,
    LegacyOp,
    LegacyProgress,
    LegacyRoute,
    LegacyRouter,
    active_reply,
    live_frame,
    parse_final,
    parse_fly,
    progress_reply,
    route_table,
    snapshot_frame,
    task_json,
)

__all__ = [
    "FLY_LIMIT",
    "LEGACY_KEEPALIVE",
    "LEGACY_ROUTES",
    "PROGRESS_WEIGHTS",
    "LegacyInternalApp",
    "LegacyMatch",
    "LegacyOp",
    "LegacyProgress",
    "LegacyRoute",
    "LegacyRouter",
    "active_reply",
    "install",
    "legacy_stream",
    "live_frame",
    "parse_final",
    "parse_fly",
    "progress_reply",
    "route_table",
    "snapshot_frame",
    "task_json",
]
