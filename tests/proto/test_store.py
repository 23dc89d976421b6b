"""The state-proxy client (docs/stateproxy.md): exact requests, reply readers, and the procedures.

The procedures run against `FakeKV`, an in-test state proxy with the `GET` / `PUT ?if_status=`
semantics of the real one, which can also let another writer in, fail, or answer garbage
before serving a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_proto import (
    FEATURES_HEADER,
    RANK,
    REV_GUARD,
    RULES,
    TERMINAL,
    Applied,
    Envelope,
    Ignored,
    ListQuery,
    Outcome,
    PayloadTooLarge,
    Published,
    Rule,
    ServiceError,
    SseParser,
    SseStream,
    Status,
    StatusEvent,
    StoreProtocolError,
    StoreReply,
    StoreRequest,
    apply_event,
    check_delete,
    check_health,
    check_write,
    create_envelope,
    delete_query_request,
    delete_request,
    dumps,
    envelope_key,
    expired_request,
    get_request,
    health_request,
    list_request,
    purge_request,
    put_request,
    query_request,
    read_deleted,
    read_envelope,
    read_rows,
    update_status,
)
from mesh_proto._store import MAX_ATTEMPTS, key_target

from ._support import ID, OTHER_ID, T0, drive, envelope, later

JSON = (("content-type", "application/json"),)
STAMP = "2026-11-28T14:24:06.123456Z"

# --- requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "target"),
    [
        (f"msg/{ID}", f"/keys/msg%2F{ID}"),
        ("plain", "/keys/plain"),
        ("a?if_status=x", "/keys/a%3Fif_status%3Dx"),
        ("a#frag", "/keys/a%23frag"),
        ("a/b/c", "/keys/a%2Fb%2Fc"),
        ("100%", "/keys/100%25"),
        ("%2F", "/keys/%252F"),
        ("..", "/keys/%2E%2E"),
        (".", "/keys/%2E"),
        ("../healthz", "/keys/..%2Fhealthz"),
        ("a..b", "/keys/a..b"),
        ("a b+c&d", "/keys/a%20b%2Bc%26d"),
        ("line\r\nHost: x", "/keys/line%0D%0AHost%3A%20x"),
        ("caf\u00e9", "/keys/caf%C3%A9"),
    ],
    ids=repr,
)
def test_keys_are_one_percent_encoded_segment(key: str, target: str) -> None:
    assert key_target(key) == target
    assert get_request(key) == StoreRequest(method="GET", target=target)
    assert delete_request(key) == StoreRequest(method="DELETE", target=target)
    segment = target.removeprefix("/keys/")
    assert not set(segment) & set("/?# \r\n")
    assert unquote(segment) == key


def test_health_request() -> None:
    assert health_request() == StoreRequest(method="GET", target="/healthz")


def test_envelope_key() -> None:
    assert envelope_key(ID) == f"msg/{ID}"


@pytest.mark.parametrize(
    ("if_status", "target"),
    [
        (None, f"/keys/msg%2F{ID}"),
        ("running", f"/keys/msg%2F{ID}?if_status=running"),
        (Status.PAUSED, f"/keys/msg%2F{ID}?if_status=paused"),
        ("a&b c#", f"/keys/msg%2F{ID}?if_status=a%26b+c%23"),
    ],
    ids=["unconditional", "if-status", "status-enum", "hostile-condition"],
)
def test_put_request(if_status: str | None, target: str) -> None:
    assert put_request(f"msg/{ID}", {"status": "x", "n": [1]}, if_status=if_status) == (
        StoreRequest(method="PUT", target=target, headers=JSON, body=b'{"status":"x","n":[1]}')
    )


@pytest.mark.parametrize(
    ("request_", "body"),
    [
        (query_request(prefix="msg/"), {"prefix": "msg/", "filter": {}, "sort": []}),
        (
            query_request(
                prefix="p/", filter={"a": {"$gt": 1}}, sort=("-x", "y"), limit=5, offset=10,
                count=True,
            ),
            {"prefix": "p/", "filter": {"a": {"$gt": 1}}, "sort": ["-x", "y"], "limit": 5,
             "offset": 10, "count": True},
        ),
        (query_request(prefix="", limit=0, offset=0), {"prefix": "", "filter": {}, "sort": [],
                                                       "limit": 0}),
        (
            list_request(ListQuery()),
            {"prefix": "msg/", "filter": {}, "sort": ["-created_at", "-key"], "limit": 100,
             "count": True},
        ),
        (
            list_request(ListQuery(statuses=(Status.RUNNING,), limit=10, offset=20)),
            {"prefix": "msg/", "filter": {"status": "running"}, "sort": ["-created_at", "-key"],
             "limit": 10, "offset": 20, "count": True},
        ),
        (
            expired_request(T0, 50),
            {"prefix": "msg/",
             "filter": {"deadline_at": {"$lte": STAMP},
                        "status": {"$in": ["pending", "running", "paused"]}},
             "sort": ["deadline_at"], "limit": 50},
        ),
    ],
    ids=["bare", "everything", "zero-limit", "list-all", "list-status", "expired"],
)  # fmt: skip
def test_query_bodies(request_: StoreRequest, body: dict[str, Any]) -> None:
    assert (request_.method, request_.target, request_.headers) == ("POST", "/query", JSON)
    assert request_.body == dumps(body), "compact JSON in this key order"


# --- replies ------------------------------------------------------------------------------


def row(value: Any = None, key: str = f"msg/{ID}", **extra: Any) -> dict[str, Any]:
    if value is None:
        value = {"actor": "echo", "status": "running", "_rev": 4}
    return {"key": key, "value": value, "created_at": STAMP, "updated_at": STAMP, **extra}


def reply(status: int, value: Any = b"") -> StoreReply:
    return StoreReply(status=status, body=value if isinstance(value, bytes) else dumps(value))


RUNNING_4 = Envelope(
    id=ID, status=Status.RUNNING, created_at=T0, updated_at=T0, data={"actor": "echo"}, revision=4
)


@pytest.mark.parametrize(
    ("status", "raised"),
    [(200, None), (500, ServiceError), (502, ServiceError), (503, ServiceError),
     (504, ServiceError), (404, StoreProtocolError), (204, StoreProtocolError)],
    ids=str,
)  # fmt: skip
def test_check_health(status: int, raised: type[Exception] | None) -> None:
    if raised is None:
        assert check_health(reply(status, b"ok")) == frozenset()
    else:
        with pytest.raises(raised) as caught:
            check_health(reply(status, b"down"))
        assert type(caught.value) is raised


def test_read_envelope() -> None:
    assert read_envelope(ID, reply(200, row())) == RUNNING_4
    assert read_envelope(ID, reply(404, b"not found")) is None


@pytest.mark.parametrize(
    ("rev", "revision"),
    [(4, 4), (0, 0), (None, 0), (True, 0), ("4", 0), (4.0, 0)],
    ids=["int", "zero", "null", "bool", "string", "float"],
)
def test_read_envelope_revision(rev: Any, revision: int) -> None:
    value = {"status": "pending", "_rev": rev}
    assert read_envelope(ID, reply(200, row(value))).revision == revision  # type: ignore[union-attr]
    del value["_rev"]
    assert read_envelope(ID, reply(200, row(value))).revision == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "invalid JSON store reply"),
        (b"{nope", "invalid JSON store reply"),
        (b"\xff", "invalid JSON store reply: not UTF-8"),
        (b'{"value": NaN}', "invalid JSON store reply"),
        ([], "row is not an object"),
        ({"value": {"status": "running"}}, "is incomplete"),
        (row(created_at=None) | {"created_at": None}, "is invalid"),
        ({k: v for k, v in row().items() if k != "updated_at"}, "is incomplete"),
        ({k: v for k, v in row().items() if k != "value"}, "is incomplete"),
        (row(value=["status"]), "is not an object"),
        (row(value={"actor": "echo"}), "is invalid"),
        (row(value={"status": "Running"}), "is invalid"),
        (row(value={"status": 1}), "is invalid"),
        (row() | {"created_at": "yesterday"}, "is invalid"),
        (row() | {"updated_at": "2026-11-28T14:24:06"}, "timestamp without time zone"),
        (row() | {"updated_at": 1700000000}, "is invalid"),
    ],
    ids=["empty", "not-json", "not-utf8", "nan", "array", "no-times", "created-null",
         "no-updated", "no-value", "value-array", "no-status", "status-case", "status-number",
         "bad-time", "naive-time", "time-number"],
)  # fmt: skip
def test_read_envelope_garbage(body: Any, message: str) -> None:
    with pytest.raises(StoreProtocolError) as caught:
        read_envelope(ID, reply(200, body))
    assert caught.value.status_hint == 502
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("status", "raised", "message"),
    [
        (503, ServiceError, "state proxy unavailable (get: 503 pg down)"),
        (500, ServiceError, "state proxy unavailable (get: 500 pg down)"),
        (400, StoreProtocolError, "unexpected state proxy reply to get: 400 pg down"),
        (409, StoreProtocolError, "unexpected state proxy reply to get: 409 pg down"),
        (204, StoreProtocolError, "unexpected state proxy reply to get: 204 pg down"),
    ],
    ids=str,
)
def test_read_envelope_failures(status: int, raised: type[Exception], message: str) -> None:
    with pytest.raises(raised) as caught:
        read_envelope(ID, reply(status, b"pg down"))
    assert type(caught.value) is raised
    assert caught.value.args[0] == message


def test_failure_detail_is_short_and_decoded() -> None:
    with pytest.raises(ServiceError) as caught:
        read_envelope(ID, reply(503, b"\xff" + b"x" * 500))
    assert caught.value.message == "state proxy unavailable (get: 503 \ufffd" + "x" * 199 + ")"
    with pytest.raises(ServiceError) as caught:
        read_envelope(ID, reply(503, b""))
    assert caught.value.message == "state proxy unavailable (get: 503 )"


@pytest.mark.parametrize(
    ("status", "result"),
    [(200, True), (201, True), (204, True), (409, False), (404, StoreProtocolError),
     (400, StoreProtocolError), (413, PayloadTooLarge), (500, ServiceError),
     (503, ServiceError)],
    ids=str,
)  # fmt: skip
def test_check_write(status: int, result: Any) -> None:
    if isinstance(result, bool):
        assert check_write(reply(status)) is result
    else:
        with pytest.raises(result) as caught:
            check_write(reply(status, b"x"))
        assert type(caught.value) is result
        assert "put: " in caught.value.args[0]


@pytest.mark.parametrize(
    ("status", "result"),
    [(200, True), (204, True), (404, False), (409, StoreProtocolError), (500, ServiceError),
     (504, ServiceError)],
    ids=str,
)  # fmt: skip
def test_check_delete(status: int, result: Any) -> None:
    if isinstance(result, bool):
        assert check_delete(reply(status)) is result
    else:
        with pytest.raises(result) as caught:
            check_delete(reply(status))
        assert type(caught.value) is result
        assert "delete: " in caught.value.args[0]


def test_read_rows() -> None:
    other = row({"status": "failed", "error": "x"}, key=f"msg/{OTHER_ID}")
    envelopes, total = read_rows(reply(200, {"rows": [row(), other], "total": 7}))
    assert envelopes == [
        RUNNING_4,
        Envelope(
            id=OTHER_ID,
            status=Status.FAILED,
            created_at=T0,
            updated_at=T0,
            data={"error": "x"},
        ),
    ]
    assert total == 7
    assert read_rows(reply(200, {"rows": []})) == ([], None)


@pytest.mark.parametrize("total", [None, "7", True, 7.0, [7]], ids=repr)
def test_read_rows_total_must_be_an_integer(total: Any) -> None:
    assert read_rows(reply(200, {"rows": [], "total": total})) == ([], None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "invalid JSON store reply"),
        ([], "query reply has no rows"),
        ({}, "query reply has no rows"),
        ({"rows": {}}, "query reply has no rows"),
        ({"rows": None, "total": 0}, "query reply has no rows"),
        ({"rows": ["msg/x"]}, "query row has no envelope key"),
        ({"rows": [{"value": {}}]}, "query row has no envelope key"),
        ({"rows": [row(key=1)]}, "query row has no envelope key"),  # type: ignore[arg-type]
        ({"rows": [row(key=f"other/{ID}")]}, "query row has no envelope key"),
        ({"rows": [row(), row(value=[])]}, "is not an object"),
        ({"rows": [{"key": f"msg/{ID}"}]}, "is incomplete"),
    ],
    ids=["not-json", "array", "no-rows", "rows-object", "rows-null", "row-string",
         "row-no-key", "key-number", "key-prefix", "bad-value", "incomplete"],
)  # fmt: skip
def test_read_rows_garbage(body: Any, message: str) -> None:
    with pytest.raises(StoreProtocolError, match=message):
        read_rows(reply(200, body))


@pytest.mark.parametrize(
    ("status", "raised"), [(503, ServiceError), (400, StoreProtocolError)], ids=str
)
def test_read_rows_failures(status: int, raised: type[Exception]) -> None:
    with pytest.raises(raised, match="query: ") as caught:
        read_rows(reply(status, b'{"error": "bad filter"}'))
    assert type(caught.value) is raised


def test_purge_request_is_a_bounded_delete_of_old_terminal_envelopes() -> None:
    request = purge_request(T0, 500)
    assert (request.method, request.target, request.headers) == ("POST", "/delete", JSON)
    assert request.body == dumps(
        {"prefix": "msg/",
         "filter": {"status": {"$in": ["canceled", "failed", "succeeded"]},
                    "updated_at": {"$lt": "2026-11-28T14:24:06.123456+00:00"}},
         "sort": [], "limit": 500}
    )  # fmt: skip


def test_delete_query_request() -> None:
    request = delete_query_request(prefix="idem/", filter={"expires_at": {"$lte": STAMP}}, limit=9)
    assert (request.method, request.target, request.headers) == ("POST", "/delete", JSON)
    assert request.body == dumps(
        {"prefix": "idem/", "filter": {"expires_at": {"$lte": STAMP}}, "sort": [], "limit": 9}
    )


def test_read_deleted() -> None:
    assert read_deleted(reply(200, {"deleted": 3})) == 3
    assert read_deleted(reply(200, {"deleted": 0})) == 0


@pytest.mark.parametrize(
    "body", [b"{", [], {}, {"deleted": -1}, {"deleted": True}, {"deleted": "3"}], ids=repr
)
def test_read_deleted_garbage(body: Any) -> None:
    with pytest.raises(StoreProtocolError):
        read_deleted(reply(200, body))


@pytest.mark.parametrize(
    ("status", "raised"), [(503, ServiceError), (404, StoreProtocolError)], ids=str
)
def test_read_deleted_failures(status: int, raised: type[Exception]) -> None:
    with pytest.raises(raised, match="delete query: ") as caught:
        read_deleted(reply(status, b'{"error": "no"}'))
    assert type(caught.value) is raised


# --- the fake state proxy -----------------------------------------------------------------

Intervention = Callable[["FakeKV", StoreRequest], StoreReply | None]


@attrs.define
class FakeKV:
    """The state proxy's key semantics, in memory. `before` may act ahead of each request."""

    values: dict[str, Any] = attrs.field(factory=dict)
    log: list[StoreRequest] = attrs.field(factory=list)
    history: list[Status] = attrs.field(factory=list)
    before: Intervention | None = None
    rev_guard: bool = True  # our proxy; False: a proxy that ignores `if_rev` (the Go one)

    def write(self, key: str, value: Any) -> None:
        self.values[key] = value
        self.history.append(Status(value["status"]))

    def __call__(self, request: StoreRequest) -> StoreReply:
        self.log.append(request)
        if self.before is not None and (early := self.before(self, request)) is not None:
            return early
        url = urlsplit(request.target)
        assert url.path.startswith("/keys/") and "/" not in url.path[6:], "one segment"
        key = unquote(url.path[6:])
        params = dict(parse_qsl(url.query))
        condition = params.get("if_status")
        rev = params.get("if_rev") if self.rev_guard else None
        stored = self.values.get(key)
        if request.method == "GET":
            if stored is None:
                return StoreReply(status=404, body=b"not found")
            return reply(200, row(stored, key=key))
        assert request.method == "PUT"
        assert request.headers == JSON
        if condition is not None and (stored is None or stored["status"] != condition):
            return StoreReply(status=409, body=b"condition failed")
        if rev is not None and (stored is None or stored.get("_rev", 0) != int(rev)):
            return StoreReply(status=409, body=b"condition failed")
        self.write(key, json.loads(request.body))
        return StoreReply(status=204)

    def envelope(self, envelope_id: str = ID) -> Envelope | None:
        return read_envelope(envelope_id, self(get_request(envelope_key(envelope_id))))


