"""The legacy translators of `mesh_compat`, as tables: no server, no event loop.

Every legacy shape (sidecar bodies in, task JSON and SSE frames out), the progress weights, the
legacy route table next to the new one (which route wins where paths overlap), and property
tests proving the body parsers raise nothing but client errors.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mesh_compat
from mesh_compat import (
    FLY_LIMIT,
    LEGACY_KEEPALIVE,
    LEGACY_ROUTES,
    PROGRESS_WEIGHTS,
    LegacyOp,
    LegacyProgress,
    active_reply,
    deprecation_headers,
    legacy_router,
    live_frame,
    parse_final,
    parse_fly,
    progress_reply,
    route_table,
    snapshot_frame,
    task_json,
)
from mesh_proto import (
    ROUTES,
    Applied,
    BadRequest,
    ClientError,
    Envelope,
    MethodNotAllowed,
    NotFound,
    Op,
    PayloadTooLarge,
    Published,
    Role,
    Route,
    Router,
    Status,
    StatusEvent,
    apply_event,
)

ROOT = Path(__file__).resolve().parent.parent
ID = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
T0 = datetime(2026, 11, 28, 14, 24, 6, 123456, tzinfo=UTC)
T1 = T0 + timedelta(seconds=2)
T0S, T1S = "2026-11-28T14:24:06.123456Z", "2026-11-28T14:24:08.123456Z"


def envelope(status: Status = Status.PENDING, **data: Any) -> Envelope:
    return Envelope(
        id=ID,
        status=status,
        created_at=T0,
        updated_at=T1,
        data={"actor": "echo", "payload": {"x": 1}, "headers": {}, **data},
    )


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- the package's surface --------------------------------------------------------------------


def test_exports_match_all() -> None:
    public = {
        name
        for name, value in vars(mesh_compat).items()
        if not name.startswith("_") and not isinstance(value, type(sys))
    }
    assert sorted(mesh_compat.__all__) == sorted(public)


def test_translators_import_only_the_core() -> None:
    tree = ast.parse((ROOT / "mesh_compat" / "_translate.py").read_text())
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert imported - stdlib == {"attrs", "mesh_proto"}


def test_the_runtime_modules_use_only_the_public_runtime_api() -> None:
    import mesh_trio

    for module in ("_routes.py", "_stream.py"):
        tree = ast.parse((ROOT / "mesh_compat" / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mesh_trio"):
                assert node.module == "mesh_trio", (module, node.module)
                assert {a.name for a in node.names} <= set(mesh_trio.__all__), module


def test_mesh_trio_never_imports_mesh_compat() -> None:
    code = "import sys, mesh_trio; assert 'mesh_compat' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_docs_hold_the_current_route_map() -> None:
    assert route_table() in (ROOT / "docs" / "compat.md").read_text()


# --- routes: legacy next to new ---------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/v1", "api/v1/", "/mesh", "/v2/gw"])
def test_every_legacy_route_is_mounted_under_a_prefix(prefix: str) -> None:
    router = legacy_router(Router(prefix))
    assert (router.extra, router.shadowed()) == (LEGACY_ROUTES, ())
    for spec in LEGACY_ROUTES:
        assert router.resolve(spec.role, spec.method, router.path(spec, ID)).op is spec.op


def test_the_legacy_table_is_rows_of_the_core_table() -> None:
    assert all(spec.bare and isinstance(spec.op, LegacyOp) for spec in LEGACY_ROUTES)
    assert {spec.op for spec in LEGACY_ROUTES} == set(LegacyOp)
    # Bare: at `/mesh/...` whatever the prefix, unlike the core's `/mesh` routes.
    assert all(not s.bare for s in ROUTES if s.pattern.startswith("/mesh"))


def test_new_routes_win_where_paths_overlap() -> None:
    # With no prefix the new API serves `/mesh/{id}`: the legacy task route is never reached.
    router = legacy_router(Router(""))
    assert [r.op for r in router.shadowed()] == [LegacyOp.TASK]
    assert router.resolve(Role.EXTERNAL, "GET", f"/mesh/{ID}") == Route(op=Op.GET, id=ID)
    with pytest.raises(MethodNotAllowed) as caught:
        router.resolve(Role.EXTERNAL, "PUT", f"/mesh/{ID}")
    assert caught.value.allowed == ("DELETE", "GET")


@pytest.mark.parametrize("prefix", ["/api/v1", ""])
@pytest.mark.parametrize(
    ("role", "method", "path", "op"),
    [
        (Role.INTERNAL, "POST", f"/mesh/{ID}/progress", LegacyOp.PROGRESS),
        (Role.INTERNAL, "POST", f"/mesh/{ID}/final", LegacyOp.FINAL),
        (Role.INTERNAL, "POST", f"/mesh/{ID}/fly", LegacyOp.FLY),
        (Role.EXTERNAL, "GET", f"/mesh/{ID}/stream", LegacyOp.STREAM),
        (Role.EXTERNAL, "HEAD", f"/mesh/{ID}/active", LegacyOp.ACTIVE),
        (Role.EXTERNAL, "GET", f"/mesh/{ID}/active", LegacyOp.ACTIVE),
    ],
)
def test_resolve(prefix: str, role: Role, method: str, path: str, op: LegacyOp) -> None:
    assert legacy_router(Router(prefix)).resolve(role, method, path) == Route(op=op, id=ID)


@pytest.mark.parametrize(
    ("role", "path"),
    [
        (Role.INTERNAL, f"/mesh/{ID}/stream"),  # an external route, asked on the internal port
        (Role.EXTERNAL, f"/mesh/{ID}/progress"),
        (Role.INTERNAL, f"/api/v1/mesh/{ID}/progress"),  # legacy routes have no prefix
        (Role.INTERNAL, f"/mesh/{ID.upper()}/progress"),  # ids are canonical UUIDs
        (Role.INTERNAL, f"/mesh/{ID.replace('-', '')}/progress"),
        (Role.INTERNAL, "/mesh/task-1/progress"),
        (Role.INTERNAL, f"/mesh/{ID}/progress/"),
        (Role.INTERNAL, f"/mesh/{ID}/x/progress"),
        (Role.EXTERNAL, f"/mesh/{ID}/"),
        (Role.EXTERNAL, "/mesh/"),
    ],
)
def test_not_legacy(role: Role, path: str) -> None:
    """Not a legacy path: the new API's own 404."""
    router = legacy_router(Router("/api/v1"))
    for method in ("POST", "GET"):
        with pytest.raises(NotFound) as caught:
            router.resolve(role, method, path)
        assert caught.value.message == "not found"
    assert router.match(role, path) is None


