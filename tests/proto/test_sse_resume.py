"""SSE ids and resume (docs/contract.md, "SSE"): id parsing, what a resuming stream sends first,
live dedupe against the replay, resyncs, and the exact bytes with `id:` and `retry:`."""

from __future__ import annotations

import pytest

from mesh_proto import (
    Envelope,
    Gap,
    Published,
    Send,
    SseParser,
    SseStream,
    Status,
    catch_up_frame,
    encode_frame,
    parse_event_id,
)
from mesh_proto._sse import FROM_START

from ._support import envelope


def fly(seq: int | None, text: str = "") -> Published:
    return Published(frame=f"<fly {text or seq}>".encode(), seq=seq)


def status(version: int, seq: int, name: str = "running") -> Published:
    return Published(
        frame=f"<{name} {version}>".encode(),
        terminal=Status(name).terminal,
        version=version,
        rank=Status(name).rank,
        seq=seq,
    )


def resumed(last_event_id: str | None) -> tuple[SseStream, int | None]:
    stream = SseStream(keepalive=15)
    return stream, stream.resume(last_event_id)


def shape(sends: list[Send]) -> list[tuple[str, tuple[int, int]]]:
    """Each send as a short label and its id."""
    out = []
    for item, rev, seq in sends:
        if isinstance(item, Envelope):
            out.append((f"snapshot {item.revision}", (rev, seq)))
        elif isinstance(item, Gap):
            out.append((f"gap {item.last_event_id}", (rev, seq)))
        else:
            out.append((item.frame.decode(), (rev, seq)))
    return out


# --- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("3.17", (3, 17)),
        ("0.0", (0, 0)),
        ("12.1733000000000000", (12, 1733000000000000)),
        ("3", None),
        ("", None),
        ("a.b", None),
        ("1.2.3", None),
        ("-1.2", None),
        (" 1.2", None),
        ("1." + "9" * 20, None),
    ],
)
def test_parse_event_id(value: str, parsed: tuple[int, int] | None) -> None:
    assert parse_event_id(value) == parsed


def test_framed_prepends_the_id_and_caches_the_last() -> None:
    event = fly(5)
    first = event.framed(2, 5)
    assert first == b"id: 2.5\n<fly 5>"
    assert event.framed(2, 5) is first  # the next subscriber at the same id shares it
    assert event.framed(3, 5) == b"id: 3.5\n<fly 5>"
    assert event.framed(3, 6) == b"id: 3.6\n<fly 5>"
    assert event == fly(5)  # the cache is no part of the value


def test_with_seq_is_the_same_event_with_its_seq() -> None:
    event = status(4, 0)
    assert event.with_seq(9) == Published(
        frame=event.frame, terminal=False, version=4, rank=event.rank, seq=9
    )


def test_gap_frame() -> None:
    assert Gap("x.y").frame() == encode_frame("gap", {"last_event_id": "x.y"})


# --- a fresh stream -----------------------------------------------------------------------


def test_fresh_stream_bytes_open_with_retry_and_carry_ids() -> None:
    stream = SseStream(keepalive=15, retry=2.5)
    assert stream.resume(None) is None
    stored = envelope(Status.RUNNING, revision=3)
    first = stream.encode(stream.start(stored))
    assert first == b"retry: 2500\nid: 3.0\n" + catch_up_frame(stored)
    sends = stream.passed([fly(7), status(4, 8), fly(9)])
    assert stream.encode(sends) == b"id: 3.7\n<fly 7>id: 4.8\n<running 4>id: 4.9\n<fly 9>"
    assert stream.seq == 9
    events = SseParser().feed(first)
    assert [e.id for e in events] == ["3.0"]


def test_an_empty_id_is_a_fresh_stream() -> None:
    stream, after = resumed("")
    assert after is None
    assert shape(stream.start(envelope(Status.RUNNING, revision=2))) == [("snapshot 2", (2, 0))]


def test_retry_alone_when_the_first_write_has_no_frame() -> None:
    stream = SseStream(keepalive=15, retry=3)
    assert stream.encode([]) == b"retry: 3000\n\n"
    assert stream.encode([]) == b""


def test_no_retry_line_without_a_retry() -> None:
    stream = SseStream(keepalive=15)
    stored = envelope(Status.RUNNING, revision=1)
    assert stream.encode(stream.start(stored)) == b"id: 1.0\n" + catch_up_frame(stored)


def test_live_drops_fly_already_passed_and_status_already_held() -> None:
    stream = SseStream(keepalive=15)
    stream.start(envelope(Status.RUNNING, revision=3))
    sends = stream.passed([fly(5), fly(5), fly(4), status(3, 6), fly(None), status(5, 7)])
    assert shape(sends) == [
        ("<fly 5>", (3, 5)),
        ("<fly None>", (3, 5)),
        ("<running 5>", (5, 7)),
    ]
    assert shape(stream.passed([status(6, 8, "succeeded"), fly(9)])) == [("<succeeded 6>", (6, 8))]
    assert stream.done


# --- resume -------------------------------------------------------------------------------


