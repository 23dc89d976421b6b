"""JSON in and out, the same way everywhere.

Output is compact, ASCII-only JSON on one line (so it can never break SSE framing and never
fails to encode a lone surrogate). Input rejects `NaN`/`Infinity` (not JSON), numbers too large
for a double such as `1e400` (Python would read them as infinity and later write the non-JSON
`Infinity` to the store and to SSE clients), and anything that is not UTF-8, raising the caller's
client-error type.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ._errors import BadRequest, ProtocolError


def dumps(value: Any) -> bytes:
    """Compact single-line JSON bytes."""
    return json.dumps(value, separators=(",", ":")).encode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads(raw: bytes, *, error: type[ProtocolError] = BadRequest, what: str = "body") -> Any:
    """Parse JSON bytes or raise `error` with a message naming `what`."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"invalid JSON {what}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]