@pytest.mark.parametrize(
    ("role", "method", "path", "op"),
    [
        (Role.INTERNAL, "GET", f"/mesh/{ID}/progress", LegacyOp.PROGRESS),
        (Role.INTERNAL, "PUT", f"/mesh/{ID}/fly", LegacyOp.FLY),
        (Role.EXTERNAL, "POST", f"/mesh/{ID}/stream", LegacyOp.STREAM),
        (Role.EXTERNAL, "DELETE", f"/mesh/{ID}", LegacyOp.TASK),
        (Role.EXTERNAL, "OPTIONS", f"/mesh/{ID}/active", LegacyOp.ACTIVE),
    ],
)
def test_wrong_method(role: Role, method: str, path: str, op: LegacyOp) -> None:
    """A 405 with the core's `Allow`; `match` names the legacy route, for its headers."""
    router = legacy_router(Router("/api/v1"))
    with pytest.raises(MethodNotAllowed) as caught:
        router.resolve(role, method, path)
    spec = next(s for s in LEGACY_ROUTES if s.op is op)
    assert caught.value.allowed == (spec.method,)
    assert router.match(role, path) == Route(op=op, id=ID)


@pytest.mark.parametrize(
    ("prefix", "op", "successor"),
    [
        ("/api/v1", LegacyOp.PROGRESS, f"/api/v1/mesh/{ID}/events"),
        ("/api/v1", LegacyOp.STREAM, f"/api/v1/mesh/{ID}/events"),
        ("/api/v1", LegacyOp.ACTIVE, f"/api/v1/mesh/{ID}"),
        ("/api/v1", LegacyOp.TASK, f"/api/v1/mesh/{ID}"),
        ("", LegacyOp.FINAL, f"/mesh/{ID}/events"),
        ("", LegacyOp.ACTIVE, f"/mesh/{ID}"),
        ("gw/", LegacyOp.FLY, f"/gw/mesh/{ID}/events"),
    ],
)
def test_deprecation_headers(prefix: str, op: LegacyOp, successor: str) -> None:
    assert deprecation_headers(Router(prefix).prefix, op, ID) == (
        ("Deprecation", "true"),
        ("Link", f'<{successor}>; rel="successor-version"'),
    )