def seeded(status: Status, data: dict[str, Any] | None = None, revision: int = 0) -> FakeKV:
    kv = FakeKV()
    kv.write(envelope_key(ID), envelope(status, data, revision=revision).to_value())
    return kv


def other_writer(event: StatusEvent) -> Intervention:
    """Another replica's conditional update, landing just before our first PUT."""

    def act(kv: FakeKV, request: StoreRequest) -> StoreReply | None:
        if request.method == "PUT" and kv.before is not None:
            kv.before = None
            drive(update_status(ID, event, later(0)), kv)
        return None

    return act


def puts(kv: FakeKV) -> list[str]:
    """The log as `METHOD query`, to read a procedure's request sequence at a glance."""
    return [f"{r.method} {urlsplit(r.target).query}" for r in kv.log]


# --- procedures ---------------------------------------------------------------------------


def test_create_envelope_puts_the_value_unconditionally() -> None:
    kv = FakeKV()
    new = envelope(Status.PENDING, {"actor": "echo", "payload": 1})
    assert drive(create_envelope(new), kv) is None
    assert kv.log == [
        StoreRequest(
            method="PUT",
            target=f"/keys/msg%2F{ID}",
            headers=JSON,
            body=b'{"actor":"echo","payload":1,"status":"pending","_rev":0}',
        )
    ]
    assert kv.envelope() == new


