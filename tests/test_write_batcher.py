"""Status writes of concurrent updates travel together (`WriteBatcher`, `POST /writes`).

The batcher is driven with a fake proxy first (what it sends, and what each caller gets back
when things go wrong), then through the real proxy on PostgreSQL: concurrent status events of
many envelopes all land, in fewer requests than events.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from functools import partial

import pytest
import trio
import trio.testing

from mesh_proto import (
    WRITES,
    Envelope,
    ServiceError,
    Status,
    StatusEvent,
    StoreReply,
    StoreRequest,
    decode_writes,
    put_request,
)
from mesh_trio._proxy_store import WriteBatcher, open_proxy_store
from mesh_trio.stateproxy import serve_state_proxy


def put(n: int, size: int = 10) -> StoreRequest:
    return put_request(f"msg/{n}", {"n": n, "pad": "x" * size}, if_rev=0)


class FakeProxy:
    """Answers each PUT 204 (a lone one, or each of a `POST /writes`) once `release` is set;
    records what it was sent."""

    def __init__(self) -> None:
        self.sent: list[StoreRequest] = []
        self.release = trio.Event()
        self.fail: Exception | None = None

    async def send(self, request: StoreRequest) -> StoreReply:
        self.sent.append(request)
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        if request.method == "PUT":
            return StoreReply(status=204)
        results = [
            {"status": 204, "body": {"n": i}} for i, _ in enumerate(decode_writes(request.body))
        ]
        return StoreReply(status=200, body=json.dumps({"results": results}).encode())


async def start(nursery: trio.Nursery, proxy: FakeProxy, **options: int) -> WriteBatcher:
    batcher = WriteBatcher(proxy.send, **options)
    await nursery.start(batcher.run)
    return batcher


async def test_puts_waiting_while_one_is_sent_go_together_in_order(nursery: trio.Nursery) -> None:
    proxy = FakeProxy()
    batcher = await start(nursery, proxy, senders=1)
    replies: dict[int, StoreReply] = {}

    async def call(n: int) -> None:
        replies[n] = await batcher.put(put(n))

    async with trio.open_nursery() as callers:
        callers.start_soon(call, 0)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(1, 6):
            callers.start_soon(call, n)
            await trio.testing.wait_all_tasks_blocked()
        proxy.release.set()
    assert [r.method for r in proxy.sent] == ["PUT", "POST"]
    assert proxy.sent[0] == put(0)
    batch = decode_writes(proxy.sent[1].body)
    assert [b"/keys/" + key + b"?" + query for key, query, _ in batch] == [
        put(n).target.encode() for n in range(1, 6)
    ]
    assert replies[0] == StoreReply(status=204)
    assert [replies[n] for n in range(1, 6)] == [
        StoreReply(status=204, body=json.dumps({"n": i}, separators=(",", ":")).encode())
        for i in range(5)
    ]
    assert batcher.batches == 1


async def test_a_batch_is_bounded_in_writes_and_bytes(nursery: trio.Nursery) -> None:
    proxy = FakeProxy()
    batcher = await start(nursery, proxy, senders=1, max_writes=3, max_bytes=2000)
    async with trio.open_nursery() as callers:
        callers.start_soon(batcher.put, put(0))
        await trio.testing.wait_all_tasks_blocked()
        sizes = [10, 10, 10, 10, 1500, 1500, 5000]
        for n, size in enumerate(sizes, 1):
            callers.start_soon(batcher.put, put(n, size))
            await trio.testing.wait_all_tasks_blocked()
        proxy.release.set()
    counts = [len(decode_writes(r.body)) if r.method == "POST" else 1 for r in proxy.sent]
    assert counts == [1, 3, 2, 1, 1]  # 3 small; 1 small + 1500; 1500 alone; 5000 alone


async def test_a_caller_cancelled_before_its_put_went_out_takes_it_back(
    nursery: trio.Nursery,
) -> None:
    proxy = FakeProxy()
    batcher = await start(nursery, proxy, senders=1)
    async with trio.open_nursery() as callers:
        callers.start_soon(batcher.put, put(0))
        await trio.testing.wait_all_tasks_blocked()
        scope = trio.CancelScope()
        callers.start_soon(partial(cancellable_put, batcher, put(1), scope))
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        callers.start_soon(batcher.put, put(2))
        await trio.testing.wait_all_tasks_blocked()
        proxy.release.set()
    assert [r.target for r in proxy.sent] == [put(0).target, put(2).target]


async def cancellable_put(
    batcher: WriteBatcher, request: StoreRequest, scope: trio.CancelScope
) -> None:
    with scope:
        await batcher.put(request)


async def test_a_caller_cancelled_after_its_batch_went_out_cuts_no_one_short(
    nursery: trio.Nursery,
) -> None:
    proxy = FakeProxy()
    batcher = await start(nursery, proxy, senders=1)
    got: list[StoreReply] = []
    scope = trio.CancelScope()

    async def keep(request: StoreRequest) -> None:
        got.append(await batcher.put(request))

    async with trio.open_nursery() as callers:
        callers.start_soon(partial(cancellable_put, batcher, put(0), scope))
        callers.start_soon(keep, put(1))
        await trio.testing.wait_all_tasks_blocked()
        assert len(proxy.sent) == 1  # both in one batch
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        proxy.release.set()
    assert len(got) == 1 and got[0].status == 204


async def test_a_failed_batch_fails_each_caller_with_its_own_error(nursery: trio.Nursery) -> None:
    proxy = FakeProxy()
    proxy.fail = ServiceError("state proxy unreachable: gone")
    batcher = await start(nursery, proxy, senders=1)
    errors: list[BaseException] = []

    async def call(n: int) -> None:
        try:
            await batcher.put(put(n))
        except ServiceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers:
        for n in range(4):
            callers.start_soon(call, n)
        await trio.testing.wait_all_tasks_blocked()
        proxy.release.set()
    assert len(errors) == 4 and len({id(e) for e in errors}) == 4
    assert all(str(e) == "state proxy unreachable: gone" for e in errors)
    proxy.fail = None  # the senders carry on
    assert (await batcher.put(put(9))).status == 204


@pytest.mark.postgres
@pytest.mark.parametrize("writes", [True, False])
async def test_concurrent_status_events_land_in_fewer_requests(
    nursery: trio.Nursery, pg_url: str, short_dir: str, writes: bool
) -> None:
    """Through our proxy the writes travel in batches; through one that does not list
    `writes` (the Go proxy), each goes alone, and all land either way."""
    path = os.path.join(short_dir, "proxy.sock")
    await nursery.start(partial(serve_state_proxy, path, pg_url))
    now = datetime.now(UTC)
    envelopes = [
        Envelope(
            id=f"batch-{n}", status=Status.PENDING, created_at=now, updated_at=now, data={"n": n}
        )
        for n in range(60)
    ]
    async with open_proxy_store(path) as store:
        await store.ping()  # the features first: then creates are cached, updates need no read
        for envelope in envelopes:
            await store.create(envelope)
        if not writes:
            assert store.features is not None and WRITES in store.features
            store.features = store.features - {WRITES}
        before = store.pool.statistics().requests

        async def advance(envelope: Envelope) -> None:
            for status in (Status.RUNNING, Status.SUCCEEDED):
                await store.update(envelope.id, StatusEvent(status=status), now)

        async with trio.open_nursery() as writers:
            for envelope in envelopes:
                writers.start_soon(advance, envelope)
        sent = store.pool.statistics().requests - before
        assert store.batcher is not None
        if writes:
            assert store.batcher.batches > 0 and sent < 2 * len(envelopes)
        else:
            assert store.batcher.batches == 0 and sent == 2 * len(envelopes)
        for envelope in envelopes:
            stored = await store.get(envelope.id)
            assert stored is not None and stored.status == Status.SUCCEEDED
