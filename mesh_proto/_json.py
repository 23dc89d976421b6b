"""JSON in and out, the same way everywhere.

Output is compact, ASCII-only JSON on one line (so it can never break SSE framing and never
fails to encode a lone surrogate). Input rejects `NaN`/`Infinity` (not JSON), numbers too large
for a double such as `1e400` (Python would read them as infinity and later write the non-JSON
`Infinity` to the store and to SSE clients), and anything that is not UTF-8, raising the caller's
client-error type.

Untrusted bodies are also held to `MAX_DEPTH` levels of nesting, checked on the bytes before
they are parsed. Python's encoder and decoder recurse once per level against the interpreter's
recursion limit (1000 frames, shared with the caller's stack), and what a client sends comes
back deeper than it went in (a list reply wraps a payload in two more levels), so without a
bound a body the parser accepted could later fail to be written, listed or streamed. 128 levels
leave the interpreter a margin of about seven times (a request is parsed about 20 frames deep),
SQLite's JSON functions (1000 or 2000 levels by version; the SQLite store keeps text and calls
none) eight, and PostgreSQL's jsonb (over 10 000 levels at the default `max_stack_depth` of
2 MB) far more.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from ._errors import BadRequest, ProtocolError

MAX_DEPTH: Final = 128

# For the depth check: brackets become parentheses, quotes stay, every other byte goes.
_BRACKETS: Final = bytes.maketrans(b"[{]}", b"(())")
_NOT_QUOTE_OR_BRACKET: Final = bytes(b for b in range(256) if b not in b'"[]{}')


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# Made once: `json.dumps` / `json.loads` with any option build a new encoder or decoder per call,
# a few microseconds of every request.
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode
# JSON text (a `str`) of any value, and of one string (quoted and escaped, in C), for callers that
# assemble a document from pieces.
dumps_text: Final = _ENCODE
quote: Final[Any] = json.encoder.encode_basestring_ascii
_DECODE: Final = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite).decode


def dumps(value: Any) -> bytes:
    """Compact single-line JSON bytes."""
    return _ENCODE(value).encode()


def loads(
    raw: bytes,
    *,
    error: type[ProtocolError] = BadRequest,
    what: str = "body",
    max_depth: int | None = None,
) -> Any:
    """Parse JSON bytes or raise `error` with a message naming `what`.

    With `max_depth`, a document nested deeper than that many arrays and objects is refused
    before it is parsed (`[]` is one level, `{"a": []}` two).
    """
    if max_depth is not None and _deeper_than(raw, max_depth):
        raise error(f"{what} is nested deeper than {max_depth} levels")
    try:
        return _DECODE(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"invalid JSON {what}: {_short(exc)}") from None


def _deeper_than(raw: bytes, limit: int) -> bool:
    # A document cannot be nested deeper than it has opening brackets: for ordinary bodies this
    # is the whole check, two byte counts.
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Brackets inside strings do not nest. Escaped backslashes go first, so that what is left of
    # an escaped quote is exactly `\"`; then every quote that remains opens or closes a string.
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    levels = raw.translate(_BRACKETS, _NOT_QUOTE_OR_BRACKET)
    # Two adjacent quotes have no bracket between them, so dropping them changes nothing; it
    # drops every string without brackets at C speed. Then odd pieces are inside strings.
    levels = levels.replace(b'""', b"")
    if b'"' in levels:
        levels = b"".join(levels.split(b'"')[::2])
    # Each pass removes every innermost pair, so one level of depth; a document that is gone
    # within `limit` passes is at most `limit` deep. (On invalid JSON the answer may be wrong
    # either way: the parser refuses it next.)
    for _ in range(limit):
        inner = levels.replace(b"()", b"")
        if len(inner) == len(levels):
            return False
        levels = inner
    return b"()" in levels


def _short(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]
