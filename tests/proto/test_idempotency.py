"""The idempotent create's core: key validation, fingerprint, the claim value, the decision
table, and the claim procedure through a state proxy (exact requests, scripted replies)."""

from __future__ import annotations

import json
from collections.abc import Generator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_proto import (
    CLAIM_PREFIX,
    MAX_IDEMPOTENCY_KEY,
    BadRequest,
    Claim,
    ClaimDecision,
    IdempotencyUnsupported,
    KeyReused,
    ServiceError,
    StoreProtocolError,
    StoreReply,
    StoreRequest,
    claim_envelope,
    claim_key,
    decide_claim,
    parse_idempotency_key,
    request_fingerprint,
)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=24)
CLAIM = Claim(envelope_id="e1", fingerprint="f1", expires_at=LATER)


@pytest.mark.parametrize("key", ["a", "x" * MAX_IDEMPOTENCY_KEY, "!~/%..?#", "order-42"])
def test_valid_keys(key: str) -> None:
    assert parse_idempotency_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "x" * (MAX_IDEMPOTENCY_KEY + 1), "a b", "tab\t", "caf\u00e9", "nl\n", "\x7f"]
)
def test_invalid_keys(key: str) -> None:
    with pytest.raises(BadRequest, match="Idempotency-Key must be 1-255 visible ASCII"):
        parse_idempotency_key(key)


@given(st.text(max_size=300))
def test_any_text_is_a_key_or_a_bad_request(text: str) -> None:
    try:
        assert parse_idempotency_key(text) == text
    except BadRequest:
        pass
    else:
        assert all(0x21 <= ord(c) <= 0x7E for c in text) and 1 <= len(text) <= 255


def test_fingerprint_is_exact_over_actor_namespace_and_body() -> None:
    base = request_fingerprint("worker", "default", b'{"a":1}')
    assert base == request_fingerprint("worker", "default", b'{"a":1}')
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != request_fingerprint("worker", "default", b'{"a": 1}')
    assert base != request_fingerprint("other", "default", b'{"a":1}')
    assert base != request_fingerprint("worker", "prod", b'{"a":1}')


def test_claim_key_encodes_the_key() -> None:
    assert claim_key("a/b c") == "idem/a%2Fb%20c"
    assert claim_key("..") == "idem/%2E%2E"
    assert claim_key("k").startswith(CLAIM_PREFIX)


def test_claim_value_round_trips() -> None:
    assert CLAIM.to_value() == {
        "envelope_id": "e1",
        "fingerprint": "f1",
        "expires_at": "2026-12-03T12:00:00.000000Z",
    }
    assert Claim.from_value(CLAIM.to_value()) == CLAIM
    revised = Claim(envelope_id="e1", fingerprint="f1", expires_at=LATER, revision=3)
    assert revised.to_value()["_rev"] == 3
    assert Claim.from_value(revised.to_value()) == revised


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        {},
        {"envelope_id": 1, "fingerprint": "f", "expires_at": "2026-12-03T12:00:00Z"},
        {"envelope_id": "e", "fingerprint": None, "expires_at": "2026-12-03T12:00:00Z"},
        {"envelope_id": "e", "fingerprint": "f", "expires_at": 5},
        {"envelope_id": "e", "fingerprint": "f", "expires_at": "yesterday"},
        {"envelope_id": "e", "fingerprint": "f", "expires_at": "2026-12-03T12:00:00"},
        {"envelope_id": "e", "fingerprint": "f", "expires_at": "2026-12-03T12:00:00Z", "_rev": "1"},
    ],
)
def test_malformed_claim_values(value: object) -> None:
    with pytest.raises(StoreProtocolError, match="malformed"):
        Claim.from_value(value)


@pytest.mark.parametrize(
    ("stored", "fingerprint", "decision"),
    [
        (None, "f1", ClaimDecision.FRESH),
        (CLAIM, "f1", ClaimDecision.REPLAY),
        (CLAIM, "f2", ClaimDecision.CONFLICT),
        (Claim(envelope_id="e1", fingerprint="f1", expires_at=NOW), "f1", ClaimDecision.EXPIRED),
        (Claim(envelope_id="e1", fingerprint="f1", expires_at=NOW), "f2", ClaimDecision.EXPIRED),
    ],
)
def test_decision_table(stored: Claim | None, fingerprint: str, decision: ClaimDecision) -> None:
    assert decide_claim(stored, fingerprint, NOW) is decision