@pytest.mark.parametrize(
    ("status", "raised", "message"),
    [
        (409, StoreProtocolError, "state proxy refused an unconditional put"),
        (503, ServiceError, "state proxy unavailable (put: 503"),
        (400, StoreProtocolError, "unexpected state proxy reply to put: 400"),
    ],
    ids=str,
)
def test_create_envelope_failures(status: int, raised: type[Exception], message: str) -> None:
    with pytest.raises(raised) as caught:
        drive(create_envelope(envelope()), lambda request: StoreReply(status=status))
    assert type(caught.value) is raised
    assert caught.value.args[0].startswith(message)


def test_update_writes_only_if_the_status_is_still_the_one_read() -> None:
    kv = seeded(Status.RUNNING, {"actor": "echo", "n": 1}, revision=2)
    outcome = drive(update_status(ID, StatusEvent(status=Status.SUCCEEDED, data={"r": 9}), T0), kv)
    assert isinstance(outcome, Applied)
    assert kv.log[1:] == [
        StoreRequest(
            method="PUT",
            target=f"/keys/msg%2F{ID}?if_status=running&if_rev=2",
            headers=JSON,
            body=b'{"actor":"echo","n":1,"r":9,"status":"succeeded","_rev":3}',
        )
    ]
    assert kv.log[0] == get_request(envelope_key(ID))
    stored = kv.envelope()
    assert stored is not None
    assert (stored.status, stored.data, stored.revision) == (
        Status.SUCCEEDED,
        {"actor": "echo", "n": 1, "r": 9},
        3,
    )
    assert outcome.envelope.to_value() == stored.to_value()


