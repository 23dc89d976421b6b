"""Fresh ids: envelope ids are random canonical UUID4s, request ids unique tokens, and a
forked child never hands out its parent's."""

from __future__ import annotations

import os
import re
import uuid

from mesh_proto import parse_id
from mesh_trio._mesh import EnvelopeIds
from mesh_trio._observability import fresh_request_id, new_request_id


def test_envelope_ids_are_canonical_random_uuid4s() -> None:
    ids = EnvelopeIds()
    drawn = [ids() for _ in range(3 * EnvelopeIds.BATCH + 7)]  # across several draws
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text == parse_id(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every variant digit turns up: the variant bits are set, the other two stay random.
    assert {text[19] for text in drawn} == set("89ab")


def test_request_ids_are_unique_tokens_and_a_given_one_is_kept() -> None:
    drawn = [fresh_request_id() for _ in range(1000)]
    assert len(set(drawn)) == len(drawn)
    assert all(re.fullmatch("[0-9a-f]{32}", text) for text in drawn)
    assert new_request_id(b"trace-42") == "trace-42"
    assert re.fullmatch("[0-9a-f]{32}", new_request_id(b"has space"))


def _in_child(draw: object) -> list[str]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: draw, report, leave without running the parent's cleanup
        try:
            os.write(write, " ".join(draw() for _ in range(4)).encode())  # type: ignore[operator]
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode().split()
    os.waitpid(pid, 0)
    return out


def test_a_forked_child_draws_its_own_ids() -> None:
    ids = EnvelopeIds()
    ids()  # the parent holds a drawn batch
    child = _in_child(ids)
    parent = [ids() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)
    child_requests = _in_child(fresh_request_id)
    assert {text[:16] for text in child_requests} != {fresh_request_id()[:16]}
