"""The deadline backstop: every interval, fail the live envelopes whose deadline passed.

Candidates come from a store query on `deadline_at`; the core decides which expired
(`mesh_proto.expired`) and each is failed through the ordinary conditional update with
`EXPIRE_EVENT`, so an envelope that finished meanwhile is left alone, and with several
replicas exactly one of them wins each transition (the others' updates are ignored as stale).
Every replica runs it; nothing coordinates them beyond that conditional write. The winner's
write publishes the `failed` event on the state proxy's bus in the same transaction
(`_bus.py`), so every replica's subscribers get it exactly once and the losers publish nothing.
"""

from __future__ import annotations

import logging

import trio

from mesh_proto import EXPIRE_EVENT, Applied, NotFound, ServiceError, expired

from ._mesh import Mesh

log = logging.getLogger("mesh_trio.backstop")
BATCH = 500


async def expire_once(mesh: Mesh) -> int:
    """Fail every envelope expired now; returns how many this process failed."""
    now = mesh.clock()
    failed = 0
    while True:
        candidates = await mesh.store.expired(now, BATCH)
        progressed = False
        for envelope_id in expired(candidates, now):
            try:
                outcome = await mesh.apply(envelope_id, EXPIRE_EVENT)
            except NotFound:
                continue
            progressed = True
            failed += isinstance(outcome, Applied)
        if len(candidates) < BATCH or not progressed:
            return failed


async def run_backstop(mesh: Mesh, interval: float) -> None:
    """Run `expire_once` every `interval` seconds until cancelled; logs faults once."""
    failing = False
    while True:
        await trio.sleep(interval)
        try:
            failed = await expire_once(mesh)
        except ServiceError as exc:
            mesh.metrics.backstop_errors.inc()
            if not failing:
                log.warning("backstop: store unavailable, will retry: %s", exc.message)
            failing = True
            continue
        if failing:
            log.info("backstop: store available again")
            failing = False
        if failed:
            mesh.metrics.backstop_expired.inc(failed)
            log.info("backstop: %d envelope(s) timed out", failed)
