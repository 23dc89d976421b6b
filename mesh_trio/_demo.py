"""Built-in demo actors for the embedded default.

They consume their own queues of the in-process transport and report to the internal port over
HTTP, exactly as an Asya sidecar does: the `received`/`processing` aliases with the route, FLY
events, and a final `succeeded` (or `failed`) status. With them, one command on a bare machine
gives a mesh whose envelopes really move.

- `echo`: answers with its payload.
- `story`: a three-actor route (`plan` → `write` → `review`) reporting progress at each hop;
  `write` streams the words of `payload.text` (or a default text) as FLY `{"token": ...}`
  events, `payload.delay` seconds apart (default 0.05).

Like a real sidecar, a post that fails for want of the mesh API (503, or a connection error) is
retried with a short, growing backoff for up to `RETRY_FOR` seconds; then the actor logs it once
and drops the envelope, which the backstop fails at its deadline. A status event is re-posted
even when the first try may have been applied (the status table ignores a repeat); a FLY token
only when it cannot have been (a repeat would show the token twice).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import trio

from mesh_proto import dumps, queue_name

from ._client import ConnectError, ExchangeError, HttpPool
from .transports import MemoryQueues

log = logging.getLogger("mesh_trio.demo")

DEMO_ACTORS = ("echo", "story")
ROUTE = ("plan", "write", "review")
DEFAULT_TEXT = "Envelopes travel the mesh one actor at a time, and every token arrives live."


RETRY_FOR = 10.0  # seconds a sidecar keeps re-posting one event
_BACKOFF = (0.05, 1.0)  # first and longest pause between tries


class _Unreachable(Exception):
    """A post still failed after `RETRY_FOR` seconds; already logged."""


class _Sidecar:
    """Posts events for one envelope to the internal port."""

    def __init__(self, pool: HttpPool, prefix: str, envelope_id: str) -> None:
        self.pool = pool
        self.envelope_id = envelope_id
        self.target = f"{prefix}/mesh/{envelope_id}/events"

    async def post(self, event: dict[str, Any]) -> None:
        """Post `event`, retrying as a sidecar does (see the module comment).

        Raises:
            _Unreachable: the mesh API did not take it within `RETRY_FOR` seconds (logged).
        """
        retry_after_sent = event.get("type") == "status"
        pause, longest = _BACKOFF
        deadline = trio.current_time() + RETRY_FOR
        while True:
            try:
                reply = await self.pool.request(
                    "POST",
                    self.target,
                    body=dumps(event),
                    headers=(("content-type", "application/json"),),
                )
            except ConnectError as exc:
                failure = str(exc)
            except ExchangeError as exc:
                if not retry_after_sent:
                    log.warning("demo event for %s lost: %s", self.envelope_id, exc)
                    raise _Unreachable from None
                failure = str(exc)
            else:
                if reply.status != 503:
                    if reply.status != 204:
                        log.warning("demo event refused: %s %s", reply.status, reply.body[:200])
                    return
                failure = f"503 {reply.body[:200]!r}"
            if trio.current_time() + pause > deadline:
                log.warning(
                    "demo event for %s not taken in %gs: %s", self.envelope_id, RETRY_FOR, failure
                )
                raise _Unreachable
            await trio.sleep(pause)
            pause = min(pause * 2, longest)

    async def status(self, status: str, data: dict[str, Any]) -> None:
        await self.post({"type": "status", "status": status, "data": data})


async def _echo(side: _Sidecar, payload: Any) -> None:
    await side.status("received", {"prev": [], "curr": "echo", "next": []})
    await side.status("succeeded", {"result": payload, "progress": 1.0})


async def _story(side: _Sidecar, payload: Any) -> None:
    options = payload if isinstance(payload, dict) else {}
    text = options.get("text")
    if not isinstance(text, str):
        text = DEFAULT_TEXT
    delay = options.get("delay", 0.05)
    delay = min(max(float(delay), 0.0), 5.0) if isinstance(delay, int | float) else 0.05
    for hop, actor in enumerate(ROUTE):
        route = {"prev": list(ROUTE[:hop]), "curr": actor, "next": list(ROUTE[hop + 1 :])}
        await side.status("processing", route)
        if actor == "write":
            for word in text.split():
                await side.post({"type": "fly", "data": {"token": word + " "}})
                await trio.sleep(delay)
    await side.status("succeeded", {"result": {"text": text}, "progress": 1.0})


async def _handle(pool: HttpPool, prefix: str, actor: str, raw: bytes) -> None:
    message = json.loads(raw)
    side = _Sidecar(pool, prefix, message["id"])
    try:
        await (_echo if actor == "echo" else _story)(side, message.get("payload"))
    except _Unreachable:
        pass
    except Exception as exc:
        with contextlib.suppress(_Unreachable):
            await side.status("failed", {"error": f"demo actor {actor}: {exc}"})


async def run_demo_actors(
    queues: MemoryQueues, *, namespace: str, internal_port: int, prefix: str
) -> None:
    """Consume the demo actors' queues until cancelled."""
    pool = HttpPool.tcp("127.0.0.1", internal_port)
    limiter = trio.Semaphore(64)

    async def consume(actor: str, nursery: trio.Nursery) -> None:
        queue = queue_name(namespace, actor)
        while True:
            raw = await queues.receive(queue)
            await limiter.acquire()

            async def work(raw: bytes = raw) -> None:
                try:
                    await _handle(pool, prefix, actor, raw)
                finally:
                    limiter.release()

            nursery.start_soon(work)

    try:
        async with trio.open_nursery() as nursery:
            for actor in DEMO_ACTORS:
                nursery.start_soon(consume, actor, nursery)
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()
