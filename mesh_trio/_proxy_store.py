"""The state-proxy store: `Store` over HTTP/1.1 on a Unix socket (DESIGN §6).

Every operation is a `mesh_proto` procedure (a generator of `StoreRequest`s) driven here over
a keep-alive connection pool, so status updates get the core's conditional-update guarantee:
read, decide with the status table, `PUT ?if_status=<read status>`, re-read on 409.

Faults map to `ServiceError` (503 to the client) within the pool's timeout: the socket missing
or the proxy down, a reply cut short, a 5xx from the proxy. A write whose request may have
reached the proxy is never re-sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TypeVar

import attrs

from mesh_proto import (
    Envelope,
    Outcome,
    ServiceError,
    Status,
    StatusEvent,
    StoreReply,
    StoreRequest,
    check_delete,
    check_health,
    create_envelope,
    delete_request,
    envelope_key,
    expired_request,
    get_request,
    health_request,
    list_request,
    read_envelope,
    read_rows,
    update_status,
)

from ._client import ConnectError, ExchangeError, HttpPool, unix_opener

T = TypeVar("T")


@attrs.define(eq=False)
class ProxyStore:
    pool: HttpPool

    async def _send(self, request: StoreRequest) -> StoreReply:
        try:
            reply = await self.pool.request(
                request.method, request.target, body=request.body, headers=request.headers
            )
        except ConnectError as exc:
            raise ServiceError(f"state proxy unreachable: {exc}") from None
        except ExchangeError as exc:
            raise ServiceError(f"state proxy request failed: {exc}") from None
        return StoreReply(status=reply.status, body=reply.body)

    async def _drive(self, procedure: Generator[StoreRequest, StoreReply, T]) -> T:
        request = next(procedure)
        while True:
            reply = await self._send(request)
            try:
                request = procedure.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def ping(self) -> None:
        check_health(await self._send(health_request()))

    async def create(self, envelope: Envelope) -> None:
        await self._drive(create_envelope(envelope))

    async def get(self, envelope_id: str) -> Envelope | None:
        return read_envelope(envelope_id, await self._send(get_request(envelope_key(envelope_id))))

    async def update(self, envelope_id: str, event: StatusEvent, now: datetime) -> Outcome | None:
        return await self._drive(update_status(envelope_id, event, now))

    async def delete(self, envelope_id: str) -> bool:
        return check_delete(await self._send(delete_request(envelope_key(envelope_id))))

    async def list(
        self, status: Status | None, limit: int, offset: int
    ) -> tuple[Sequence[Envelope], int]:
        envelopes, total = read_rows(await self._send(list_request(status, limit, offset)))
        return envelopes, total if total is not None else offset + len(envelopes)

    async def expired(self, now: datetime, limit: int) -> Sequence[Envelope]:
        envelopes, _ = read_rows(await self._send(expired_request(now, limit)))
        return envelopes


@asynccontextmanager
async def open_proxy_store(
    socket_path: str, *, timeout: float = 5.0, connections: int = 32
) -> AsyncIterator[ProxyStore]:
    pool = HttpPool(unix_opener(socket_path), host="state-proxy", size=connections, timeout=timeout)
    try:
        yield ProxyStore(pool)
    finally:
        await pool.aclose()
