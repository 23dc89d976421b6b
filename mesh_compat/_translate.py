"""Pure translation between the legacy gateway's wire shapes and the `mesh_proto` core.

Nothing here does I/O, reads a clock or awaits: legacy request bodies go in and come out as
core inputs (`StatusEvent`s, FLY data), and core outputs (`Envelope`s, `Published` frames) go
in and come out as legacy replies and SSE frames. The runtime modules (`_routes`, `_stream`)
only move bytes between sockets and these functions, so every legacy shape is
table-tested without a server (`tests/test_compat_translate.py`).

The pieces:

- `LEGACY_ROUTES`, the legacy route table: rows of the core's own route table
  (`mesh_proto.RouteSpec`, ops of `LegacyOp`), resolved by the core's `Router` as extra rows
  (`legacy_router`). A path the new API serves (with any method) belongs to the new API: with
  `ASYA_MESH_API_PREFIX=""` the new `GET /mesh/{id}` wins over the legacy one, which is then
  never reached (`Router.shadowed()`). Legacy ids must be canonical UUIDs, like the new API's;
  anything else is not a legacy path and gets the contract's 404. `SUCCESSORS` and
  `deprecation_headers` name the new route replacing each legacy one.
- Sidecar bodies: `LegacyProgress` (`/progress`), `parse_final` (`/final`), `parse_fly`
  (`/fly`). Each parser raises only `ClientError`s, before anything is stored.
- Client views: `task_json` (legacy `GET /mesh/{id}`), `active_reply` (`/active`), and the
  legacy SSE frames (`snapshot_frame`, `live_frame`, `LEGACY_KEEPALIVE`).

Legacy progress is weighted per hop (received 0.1, processing 0.5, completed 1.0 of the current
hop) and never goes down: the event carries the larger of the computed and the stored percent,
and then goes through the core's status table like any other event, so the same monotonic
status rules hold for legacy and new sidecars alike.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

import attrs

from mesh_proto import (
    MAX_DEPTH,
    BadRequest,
    Envelope,
    PayloadTooLarge,
    Published,
    Role,
    Router,
    RouteSpec,
    SseParser,
    Status,
    StatusEvent,
    check_body_size,
    dumps,
    format_time,
    loads,
)

# Share of the current hop that each legacy sidecar state stands for.
PROGRESS_WEIGHTS: Final[Mapping[str, float]] = {
    "received": 0.1,
    "processing": 0.5,
    "completed": 1.0,
}
# Legacy FLY bodies were capped at 1 MiB (the new events route allows the general 10 MiB).
FLY_LIMIT: Final = 1024 * 1024
FINAL_STATUSES: Final = (Status.SUCCEEDED, Status.FAILED)
LEGACY_KEEPALIVE: Final = b": keepalive\n\n"
OK: Final[Mapping[str, str]] = {"status": "ok"}
PERCENT_KEPT: Final = frozenset({"progress_percent"})


class LegacyOp(enum.Enum):
    PROGRESS = "progress"
    FINAL = "final"
    FLY = "fly"
    STREAM = "stream"
    ACTIVE = "active"
    TASK = "task"


# The new route replacing each legacy one (under the configured prefix).
SUCCESSORS: Final[Mapping[LegacyOp, str]] = {
    LegacyOp.PROGRESS: "/mesh/{id}/events",
    LegacyOp.FINAL: "/mesh/{id}/events",
    LegacyOp.FLY: "/mesh/{id}/events",
    LegacyOp.STREAM: "/mesh/{id}/events",
    LegacyOp.ACTIVE: "/mesh/{id}",
    LegacyOp.TASK: "/mesh/{id}",
}

_E, _I = Role.EXTERNAL, Role.INTERNAL
# Rows of the core's route table (`mesh_proto.RouteSpec`), bare: old components look for them
# at `/mesh/...` whatever the prefix.
LEGACY_ROUTES: Final[tuple[RouteSpec, ...]] = tuple(
    RouteSpec(role=role, method=method, pattern=pattern, op=op, summary=summary, bare=True)
    for role, method, pattern, op, summary in (
        (
            _I,
            "POST",
            "/mesh/{id}/progress",
            LegacyOp.PROGRESS,
            'sidecar progress; 200 {"status": "ok", "progress_percent"}',
        ),
        (
            _I,
            "POST",
            "/mesh/{id}/final",
            LegacyOp.FINAL,
            'final status (succeeded, failed); 200 {"status": "ok"}',
        ),
        (
            _I,
            "POST",
            "/mesh/{id}/fly",
            LegacyOp.FLY,
            'FLY event, any JSON up to 1 MiB; 200 {"status": "ok"}, 413',
        ),
        (
            _E,
            "GET",
            "/mesh/{id}/stream",
            LegacyOp.STREAM,
            "legacy SSE: `update` / `partial` frames, ends on terminal",
        ),
        (
            _E,
            "GET",
            "/mesh/{id}/active",
            LegacyOp.ACTIVE,
            '200 {"active": true}; 410 {"active": false} once terminal',
        ),
        (_E, "GET", "/mesh/{id}", LegacyOp.TASK, "the legacy task JSON"),
    )
)


def legacy_router(router: Router) -> Router:
    """`router` with the legacy routes as extra rows: the core resolves both (see the module
    comment); `shadowed()` lists the legacy routes its prefix hides."""
    return Router(router.prefix, extra=LEGACY_ROUTES)


def successor(prefix: str, op: LegacyOp, envelope_id: str) -> str:
    """The new route replacing the legacy route `op`, under `prefix` (a normalised one)."""
    return prefix + SUCCESSORS[op].replace("{id}", quote(envelope_id, safe=""))


def deprecation_headers(prefix: str, op: LegacyOp, envelope_id: str) -> tuple[tuple[str, str], ...]:
    """`Deprecation` and `Link` (rel successor-version), on every legacy response."""
    link = f'<{successor(prefix, op, envelope_id)}>; rel="successor-version"'
    return (("Deprecation", "true"), ("Link", link))


def route_table() -> str:
    """The legacy → new route map as a Markdown table (docs/compat.md holds a copy)."""
    lines = [
        "| port | legacy route | replaced by | legacy result |",
        "|---|---|---|---|",
    ]
    for r in LEGACY_ROUTES:
        assert isinstance(r.op, LegacyOp)
        # Sidecars POST events to the new API, clients GET.
        method = "POST" if r.role is Role.INTERNAL else "GET"
        new = f"{method} {{prefix}}{SUCCESSORS[r.op]}"
        lines.append(f"| {r.role.value} | `{r.method} {r.pattern}` | `{new}` | {r.summary} |")
    return "\n".join(lines) + "\n"


# ---- sidecar bodies -------------------------------------------------------------------------


def _object(body: bytes, what: str) -> dict[str, Any]:
    check_body_size(len(body))
    value = loads(body, what=what, max_depth=MAX_DEPTH)
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _check_id(fields: Mapping[str, Any], envelope_id: str) -> None:
    if "id" in fields and fields["id"] != envelope_id:
        raise BadRequest("id in the body does not match the path")


def _names(value: Any, what: str) -> tuple[str, ...]:
    # Go sidecars encode an empty route list as `null`.
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what} must be a list of actor names")
    return tuple(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def stored_percent(envelope: Envelope) -> float:
    """The envelope's `progress_percent` (0 when it has none, or not a number)."""
    return _number(envelope.data.get("progress_percent")) or 0.0