def test_update_of_a_missing_envelope_is_none() -> None:
    kv = FakeKV()
    assert drive(update_status(ID, StatusEvent(status=Status.RUNNING), T0), kv) is None
    assert puts(kv) == ["GET "]


def test_update_with_a_stale_event_reads_and_never_writes() -> None:
    kv = seeded(Status.SUCCEEDED)
    outcome = drive(update_status(ID, StatusEvent(status=Status.RUNNING), T0), kv)
    assert isinstance(outcome, Ignored)
    assert outcome.envelope.status is Status.SUCCEEDED
    assert puts(kv) == ["GET "]


def test_update_retries_after_losing_a_race() -> None:
    kv = seeded(Status.RUNNING, {"actor": "echo"}, revision=1)
    kv.before = other_writer(StatusEvent(status=Status.PAUSED, data={"by": "other"}))
    event = StatusEvent(status=Status.SUCCEEDED, data={"by": "us"})
    outcome = drive(update_status(ID, event, T0), kv)
    assert isinstance(outcome, Applied) and outcome.rule is Rule.TRANSITION
    # ours: GET, PUT (409); theirs inside: GET, PUT; ours again: GET, PUT.
    assert puts(kv) == [
        "GET ",
        "PUT if_status=running&if_rev=1",
        "GET ",
        "PUT if_status=running&if_rev=1",
        "GET ",
        "PUT if_status=paused&if_rev=2",
    ]
    assert kv.history == [Status.RUNNING, Status.PAUSED, Status.SUCCEEDED]
    stored = kv.envelope()
    assert stored is not None and stored.revision == 3 and stored.data["by"] == "us"


