"""mesh_compat: the pre-mesh-api gateway routes, translated onto the mesh API's core.

Off by default; `ASYA_MESH_COMPAT=1` makes `mesh_trio.serve` load this package by name as an
extension and call `routes(mesh, router)`, which returns the legacy routes of both ports: rows
of the core's route table with their handlers (see docs/compat.md). Translation is pure
(`_translate`); `_routes` and `_stream` only bind it to the `Mesh` operations through the
public `mesh_trio` extension API. `mesh_trio` never imports this package.
"""

from ._routes import LegacyHandlers, routes
from ._stream import LEGACY_DIALECT, legacy_stream
from ._translate import (
    FLY_LIMIT,
    LEGACY_KEEPALIVE,
    LEGACY_ROUTES,
    PROGRESS_WEIGHTS,
    SUCCESSORS,
    LegacyOp,
    LegacyProgress,
    active_reply,
    deprecation_headers,
    legacy_router,
    live_frame,
    parse_final,
    parse_fly,
    progress_reply,
    route_table,
    snapshot_frame,
    successor,
    task_json,
)

__all__ = [
    "FLY_LIMIT",
    "LEGACY_DIALECT",
    "LEGACY_KEEPALIVE",
    "LEGACY_ROUTES",
    "PROGRESS_WEIGHTS",
    "SUCCESSORS",
    "LegacyHandlers",
    "LegacyOp",
    "LegacyProgress",
    "active_reply",
    "deprecation_headers",
    "legacy_router",
    "legacy_stream",
    "live_frame",
    "parse_final",
    "parse_fly",
    "progress_reply",
    "route_table",
    "routes",
    "snapshot_frame",
    "successor",
    "task_json",
]