# --- /progress --------------------------------------------------------------------------------


def test_weights() -> None:
    assert PROGRESS_WEIGHTS == {"received": 0.1, "processing": 0.5, "completed": 1.0}


@pytest.mark.parametrize(
    ("prev", "nxt", "state", "percent"),
    [
        ([], [], "received", 10.0),
        ([], [], "processing", 50.0),
        ([], [], "completed", 100.0),
        ([], ["b"], "received", 5.0),
        ([], ["b"], "processing", 25.0),
        ([], ["b"], "completed", 50.0),
        (["a"], [], "received", 55.0),
        (["a"], ["c"], "processing", 50.0),
        (["a"], ["c", "d"], "received", 27.5),
        (["a", "b"], [], "completed", 100.0),
        (["a", "b"], ["d"], "processing", 62.5),
        ([], ["b", "c"], "received", 3.333333),
    ],
)
def test_percent(prev: list[str], nxt: list[str], state: str, percent: float) -> None:
    body = raw({"prev": prev, "curr": "x", "next": nxt, "status": state})
    progress = LegacyProgress.parse(ID, body)
    assert progress.percent == percent
    event = progress.event(envelope())
    assert event == StatusEvent(
        status=Status.RUNNING,
        data={
            "prev": prev,
            "curr": "x",
            "next": nxt,
            "task_state": state,
            "progress_percent": percent,
        },
        keep_highest=frozenset({"progress_percent"}),
    )


@pytest.mark.parametrize(
    ("stored", "reported"),
    [
        ({}, 25.0),
        ({"progress_percent": 10}, 25.0),
        ({"progress_percent": 25.0}, 25.0),
        ({"progress_percent": 60}, 60.0),
        ({"progress_percent": 100}, 100.0),
        ({"progress_percent": "90"}, 25.0),  # not a number: ignored
        ({"progress_percent": True}, 25.0),
    ],
)
def test_progress_never_decreases(stored: dict[str, Any], reported: float) -> None:
    body = raw({"prev": [], "curr": "a", "next": ["b"], "status": "processing"})
    event = LegacyProgress.parse(ID, body).event(envelope(Status.RUNNING, **stored))
    assert event.data["progress_percent"] == reported


def test_racing_reports_cannot_lower_progress() -> None:
    # Both reports read 0 %; the lower one is applied to the version the higher one stored.
    low = raw({"prev": [], "curr": "a", "next": ["b"], "status": "received"})
    high = raw({"prev": [], "curr": "a", "next": ["b"], "status": "completed"})
    read = envelope(Status.RUNNING)
    first = apply_event(read, LegacyProgress.parse(ID, high).event(read), T1)
    assert isinstance(first, Applied)
    second = apply_event(first.envelope, LegacyProgress.parse(ID, low).event(read), T1)
    assert second.envelope.data["progress_percent"] == 50.0
    assert second.envelope.data["task_state"] == "received"