def test_resume_at_the_stored_revision_replays_fly_only() -> None:
    stream, after = resumed("3.10")
    assert after == 10
    sends = stream.start(envelope(Status.RUNNING, revision=3), [fly(11), fly(12)])
    assert shape(sends) == [("<fly 11>", (3, 11)), ("<fly 12>", (3, 12))]
    assert not stream.done
    # The live subscription delivers some replayed events again, and a status the client has.
    live = [fly(12), status(3, 12), fly(13), status(4, 14)]
    assert shape(stream.passed(live)) == [("<fly 13>", (3, 13)), ("<running 4>", (4, 14))]


def test_a_live_status_older_than_the_replay_keeps_the_ids_going_up() -> None:
    stream, _ = resumed("3.10")
    stream.start(envelope(Status.RUNNING, revision=3), [fly(13)])
    # Published after the subscription, before the replay: below the replayed seq.
    assert shape(stream.passed([status(4, 12)])) == [("<running 4>", (4, 13))]


def test_resume_behind_the_store_replays_then_catches_up() -> None:
    stream, _ = resumed("2.10")
    sends = stream.start(envelope(Status.RUNNING, revision=4), [fly(11)])
    assert shape(sends) == [("<fly 11>", (2, 11)), ("snapshot 4", (4, 11))]
    assert shape(stream.passed([status(4, 12), fly(11), fly(13)])) == [("<fly 13>", (4, 13))]


def test_resume_of_a_terminal_envelope_it_already_has_answers_one_frame() -> None:
    stream, _ = resumed("5.20")
    sends = stream.start(envelope(Status.SUCCEEDED, revision=5), [])
    assert shape(sends) == [("snapshot 5", (5, 20))]
    assert stream.done


def test_resume_of_a_terminal_envelope_sends_the_tokens_before_the_end() -> None:
    stream, _ = resumed("2.10")
    sends = stream.start(envelope(Status.FAILED, revision=3), [fly(11)])
    assert shape(sends) == [("<fly 11>", (2, 11)), ("snapshot 3", (3, 11))]
    assert stream.done


def test_from_start_is_the_replay_then_the_snapshot() -> None:
    stream, after = resumed(FROM_START)
    assert after == 0
    stored = envelope(Status.PENDING, revision=0)
    sends = stream.start(stored, [fly(3), fly(4)])
    assert shape(sends) == [("<fly 3>", (0, 3)), ("<fly 4>", (0, 4)), ("snapshot 0", (0, 4))]


@pytest.mark.parametrize("last_event_id", ["junk", "3", "7.1"], ids=["junk", "no-seq", "rev-ahead"])
def test_unknown_id_is_a_gap_and_a_fresh_snapshot(last_event_id: str) -> None:
    stream, after = resumed(last_event_id)
    assert after == (1 if last_event_id == "7.1" else None)
    sends = stream.start(envelope(Status.RUNNING, revision=4), [fly(5)])
    assert shape(sends) == [(f"gap {last_event_id}", (0, 0)), ("snapshot 4", (4, 0))]
    assert shape(stream.passed([fly(2)])) == [("<fly 2>", (4, 2))]  # nothing live is lost


def test_gap_sends_the_survivors_after_a_fresh_snapshot() -> None:
    stream, _ = resumed("3.10")
    sends = stream.start(envelope(Status.RUNNING, revision=4), [fly(30), fly(31)], True)
    assert shape(sends) == [
        ("gap 3.10", (0, 0)),
        ("snapshot 4", (4, 0)),
        ("<fly 30>", (4, 30)),
        ("<fly 31>", (4, 31)),
    ]


def test_gap_of_a_terminal_envelope_ends_with_the_snapshot() -> None:
    stream, _ = resumed(FROM_START)
    sends = stream.start(envelope(Status.CANCELED, revision=2), [fly(30)], True)
    assert shape(sends) == [("gap 0", (0, 0)), ("snapshot 2", (2, 0))]
    assert stream.done


# --- resync -------------------------------------------------------------------------------


def test_resync_replays_after_the_stream_seq_then_catches_up() -> None:
    stream = SseStream(keepalive=15)
    stream.start(envelope(Status.RUNNING, revision=3))
    stream.passed([fly(10)])
    sends = stream.resync(envelope(Status.RUNNING, revision=5), [fly(10), fly(12)])
    assert shape(sends) == [("<fly 12>", (3, 12)), ("snapshot 5", (5, 12))]


def test_resync_with_a_gap_keeps_the_ids_going_up() -> None:
    stream = SseStream(keepalive=15)
    stream.start(envelope(Status.RUNNING, revision=3))
    stream.passed([fly(10)])
    sends = stream.resync(envelope(Status.RUNNING, revision=5), [fly(40)], True)
    assert shape(sends) == [
        ("gap 3.10", (3, 10)),
        ("snapshot 5", (5, 10)),
        ("<fly 40>", (5, 40)),
    ]


def test_encode_of_every_kind_of_send() -> None:
    stream = SseStream(keepalive=15)
    stored = envelope(Status.RUNNING, revision=1)
    sends: list[Send] = [(Gap("9.9"), 0, 0), (stored, 1, 0), (fly(4), 1, 4)]
    assert stream.encode(sends) == (
        b"id: 0.0\n" + Gap("9.9").frame() + b"id: 1.0\n" + catch_up_frame(stored)
        + b"id: 1.4\n<fly 4>"
    )  # fmt: skip
