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

Ids and resume (the contract's stream; `docs/contract.md`, "SSE"). Every frame carries `id:
{rev}.{seq}`: `rev` the envelope revision the client has after the frame, `seq` the highest
event seq (`Published.seq`, given by the broadcaster) the stream has passed. Ids never go back
on a stream. A client that reconnects with that id (`resume`) gets, after the runtime read the
snapshot and asked the broadcaster to replay the buffered FLY events after `seq` (`start`):

- the replayed FLY events, then the snapshot if it is news (a revision above `rev`) or
  terminal (a terminal envelope always answers one frame and ends); the snapshot goes last
  because it is the newest state, so a stream that ends with it still delivers the tokens;
- `event: gap`, a fresh snapshot and the FLY events that survived, when events were lost (the
  broadcaster says `gap`) or the id is malformed or unknown (a revision above the stored one):
  the client starts over instead of waiting for what will never come;
- then live events, minus the FLY events already replayed (told apart by seq).

The bare id `0` means "nothing yet": the snapshot and every buffered FLY event. A revision tie
between different statuses (see above) cannot be seen from an id; such a resume sends no
snapshot, but a terminal one always is. The frame bytes stay encoded once: the id line is
prepended per stream, and `Published.framed` caches the last result, since every subscriber of
one envelope is usually at the same id.

`SseParser` reads a byte stream back into events (for tests and clients).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeAlias

import attrs

from ._envelope import Envelope
from ._json import dumps
from ._status import RANK, Applied

KEEPALIVE: Final = b":keepalive\n\n"
_TERMINAL_RANK: Final = max(RANK.values())
# A resume point: `{rev}.{seq}`, two non-negative integers (of a bounded length).
_EVENT_ID: Final = re.compile(r"(\d{1,19})\.(\d{1,19})")
# The id a client sends to get everything still buffered (see the module comment).
FROM_START: Final = "0"

EventId: TypeAlias = tuple[int, int]


def encode_frame(event: str, data: Any, *, event_id: str | None = None) -> bytes:
    """One SSE frame: optional `id:`, `event:`, and `data:` as compact one-line JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + dumps(data) + b"\n\n"


def catch_up_frame(envelope: Envelope) -> bytes:
    """The first frame of a stream: the whole stored envelope as GET returns it."""
    return b"event: status\ndata: " + envelope.encoded() + b"\n\n"


@attrs.frozen(kw_only=True, eq=False)
class Published:
    """An event as the hub fans it out: the frame bytes, encoded once for all subscribers.

    `version` is the envelope's revision after a status event (None for FLY) and `rank` the
    rank of its status, which is how a stream tells whether its snapshot already holds the
    event (a status event built without a rank is ordered by `terminal` and `version`).

    Built by `status` or `fly`, the frame is encoded on first use: most status events have no
    subscriber and are never framed, a FLY event only when it is delivered or replayed.
    """

    _frame: bytes | None = attrs.field(default=None, alias="frame")
    terminal: bool = False
    version: int | None = None
    rank: int | None = None
    # The event's sequence number for stream ids and resume (given by the broadcaster, or by
    # the store that published it with its write); None until then.
    seq: int | None = None
    # What `frame` encodes when it was not given: the event name and its data.
    _source: tuple[str, Any] | None = attrs.field(default=None, alias="source", repr=False)

    # The last `framed` result (rev, seq, bytes), shared by the subscribers at that id: a cache,
    # no part of the value (set with object.__setattr__, so building a Published costs nothing).
    _framed: tuple[int, int, bytes] | None = attrs.field(default=None, repr=False, init=False)

    @property
    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            assert self._source is not None, "a Published needs a frame or a source"
            frame = encode_frame(*self._source)
            object.__setattr__(self, "_frame", frame)
        return frame

    def _key(self) -> tuple[bytes, bool, int | None, int | None, int | None]:
        return (self.frame, self.terminal, self.version, self.rank, self.seq)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Published):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def is_fly(self) -> bool:
        return self.version is None

    def framed(self, rev: int, seq: int) -> bytes:
        """The frame with its `id: {rev}.{seq}` line, cached for the next stream at that id."""
        cache = self._framed
        if cache is not None and cache[0] == rev and cache[1] == seq:
            return cache[2]
        framed = id_line(rev, seq) + self.frame
        object.__setattr__(self, "_framed", (rev, seq, framed))
        return framed

    def with_seq(self, seq: int) -> Published:
        """This event with its seq (the broadcaster gives it at publish)."""
        return Published(
            frame=self._frame,
            terminal=self.terminal,
            version=self.version,
            rank=self.rank,
            seq=seq,
            source=self._source,
        )

    @classmethod
    def status(cls, applied: Applied) -> Published:
        """The live frame of a stored status change: the event data with `status` set. Made
        once per `Applied` (`Applied.remember`)."""
        published = applied.remembered
        if published is None:
            published = cls(
                terminal=applied.terminal,
                version=applied.envelope.revision,
                rank=RANK[applied.envelope.status],
                seq=applied.seq,
                source=("status", {**applied.event.data, "status": str(applied.event.status)}),
            )
            applied.remember(published)
        return published

    @classmethod
    def fly(cls, data: Any) -> Published:
        """The frame of a FLY event: the posted data as is."""
        return cls(source=("fly", data))


def id_line(rev: int, seq: int) -> bytes:
    return b"id: %d.%d\n" % (rev, seq)


def parse_event_id(value: str) -> EventId | None:
    """A `Last-Event-ID` as (rev, seq); None when it is not one this API sent."""
    match = _EVENT_ID.fullmatch(value)
    return (int(match[1]), int(match[2])) if match else None


@attrs.frozen
class Gap:
    """The frame telling a resuming client that it missed events it cannot get back."""

    last_event_id: str

    def frame(self) -> bytes:
        return encode_frame("gap", {"last_event_id": self.last_event_id})


# What a stream sends, in order: a snapshot, a published event, or a gap notice, with its id
# (rev, seq).
Send: TypeAlias = tuple[Envelope | Published | Gap, int, int]


@attrs.define(eq=False)
class SseStream:
    """The state of one SSE stream (see the module comment).

    `retry` (seconds) is the reconnect delay the first bytes advise (`retry:`); None: none.
    """

    keepalive: float
    retry: float | None = None
    done: bool = False
    _seen: tuple[int, int] | None = None
    _last_sent: float = 0.0
    # What the client has: the revision and the highest event seq (the frames' ids).
    _rev: int = 0
    _seq: int = 0
    # The id to resume from (None: a fresh stream), and whether it is one this API sent.
    _resume_id: str | None = None
    _resume: EventId | None = None
    _opened: bool = False

    @property
    def seq(self) -> int:
        """The highest event seq passed: where a replay for this stream starts."""
        return self._seq

    def resume(self, last_event_id: str | None) -> int | None:
        """Take the client's `Last-Event-ID`; returns the seq after which the broadcaster is to
        replay FLY events (None: nothing to replay, the stream starts fresh or over). An empty
        id is a fresh stream, as for a browser that never got one."""
        self._resume_id = last_event_id = last_event_id or None
        if last_event_id == FROM_START:
            return 0
        self._resume = parse_event_id(last_event_id) if last_event_id is not None else None
        return self._resume[1] if self._resume is not None else None

    def start(
        self, envelope: Envelope, replayed: Sequence[Published] = (), gap: bool = False
    ) -> list[Send]:
        """What to send first, given the snapshot read after subscribing and, on a resume, the
        replay the broadcaster answered (`Broadcaster.replay`)."""
        asked = self._resume_id
        if asked is None:
            return [self._snapshot(envelope)]
        known = asked == FROM_START or (
            self._resume is not None and self._resume[0] <= envelope.revision
        )
        if not known or gap:
            return self._over(envelope, replayed if known else (), asked)
        if self._resume is None:  # from the start
            return [*self._replay(replayed), self._snapshot(envelope)]
        self._rev, self._seq = self._resume
        sends = self._replay(replayed)
        if envelope.revision > self._resume[0] or envelope.terminal:
            sends.append(self._snapshot(envelope))
        else:
            self._seen = (RANK[envelope.status], envelope.revision)
        return sends

    def resync(
        self, envelope: Envelope, replayed: Sequence[Published] = (), gap: bool = False
    ) -> list[Send]:
        """After the broadcaster lost events for this stream (a slow client's overflow, a watch
        stream that reconnected): the replayed FLY events after `seq`, then a fresh snapshot;
        on a gap, the gap notice first."""
        if gap:
            return self._over(envelope, replayed, f"{self._rev}.{self._seq}")
        return [*self._replay(replayed), self._snapshot(envelope)]

    def _over(
        self, envelope: Envelope, replayed: Sequence[Published], last_event_id: str
    ) -> list[Send]:
        """Start over: the gap notice, a fresh snapshot, and the FLY events that survived.

        The id stays where the stream is (0.0 on a resume: the client's seq may be bogus)."""
        gap: Send = (Gap(last_event_id), self._rev, self._seq)
        return [gap, self._snapshot(envelope), *self._replay(replayed)]

    def _snapshot(self, envelope: Envelope) -> Send:
        self.catch_up(envelope)
        self._rev = envelope.revision
        return (envelope, self._rev, self._seq)

    def _replay(self, replayed: Sequence[Published]) -> list[Send]:
        sends: list[Send] = []
        for event in replayed:
            if event.seq is not None and event.seq > self._seq and not self.done:
                self._seq = event.seq
                sends.append((event, self._rev, self._seq))
        return sends

    def passed(self, events: Iterable[Published]) -> list[Send]:
        """The live events to send, with their ids (see `live` for the verdicts); FLY events
        already replayed (seq not above the stream's) are dropped. The path of every event to
        every subscriber: kept lean."""
        sends: list[Send] = []
        for event in events:
            if self.done:
                break
            seq = event.seq
            if event.version is None:
                if seq is not None:
                    if seq <= self._seq:
                        continue
                    self._seq = seq
            elif self.live((event,)):
                self._rev = event.version
                if seq is not None and seq > self._seq:
                    self._seq = seq
            else:
                continue
            sends.append((event, self._rev, self._seq))
        return sends

    def encode(self, sends: Iterable[Send]) -> bytes:
        """The contract's bytes of `sends`: each frame with its `id:` line; the first bytes of
        the stream advise the reconnect delay (`retry:`)."""
        out = [
            item.framed(rev, seq) if type(item) is Published else _framed(item, rev, seq)
            for item, rev, seq in sends
        ]
        if not self._opened:
            self._opened = True
            if self.retry is not None:
                retry = b"retry: %d\n" % round(self.retry * 1000)
                out.insert(0, retry if out else retry + b"\n")
        return b"".join(out)

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


def _framed(item: Envelope | Published | Gap, rev: int, seq: int) -> bytes:
    """A frame that is not shared: a snapshot or a gap notice, with its id."""
    if isinstance(item, Envelope):
        return id_line(rev, seq) + catch_up_frame(item)
    assert isinstance(item, Gap)
    return id_line(rev, seq) + item.frame()


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