@attrs.frozen(kw_only=True)
class LegacyProgress:
    """A legacy `/progress` report: where the envelope is on its route, and the hop state."""

    prev: tuple[str, ...] = ()
    curr: str = ""
    next: tuple[str, ...] = ()
    state: str
    message: str | None = None
    pause_metadata: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, envelope_id: str, body: bytes) -> LegacyProgress:
        """Validate a legacy progress body.

        Raises:
            BadRequest: invalid JSON, not an object, `status` not one of received, processing,
                completed, `prev`/`next` not lists of names, `curr`/`message` not strings,
                `pause_metadata` not an object, or an `id` other than the path's.
            PayloadTooLarge: body over 10 MiB.
        """
        fields = _object(body, "progress")
        _check_id(fields, envelope_id)
        state = fields.get("status")
        if not isinstance(state, str) or state not in PROGRESS_WEIGHTS:
            raise BadRequest("status must be one of " + ", ".join(PROGRESS_WEIGHTS))
        curr = fields.get("curr")
        if curr is None:
            curr = ""
        if not isinstance(curr, str):
            raise BadRequest("curr must be a string")
        message = fields.get("message")
        if message is not None and not isinstance(message, str):
            raise BadRequest("message must be a string")
        pause = fields.get("pause_metadata")
        if pause is not None and not isinstance(pause, dict):
            raise BadRequest("pause_metadata must be a JSON object")
        return cls(
            prev=_names(fields.get("prev"), "prev"),
            curr=curr,
            next=_names(fields.get("next"), "next"),
            state=state,
            message=message,
            pause_metadata=pause,
        )

    @property
    def percent(self) -> float:
        """`(len(prev) + weight) / (len(prev) + 1 + len(next)) * 100`, rounded to 1e-6."""
        hops = len(self.prev) + 1 + len(self.next)
        return round((len(self.prev) + PROGRESS_WEIGHTS[self.state]) / hops * 100, 6)

    def event(self, stored: Envelope) -> StatusEvent:
        """The core event for this report against the stored envelope.

        `paused` when `pause_metadata` is present (its keys merged into the data), `running`
        otherwise; `progress_percent` never below the stored one: the larger of the computed
        and the stored percent, and a `keep_highest` key, so the conditional update keeps the
        larger one against whatever version it replaces (racing reports cannot lower it). The
        route keys win over pause metadata of the same name, so the stored route stays the
        sidecar's.
        """
        data: dict[str, Any] = dict(self.pause_metadata or {})
        data.update(
            prev=list(self.prev),
            curr=self.curr,
            next=list(self.next),
            task_state=self.state,
            progress_percent=max(self.percent, stored_percent(stored)),
        )
        if self.message is not None:
            data["message"] = self.message
        status = Status.PAUSED if self.pause_metadata is not None else Status.RUNNING
        return StatusEvent(status=status, data=data, keep_highest=PERCENT_KEPT)