def test_update_that_loses_to_a_terminal_status_is_ignored() -> None:
    kv = seeded(Status.RUNNING)
    kv.before = other_writer(StatusEvent(status=Status.CANCELED))
    outcome = drive(update_status(ID, StatusEvent(status=Status.SUCCEEDED), T0), kv)
    assert isinstance(outcome, Ignored)
    assert outcome.envelope.status is Status.CANCELED
    assert kv.history == [Status.RUNNING, Status.CANCELED]


def test_update_of_an_envelope_deleted_meanwhile_is_none() -> None:
    kv = seeded(Status.RUNNING)

    def delete(kv: FakeKV, request: StoreRequest) -> StoreReply | None:
        if request.method == "PUT":
            kv.values.clear()
        return None

    kv.before = delete
    assert drive(update_status(ID, StatusEvent(status=Status.PAUSED), T0), kv) is None
    assert puts(kv) == ["GET ", "PUT if_status=running&if_rev=0", "GET "]


@pytest.mark.parametrize(
    ("headers", "features"),
    [
        ((), set()),
        ((("asya-state-proxy-features", "if_rev"),), {"if_rev"}),
        ((("asya-state-proxy-features", " if_rev , watch,"),), {"if_rev", "watch"}),
        ((("asya-state-proxy-features", "a"), ("asya-state-proxy-features", "b")), {"a", "b"}),
        ((("server", "if_rev"),), set()),
    ],
    ids=["none", "one", "spaces", "repeated", "other-header"],
)
def test_check_health_reads_the_features(
    headers: tuple[tuple[str, str], ...], features: set[str]
) -> None:
    assert check_health(StoreReply(status=200, body=b"ok", headers=headers)) == features
    assert FEATURES_HEADER == "asya-state-proxy-features" and REV_GUARD == "if_rev"


