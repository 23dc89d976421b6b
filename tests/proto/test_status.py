"""The status table (docs/contract.md): every (stored, incoming) pair, and event normalisation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_proto import (
    ALIASES,
    CANCEL_EVENT,
    EXPIRE_EVENT,
    RANK,
    RULES,
    TERMINAL,
    Applied,
    Ignored,
    Rule,
    Status,
    StatusEvent,
    apply_event,
    dumps,
    parse_event,
)

from ._support import T0, envelope, later

P, R, A, S, F, C = (
    Status.PENDING,
    Status.RUNNING,
    Status.PAUSED,
    Status.SUCCEEDED,
    Status.FAILED,
    Status.CANCELED,
)
ORDER = (P, R, A, S, F, C)
# The contract, written out: rows are the stored status, columns the incoming one.
# T = transition (store, merge, publish), P = progress (same live status: merge, publish),
# . = ignored (stale: 204, nothing stored or published).
MATRIX = {
    #      pending running paused succeeded failed canceled
    P: "P T T T T T",
    R: ". P T T T T",
    A: ". . P T T T",
    S: ". . . . . .",
    F: ". . . . . .",
    C: ". . . . . .",
}
LETTER = {"T": Rule.TRANSITION, "P": Rule.PROGRESS, ".": Rule.IGNORED}
EXPECTED = {
    (stored, incoming): LETTER[letter]
    for stored, row in MATRIX.items()
    for incoming, letter in zip(ORDER, row.split(), strict=True)
}
PAIRS = [pytest.param(s, i, id=f"{s}->{i}") for s in ORDER for i in ORDER]


def test_ranks_and_terminals() -> None:
    assert [RANK[s] for s in ORDER] == [0, 1, 2, 3, 3, 3]
    assert {S, F, C} == TERMINAL
    assert [s.rank for s in ORDER] == [0, 1, 2, 3, 3, 3]
    assert [s.terminal for s in ORDER] == [False, False, False, True, True, True]
    assert dict(ALIASES) == {"received": R, "processing": R, "completed": R}


def test_rules_table_is_the_contract() -> None:
    assert dict(RULES) == EXPECTED


STORED_DATA = {"actor": "echo", "k": "old", "keep": 1, "result": {"a": 1}}
EVENT_DATA = {"k": "new", "result": {"b": 2}, "status": "hijack", "_rev": 99}


@pytest.mark.parametrize(("stored", "incoming"), PAIRS)
def test_every_pair(stored: Status, incoming: Status) -> None:
    before = envelope(stored, STORED_DATA, revision=7)
    event = StatusEvent(status=incoming, data=EVENT_DATA)
    now = later(1)
    outcome = apply_event(before, event, now)
    if EXPECTED[(stored, incoming)] is Rule.IGNORED:
        assert outcome == Ignored(envelope=before, event=event)
        assert outcome.envelope is before
        return
    assert isinstance(outcome, Applied)
    assert outcome.rule is EXPECTED[(stored, incoming)]
    after = outcome.envelope
    assert after.status is incoming
    # Shallow merge: top-level keys replace (`result` is not merged deeply); the stored status
    # and revision are the table's, never the poster's.
    assert after.data == {"actor": "echo", "k": "new", "keep": 1, "result": {"b": 2}}
    assert after.revision == 8
    assert after.updated_at == now
    assert (after.id, after.created_at) == (before.id, before.created_at)
    assert outcome.event == StatusEvent(status=incoming, data={"k": "new", "result": {"b": 2}})
    assert outcome.terminal is (incoming in TERMINAL)
    assert before.data == STORED_DATA, "the stored envelope is a value: never mutated"


@pytest.mark.parametrize(
    "now",
    [T0 - timedelta(hours=1), T0, T0 + timedelta(microseconds=1)],
    ids=["clock-went-back", "same-instant", "one-tick-later"],
)
def test_updated_at_strictly_increases_whatever_the_clock(now: Any) -> None:
    outcome = apply_event(envelope(R), StatusEvent(status=R), now)
    assert isinstance(outcome, Applied)
    assert outcome.envelope.updated_at == T0 + timedelta(microseconds=1)


@pytest.mark.parametrize("stored", ORDER, ids=str)
def test_cancel_is_an_ordinary_transition(stored: Status) -> None:
    outcome = apply_event(envelope(stored), CANCEL_EVENT, later(1))
    if stored in TERMINAL:
        assert isinstance(outcome, Ignored)
    else:
        assert isinstance(outcome, Applied)
        assert outcome.envelope.status is C
        assert outcome.envelope.data == {"actor": "echo"}
        assert outcome.terminal


@pytest.mark.parametrize("stored", ORDER, ids=str)
def test_expiry_fails_live_envelopes_with_the_timeout_error(stored: Status) -> None:
    outcome = apply_event(envelope(stored), EXPIRE_EVENT, later(1))
    if stored in TERMINAL:
        assert isinstance(outcome, Ignored)
    else:
        assert isinstance(outcome, Applied)
        assert outcome.envelope.status is F
        assert outcome.envelope.data == {"actor": "echo", "error": "task timed out"}


# --- parse_event: aliases and progress normalisation --------------------------------------


def status_event(status: str, data: Any = None) -> StatusEvent:
    body: dict[str, Any] = {"type": "status", "status": status}
    if data is not None:
        body["data"] = data
    event = parse_event(dumps(body))
    assert isinstance(event, StatusEvent)
    return event


@pytest.mark.parametrize("name", [*ORDER, "received", "processing", "completed"], ids=str)
def test_status_names_and_aliases(name: str) -> None:
    expected = ALIASES.get(name, Status(name) if name in set(ORDER) else None)
    assert status_event(name).status is expected


@pytest.mark.parametrize(
    ("data", "percent"),
    [
        ({"prev": [], "next": ["b"]}, 50.0),
        ({"prev": ["a"], "next": []}, 100.0),
        ({"prev": ["a"], "next": ["c", "d"]}, 50.0),
        ({"prev": ["a", "b"], "next": ["d"]}, 75.0),
        ({"prev": [], "next": ["b", "c"]}, 1 / 3 * 100),
        ({"prev": ["a", "b", "c"], "next": []}, 100.0),
        ({"prev": [], "next": []}, None),
        ({"prev": "a", "next": ["b"]}, None),
        ({"prev": ["a"], "next": None}, None),
        ({"prev": ["a"]}, None),
        ({"next": ["a"]}, None),
        ({"progress": 1.0}, 100),
        ({"progress": 1}, 100),
        ({"progress": True}, None),
        ({"progress": 0.5}, None),
        ({"progress": 1.0, "prev": [], "next": ["b", "c"]}, 100),
        ({"progress": 0.5, "prev": [], "next": ["b"]}, 50.0),
        ({"progress_percent": 12, "prev": [], "next": ["b"]}, 12),
        ({"progress_percent": 12, "progress": 1.0}, 12),
        ({"progress_percent": None, "progress": 1.0}, None),
    ],
    ids=[
        "first-of-two",
        "last-of-two",
        "second-of-four",
        "third-of-four",
        "first-of-three",
        "last-of-four",
        "one-actor-route",
        "prev-not-a-list",
        "next-null",
        "no-next",
        "no-prev",
        "progress-1.0",
        "progress-1",
        "progress-true-is-not-1",
        "progress-half",
        "progress-1.0-beats-route",
        "route-beats-partial-progress",
        "progress_percent-kept-over-route",
        "progress_percent-kept-over-progress",
        "progress_percent-null-kept",
    ],
)
def test_progress_percent(data: dict[str, Any], percent: Any) -> None:
    """`(len(prev)+1) / (len(prev)+1+len(next)) * 100`, exactly as the contract writes it."""
    event = status_event("processing", data)
    if percent is None and "progress_percent" not in data:
        assert event.data == data
    else:
        assert event.data == {**data, "progress_percent": percent}


@pytest.mark.parametrize(
    ("stored", "alias"),
    [pytest.param(s, a, id=f"{s}->{a}") for s in ORDER for a in ALIASES],
)
def test_aliases_follow_the_running_column(stored: Status, alias: str) -> None:
    outcome = apply_event(envelope(stored), status_event(alias, {"k": 1}), later(1))
    assert outcome == apply_event(envelope(stored), StatusEvent(status=R, data={"k": 1}), later(1))
    assert isinstance(outcome, Applied) is (EXPECTED[(stored, R)] is not Rule.IGNORED)


def test_succeeded_with_progress_one_stores_100() -> None:
    event = status_event("succeeded", {"progress": 1.0, "result": "ok"})
    outcome = apply_event(envelope(R, {"actor": "echo", "progress_percent": 50}), event, later(1))
    assert isinstance(outcome, Applied)
    assert outcome.envelope.data == {
        "actor": "echo",
        "progress": 1.0,
        "progress_percent": 100,
        "result": "ok",
    }


def test_alias_with_route_moves_pending_to_running_with_progress() -> None:
    event = status_event("received", {"prev": ["a"], "curr": "b", "next": ["c"]})
    outcome = apply_event(envelope(P), event, later(1))
    assert isinstance(outcome, Applied)
    assert outcome.rule is Rule.TRANSITION
    assert outcome.envelope.status is R
    assert outcome.envelope.data["progress_percent"] == 2 / 3 * 100
    assert outcome.envelope.data["curr"] == "b"


def test_missing_or_null_data_is_empty() -> None:
    assert status_event("running").data == {}
    assert parse_event(b'{"type":"status","status":"running","data":null}') == StatusEvent(status=R)


# --- sequences: the invariants of the table ------------------------------------------------

events = st.builds(
    StatusEvent,
    status=st.sampled_from(ORDER),
    data=st.dictionaries(st.sampled_from(["a", "b", "status", "_rev"]), st.integers(0, 9)),
)
clock = st.integers(-5, 5).map(lambda s: later(s))


@settings(max_examples=200, deadline=None)
@given(start=st.sampled_from(ORDER), steps=st.lists(st.tuples(events, clock), max_size=12))
def test_sequences_never_lower_the_rank_or_leave_a_terminal(
    start: Status, steps: list[tuple[StatusEvent, Any]]
) -> None:
    current = envelope(start, {"actor": "echo"})
    expected_data: dict[str, Any] = {"actor": "echo"}
    for event, now in steps:
        outcome = apply_event(current, event, now)
        after = outcome.envelope
        assert RANK[after.status] >= RANK[current.status]
        if current.terminal:
            assert isinstance(outcome, Ignored)
        if isinstance(outcome, Ignored):
            assert after is current
            continue
        expected_data.update({k: v for k, v in event.data.items() if k not in ("status", "_rev")})
        assert after.revision == current.revision + 1
        assert after.updated_at > current.updated_at
        assert after.data == expected_data
        current = after


@pytest.mark.parametrize(
    ("stored", "incoming", "merged"),
    [
        (50.0, 55.0, 55.0),
        (55.0, 50.0, 55.0),
        (55, 50.5, 55),
        (None, 20.0, 20.0),
        ("high", 20.0, 20.0),
        (True, 0.5, 0.5),
        (50.0, "low", "low"),
    ],
    ids=["rises", "never-lowers", "int-stored", "none-stored", "text-stored", "bool-stored",
         "text-incoming"],
)  # fmt: skip
def test_keep_highest_keys_never_go_down(stored: Any, incoming: Any, merged: Any) -> None:
    data = {"actor": "echo"} if stored is None else {"actor": "echo", "p": stored}
    event = StatusEvent(status=R, data={"p": incoming, "q": 1}, keep_highest=frozenset({"p", "x"}))
    outcome = apply_event(envelope(R, data), event, later(1))
    assert isinstance(outcome, Applied)
    assert outcome.envelope.data["p"] == merged and outcome.event.data == {"p": merged, "q": 1}
    assert "x" not in outcome.envelope.data