def progress_reply(envelope: Envelope) -> dict[str, Any]:
    """The legacy `/progress` answer for the envelope as stored after the event."""
    return {"status": "ok", "progress_percent": stored_percent(envelope)}


def parse_final(envelope_id: str, body: bytes) -> StatusEvent:
    """A legacy `/final` body as a terminal status event.

    Every key but `id` and `status` (`result`, `error`, `error_details`, ...) becomes event
    data; `succeeded` also sets `progress_percent` to 100.

    Raises:
        BadRequest: invalid JSON, not an object, `status` not succeeded or failed, or an `id`
            other than the path's.
        PayloadTooLarge: body over 10 MiB.
    """
    fields = _object(body, "final")
    _check_id(fields, envelope_id)
    status = fields.get("status")
    if status not in FINAL_STATUSES:
        raise BadRequest("status must be one of " + ", ".join(FINAL_STATUSES))
    data = {k: v for k, v in fields.items() if k not in ("id", "status")}
    if status == Status.SUCCEEDED:
        data["progress_percent"] = 100
    return StatusEvent(status=Status(status), data=data)


def parse_fly(body: bytes) -> Any:
    """A legacy `/fly` body: any JSON value of at most 1 MiB.

    Raises:
        PayloadTooLarge: body over 1 MiB.
        BadRequest: not JSON.
    """
    if len(body) > FLY_LIMIT:
        raise PayloadTooLarge(f"FLY body larger than {FLY_LIMIT} bytes")
    return loads(body, what="FLY body", max_depth=MAX_DEPTH)


