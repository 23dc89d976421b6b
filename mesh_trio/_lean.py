"""The lean listener: a trio HTTP/1.1 server that hands each request to a `Handler`.

(Interface fixed first; the server itself is being written: see `serve_lean`.)

A `Handler` gets a `Request` whose body has already been read (at most `max_body` bytes; the
listener answers 413 itself past that) and returns a `Reply`: a whole body, or a `stream` of
chunks (SSE) sent with chunked encoding until it ends. The listener adds `Content-Length` (or
`Transfer-Encoding: chunked`), `Connection` and `Date`; it owns HEAD (no body), keep-alive,
`Expect: 100-continue`, timeouts and the errors of HTTP itself (400, 413, 431, 505), whose
bodies are JSON `{"error": ...}` like every other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import attrs


@attrs.frozen(slots=True)
class Request:
    """One request, as parsed. Header names are lowercase bytes, values as sent."""

    method: str
    path: str
    query: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@attrs.frozen(slots=True)
class Reply:
    """A response: `status`, extra headers (lowercase names), and `body` or `stream`."""

    status: int
    headers: Sequence[tuple[bytes, bytes]] = ()
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Reply]]
