"""The envelope: the stored record, its JSON shapes, and the queue wire message.

An `Envelope` is a frozen value. It has three shapes on the wire:

- `to_json()`: what GET and list answer, `{"id", "status", "created_at", "updated_at", "data"}`
  (`encoded()`: the same as JSON bytes, encoded once);
- `to_value()`: what the store keeps under `msg/{id}`, the data plus a top-level `status`;
- `wire_message()`: the JSON body put on the actor's queue (docs/contract.md, "Queue message").

`Envelope.new` builds a fresh `pending` envelope from a validated create request; the id and
`now` come from the runtime, so the core stays free of randomness and clocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._errors import StoreProtocolError
from ._json import dumps, dumps_text, quote
from ._status import TERMINAL, Status
from ._time import format_time, parse_time

if TYPE_CHECKING:
    from ._requests import CreateRequest

GATEWAY_HEADER: Final = "x-asya-gateway-url"
KEY_PREFIX: Final = "msg/"
# The stored value carries a revision counter under this key (never shown in `data`): it orders
# the versions of one envelope without trusting any clock, which is how an SSE stream drops
# events its catch-up snapshot already holds.
REVISION_KEY: Final = "_rev"


def queue_name(namespace: str, actor: str) -> str:
    """The queue an actor consumes: `asya-{namespace}-{actor}`."""
    return f"asya-{namespace}-{actor}"


def envelope_key(envelope_id: str) -> str:
    """The store key of an envelope."""
    return KEY_PREFIX + envelope_id


@attrs.frozen(kw_only=True)
class Envelope:
    id: str
    status: Status
    created_at: datetime
    updated_at: datetime
    data: Mapping[str, Any]
    revision: int = 0
    # `encoded()`'s bytes, made on first use: an envelope is a value, so its JSON never changes.
    _encoded: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def deadline_at(self) -> datetime | None:
        """The deadline, or None when there is none (or the stored one is unreadable)."""
        raw = self.data.get("deadline_at")
        if not isinstance(raw, str):
            return None
        try:
            return parse_time(raw)
        except ValueError:
            return None

    @classmethod
    def new(
        cls,
        request: CreateRequest,
        *,
        envelope_id: str,
        now: datetime,
        gateway_url: str | None,
        traceparent: str | None = None,
    ) -> Envelope:
        """A fresh `pending` envelope for a validated create request.

        The gateway header is always overwritten with `gateway_url` (when one is configured),
        and `traceparent` is set when tracing supplies one.
        """
        headers = dict(request.headers)
        if gateway_url is not None:
            headers[GATEWAY_HEADER] = gateway_url
        if traceparent is not None:
            headers["traceparent"] = traceparent
        data: dict[str, Any] = {
            "actor": request.actor,
            "payload": request.payload,
            "headers": headers,
        }
        if request.timeout > 0:
            data["deadline_at"] = format_time(now + timedelta(seconds=request.timeout))
        return cls(id=envelope_id, status=Status.PENDING, created_at=now, updated_at=now, data=data)

    @classmethod
    def from_value(
        cls, envelope_id: str, value: Any, *, created_at: str, updated_at: str
    ) -> Envelope:
        """Rebuild an envelope from a stored value and its row timestamps.

        Raises:
            StoreProtocolError: the stored value is not an envelope.
        """
        if not isinstance(value, dict):
            raise StoreProtocolError(f"stored envelope {envelope_id} is not an object")
        data = dict(value)
        revision = data.pop(REVISION_KEY, 0)
        try:
            status = Status(data.pop("status", None))
            return cls(
                id=envelope_id,
                status=status,
                created_at=parse_time(created_at),
                updated_at=parse_time(updated_at),
                data=data,
                revision=revision if type(revision) is int else 0,
            )
        except (ValueError, TypeError) as exc:
            raise StoreProtocolError(f"stored envelope {envelope_id} is invalid: {exc}") from None

    def to_value(self) -> dict[str, Any]:
        return {**self.data, "status": str(self.status), REVISION_KEY: self.revision}

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": str(self.status),
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at),
            "data": dict(self.data),
        }

    def encoded(self) -> bytes:
        """`to_json()` as compact JSON bytes, encoded once per envelope (a store hands out the
        same value until it changes, so a heartbeat GET or a catch-up re-encodes nothing)."""
        encoded = self._encoded
        if encoded is None:
            encoded = dumps(self.to_json())
            object.__setattr__(self, "_encoded", encoded)
        return encoded

    def wire_message(self) -> bytes:
        """The queue message (docs/contract.md, "Queue message") for this (new) envelope.

        Assembled from the JSON of its pieces, so that only the payload and headers go through
        the encoder (about half the cost of encoding the whole message as one dict); the same
        bytes as `dumps` of that dict.
        """
        data = self.data
        actor = data.get("actor")
        actor_json = quote(actor) if isinstance(actor, str) else dumps_text(actor)
        created = format_time(self.created_at)
        updated = created if self.updated_at == self.created_at else format_time(self.updated_at)
        headers = data.get("headers", {})
        deadline = (
            f',"deadline_at":{dumps_text(data["deadline_at"])}' if "deadline_at" in data else ""
        )
        return (
            f'{{"id":{quote(self.id)},"route":{{"prev":[],"curr":{actor_json},"next":[]}},'
            f'"headers":{"{}" if headers == {} else dumps_text(headers)},'
            f'"payload":{dumps_text(data.get("payload"))},'
            f'"status":{{"phase":"pending","actor":{actor_json},"attempt":1,"max_attempts":1,'
            f'"created_at":{quote(created)},"updated_at":{quote(updated)}{deadline}}}}}'
        ).encode()
