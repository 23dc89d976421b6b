"""The envelope's shapes (docs/contract.md), the backstop's decision, time and errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_proto import (
    GATEWAY_HEADER,
    BadRequest,
    ClientError,
    CreateRequest,
    Envelope,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ServiceError,
    Status,
    StoreProtocolError,
    dumps,
    expired,
    format_time,
    is_expired,
    loads,
    parse_time,
    queue_name,
)

from ._support import ID, OTHER_ID, T0, envelope, later

STAMP = "2026-11-28T14:24:06.123456Z"


def test_queue_name() -> None:
    assert queue_name("default", "echo") == "asya-default-echo"


def test_new_envelope_is_pending_with_request_data() -> None:
    request = CreateRequest(actor="echo", payload={"q": 1}, headers={"h": "v"})
    new = Envelope.new(request, envelope_id=ID, now=T0, gateway_url="http://mesh:8081")
    assert new == Envelope(
        id=ID,
        status=Status.PENDING,
        created_at=T0,
        updated_at=T0,
        data={
            "actor": "echo",
            "payload": {"q": 1},
            "headers": {"h": "v", GATEWAY_HEADER: "http://mesh:8081"},
        },
        revision=0,
    )
    assert new.deadline_at is None
    assert request.headers == {"h": "v"}, "the request is not mutated"


@pytest.mark.parametrize(
    ("gateway", "traceparent", "headers"),
    [
        (None, None, {GATEWAY_HEADER: "http://evil"}),
        ("http://mesh", None, {GATEWAY_HEADER: "http://mesh"}),
        (None, "00-abc-def-01", {GATEWAY_HEADER: "http://evil", "traceparent": "00-abc-def-01"}),
        ("http://mesh", "00-1-2-01", {GATEWAY_HEADER: "http://mesh", "traceparent": "00-1-2-01"}),
    ],
    ids=["no-gateway-configured", "gateway-overwritten", "traceparent", "both"],
)
def test_new_envelope_headers(
    gateway: str | None, traceparent: str | None, headers: dict[str, str]
) -> None:
    request = CreateRequest(actor="a", headers={GATEWAY_HEADER: "http://evil"})
    new = Envelope.new(
        request, envelope_id=ID, now=T0, gateway_url=gateway, traceparent=traceparent
    )
    assert new.data["headers"] == headers


@pytest.mark.parametrize(
    ("timeout", "deadline"),
    [(1.5, "2026-11-28T14:24:07.623456Z"), (30.0, "2026-11-28T14:24:36.123456Z"),
     (1e-6, "2026-11-28T14:24:06.123457Z"), (0.0, None)],
    ids=["fractional", "whole", "one-microsecond", "none"],
)  # fmt: skip
def test_new_envelope_deadline(timeout: float, deadline: str | None) -> None:
    new = Envelope.new(
        CreateRequest(actor="a", timeout=timeout), envelope_id=ID, now=T0, gateway_url=None
    )
    assert new.data.get("deadline_at") == deadline
    assert new.deadline_at == (None if deadline is None else T0 + timedelta(seconds=timeout))


def test_json_shapes() -> None:
    stored = envelope(Status.PAUSED, {"actor": "echo", "x": [1]}, revision=5, updated_at=later(2))
    assert stored.to_json() == {
        "id": ID,
        "status": "paused",
        "created_at": STAMP,
        "updated_at": "2026-11-28T14:24:08.123456Z",
        "data": {"actor": "echo", "x": [1]},
    }
    assert stored.to_value() == {"actor": "echo", "x": [1], "status": "paused", "_rev": 5}
    assert type(stored.to_value()["status"]) is str
    again = Envelope.from_value(
        ID, stored.to_value(), created_at=STAMP, updated_at="2026-11-28T14:24:08.123456Z"
    )
    assert again == stored


def test_encoded_is_the_json_shape_and_each_version_has_its_own() -> None:
    stored = envelope(Status.RUNNING, {"actor": "echo", "x": "é"}, revision=1)
    assert json.loads(stored.encoded()) == stored.to_json()
    assert stored.encoded() == stored.encoded()
    assert stored.encoded().isascii()
    changed = attrs.evolve(stored, status=Status.SUCCEEDED, revision=2)
    assert json.loads(changed.encoded())["status"] == "succeeded"
    assert json.loads(stored.encoded())["status"] == "running"
    assert changed != stored and attrs.evolve(stored) == stored


def test_stored_status_and_revision_never_leak_into_data() -> None:
    value = {"actor": "a", "status": "running", "_rev": 2}
    restored = Envelope.from_value(ID, value, created_at=STAMP, updated_at=STAMP)
    assert restored.data == {"actor": "a"}
    assert value == {"actor": "a", "status": "running", "_rev": 2}, "input not mutated"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", f"stored envelope {ID} is not an object"),
        ({"actor": "a"}, f"stored envelope {ID} is invalid"),
        ({"status": "done"}, f"stored envelope {ID} is invalid"),
    ],
    ids=["not-object", "no-status", "unknown-status"],
)
def test_from_value_rejects(value: Any, message: str) -> None:
    with pytest.raises(StoreProtocolError, match=message):
        Envelope.from_value(ID, value, created_at=STAMP, updated_at=STAMP)


def test_wire_message() -> None:
    new = Envelope.new(
        CreateRequest(actor="echo", payload=[1], headers={"h": "v"}, timeout=2),
        envelope_id=ID,
        now=T0,
        gateway_url="http://gw",
    )
    assert json.loads(new.wire_message()) == {
        "id": ID,
        "route": {"prev": [], "curr": "echo", "next": []},
        "headers": {"h": "v", GATEWAY_HEADER: "http://gw"},
        "payload": [1],
        "status": {
            "phase": "pending",
            "actor": "echo",
            "attempt": 1,
            "max_attempts": 1,
            "created_at": STAMP,
            "updated_at": STAMP,
            "deadline_at": "2026-11-28T14:24:08.123456Z",
        },
    }
    assert b"\n" not in new.wire_message() and b" " not in new.wire_message()


def test_wire_message_without_deadline() -> None:
    new = Envelope.new(CreateRequest(actor="a"), envelope_id=ID, now=T0, gateway_url=None)
    assert json.loads(new.wire_message())["status"] == {
        "phase": "pending",
        "actor": "a",
        "attempt": 1,
        "max_attempts": 1,
        "created_at": STAMP,
        "updated_at": STAMP,
    }


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    actor=st.text() | st.none(),
    payload=JSON_VALUES,
    headers=st.dictionaries(st.text(), st.text(), max_size=3),
    deadline=st.none() | st.text(),
    later_by=st.sampled_from([0, 1]),
)
def test_wire_message_is_the_messages_json(
    actor: str | None, payload: Any, headers: dict[str, str], deadline: str | None, later_by: int
) -> None:
    # Assembled from pieces, it must be byte for byte what encoding the whole message gives.
    data: dict[str, Any] = {"actor": actor, "payload": payload, "headers": headers}
    if deadline is not None:
        data["deadline_at"] = deadline
    updated = T0 + timedelta(seconds=later_by)
    new = Envelope(id=ID, status=Status.PENDING, created_at=T0, updated_at=updated, data=data)
    status: dict[str, Any] = {
        "phase": "pending",
        "actor": actor,
        "attempt": 1,
        "max_attempts": 1,
        "created_at": format_time(T0),
        "updated_at": format_time(updated),
    }
    if deadline is not None:
        status["deadline_at"] = deadline
    whole = {
        "id": ID,
        "route": {"prev": [], "curr": actor, "next": []},
        "headers": headers,
        "payload": payload,
        "status": status,
    }
    assert new.wire_message() == dumps(whole)


@pytest.mark.parametrize(
    ("raw", "deadline"),
    [
        (STAMP, T0),
        ("2026-11-28T15:24:06.123456+01:00", T0),
        ("2026-11-28T14:24:06", None),
        ("soon", None),
        (12, None),
        (None, None),
    ],
    ids=["utc", "offset", "naive", "garbage", "number", "null"],
)
def test_deadline_at_reads_what_it_can(raw: Any, deadline: datetime | None) -> None:
    assert envelope(data={"deadline_at": raw}).deadline_at == deadline


# --- backstop -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "deadline", "now", "result"),
    [
        (Status.PENDING, STAMP, later(1), True),
        (Status.RUNNING, STAMP, T0, True),
        (Status.PAUSED, STAMP, later(1), True),
        (Status.RUNNING, STAMP, later(-1), False),
        (Status.SUCCEEDED, STAMP, later(1), False),
        (Status.FAILED, STAMP, later(1), False),
        (Status.CANCELED, STAMP, later(1), False),
        (Status.RUNNING, None, later(1), False),
        (Status.RUNNING, "garbage", later(1), False),
    ],
    ids=["pending-past", "running-at-deadline", "paused-past", "before-deadline",
         "succeeded", "failed", "canceled", "no-deadline", "unreadable-deadline"],
)  # fmt: skip
def test_is_expired(status: Status, deadline: str | None, now: datetime, result: bool) -> None:
    data = {"actor": "a"} if deadline is None else {"deadline_at": deadline}
    assert is_expired(envelope(status, data), now) is result


def test_expired_keeps_the_order_given() -> None:
    live = envelope(Status.RUNNING, {"deadline_at": STAMP}, envelope_id=OTHER_ID)
    done = envelope(Status.SUCCEEDED, {"deadline_at": STAMP}, envelope_id="done")
    first = envelope(Status.PENDING, {"deadline_at": STAMP})
    assert expired([live, done, first], later(1)) == [OTHER_ID, ID]
    assert expired([], later(1)) == []


# --- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (T0, STAMP),
        (T0.astimezone(timezone(timedelta(hours=-5))), STAMP),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000000Z"),
    ],
    ids=["utc", "other-zone", "whole-seconds"],
)
def test_format_time(moment: datetime, text: str) -> None:
    assert format_time(moment) == text
    assert parse_time(text) == moment


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-11-28T14:24:06.123456+00:00", T0),
        ("2026-11-28T09:24:06.123456-05:00", T0),
        ("2026-11-28T14:24:06Z", T0.replace(microsecond=0)),
        ("2026-11-28 14:24:06.123456Z", T0),
    ],
    ids=["plus-zero", "minus-five", "no-fraction", "space"],
)
def test_parse_time_variants(text: str, moment: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == moment and parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["2026-11-28T14:24:06", "yesterday", ""], ids=repr)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


# --- JSON and errors ----------------------------------------------------------------------


def test_dumps_is_compact_ascii_one_line() -> None:
    assert dumps({"a": [1, "é\n"], "b": None}) == b'{"a":[1,"\\u00e9\\n"],"b":null}'


@pytest.mark.parametrize(
    ("raw", "value"),
    [(b"{}", {}), (b" [1, 2.5] ", [1, 2.5]), (b'"\\ud800"', "\ud800"), (b"1e308", 1e308)],
    ids=["object", "spaces", "lone-surrogate", "largest-finite"],
)
def test_loads(raw: bytes, value: Any) -> None:
    assert loads(raw) == value


def test_loads_raises_the_callers_error_type() -> None:
    with pytest.raises(StoreProtocolError, match=r"^invalid JSON reply: Expecting value$"):
        loads(b"", error=StoreProtocolError, what="reply")


@pytest.mark.parametrize(
    ("error", "status", "family"),
    [
        (BadRequest("bad"), 400, ClientError),
        (NotFound("gone"), 404, ClientError),
        (PayloadTooLarge("big"), 413, ClientError),
        (ClientError("client"), 400, ClientError),
        (ServiceError("store down"), 503, ServiceError),
        (StoreProtocolError("garbage"), 502, ServiceError),
        (ProtocolError("bug"), 500, ProtocolError),
        (ProtocolError("teapot", status_hint=418), 418, ProtocolError),
        (ServiceError("later", status_hint=504), 504, ServiceError),
    ],
    ids=["bad-request", "not-found", "too-large", "client", "service", "store-protocol",
         "base", "hint-override", "service-override"],
)  # fmt: skip
def test_error_family_carries_its_reply(
    error: ProtocolError, status: int, family: type[ProtocolError]
) -> None:
    assert isinstance(error, family)
    assert error.status_hint == status
    assert error.headers == ()
    assert json.loads(error.body()) == {"error": error.message}
    assert str(error) == error.message
    assert isinstance(error, ClientError) is (400 <= status < 500 and status != 418)


def test_hint_override_is_per_instance() -> None:
    ProtocolError("x", status_hint=418)
    assert ProtocolError("y").status_hint == 500


def test_method_not_allowed() -> None:
    error = MethodNotAllowed(("GET", "POST"))
    assert (error.status_hint, error.allowed, error.headers) == (
        405,
        ("GET", "POST"),
        (("allow", "GET, POST"),),
    )
    assert error.body() == b'{"error": "method not allowed"}'


def test_error_body_escapes_the_message() -> None:
    assert BadRequest('say "hi"\n').body() == b'{"error": "say \\"hi\\"\\n"}'
