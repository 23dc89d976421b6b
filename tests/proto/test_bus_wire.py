"""The event bus on the wire (feature `events`): the event form of `Published` frames, the bus
records, `POST /events`, the replay, and the publishing `PUT ?publish=1` of `update_status`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_proto import (
    MAX_EVENTS,
    Applied,
    BadRequest,
    BusEvent,
    Ignored,
    Published,
    Rule,
    ServiceError,
    Status,
    StatusEvent,
    StoreProtocolError,
    StoreReply,
    StoreRequest,
    dumps,
    event_bytes,
    events_request,
    is_origin,
    parse_after,
    peek_bus_record,
    published_of,
    read_published,
    read_replay,
    read_seqs,
    replay_request,
    update_status,
)

from ._support import ID, T0, drive, envelope

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


def reply(status: int, value: Any = b"") -> StoreReply:
    return StoreReply(status=status, body=value if isinstance(value, bytes) else dumps(value))


def applied(status: Status = Status.RUNNING, revision: int = 3, **data: Any) -> Applied:
    return Applied(
        rule=Rule.TRANSITION,
        envelope=envelope(status, revision=revision),
        event=StatusEvent(status=status, data=data),
    )


# --- the event form of frames -------------------------------------------------------------


@given(JSON_VALUES)
def test_a_fly_frame_crosses_the_bus_unchanged(data: Any) -> None:
    sent = Published.fly(data)
    event = json.loads(event_bytes(sent))
    assert event == {"kind": "fly", "data": data}
    assert published_of(event, 7) == attrs.evolve(sent, seq=7)


@pytest.mark.parametrize("status", [Status.RUNNING, Status.SUCCEEDED, Status.CANCELED])
def test_a_status_frame_crosses_the_bus_unchanged(status: Status) -> None:
    sent = Published.status(applied(status, 5, progress=0.5))
    event = json.loads(event_bytes(sent))
    assert event == {
        "kind": "status",
        "data": {"progress": 0.5, "status": str(status)},
        "rev": 5,
        "rank": sent.rank,
        "terminal": status is not Status.RUNNING,
    }
    assert published_of(event, 9) == attrs.evolve(sent, seq=9)


def test_a_status_frame_without_a_rank_has_none_on_the_bus() -> None:
    sent = attrs.evolve(Published.status(applied()), rank=None)
    event = json.loads(event_bytes(sent))
    assert "rank" not in event
    assert published_of(event, 1) == attrs.evolve(sent, seq=1)


def test_only_frames_of_encode_frame_have_an_event_form() -> None:
    for frame in (b"event: fly\n\n", b"event: fly\ndata: 1\n"):
        with pytest.raises(ValueError, match="not a frame"):
            event_bytes(Published(frame=frame))


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        {"kind": "fly"},
        {"kind": "other", "data": 1},
        {"kind": "status", "data": [], "rev": 1, "terminal": False},
        {"kind": "status", "data": {}, "rev": "1", "terminal": False},
        {"kind": "status", "data": {}, "rev": True, "terminal": False},
        {"kind": "status", "data": {}, "rev": 1, "rank": "2", "terminal": False},
        {"kind": "status", "data": {}, "rev": 1, "terminal": 0},
        {"kind": "status", "data": {}, "rev": 1},
    ],
    ids=repr,
)
def test_foreign_events_are_refused(event: Any) -> None:
    with pytest.raises(StoreProtocolError, match="not a fly or status event"):
        published_of(event, 1)


# --- records, origins, replay bounds ------------------------------------------------------


def test_a_bus_record_and_its_frame() -> None:
    doc = {"seq": 4, "key": "msg/x", "origin": "a-1", "event": {"kind": "fly", "data": [1]}}
    record = BusEvent.from_json(doc)
    assert record == BusEvent(seq=4, key="msg/x", origin="a-1", event={"kind": "fly", "data": [1]})
    assert record.published() == attrs.evolve(Published.fly([1]), seq=4)


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"key": "k", "origin": "o", "event": {}},
        {"seq": True, "key": "k", "origin": "o", "event": {}},
        {"seq": 1, "key": 2, "origin": "o", "event": {}},
        {"seq": 1, "key": "k", "origin": None, "event": {}},
    ],
    ids=repr,
)
def test_malformed_bus_records_are_refused(doc: Any) -> None:
    with pytest.raises(StoreProtocolError, match="bus record"):
        BusEvent.from_json(doc)


@pytest.mark.parametrize(
    ("text", "valid"),
    [("a", True), ("A-z_0.9", True), ("x" * 64, True), ("x" * 65, False), ("", False),
     ("a b", False), ("a/b", False), ("caf\u00e9", False), (None, False), (3, False)],
    ids=repr,
)  # fmt: skip
def test_origins(text: Any, valid: bool) -> None:
    assert is_origin(text) is valid


def test_parse_after() -> None:
    assert parse_after("0") == 0
    assert parse_after("0012") == 12
    assert parse_after("9" * 30) == int("9" * 30)
    for bad in ("", "-1", "+1", " 1", "1.0", "\u0661"):
        with pytest.raises(BadRequest, match="after must be"):
            parse_after(bad)


# --- POST /events and the replay ----------------------------------------------------------


def test_events_request_posts_the_spliced_events_in_order() -> None:
    request = events_request("r-1", [("msg/a", b'{"kind":"fly","data":1}'), ("k/b", b"{}")])
    assert (request.method, request.target) == ("POST", "/events")
    assert json.loads(request.body) == {
        "origin": "r-1",
        "events": [
            {"key": "msg/a", "event": {"kind": "fly", "data": 1}},
            {"key": "k/b", "event": {}},
        ],
    }


def test_events_request_takes_1_to_max_events() -> None:
    assert events_request("o", [("k", b"{}")] * MAX_EVENTS).target == "/events"
    for count in (0, MAX_EVENTS + 1):
        with pytest.raises(ValueError, match="takes 1 to"):
            events_request("o", [("k", b"{}")] * count)


def test_read_seqs() -> None:
    assert read_seqs(reply(200, {"seqs": [3, 4]}), 2) == [3, 4]
    bad_bodies: tuple[Any, ...] = ({"seqs": [3]}, {"seqs": 3}, {"seqs": [3, "4"]}, [], {"seq": 3})
    for bad in bad_bodies:
        with pytest.raises(StoreProtocolError):
            read_seqs(reply(200, bad), 2)
    with pytest.raises(ServiceError):
        read_seqs(reply(503, {"error": "down"}), 1)
    with pytest.raises(StoreProtocolError):
        read_seqs(reply(400, {"error": "bad"}), 1)


def test_replay_request_encodes_the_key() -> None:
    assert replay_request("msg/a b", 12) == StoreRequest(
        method="GET", target="/events/msg%2Fa%20b?after=12"
    )


def test_read_replay() -> None:
    row = {"seq": 5, "key": "k", "origin": "o", "event": {"kind": "fly", "data": None}}
    assert read_replay(reply(200, {"events": [row], "gap": True})) == (
        [BusEvent.from_json(row)],
        True,
    )
    assert read_replay(reply(200, {"events": [], "gap": False})) == ([], False)
    bad_bodies: tuple[Any, ...] = (
        [],
        {"events": {}, "gap": False},
        {"events": [], "gap": 0},
        {"gap": False},
    )
    for bad in bad_bodies:
        with pytest.raises(StoreProtocolError, match="replay reply"):
            read_replay(reply(200, bad))
    with pytest.raises(ServiceError):
        read_replay(reply(503, b"down"))


def test_read_published() -> None:
    assert read_published(reply(200, {"seq": 8})) == 8
    assert read_published(reply(409, b"conflict")) is None
    bad_bodies: tuple[Any, ...] = ({}, {"seq": "8"}, {"seq": None}, [])
    for bad in bad_bodies:
        with pytest.raises(StoreProtocolError, match="no seq"):
            read_published(reply(200, bad))
    with pytest.raises(ServiceError):
        read_published(reply(503, b"down"))


# --- the publishing PUT -------------------------------------------------------------------


@attrs.define
class PublishingKV:
    """One stored envelope behind a proxy that honours both guards and `publish=1`."""

    value: dict[str, Any]
    rev: int
    seq: int = 100
    published: list[tuple[str, Any]] = attrs.field(factory=list)
    writes: list[str] = attrs.field(factory=list)

    def __call__(self, request: StoreRequest) -> StoreReply:
        stamp = "2026-11-28T14:24:06Z"
        value = {**self.value, "_rev": self.rev}
        row = {"key": f"msg/{ID}", "value": value, "created_at": stamp, "updated_at": stamp}
        if request.method == "GET":
            return reply(200, row)
        params = dict(parse_qsl(urlsplit(request.target).query))
        self.writes.append(urlsplit(request.target).query)
        if params["if_status"] != self.value["status"] or int(params["if_rev"]) != self.rev:
            return reply(409, {"error": "conflict"})
        body = json.loads(request.body)
        assert params["publish"] == "1"
        self.value, self.rev = body["value"], self.rev + 1
        self.seq += 1
        self.published.append((params["origin"], body["event"]))
        return reply(200, {"seq": self.seq})


def test_a_publishing_update_stores_and_publishes_in_one_put() -> None:
    kv = PublishingKV({"status": "running", "actor": "echo"}, rev=2)
    event = StatusEvent(status=Status.SUCCEEDED, data={"result": 1})
    outcome = drive(update_status(ID, event, T0, publish="replica-a"), kv)
    assert isinstance(outcome, Applied) and outcome.seq == 101
    assert kv.writes == ["if_status=running&if_rev=2&publish=1&origin=replica-a"]
    assert kv.value["status"] == "succeeded"
    sent = attrs.evolve(Published.status(outcome), seq=None)
    assert kv.published == [("replica-a", json.loads(event_bytes(sent)))]
    assert Published.status(outcome).seq == 101


def test_the_published_status_of_a_change_is_made_once() -> None:
    """The frame the bus got is the one the runtime then publishes: encoded once."""
    kv = PublishingKV({"status": "running"}, rev=2)
    outcome = drive(update_status(ID, StatusEvent(status=Status.PAUSED), T0, publish="a"), kv)
    assert isinstance(outcome, Applied)
    published = Published.status(outcome)
    assert published is Published.status(outcome) and published.seq == outcome.seq
    assert json.loads(event_bytes(published)) == kv.published[0][1]
    fresh = applied()
    assert Published.status(fresh) is Published.status(fresh)
    assert Published.status(fresh) is not Published.status(applied())


def test_a_publishing_update_that_loses_a_race_publishes_nothing_and_reads_again() -> None:
    kv = PublishingKV({"status": "running", "actor": "echo"}, rev=3)
    known = envelope(Status.RUNNING, {"actor": "echo"}, revision=2)
    event = StatusEvent(status=Status.RUNNING, data={"step": 1})
    outcome = drive(update_status(ID, event, T0, known=known, publish="o"), kv)
    assert isinstance(outcome, Applied) and outcome.seq == 101
    assert [w.split("&")[1] for w in kv.writes] == ["if_rev=2", "if_rev=3"]
    assert len(kv.published) == 1


def test_a_stale_event_publishes_nothing() -> None:
    kv = PublishingKV({"status": "succeeded", "actor": "echo"}, rev=3)
    event = StatusEvent(status=Status.RUNNING, data={})
    outcome = drive(update_status(ID, event, T0, publish="o"), kv)
    assert isinstance(outcome, Ignored)
    assert kv.writes == [] and kv.published == []


# --- reading a watch line's key and origin without its event -------------------------------


@given(st.integers(0, 2**63), st.text(), st.text(), JSON_VALUES, st.booleans())
def test_peek_reads_key_and_origin_of_any_line_the_proxy_writes(
    seq: int, key: str, origin: str, event: Any, ascii_only: bool
) -> None:
    def encode(value: Any) -> str:
        return json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))

    line = f'{{"seq":{seq},"key":{encode(key)},"origin":{encode(origin)},"event":{encode(event)}}}'
    assert peek_bus_record(line) == (key, origin)
    record = BusEvent.from_json(json.loads(line))
    assert (record.key, record.origin) == (key, origin)


PIECES = ['{"seq":', "1", ',"key":', '"k"', '"o\\"', ',"origin":', '"o"', ',"event":{}', "}",
          " ", "[", '"', "\\", "null"]  # fmt: skip


@given(st.lists(st.sampled_from(PIECES), max_size=10).map("".join))
def test_peek_agrees_with_the_whole_decode_or_declines(line: str) -> None:
    peeked = peek_bus_record(line)
    if peeked is None:
        return
    try:
        record = BusEvent.from_json(json.loads(line))
    except (ValueError, StoreProtocolError):
        return  # not a record at all: the whole decode refuses it as well
    assert peeked == (record.key, record.origin)
