"""The legacy SSE stream (`GET /mesh/{id}/stream`) over the mesh's hub.

Why not re-encode `Mesh.stream`'s bytes: its catch-up frame (the whole envelope) and its live
status frames (an event's data) are both `event: status`, and after a slow-client resync a
catch-up frame can turn up mid-stream, so a frame parser could tell them apart only by guessing
from the JSON's shape. Driving the same pieces directly keeps every decision exact:

- the subscription is opened before the snapshot is read (`mesh.hub.subscribe`), so nothing
  published in between is lost;
- the core's `SseStream` decides what passes: it drops status events the snapshot already holds
  (by revision), ends the stream after a terminal status, and says when a keepalive is due;
- a resync (the hub discarded frames for this slow client) re-reads the envelope and sends a
  fresh snapshot, like the new stream does.

What differs is only the encoding, done by the pure `_translate` functions: snapshots come from
the `Envelope` itself, live frames from the `Published` events. Cost: a legacy subscriber parses
each live frame once, where new-API subscribers share bytes encoded once for all; legacy
clients are few, and the new stream is untouched.

The loop follows the runtime's SSE etiquette: wait with a timeout inside a cancel scope, leave
the scope, then yield; the subscription is dropped in `finally` (the `with` block).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from mesh_proto import SseStream
from mesh_trio import Mesh

from ._translate import LEGACY_KEEPALIVE, live_frame, snapshot_frame


async def legacy_stream(mesh: Mesh, envelope_id: str) -> AsyncIterator[bytes]:
    """The legacy SSE byte stream of one envelope (call `mesh.get` first, for a clean 404).

    Ends after a terminal status, when the hub closes (shutdown), when the envelope disappears,
    or when the caller stops iterating.
    """
    state = SseStream(keepalive=mesh.keepalive)
    with mesh.hub.subscribe(envelope_id) as sub:
        envelope = await mesh.store.get(envelope_id)
        if envelope is None:
            return
        state.catch_up(envelope)
        yield snapshot_frame(envelope)
        state.sent(trio.current_time())
        while not state.done:
            with trio.move_on_after(state.keepalive_in(trio.current_time())):
                await sub.wait()
            pending, resync = sub.take()
            frames: list[bytes] = []
            if resync:
                envelope = await mesh.store.get(envelope_id)
                if envelope is None:
                    return
                state.catch_up(envelope)
                frames.append(snapshot_frame(envelope))
            now = mesh.clock()
            for published in pending:
                # One event at a time, so the core's verdict is known for each of them.
                if state.live([published]):
                    frames.append(live_frame(envelope_id, published, now))
            chunk = b"".join(frames)
            if not chunk and state.keepalive_in(trio.current_time()) == 0:
                chunk = LEGACY_KEEPALIVE
            if chunk:
                yield chunk
                state.sent(trio.current_time())
            if sub.closed:
                return
