"""SSE (docs/contract.md, "SSE"): exact frame bytes, the stream state machine, and the parser."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_proto import (
    KEEPALIVE,
    Applied,
    Published,
    SseEvent,
    SseParser,
    SseStream,
    Status,
    StatusEvent,
    apply_event,
    catch_up_frame,
    encode_frame,
)

from ._support import ID, envelope, later

# --- frames -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "data", "event_id", "frame"),
    [
        ("status", {"status": "running"}, None,
         b'event: status\ndata: {"status":"running"}\n\n'),
        ("status", {"status": "running", "n": 1}, "7",
         b'id: 7\nevent: status\ndata: {"status":"running","n":1}\n\n'),
        ("fly", "token", None, b'event: fly\ndata: "token"\n\n'),
        ("fly", None, None, b"event: fly\ndata: null\n\n"),
        ("fly", [1, 2.5, True], None, b"event: fly\ndata: [1,2.5,true]\n\n"),
        ("fly", {"t": "a\nb\r\n\ndata: x"}, None,
         b'event: fly\ndata: {"t":"a\\nb\\r\\n\\ndata: x"}\n\n'),
        ("fly", "caf\u00e9 \u2028 \ud800", None,
         b'event: fly\ndata: "caf\\u00e9 \\u2028 \\ud800"\n\n'),
        ("fly", {"nested": {"a": []}}, "", b'id: \nevent: fly\ndata: {"nested":{"a":[]}}\n\n'),
    ],
    ids=["status", "with-id", "string", "null", "array", "newlines-escaped", "non-ascii",
         "empty-id"],
)  # fmt: skip
def test_encode_frame(event: str, data: Any, event_id: str | None, frame: bytes) -> None:
    assert encode_frame(event, data, event_id=event_id) == frame


def test_keepalive_is_a_comment() -> None:
    assert KEEPALIVE == b":keepalive\n\n"


def test_catch_up_frame_is_the_whole_envelope() -> None:
    stored = envelope(Status.RUNNING, {"actor": "echo", "payload": {"q": 1}}, revision=3)
    assert catch_up_frame(stored) == (
        b'event: status\ndata: {"id":"' + ID.encode() + b'","status":"running",'
        b'"created_at":"2026-11-28T14:24:06.123456Z","updated_at":"2026-11-28T14:24:06.123456Z",'
        b'"data":{"actor":"echo","payload":{"q":1}}}\n\n'
    )


def applied(stored: Status, incoming: Status, data: dict[str, Any], revision: int) -> Applied:
    outcome = apply_event(
        envelope(stored, revision=revision - 1), StatusEvent(status=incoming, data=data), later(1)
    )
    assert isinstance(outcome, Applied)
    return outcome


def test_published_status_carries_the_event_data_with_status() -> None:
    published = Published.status(applied(Status.PENDING, Status.RUNNING, {"k": "v"}, 4))
    assert published == Published(
        frame=b'event: status\ndata: {"k":"v","status":"running"}\n\n',
        terminal=False,
        version=4,
        rank=1,
    )
    assert not published.is_fly


def test_published_status_overrides_a_posted_status_key() -> None:
    published = Published.status(applied(Status.RUNNING, Status.SUCCEEDED, {"status": "x"}, 9))
    assert published == Published(
        frame=b'event: status\ndata: {"status":"succeeded"}\n\n', terminal=True, version=9, rank=3
    )


@pytest.mark.parametrize(
    ("data", "frame"),
    [({"token": "hi"}, b'event: fly\ndata: {"token":"hi"}\n\n'), (7, b"event: fly\ndata: 7\n\n")],
    ids=["object", "number"],
)
def test_published_fly_is_the_posted_data(data: Any, frame: bytes) -> None:
    published = Published.fly(data)
    assert published == Published(frame=frame, terminal=False, version=None, rank=None)
    assert published.is_fly


def test_published_is_a_value_whether_its_frame_was_given_or_encoded() -> None:
    given = Published(frame=b'event: fly\ndata: {"token":"hi"}\n\n', seq=3)
    encoded = Published.fly({"token": "hi"}).with_seq(3)
    assert encoded == given and hash(encoded) == hash(given)
    assert encoded != Published.fly({"token": "hi"}).with_seq(4)
    assert encoded != given.frame
    assert len({given, encoded}) == 1


# --- the stream state machine -------------------------------------------------------------


def status(version: int, name: str = "running") -> Published:
    """A published status event as `Published.status` makes it, with a readable frame."""
    return Published(
        frame=f"<{name} {version}>".encode(),
        terminal=Status(name).terminal,
        version=version,
        rank=Status(name).rank,
    )


def fly(text: str) -> Published:
    return Published(frame=f"<fly {text}>".encode())


def test_catch_up_of_a_live_envelope_keeps_the_stream_open() -> None:
    stream = SseStream(keepalive=15)
    stored = envelope(Status.RUNNING, revision=2)
    assert stream.catch_up(stored) == catch_up_frame(stored)
    assert not stream.done


@pytest.mark.parametrize("terminal", [Status.SUCCEEDED, Status.FAILED, Status.CANCELED], ids=str)
def test_catch_up_of_a_terminal_envelope_is_the_only_frame(terminal: Status) -> None:
    stream = SseStream(keepalive=15)
    stored = envelope(terminal, revision=5)
    assert stream.catch_up(stored) == catch_up_frame(stored)
    assert stream.done
    assert stream.live([fly("a"), status(6, "failed")]) == b""


@pytest.mark.parametrize(
    ("events", "sent", "done"),
    [
        ([status(1), status(2), status(3)], b"", False),
        ([status(1, "pending"), status(9, "pending")], b"", False),
        ([status(2), status(4), status(3), status(5)], b"<running 4><running 5>", False),
        ([fly("a"), status(3), fly("b")], b"<fly a><fly b>", False),
        ([status(2, "paused"), status(1, "paused"), status(3, "paused")],
         b"<paused 2><paused 3>", False),
        ([status(4, "paused"), status(5), status(6, "pending")], b"<paused 4>", False),
        ([status(3, "failed")], b"<failed 3>", True),
        ([status(2, "canceled")], b"<canceled 2>", True),
        ([status(4, "succeeded"), fly("late"), status(5)], b"<succeeded 4>", True),
        ([fly("a"), status(4), status(5, "canceled"), status(6)],
         b"<fly a><running 4><canceled 5>", True),
        ([], b"", False),
    ],
    ids=["snapshot-holds-them", "lower-rank-is-held-at-any-revision", "newer-pass-in-order",
         "fly-always-passes", "higher-rank-is-news-at-any-revision", "never-goes-back-once-sent",
         "terminal-at-same-revision",
         "terminal-at-older-revision", "terminal-ends-the-stream", "one-write-for-a-batch",
         "nothing"],
)  # fmt: skip
def test_live_after_a_snapshot_at_revision_3(
    events: list[Published], sent: bytes, done: bool
) -> None:
    stream = SseStream(keepalive=15)
    stream.catch_up(envelope(Status.RUNNING, revision=3))
    assert stream.live(events) == sent
    assert stream.done is done
    if done:
        assert stream.live([fly("after"), status(99, "failed")]) == b""


@pytest.mark.parametrize(
    ("event", "held"),
    [
        (Published(frame=b"<t>", terminal=True, version=3), False),
        (Published(frame=b"<t>", terminal=True, version=1), False),
        (Published(frame=b"<s>", version=3), True),
        (Published(frame=b"<s>", version=4), False),
    ],
    ids=["terminal-same-revision", "terminal-older", "same-revision", "newer"],
)
def test_status_events_without_a_rank(event: Published, held: bool) -> None:
    """Built by hand without `rank`: a terminal is news, others are ordered by revision."""
    stream = SseStream(keepalive=15)
    stream.catch_up(envelope(Status.RUNNING, revision=3))
    assert stream.live([event]) == (b"" if held else event.frame)


def test_live_before_any_snapshot_starts_from_the_first_status() -> None:
    stream = SseStream(keepalive=15)
    assert stream.live([status(0), fly("x"), status(0), status(1)]) == (
        b"<running 0><fly x><running 1>"
    )
    stream = SseStream(keepalive=15)
    unranked = [Published(frame=b"<a>", version=2), Published(frame=b"<b>", version=1)]
    assert stream.live(unranked) == b"<a>"


def test_live_accepts_any_iterable() -> None:
    stream = SseStream(keepalive=15)
    stream.catch_up(envelope(Status.PENDING))
    assert stream.live(iter([status(1), status(2)])) == b"<running 1><running 2>"


def test_keepalive_timing() -> None:
    stream = SseStream(keepalive=15)
    assert stream.keepalive_in(0.0) == 15.0
    stream.sent(100.0)
    assert stream.keepalive_in(100.0) == 15.0
    assert stream.keepalive_in(110.5) == 4.5
    assert stream.keepalive_in(115.0) == 0.0
    assert stream.keepalive_in(500.0) == 0.0
    stream.sent(500.0)
    assert stream.keepalive_in(501.0) == 14.0


def test_a_whole_stream_as_the_runtime_drives_it() -> None:
    """Subscribe, a publisher writes, snapshot, live, parse what the client got back."""
    stored = envelope(Status.PENDING)
    queued = []  # what the subscription received before the snapshot was read
    first = apply_event(stored, StatusEvent(status=Status.RUNNING, data={"n": 1}), later(1))
    assert isinstance(first, Applied)
    queued.append(Published.status(first))
    stream = SseStream(keepalive=15)
    wire = stream.catch_up(first.envelope)  # the snapshot already holds the running event
    last = apply_event(
        first.envelope, StatusEvent(status=Status.SUCCEEDED, data={"result": 42}), later(2)
    )
    assert isinstance(last, Applied)
    queued += [Published.fly({"token": "x"}), Published.status(last), Published.fly("late")]
    wire += stream.live(queued)
    assert stream.done
    events = SseParser().feed(wire)
    assert [(e.event, json.loads(e.data)) for e in events] == [
        ("status", first.envelope.to_json()),
        ("fly", {"token": "x"}),
        ("status", {"result": 42, "status": "succeeded"}),
    ]


# --- the parser ---------------------------------------------------------------------------

STREAM = (
    b'event: status\ndata: {"status":"running"}\n\n'
    b":keepalive\n\n"
    b'id: 7\nevent: fly\ndata: "tok"\n\n'
    b"data: line one\ndata: line two\n\n"
)
PARSED = [
    SseEvent(event="status", data='{"status":"running"}'),
    SseEvent(event="fly", data='"tok"', id="7"),
    SseEvent(event="message", data="line one\nline two"),
]


def feed_all(chunks: list[bytes]) -> tuple[list[SseEvent], list[str]]:
    parser = SseParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser.comments


@pytest.mark.parametrize(
    "chunks",
    [
        [STREAM],
        [STREAM[i : i + 1] for i in range(len(STREAM))],
        [STREAM.replace(b"\n", b"\r\n")],
        [bytes([b]) for b in STREAM.replace(b"\n", b"\r\n")],
        [STREAM.replace(b"\n", b"\r")],
        [bytes([b]) for b in STREAM.replace(b"\n", b"\r")],
    ],
    ids=["whole", "byte-by-byte", "crlf", "crlf-byte-by-byte", "cr", "cr-byte-by-byte"],
)
def test_parser_reads_a_stream_however_it_is_cut(chunks: list[bytes]) -> None:
    assert feed_all(chunks) == (PARSED, ["keepalive"])


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"data: x"], []),
        ([b"data: x\n"], []),
        ([b"data: x\n", b"\n"], [SseEvent(data="x")]),
        ([b"data: a\r", b"\ndata: b\n\n"], [SseEvent(data="a\nb")]),
        ([b"data: a\r", b"", b"\ndata: b\n\n"], [SseEvent(data="a\nb")]),
        ([b"data: a\r", b"\r"], [SseEvent(data="a")]),
        ([b"data:x\n\n"], [SseEvent(data="x")]),
        ([b"data:  x \n\n"], [SseEvent(data=" x ")]),
        ([b"data\n\n"], [SseEvent(data="")]),
        ([b"data:\ndata:\n\n"], [SseEvent(data="\n")]),
        ([b"event: x\n\ndata: 1\n\n"], [SseEvent(data="1")]),
        ([b"id: 1\n\ndata: 1\n\n"], [SseEvent(data="1")]),
        ([b"event:\ndata: 1\n\n"], [SseEvent(data="1")]),
        ([b"event: a\nevent: b\ndata: 1\n\n"], [SseEvent(event="b", data="1")]),
        ([b"id: 1\nid: a\x00b\ndata: 1\n\n"], [SseEvent(data="1", id="1")]),
        ([b"retry: 10\nfoo: bar\ndata: 1\n\n"], [SseEvent(data="1")]),
        ([b"data: \xff\xfe\n\n"], [SseEvent(data="\ufffd\ufffd")]),
        ([b"data: caf\xc3", b"\xa9\n\n"], [SseEvent(data="caf\u00e9")]),
        ([b"\n\n\n"], []),
        ([b"data: 1\n\ndata: 2\n\n"], [SseEvent(data="1"), SseEvent(data="2")]),
    ],
    ids=["no-line-end", "no-blank-line", "completed-later", "crlf-split-across-chunks",
         "empty-chunk-keeps-cr", "cr-cr", "no-space", "one-space-removed", "field-without-colon",
         "empty-data-lines", "event-without-data-not-dispatched", "id-without-data-not-kept",
         "empty-event-is-message", "last-event-wins", "id-with-nul-ignored",
         "unknown-fields-ignored", "invalid-utf8-replaced", "utf8-split-across-chunks",
         "blank-lines", "two-events"],
)  # fmt: skip
def test_parser_fine_points(chunks: list[bytes], events: list[SseEvent]) -> None:
    assert feed_all(chunks)[0] == events


def test_parser_collects_comments_stripped() -> None:
    parser = SseParser()
    assert parser.feed(b":keepalive\n\n: hello there \r\n:\n") == []
    assert parser.comments == ["keepalive", "hello there", ""]


frames = st.lists(
    st.tuples(
        st.sampled_from(["status", "fly", "message"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=6),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        st.none() | st.text(alphabet="abc123-", max_size=4),
    ),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(frames=frames, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_parser_round_trips_encoded_frames(
    frames: list[tuple[str, Any, str | None]], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(e, d, event_id=i) for e, d, i in frames)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    events, _ = feed_all(chunks)
    assert [(e.event, json.loads(e.data), e.id) for e in events] == frames


pieces = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"data: x", b"data", b":c", b"event: e", b"id: 1", b"\xc3", b"\xa9"]
)


@settings(max_examples=200, deadline=None)
@given(
    wire=st.binary(max_size=80) | st.lists(pieces, max_size=20).map(b"".join),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_parser_result_does_not_depend_on_chunking(wire: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    assert feed_all(chunks) == feed_all([wire])


# --- racing writers -----------------------------------------------------------------------
# The state proxy's guard is the status only (`PUT ?if_status=`), so two writers that read the
# same version can both write when the first keeps the status (a progress update): revisions
# can then tie, or even go back. Ranks cannot: every write is guarded by the status it read.


def race(first: StatusEvent, second: StatusEvent) -> tuple[Applied, Applied]:
    """Both writers read revision 5 (running); the first keeps `running`, so both writes land."""
    stored = envelope(Status.RUNNING, revision=5)
    a = apply_event(stored, first, later(1))
    b = apply_event(stored, second, later(1))
    assert isinstance(a, Applied) and isinstance(b, Applied)
    assert a.envelope.revision == b.envelope.revision == 6
    return a, b


@pytest.mark.parametrize(
    "second",
    [Status.SUCCEEDED, Status.CANCELED, Status.FAILED, Status.PAUSED],
    ids=str,
)
def test_a_change_racing_a_progress_update_is_never_dropped(second: Status) -> None:
    progress, change = race(
        StatusEvent(status=Status.RUNNING, data={"n": 1}), StatusEvent(status=second)
    )
    stream = SseStream(keepalive=15)
    stream.catch_up(progress.envelope)  # the snapshot saw the progress write (revision 6)
    frames = [Published.status(progress), Published.status(change)]
    assert stream.live(frames) == Published.status(change).frame
    assert stream.done is (second is not Status.PAUSED)


def test_a_change_behind_a_newer_revision_is_not_dropped() -> None:
    """Rev 5 running; B and C progress to 6 and 7; A (read at 5) pauses at revision 6."""
    stored = envelope(Status.RUNNING, revision=5)
    b = apply_event(stored, StatusEvent(status=Status.RUNNING), later(1))
    assert isinstance(b, Applied)
    c = apply_event(b.envelope, StatusEvent(status=Status.RUNNING), later(2))
    a = apply_event(stored, StatusEvent(status=Status.PAUSED), later(3))
    assert isinstance(c, Applied) and isinstance(a, Applied)
    stream = SseStream(keepalive=15)
    stream.catch_up(c.envelope)
    sent = stream.live([Published.status(b), Published.status(c), Published.status(a)])
    assert sent == Published.status(a).frame