def test_errors_carry_their_reply() -> None:
    assert KeyReused().status_hint == 422
    assert json.loads(KeyReused().body()) == {
        "error": "Idempotency-Key reused with a different request"
    }
    assert IdempotencyUnsupported("no").status_hint == 501


# The procedure, driven with scripted replies.

KEY = claim_key("k")
NEW = Claim(envelope_id="e2", fingerprint="f2", expires_at=LATER)


def row(claim: Claim) -> StoreReply:
    value = claim.to_value()
    body = {"key": KEY, "value": value, "created_at": "x", "updated_at": "x"}
    return StoreReply(status=200, body=json.dumps(body).encode())


def drive(
    procedure: Generator[StoreRequest, StoreReply, Claim | None], replies: list[StoreReply]
) -> tuple[Claim | None, list[StoreRequest]]:
    requests = [next(procedure)]
    for reply in replies:
        try:
            requests.append(procedure.send(reply))
        except StopIteration as done:
            return done.value, requests
    raise AssertionError("the procedure wanted more replies")


def test_an_absent_key_is_claimed_with_one_request() -> None:
    result, requests = drive(claim_envelope(KEY, NEW, NOW), [StoreReply(status=204)])
    assert result is None
    (put,) = requests
    assert (put.method, put.target) == ("PUT", "/keys/idem%2Fk?if_absent=1")
    assert json.loads(put.body) == NEW.to_value()


def test_a_live_claim_is_returned() -> None:
    result, requests = drive(claim_envelope(KEY, NEW, NOW), [StoreReply(status=409), row(CLAIM)])
    assert result == CLAIM
    assert [(r.method, r.target) for r in requests] == [
        ("PUT", "/keys/idem%2Fk?if_absent=1"),
        ("GET", "/keys/idem%2Fk"),
    ]


def test_an_expired_claim_is_replaced_under_the_revision_guard() -> None:
    old = Claim(envelope_id="e0", fingerprint="f0", expires_at=NOW, revision=4)
    result, requests = drive(
        claim_envelope(KEY, NEW, NOW), [StoreReply(status=409), row(old), StoreReply(status=204)]
    )
    assert result is None
    replace = requests[-1]
    assert replace.target == "/keys/idem%2Fk?if_rev=4"
    assert json.loads(replace.body) == {**NEW.to_value(), "_rev": 5}


def test_a_lost_replacement_reads_again() -> None:
    old = Claim(envelope_id="e0", fingerprint="f0", expires_at=NOW)
    winner = Claim(envelope_id="e3", fingerprint="f3", expires_at=LATER, revision=1)
    replies = [StoreReply(status=409), row(old), StoreReply(status=409), row(winner)]
    result, requests = drive(claim_envelope(KEY, NEW, NOW), replies)
    assert result == winner
    assert [r.method for r in requests] == ["PUT", "GET", "PUT", "GET"]


def test_a_claim_released_in_between_is_claimed_again() -> None:
    replies = [StoreReply(status=409), StoreReply(status=404), StoreReply(status=204)]
    result, requests = drive(claim_envelope(KEY, NEW, NOW), replies)
    assert result is None
    assert [r.target for r in requests][-1] == "/keys/idem%2Fk?if_absent=1"


def test_a_claim_that_keeps_changing_gives_up() -> None:
    proc = claim_envelope(KEY, NEW, NOW)
    next(proc)
    with pytest.raises(ServiceError, match="changing too fast"):
        while True:
            proc.send(StoreReply(status=409))
            proc.send(StoreReply(status=404))


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (StoreReply(status=503, body=b"down"), ServiceError),
        (StoreReply(status=418), StoreProtocolError),
        (StoreReply(status=200, body=b"[]"), StoreProtocolError),
        (StoreReply(status=200, body=b"nope"), StoreProtocolError),
    ],
)
def test_bad_replies_to_the_read(reply: StoreReply, error: type[Exception]) -> None:
    proc = claim_envelope(KEY, NEW, NOW)
    next(proc)
    proc.send(StoreReply(status=409))
    with pytest.raises(error):
        proc.send(reply)
