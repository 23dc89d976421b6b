"""W3C traceparent for new envelopes."""

from __future__ import annotations

import pytest

from mesh_proto import traceparent_for

RANDOM = bytes(range(1, 25))
TRACE = RANDOM[:16].hex()
SPAN = RANDOM[16:].hex()
CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        (None, f"00-{TRACE}-{SPAN}-01"),
        ("", f"00-{TRACE}-{SPAN}-01"),
        (CALLER, f"00-4bf92f3577b34da6a3ce929d0e0e4736-{SPAN}-00"),
        (f" {CALLER} ", f"00-4bf92f3577b34da6a3ce929d0e0e4736-{SPAN}-00"),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", f"00-{TRACE}-{SPAN}-01"),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", f"00-{TRACE}-{SPAN}-01"),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE}-{SPAN}-01"),
        (f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01", f"00-{TRACE}-{SPAN}-01"),
        ("garbage", f"00-{TRACE}-{SPAN}-01"),
    ],
)
def test_traceparent_joins_a_valid_trace_or_starts_one(incoming: str | None, expected: str) -> None:
    assert traceparent_for(incoming, RANDOM) == expected


@pytest.mark.parametrize(
    "random",
    [b"short", bytes(16) + RANDOM[16:], RANDOM[:16] + bytes(8)],
    ids=["len", "trace", "span"],
)
def test_traceparent_rejects_bad_random(random: bytes) -> None:
    with pytest.raises(ValueError):
        traceparent_for(None, random)