def test_put_request_with_both_guards() -> None:
    request = put_request("k", {}, if_status="running", if_rev=7)
    assert request.target == "/keys/k?if_status=running&if_rev=7"
    assert put_request("k", {}, if_rev=0).target == "/keys/k?if_rev=0"


def progress(key: str) -> StatusEvent:
    return StatusEvent(status=Status.RUNNING, data={key: True})


def interleave(kv: FakeKV, events: list[StatusEvent]) -> list[Outcome | None]:
    """Run one update per event, request by request in turn: every GET before any PUT."""
    procs = [update_status(ID, event, T0) for event in events]
    waiting = {i: next(proc) for i, proc in enumerate(procs)}
    results: dict[int, Outcome | None] = {}
    while waiting:
        for i in sorted(waiting):
            try:
                waiting[i] = procs[i].send(kv(waiting[i]))
            except StopIteration as done:
                del waiting[i]
                results[i] = done.value
    return [results[i] for i in range(len(events))]


def test_racing_progress_updates_keep_every_key() -> None:
    kv = seeded(Status.RUNNING, {"actor": "echo"})
    keys = [f"k{i}" for i in range(20)]
    outcomes = interleave(kv, [progress(key) for key in keys])
    assert all(isinstance(o, Applied) for o in outcomes)
    stored = kv.envelope()
    assert stored is not None
    assert set(keys) <= set(stored.data) and stored.revision == 20


def test_without_the_revision_guard_racing_progress_updates_lose_keys() -> None:
    """What `if_status` alone allows (the Go proxy): why the revision guard exists."""
    kv = seeded(Status.RUNNING, {"actor": "echo"})
    kv.rev_guard = False
    interleave(kv, [progress("a"), progress("b")])
    stored = kv.envelope()
    assert stored is not None and not {"a", "b"} <= set(stored.data)


def test_a_known_envelope_saves_the_read() -> None:
    kv = seeded(Status.RUNNING, {"actor": "echo"}, revision=4)
    outcome = drive(update_status(ID, progress("a"), T0, known=RUNNING_4), kv)
    assert isinstance(outcome, Applied) and outcome.envelope.revision == 5
    assert puts(kv) == ["PUT if_status=running&if_rev=4"]
    stored = kv.envelope()
    assert stored is not None and stored.data == {"actor": "echo", "a": True}


def test_a_stale_known_envelope_costs_a_conflict_and_a_read() -> None:
    kv = seeded(Status.RUNNING, {"actor": "echo", "theirs": 1}, revision=5)
    outcome = drive(update_status(ID, progress("a"), T0, known=RUNNING_4), kv)
    assert isinstance(outcome, Applied)
    assert puts(kv) == ["PUT if_status=running&if_rev=4", "GET ", "PUT if_status=running&if_rev=5"]
    stored = kv.envelope()
    assert stored is not None and stored.data == {"actor": "echo", "theirs": 1, "a": True}


def test_an_event_the_known_envelope_ignores_is_decided_on_a_read() -> None:
    kv = seeded(Status.SUCCEEDED, {"actor": "echo", "result": 1}, revision=6)
    known = attrs.evolve(RUNNING_4, status=Status.SUCCEEDED)
    outcome = drive(update_status(ID, progress("a"), T0, known=known), kv)
    assert isinstance(outcome, Ignored)
    assert outcome.envelope.revision == 6 and outcome.envelope.data["result"] == 1
    assert puts(kv) == ["GET "]


