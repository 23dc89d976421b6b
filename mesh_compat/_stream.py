"""The legacy SSE stream (`GET /mesh/{id}/stream`): the mesh's own stream in another dialect.

`Mesh.stream` owns the whole loop (subscribe before the snapshot, the core's `SseStream`
deciding what passes, resync after a slow-client overflow, keepalive, end on terminal status);
this module only supplies the legacy encoding. Why not re-encode the new stream's bytes: its
catch-up frame (the whole envelope) and its live status frames (an event's data) are both
`event: status`, and after a resync a catch-up frame can turn up mid-stream, so a frame parser
could tell them apart only by guessing from the JSON's shape.

Snapshots are encoded from the `Envelope` itself, live frames from the `Published` events by the
pure `_translate` functions. Cost: a legacy subscriber parses each live frame once, where
new-API subscribers share bytes encoded once for all; legacy clients are few.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from mesh_trio import Mesh, SseDialect

from ._translate import LEGACY_KEEPALIVE, live_frame, snapshot_frame

LEGACY_DIALECT: Final = SseDialect(
    snapshot=snapshot_frame, live=live_frame, keepalive=LEGACY_KEEPALIVE
)


def legacy_stream(mesh: Mesh, envelope_id: str) -> AsyncIterator[bytes]:
    """The legacy SSE byte stream of one envelope (call `mesh.get` first, for a clean 404).

    Ends after a terminal status, when the broadcaster closes (shutdown), when the envelope
    disappears, or when the caller stops iterating.
    """
    return mesh.stream(envelope_id, LEGACY_DIALECT)