# ---- client views ---------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A legacy string field: strings as they are, other JSON compact-encoded."""
    return value if isinstance(value, str) else dumps(value).decode()


def _current_actor(data: Mapping[str, Any]) -> str:
    """The actor at work: the route's `curr` once a sidecar reported one, else the target."""
    curr = data["curr"] if "curr" in data else data.get("actor")
    return curr if isinstance(curr, str) else ""


def _route(data: Mapping[str, Any]) -> dict[str, Any]:
    prev, nxt = data.get("prev"), data.get("next")
    return {
        "prev": prev if isinstance(prev, list) else [],
        "curr": _current_actor(data),
        "next": nxt if isinstance(nxt, list) else [],
    }


def task_json(envelope: Envelope) -> dict[str, Any]:
    """The legacy task JSON of `GET /mesh/{id}`.

    Like the Go gateway's, `result`, `error`, `current_actor_name` and `message` are left out
    when empty; `error` is always a string.
    """
    data = envelope.data
    task: dict[str, Any] = {
        "id": envelope.id,
        "status": str(envelope.status),
        "route": _route(data),
        "payload": data.get("payload"),
    }
    if data.get("result") is not None:
        task["result"] = data["result"]
    if data.get("error") not in (None, ""):
        task["error"] = _text(data["error"])
    task["progress_percent"] = stored_percent(envelope)
    if actor := _current_actor(data):
        task["current_actor_name"] = actor
    if data.get("message") not in (None, ""):
        task["message"] = _text(data["message"])
    task["created_at"] = format_time(envelope.created_at)
    task["updated_at"] = format_time(envelope.updated_at)
    return task


def active_reply(envelope: Envelope) -> tuple[int, dict[str, bool]]:
    """`/active`: 200 while the envelope can still change, 410 (Gone) once terminal."""
    if envelope.terminal:
        return 410, {"active": False}
    return 200, {"active": True}


def _update(envelope_id: str, status: str, data: Mapping[str, Any], when: datetime) -> bytes:
    update: dict[str, Any] = {"id": envelope_id, "status": status}
    if data.get("message") not in (None, ""):
        update["message"] = _text(data["message"])
    if data.get("result") is not None:
        update["result"] = data["result"]
    if data.get("error") not in (None, ""):
        update["error"] = _text(data["error"])
    if (percent := _number(data.get("progress_percent"))) is not None:
        update["progress_percent"] = percent
    if actor := _current_actor(data):
        update["actor"] = actor
    for key in ("prev", "curr", "next", "task_state"):
        if key in data:
            update[key] = data[key]
    update["timestamp"] = format_time(when)
    return b"event: update\ndata: " + dumps(update) + b"\n\n"


def snapshot_frame(envelope: Envelope) -> bytes:
    """The legacy frame for a stored envelope (catch-up): the update as of `updated_at`."""
    return _update(envelope.id, str(envelope.status), envelope.data, envelope.updated_at)


def live_frame(envelope_id: str, published: Published, now: datetime) -> bytes:
    """The legacy frame of a published event: `update` for a status, `partial` for FLY.

    `published` carries only the new stream's frame bytes (encoded once for all new-API
    subscribers), so its data is read back with the core's `SseParser`. Status updates are
    stamped `now`, the time they reach the stream.
    """
    events = SseParser().feed(published.frame)
    if len(events) != 1:
        raise ValueError("a published frame holds exactly one event")
    if published.is_fly:
        # Already compact single-line JSON (`mesh_proto.encode_frame`): passed on as it is.
        return b"event: partial\ndata: " + events[0].data.encode() + b"\n\n"
    data = loads(events[0].data.encode())
    return _update(envelope_id, str(data.get("status")), data, now)