def test_a_known_envelope_deleted_since_is_none() -> None:
    kv = FakeKV()
    assert drive(update_status(ID, progress("a"), T0, known=RUNNING_4), kv) is None
    assert puts(kv) == ["PUT if_status=running&if_rev=4", "GET "]


def test_update_gives_up_after_max_attempts() -> None:
    kv = seeded(Status.PENDING)

    def thrash(kv: FakeKV, request: StoreRequest) -> StoreReply | None:
        if request.method == "PUT":  # a progress write by someone else, every single time
            key = envelope_key(ID)
            value = kv.values[key]
            kv.values[key] = {**value, "status": "running" if value["status"] == "pending"
                              else "pending"}  # fmt: skip
        return None

    kv.before = thrash
    with pytest.raises(ServiceError) as caught:
        drive(update_status(ID, StatusEvent(status=Status.PAUSED), T0), kv)
    assert type(caught.value) is ServiceError
    assert caught.value.message == f"envelope {ID} is changing too fast: update not applied"
    assert len(kv.log) == 2 * MAX_ATTEMPTS == 128


@pytest.mark.parametrize(
    ("fail_on", "status", "body", "raised"),
    [
        pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[3].__name__}")
        for case in [
            ("GET", 503, b"down", ServiceError),
            ("GET", 500, b"down", ServiceError),
            ("GET", 200, b"<html>", StoreProtocolError),
            ("GET", 200, b'{"key": "x"}', StoreProtocolError),
            ("GET", 400, b"bad", StoreProtocolError),
            ("PUT", 503, b"down", ServiceError),
            ("PUT", 400, b"bad JSON", StoreProtocolError),
            ("PUT", 404, b"", StoreProtocolError),
        ]
    ],
)
def test_update_failures(fail_on: str, status: int, body: bytes, raised: type[Exception]) -> None:
    kv = seeded(Status.RUNNING)
    kv.before = lambda kv, request: (
        StoreReply(status=status, body=body) if request.method == fail_on else None
    )
    with pytest.raises(raised) as caught:
        drive(update_status(ID, StatusEvent(status=Status.PAUSED), T0), kv)
    assert type(caught.value) is raised
    assert kv.history == [Status.RUNNING], "nothing written"


# --- procedures under arbitrary interference ----------------------------------------------

statuses = st.sampled_from(list(Status))
status_events = st.builds(
    StatusEvent,
    status=statuses,
    data=st.dictionaries(st.sampled_from(["a", "b", "status", "_rev"]), st.integers(0, 3)),
)
actions = st.one_of(
    st.just(("ok",)),
    st.tuples(st.just("race"), status_events),
    st.just(("delete",)),
    st.tuples(st.just("fail"), st.sampled_from([500, 502, 503, 504])),
    st.tuples(st.just("junk"), st.sampled_from([b"", b"{", b"[]", b'{"value": 1}'])),
)