def test_progress_through_the_status_table() -> None:
    # The same rules as for new sidecars: first report is a transition, later ones progress,
    # and nothing after a terminal status or a pause (higher rank) changes the envelope.
    body = raw({"prev": ["a"], "curr": "b", "next": [], "status": "received", "message": "hi"})
    progress = LegacyProgress.parse(ID, body)
    first = apply_event(envelope(), progress.event(envelope()), T1)
    assert isinstance(first, Applied)
    assert first.envelope.status is Status.RUNNING
    assert first.envelope.data["message"] == "hi"
    assert progress_reply(first.envelope) == {"status": "ok", "progress_percent": 55.0}
    for stored in (Status.PAUSED, Status.SUCCEEDED, Status.FAILED, Status.CANCELED):
        done = envelope(stored, progress_percent=70)
        outcome = apply_event(done, progress.event(done), T1)
        assert not isinstance(outcome, Applied)
        assert progress_reply(outcome.envelope) == {"status": "ok", "progress_percent": 70.0}


def test_pause_metadata() -> None:
    body = raw(
        {
            "prev": [],
            "curr": "a",
            "next": [],
            "status": "processing",
            "pause_metadata": {"reason": "approval", "curr": "ignored", "ask": {"q": 1}},
        }
    )
    event = LegacyProgress.parse(ID, body).event(envelope(Status.RUNNING))
    assert event == StatusEvent(
        status=Status.PAUSED,
        data={
            "reason": "approval",
            "curr": "a",
            "ask": {"q": 1},
            "prev": [],
            "next": [],
            "task_state": "processing",
            "progress_percent": 50.0,
        },
        keep_highest=frozenset({"progress_percent"}),
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"status": "received"}, LegacyProgress(state="received")),
        (
            {"prev": None, "curr": None, "next": None, "status": "completed"},
            LegacyProgress(state="completed"),
        ),
        (
            {"id": ID, "prev": ["a"], "curr": "b", "next": ["c"], "status": "processing"},
            LegacyProgress(prev=("a",), curr="b", next=("c",), state="processing"),
        ),
        (
            {"status": "received", "message": None, "pause_metadata": None, "extra": 1},
            LegacyProgress(state="received"),
        ),
        (
            {"status": "received", "pause_metadata": {}},
            LegacyProgress(state="received", pause_metadata={}),
        ),
    ],
)
def test_parse_progress(fields: dict[str, Any], expected: LegacyProgress) -> None:
    assert LegacyProgress.parse(ID, raw(fields)) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "invalid JSON progress"),
        (b"{", "invalid JSON progress"),
        (b"[]", "progress must be a JSON object"),
        (b"null", "progress must be a JSON object"),
        (raw({}), "status must be one of received, processing, completed"),
        (raw({"status": "running"}), "status must be one of"),
        (raw({"status": "Received"}), "status must be one of"),
        (raw({"status": ["received"]}), "status must be one of"),
        (raw({"status": "received", "prev": "a"}), "prev must be a list of actor names"),
        (raw({"status": "received", "next": [1]}), "next must be a list of actor names"),
        (raw({"status": "received", "curr": 3}), "curr must be a string"),
        (raw({"status": "received", "message": {}}), "message must be a string"),
        (raw({"status": "received", "pause_metadata": []}), "pause_metadata must be a JSON obj"),
        (raw({"status": "received", "id": "other"}), "id in the body does not match the path"),
        (raw({"status": "received", "id": None}), "id in the body does not match the path"),
    ],
)
def test_bad_progress(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        LegacyProgress.parse(ID, body)
    assert caught.value.status_hint == 400
    assert message in caught.value.message


# --- /final and /fly --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"id": ID, "status": "succeeded", "result": {"answer": 42}},
            StatusEvent(
                status=Status.SUCCEEDED, data={"result": {"answer": 42}, "progress_percent": 100}
            ),
        ),
        (
            {"status": "succeeded", "progress_percent": 20},
            StatusEvent(status=Status.SUCCEEDED, data={"progress_percent": 100}),
        ),
        (
            {"status": "failed", "error": "boom", "error_details": {"type": "ValueError"}},
            StatusEvent(
                status=Status.FAILED,
                data={"error": "boom", "error_details": {"type": "ValueError"}},
            ),
        ),
        (
            {"status": "failed", "message": "gave up", "result": None},
            StatusEvent(status=Status.FAILED, data={"message": "gave up", "result": None}),
        ),
    ],
)
def test_final(fields: dict[str, Any], expected: StatusEvent) -> None:
    assert parse_final(ID, raw(fields)) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "invalid JSON final"),
        (b"nope", "invalid JSON final"),
        (b'"succeeded"', "final must be a JSON object"),
        (raw({}), "status must be one of succeeded, failed"),
        (raw({"status": "running"}), "status must be one of succeeded, failed"),
        (raw({"status": "canceled"}), "status must be one of succeeded, failed"),
        (raw({"status": "completed"}), "status must be one of succeeded, failed"),
        (raw({"status": "SUCCEEDED"}), "status must be one of succeeded, failed"),
        (raw({"status": 1}), "status must be one of succeeded, failed"),
        (raw({"status": "failed", "id": "x"}), "id in the body does not match the path"),
    ],
)
def test_bad_final(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_final(ID, body)
    assert message in caught.value.message


@pytest.mark.parametrize("value", [None, 0, 1.5, "token", [1, "a"], {"delta": "he"}, {}])
def test_fly(value: Any) -> None:
    assert parse_fly(raw(value)) == value


def test_fly_limit() -> None:
    at_limit = b'"' + b"x" * (FLY_LIMIT - 2) + b'"'
    assert len(at_limit) == FLY_LIMIT
    assert parse_fly(at_limit) == "x" * (FLY_LIMIT - 2)
    with pytest.raises(PayloadTooLarge) as caught:
        parse_fly(at_limit + b" ")
    assert caught.value.status_hint == 413
    for bad in (b"", b"{", b"NaN", b"\xff"):
        with pytest.raises(BadRequest):
            parse_fly(bad)


# --- client views -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "task"),
    [
        (
            envelope(),
            {
                "id": ID,
                "status": "pending",
                "route": {"prev": [], "curr": "echo", "next": []},
                "payload": {"x": 1},
                "progress_percent": 0.0,
                "current_actor_name": "echo",
                "created_at": T0S,
                "updated_at": T1S,
            },
        ),
        (
            envelope(
                Status.RUNNING,
                prev=["echo"],
                curr="b",
                next=["c"],
                progress_percent=36.666667,
                message="thinking",
                task_state="processing",
            ),
            {
                "id": ID,
                "status": "running",
                "route": {"prev": ["echo"], "curr": "b", "next": ["c"]},
                "payload": {"x": 1},
                "progress_percent": 36.666667,
                "current_actor_name": "b",
                "message": "thinking",
                "created_at": T0S,
                "updated_at": T1S,
            },
        ),
        (
            envelope(Status.SUCCEEDED, prev=["echo"], curr="", next=[], result=[1, 2]),
            {
                "id": ID,
                "status": "succeeded",
                "route": {"prev": ["echo"], "curr": "", "next": []},
                "payload": {"x": 1},
                "result": [1, 2],
                "progress_percent": 0.0,
                "created_at": T0S,
                "updated_at": T1S,
            },
        ),
        (
            envelope(Status.FAILED, error={"code": 7}, progress_percent=100, message=""),
            {
                "id": ID,
                "status": "failed",
                "route": {"prev": [], "curr": "echo", "next": []},
                "payload": {"x": 1},
                "error": '{"code":7}',
                "progress_percent": 100.0,
                "current_actor_name": "echo",
                "created_at": T0S,
                "updated_at": T1S,
            },
        ),
        (
            envelope(Status.CANCELED, prev="garbled", next=None, error="task timed out"),
            {
                "id": ID,
                "status": "canceled",
                "route": {"prev": [], "curr": "echo", "next": []},
                "payload": {"x": 1},
                "error": "task timed out",
                "progress_percent": 0.0,
                "current_actor_name": "echo",
                "created_at": T0S,
                "updated_at": T1S,
            },
        ),
    ],
)
def test_task_json(stored: Envelope, task: dict[str, Any]) -> None:
    assert task_json(stored) == task
    assert list(task_json(stored)) == list(task)  # the legacy key order


