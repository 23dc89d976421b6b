"""Server-Sent Events: frame encoding, the per-stream state machine, and a parser.

Frames are bytes built once per event (`Published.status`, `Published.fly`, `catch_up_frame`) and
shared by every subscriber. `data` is always compact single-line JSON, so nothing a poster sends
can break the framing.

`SseStream` is the life of one stream, fed by the runtime:

1. the runtime subscribes first, then reads the stored envelope and calls
   `catch_up(envelope)`: the catch-up frame, and the stream is done if already terminal;
2. events published since the subscription go through `live(events)`: a status event that the
   client already has (the snapshot, or a status frame sent since) is dropped, a terminal
   status ends the stream after its frame, FLY frames pass as they are;
3. `keepalive_in(now)` says how long the stream may stay silent before a `:keepalive` comment
   is due; `sent(now)` records that bytes went out.

Whether the client has an event is decided on (rank, revision), in that order, against the
newest status it was sent. The state proxy guards a write with the status it read (`PUT
?if_status=`), so ranks never go back, but two writers that read the same version can both land
when the first keeps the status (a progress update): revisions can then tie or even go back.
Comparing revisions alone would drop a `canceled` racing a progress update whose write the
snapshot saw, and the stream would never end. A higher rank is always news; only same-status
events are told apart by revision. Since the mark moves with every status frame sent, a client
never sees a status go back, even when two publishers' events reach the hub out of order.

`SseParser` reads a byte stream back into events (for tests and clients).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

import attrs

from ._envelope import Envelope
from ._json import dumps
from ._status import RANK, Applied

KEEPALIVE: Final = b":keepalive\n\n"
_TERMINAL_RANK: Final = max(RANK.values())


def encode_frame(event: str, data: Any, *, event_id: str | None = None) -> bytes:
    """One SSE frame: optional `id:`, `event:`, and `data:` as compact one-line JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + dumps(data) + b"\n\n"


def catch_up_frame(envelope: Envelope) -> bytes:
    """The first frame of a stream: the whole stored envelope as GET returns it."""
    return encode_frame("status", envelope.to_json())


@attrs.frozen(kw_only=True)
class Published:
    """An event as the hub fans it out: the frame bytes, encoded once for all subscribers.

    `version` is the envelope's revision after a status event (None for FLY) and `rank` the
    rank of its status, which is how a stream tells whether its snapshot already holds the
    event (a status event built without a rank is ordered by `terminal` and `version`).
    """

    frame: bytes
    terminal: bool = False
    version: int | None = None
    rank: int | None = None
    # The event's sequence number for stream ids and resume (given by the broadcaster, or by
    # the store that published it with its write); None until then.
    seq: int | None = None

    @property
    def is_fly(self) -> bool:
        return self.version is None

    @classmethod
    def status(cls, applied: Applied) -> Published:
        """The live frame of a stored status change: the event data with `status` set."""
        data = {**applied.event.data, "status": str(applied.event.status)}
        return cls(
            frame=encode_frame("status", data),
            terminal=applied.terminal,
            version=applied.envelope.revision,
            rank=RANK[applied.envelope.status],
            seq=applied.seq,
        )

    @classmethod
    def fly(cls, data: Any) -> Published:
        """The frame of a FLY event: the posted data as is."""
        return cls(frame=encode_frame("fly", data))


@attrs.define(eq=False)
class SseStream:
    """The state of one SSE stream (see the module comment)."""

    keepalive: float
    done: bool = False
    _seen: tuple[int, int] | None = None
    _last_sent: float = 0.0

    def catch_up(self, envelope: Envelope) -> bytes:
        """The catch-up frame for the snapshot read after subscribing."""
        self._seen = (RANK[envelope.status], envelope.revision)
        self.done = envelope.terminal
        return catch_up_frame(envelope)

    def live(self, events: Iterable[Published]) -> bytes:
        """The bytes to send for events received since the last call (one write)."""
        out = []
        for event in events:
            if self.done:
                break
            if event.version is not None:
                key = self._key(event, event.version)
                if self._seen is not None and key <= self._seen:
                    continue
                self._seen = key
                self.done = event.terminal
            out.append(event.frame)
        return b"".join(out)

    def _key(self, event: Published, version: int) -> tuple[int, int]:
        """A status event's place in the envelope's history (see the module comment)."""
        if event.rank is not None:
            return (event.rank, version)
        if event.terminal:
            return (_TERMINAL_RANK, version)
        # Built without a rank: ordered by revision within what the client has.
        return (self._seen[0] if self._seen is not None else 0, version)

    def sent(self, now: float) -> None:
        """Record that bytes went out at `now` (seconds on any monotonic clock)."""
        self._last_sent = now

    def keepalive_in(self, now: float) -> float:
        """Seconds until a keepalive comment is due (0 when due now)."""
        return max(0.0, self._last_sent + self.keepalive - now)


@attrs.frozen(kw_only=True)
class SseEvent:
    """A parsed SSE event. `id` is the `id:` of this event's own lines (None when it had none)."""

    event: str = "message"
    data: str = ""
    id: str | None = None


_EOL: Final = re.compile(rb"\r\n|\r|\n")


@attrs.define(eq=False)
class SseParser:
    """Incremental SSE parser: `feed(bytes)` returns the events completed by those bytes.

    It follows the WHATWG event-stream rules: lines end with CRLF, LF or a lone CR (also when a
    CRLF is split across two chunks); bytes are UTF-8 with invalid sequences replaced; a blank
    line dispatches an event only if it had a `data` line; unknown fields (`retry`, ...) are
    ignored, and so is an `id` holding NUL. Comment lines (such as keepalives) are collected,
    stripped, in `comments`; an incomplete trailing event stays buffered.
    """

    comments: list[str] = attrs.field(factory=list)
    _buffer: bytes = b""
    _after_cr: bool = False
    _event: str = ""
    _data: list[str] | None = None
    _id: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if self._after_cr and chunk:
            # The CR ending the previous chunk was a line end; an LF right after it is its pair.
            chunk = chunk.removeprefix(b"\n")
            self._after_cr = False
        self._buffer += chunk
        events: list[SseEvent] = []
        while (end := _EOL.search(self._buffer)) is not None:
            line = self._buffer[: end.start()].decode("utf-8", "replace")
            self._after_cr = end.group() == b"\r" and end.end() == len(self._buffer)
            self._buffer = self._buffer[end.end() :]
            if line:
                self._field(line)
            elif self._data is not None:
                events.append(
                    SseEvent(
                        event=self._event or "message", data="\n".join(self._data), id=self._id
                    )
                )
                self._event, self._data, self._id = "", None, None
            else:
                self._event, self._id = "", None
        return events

    def _field(self, line: str) -> None:
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data = [*(self._data or ()), value]
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
