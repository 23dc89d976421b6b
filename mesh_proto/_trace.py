"""W3C trace context for new envelopes (`traceparent: 00-<trace id>-<parent id>-<flags>`).

When tracing is on, a create joins the caller's trace if its `traceparent` is valid (same trace
id and flags, a new parent id for the mesh's own span), or starts a new sampled trace. The
random bits come from the runtime, so the core stays deterministic.
"""

from __future__ import annotations

import re
from typing import Final

_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


def traceparent_for(incoming: str | None, random: bytes) -> str:
    """The `traceparent` to stamp on a new envelope.

    Args:
        incoming: the caller's `traceparent` header, if any (an invalid one is ignored).
        random: 24 random bytes from the runtime (16 for a new trace id, 8 for the parent id).

    Raises:
        ValueError: `random` is not 24 bytes, or gives an all-zero id.
    """
    if len(random) != 24:
        raise ValueError("traceparent_for needs 24 random bytes")
    span = random[16:].hex()
    if span == _ZERO_SPAN:
        raise ValueError("all-zero parent id")
    match = _TRACEPARENT.fullmatch(incoming.strip()) if incoming else None
    if match is not None and match[1] != _ZERO_TRACE and match[2] != _ZERO_SPAN:
        return f"00-{match[1]}-{span}-{match[3]}"
    trace = random[:16].hex()
    if trace == _ZERO_TRACE:
        raise ValueError("all-zero trace id")
    return f"00-{trace}-{span}-01"