@pytest.mark.parametrize(
    ("status", "reply"),
    [
        (Status.PENDING, (200, {"active": True})),
        (Status.RUNNING, (200, {"active": True})),
        (Status.PAUSED, (200, {"active": True})),
        (Status.SUCCEEDED, (410, {"active": False})),
        (Status.FAILED, (410, {"active": False})),
        (Status.CANCELED, (410, {"active": False})),
    ],
)
def test_active(status: Status, reply: tuple[int, dict[str, bool]]) -> None:
    assert active_reply(envelope(status)) == reply


def test_snapshot_frame() -> None:
    stored = envelope(Status.RUNNING, prev=[], curr="a", next=["b"], progress_percent=25.0)
    assert snapshot_frame(stored) == (
        b"event: update\n"
        b'data: {"id":"' + ID.encode() + b'","status":"running","progress_percent":25.0,'
        b'"actor":"a","prev":[],"curr":"a","next":["b"],"timestamp":"' + T1S.encode() + b'"}\n\n'
    )
    assert snapshot_frame(envelope()) == (
        b'event: update\ndata: {"id":"' + ID.encode() + b'","status":"pending","actor":"echo",'
        b'"timestamp":"' + T1S.encode() + b'"}\n\n'
    )


def test_live_frames() -> None:
    event = parse_final(ID, raw({"status": "failed", "error": "boom", "message": "m"}))
    applied = apply_event(envelope(Status.RUNNING), event, T1)
    assert isinstance(applied, Applied)
    now = T1 + timedelta(microseconds=5)
    assert live_frame(ID, Published.status(applied), now) == (
        b'event: update\ndata: {"id":"' + ID.encode() + b'","status":"failed","message":"m",'
        b'"error":"boom","timestamp":"2026-11-28T14:24:08.123461Z"}\n\n'
    )
    progress = LegacyProgress.parse(ID, raw({"curr": "a", "next": ["b"], "status": "received"}))
    applied = apply_event(envelope(), progress.event(envelope()), T1)
    assert isinstance(applied, Applied)
    assert json.loads(live_frame(ID, Published.status(applied), now).split(b"data: ")[1]) == {
        "id": ID,
        "status": "running",
        "progress_percent": 5.0,
        "actor": "a",
        "prev": [],
        "curr": "a",
        "next": ["b"],
        "task_state": "received",
        "timestamp": "2026-11-28T14:24:08.123461Z",
    }
    assert live_frame(ID, Published.fly({"delta": "he\nllo"}), now) == (
        b'event: partial\ndata: {"delta":"he\\nllo"}\n\n'
    )
    assert LEGACY_KEEPALIVE == b": keepalive\n\n"