@settings(max_examples=200, deadline=None)
@given(
    start=st.none() | statuses,
    events=st.lists(status_events, min_size=1, max_size=4),
    schedule=st.lists(actions, max_size=24),
)
def test_update_status_keeps_the_store_monotonic(
    start: Status | None, events: list[StatusEvent], schedule: list[tuple[Any, ...]]
) -> None:
    kv = FakeKV() if start is None else seeded(start)
    plan = iter(schedule)
    faults: list[type[Exception]] = []

    def interfere(kv: FakeKV, request: StoreRequest) -> StoreReply | None:
        action = next(plan, ("ok",))
        key = envelope_key(ID)
        if action[0] == "race" and key in kv.values:
            current = read_envelope(ID, reply(200, row(kv.values[key])))
            assert current is not None
            outcome = apply_event(current, action[1], later(0))
            if isinstance(outcome, Applied):
                kv.write(key, outcome.envelope.to_value())
        elif action[0] == "delete":
            kv.values.pop(key, None)
        elif action[0] == "fail":
            faults.append(ServiceError)
            return StoreReply(status=action[1], body=b"down")
        elif action[0] == "junk":
            faults.append(StoreProtocolError)
            return reply(200, action[1]) if request.method == "GET" else reply(400, b"?")
        return None

    kv.before = interfere
    for event in events:
        seen = len(kv.log)
        try:
            outcome = drive(update_status(ID, event, later(1)), kv)
        except ServiceError as exc:
            if faults:
                assert type(exc) is faults[-1]
                faults.clear()
            else:
                assert "changing too fast" in exc.message
                assert len(kv.log) - seen == 2 * MAX_ATTEMPTS
            continue
        assert not faults
        assert len(kv.log) - seen <= 2 * MAX_ATTEMPTS
        requests = kv.log[seen:]
        for get, put in zip(requests[::2], requests[1::2], strict=False):
            assert get.method == "GET" and put.method == "PUT"
            assert "?if_status=" in put.target, "never an unguarded read-modify-write"
            assert "&if_rev=" in put.target
        if outcome is None:
            assert envelope_key(ID) not in kv.values
        elif isinstance(outcome, Ignored):
            assert RULES[(outcome.envelope.status, event.status)] is Rule.IGNORED
            assert requests[-1].method == "GET"
        else:
            assert kv.values[envelope_key(ID)] == outcome.envelope.to_value()
    ranks = [RANK[s] for s in kv.history]
    assert ranks == sorted(ranks), "a stored status never goes back"
    for before, after in zip(kv.history, kv.history[1:], strict=False):
        if before in TERMINAL:
            assert after == before, "a terminal status never changes"


@settings(max_examples=100, deadline=None)
@given(status=st.integers(100, 599), body=st.binary(max_size=20))
def test_create_envelope_under_any_reply(status: int, body: bytes) -> None:
    try:
        drive(create_envelope(envelope()), lambda request: StoreReply(status=status, body=body))
    except PayloadTooLarge:
        assert status == 413
    except ServiceError as exc:
        assert status not in (200, 201, 204, 413)
        assert type(exc) is (ServiceError if status in (500, 502, 503, 504) else StoreProtocolError)
    else:
        assert status in (200, 201, 204)


# --- a stream over racing writers ---------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(status_events, min_size=2, max_size=4),
    choices=st.lists(st.integers(0, 7), max_size=16),
    subscribe_at=st.integers(0, 8),
    snapshot_after=st.integers(0, 6),
)
def test_a_stream_over_racing_writers_never_misses_the_end(
    events: list[StatusEvent], choices: list[int], subscribe_at: int, snapshot_after: int
) -> None:
    """Writers interleave request by request and publish in any order; a stream subscribes,
    reads its snapshot, and gets what was published since. Whatever the interleaving, the client
    sees statuses in rank order, and if the envelope ends terminal, the stream ends on it."""
    kv = seeded(Status.RUNNING, revision=5)
    procs = [update_status(ID, event, later(1)) for event in events]
    waiting = {i: next(proc) for i, proc in enumerate(procs)}
    finished: list[Applied] = []  # written, not yet published
    hub: list[Published] = []
    stream = SseStream(keepalive=15)
    subscribed: int | None = None  # where in the hub the subscription starts
    wire = b""

    def advance(i: int) -> None:
        try:
            waiting[i] = procs[i].send(kv(waiting.pop(i)))
        except StopIteration as done:
            if isinstance(done.value, Applied):
                finished.append(done.value)

    def read_snapshot() -> bytes:
        stored = kv.envelope()
        assert stored is not None
        return stream.catch_up(stored)

    for step, choice in enumerate(choices):
        if step == subscribe_at:
            subscribed = len(hub)
        if step == subscribe_at + snapshot_after:
            wire = read_snapshot()
        moves = [("advance", i) for i in waiting] + [("publish", j) for j in range(len(finished))]
        if not moves:
            break
        move, index = moves[choice % len(moves)]
        if move == "advance":
            advance(index)
        else:
            hub.append(Published.status(finished.pop(index)))
    while waiting:
        advance(next(iter(waiting)))
    hub += [Published.status(outcome) for outcome in finished]
    if subscribed is None:
        subscribed = len(hub)
    if not wire:
        wire = read_snapshot()
    wire += stream.live(hub[subscribed:])

    sent = [json.loads(e.data)["status"] for e in SseParser().feed(wire)]
    ranks = [RANK[Status(s)] for s in sent]
    assert ranks == sorted(ranks), f"a status went back on the stream: {sent}"
    final = kv.envelope()
    assert final is not None
    assert stream.done is final.terminal
    if final.terminal:
        assert sent[-1] == final.status
        assert [s for s in sent if Status(s) in TERMINAL] == [final.status]
