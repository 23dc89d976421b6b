"""The deadline backstop's decision: which envelopes have expired at `now`.

The runtime finds candidates (a store query on `deadline_at`) and applies `EXPIRE_EVENT` to each
through the ordinary conditional update, so an envelope that finished in the meantime is left
alone by the status table, and with several replicas only one of them wins the transition.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from ._envelope import Envelope


def is_expired(envelope: Envelope, now: datetime) -> bool:
    """True when the envelope is not terminal and its deadline is at or before `now`."""
    deadline = envelope.deadline_at
    return not envelope.terminal and deadline is not None and deadline <= now


def expired(envelopes: Iterable[Envelope], now: datetime) -> list[str]:
    """The ids of the envelopes that expire at `now`, in the given order."""
    return [e.id for e in envelopes if is_expired(e, now)]