# --- property tests: the parsers raise nothing but client errors ------------------------------

FUZZ = settings(max_examples=300, deadline=None)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
field_values = st.sampled_from(
    ["received", "processing", "completed", "succeeded", "failed", "running", ID, None, [], {}]
)
bodies = (
    st.binary(max_size=64)
    | json_values.map(raw)
    | st.dictionaries(
        st.sampled_from(["id", "status", "prev", "curr", "next", "message", "pause_metadata"]),
        field_values | json_values,
    ).map(raw)
)


def only_client_errors(parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except ClientError as exc:
        assert exc.status_hint in (400, 413)
        assert json.loads(exc.body()) == {"error": exc.message}
        return exc


@FUZZ
@given(body=bodies)
def test_fuzz_progress(body: bytes) -> None:
    result = only_client_errors(LegacyProgress.parse, ID, body)
    if isinstance(result, LegacyProgress):
        assert 0 < result.percent <= 100
        assert result.event(envelope()).status in (Status.RUNNING, Status.PAUSED)


@FUZZ
@given(body=bodies)
def test_fuzz_final(body: bytes) -> None:
    result = only_client_errors(parse_final, ID, body)
    if isinstance(result, StatusEvent):
        assert result.status.terminal


@FUZZ
@given(body=bodies)
def test_fuzz_fly(body: bytes) -> None:
    only_client_errors(parse_fly, body)
