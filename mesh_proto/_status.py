"""The status rules: one table decides what a status event does to a stored envelope.

Statuses have ranks (pending 0, running 1, paused 2, succeeded/failed/canceled 3). `RULES`
maps every (stored status, incoming status) pair to one of three outcomes:

- ``TRANSITION``: the incoming rank is higher; store the new status, merge data, publish.
- ``PROGRESS``: the same non-terminal status again; merge data, publish, status unchanged.
- ``IGNORED``: anything else (lower rank, a different status of equal rank, or anything after a
  terminal status); the contract answers 204 and nothing is stored or published.

`apply_event` is the only place that applies the table. Cancel (`CANCEL_EVENT`) and deadline
expiry (`EXPIRE_EVENT`) are ordinary status events that go through it, not special cases.
Every other package asks this module instead of re-deciding.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import attrs

if TYPE_CHECKING:
    from ._envelope import Envelope
    from ._sse import Published


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def rank(self) -> int:
        return RANK[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


RANK: Final[Mapping[Status, int]] = {
    Status.PENDING: 0,
    Status.RUNNING: 1,
    Status.PAUSED: 2,
    Status.SUCCEEDED: 3,
    Status.FAILED: 3,
    Status.CANCELED: 3,
}
TERMINAL: Final = frozenset(s for s, rank in RANK.items() if rank == 3)

# What actor sidecars send while an envelope moves along its route: all mean `running`.
ALIASES: Final[Mapping[str, Status]] = {
    "received": Status.RUNNING,
    "processing": Status.RUNNING,
    "completed": Status.RUNNING,
}


class Rule(enum.Enum):
    TRANSITION = "transition"
    PROGRESS = "progress"
    IGNORED = "ignored"


def _rule(stored: Status, incoming: Status) -> Rule:
    if RANK[incoming] > RANK[stored]:
        return Rule.TRANSITION
    if incoming is stored and stored not in TERMINAL:
        return Rule.PROGRESS
    return Rule.IGNORED


RULES: Final[Mapping[tuple[Status, Status], Rule]] = {
    (stored, incoming): _rule(stored, incoming) for stored in Status for incoming in Status
}


@attrs.frozen(kw_only=True)
class StatusEvent:
    """A status change reported for an envelope (already validated and normalised).

    `data` is merged shallowly into the stored data; a `status` key in it is never merged,
    since the stored status is the table's to decide. Keys in `keep_highest` never go down:
    where both the stored and the incoming value are numbers, the larger one is merged. It is
    decided on the very version the write replaces, so racing reports cannot lower it (the
    legacy `/progress` route uses it for `progress_percent`).
    """

    status: Status
    data: Mapping[str, Any] = attrs.field(factory=dict)
    keep_highest: frozenset[str] = frozenset()


CANCEL_EVENT: Final = StatusEvent(status=Status.CANCELED)
EXPIRE_EVENT: Final = StatusEvent(status=Status.FAILED, data={"error": "task timed out"})

_TICK: Final = timedelta(microseconds=1)
# Keys of the stored value that are not data: never merged from an event.
_RESERVED: Final = frozenset({"status", "_rev"})


@attrs.frozen(kw_only=True)
class Applied:
    """The event changed the envelope: `envelope` is what to store, `event` what to publish.

    `seq` is the event's place on a cross-replica bus when the store published it with the
    write (the state proxy's `publish`), else None.
    """

    rule: Rule
    envelope: Envelope
    event: StatusEvent
    seq: int | None = None
    # Its `Published` once made (`Published.status`), so that the frame is encoded once even
    # when the store made it first (for the bus) and the runtime then publishes it: a cache, no
    # part of the value.
    _published: Published | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.envelope.status in TERMINAL

    def remember(self, published: Published) -> None:
        """Keep `published` as this change's `Published.status`."""
        object.__setattr__(self, "_published", published)

    @property
    def remembered(self) -> Published | None:
        return self._published


@attrs.frozen(kw_only=True)
class Ignored:
    """The event is stale: nothing is stored or published. `envelope` is the stored one."""

    envelope: Envelope
    event: StatusEvent


Outcome = Applied | Ignored


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def apply_event(envelope: Envelope, event: StatusEvent, now: datetime) -> Outcome:
    """Apply a status event to a stored envelope under the rules table.

    The result's `revision` is one more than the stored one, and its `updated_at` is `now`
    (or a microsecond after the stored one, should the clock have gone back).
    """
    rule = RULES[(envelope.status, event.status)]
    if rule is Rule.IGNORED:
        return Ignored(envelope=envelope, event=event)
    delta = {k: v for k, v in event.data.items() if k not in _RESERVED}
    for key in event.keep_highest & delta.keys():
        stored, incoming = envelope.data.get(key), delta[key]
        if _number(stored) and _number(incoming) and stored > incoming:
            delta[key] = stored
    updated = type(envelope)(  # not attrs.evolve: a third of this function's time
        id=envelope.id,
        status=event.status,
        created_at=envelope.created_at,
        updated_at=max(now, envelope.updated_at + _TICK),
        data={**envelope.data, **delta},
        revision=envelope.revision + 1,
    )
    return Applied(rule=rule, envelope=updated, event=StatusEvent(status=event.status, data=delta))
