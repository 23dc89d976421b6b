"""The retention sweep: every interval, delete terminal envelopes older than the retention.

Off unless `ASYA_MESH_RETENTION` is set. A sweep deletes, in batches of at most `BATCH`, the
terminal envelopes whose `updated_at` is before now minus the retention (`Purging.purge`, one
conditional statement per batch: a live envelope is never among them), pausing `PAUSE` between
batches so that the store keeps serving other traffic, until a batch comes back short. Each
sweep that deleted something logs one INFO line and adds to `asya_mesh_retention_deleted_total`.

Through the state proxy each batch is one `POST /delete`, whose statement first tries a
transaction-scoped advisory lock: while one replica's batch runs, the others' delete nothing,
end their sweep and try again at their next interval, so replicas take turns instead of
contending for the same rows. A proxy that does not offer the delete (the Go one) turns retention
off, with one warning at startup. Through the state proxy each sweep also deletes the expired
idempotency claims (`idem/` keys, `ProxyStore.purge_claims`); the embedded stores drop theirs
as new ones are made.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Protocol

import trio

from mesh_proto import ServiceError

from ._metrics import MeshMetrics

log = logging.getLogger("mesh_trio.retention")
BATCH = 500
PAUSE = 0.05


class Purging(Protocol):
    async def purge(self, cutoff: datetime, limit: int) -> int:
        """Delete up to `limit` terminal envelopes last updated before `cutoff`; how many."""


async def sweep(store: Purging, cutoff: datetime, *, batch: int = BATCH) -> int:
    """Delete every terminal envelope last updated before `cutoff`, `batch` at a time.

    Raises:
        ServiceError: the store failed; what earlier batches deleted stays deleted.
    """
    return await _batches(lambda limit: store.purge(cutoff, limit), batch)


async def _batches(purge: Callable[[int], Awaitable[int]], batch: int) -> int:
    deleted = 0
    while True:
        count = await purge(batch)
        deleted += count
        if count < batch:
            return deleted
        await trio.sleep(PAUSE)


async def run_retention(
    store: Purging,
    metrics: MeshMetrics,
    *,
    retention: float,
    interval: float,
    clock: Callable[[], datetime],
    batch: int = BATCH,
) -> None:
    """Sweep every `interval` seconds until cancelled; logs store faults once per outage."""
    offered = await _offered(store)
    if offered is False:
        return
    failing = False
    while True:
        await trio.sleep(interval)
        try:
            if offered is None:  # the proxy did not answer at startup: ask again first
                offered = await _offered(store)
                if offered is False:
                    return
            now = clock()
            deleted = await sweep(store, now - timedelta(seconds=retention), batch=batch)
            claims = await _claims(store, now, batch)
        except ServiceError as exc:
            if not failing:
                log.warning("retention: store unavailable, will retry: %s", exc.message)
            failing = True
            continue
        if failing:
            log.info("retention: store available again")
            failing = False
        if deleted:
            metrics.retention_deleted.inc(deleted)
        log.log(
            logging.INFO if deleted or claims else logging.DEBUG,
            "retention: deleted %d terminal envelope(s) and %d expired idempotency claim(s)",
            deleted,
            claims,
        )


async def _claims(store: Purging, now: datetime, batch: int) -> int:
    from ._proxy_store import ProxyStore

    if not isinstance(store, ProxyStore):
        return 0
    return await _batches(lambda limit: store.purge_claims(now, limit), batch)


async def _offered(store: Purging) -> bool | None:
    """Whether the store can purge (None: the state proxy did not answer); warns once if not."""
    from ._proxy_store import ProxyStore  # imported only when used, as `open_store` does

    if not isinstance(store, ProxyStore):
        return True
    try:
        offered = await store.purges()
    except ServiceError:
        return None
    if not offered:
        log.warning(
            "retention is off: the state proxy does not offer POST /delete"
            " (ASYA_MESH_RETENTION needs mesh_trio's state proxy)"
        )
    return offered
