"""The `POST /writes` codec (both sides) and the watch-line peek, without I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_proto import (
    MAX_WRITES,
    BadRequest,
    ServiceError,
    StoreProtocolError,
    StoreReply,
    decode_writes,
    encode_writes,
    peek_bus_record,
    put_request,
    read_writes,
    writes_request,
)

KEYS = st.text(min_size=1, max_size=20)
BODIES = st.binary(max_size=40)


@given(st.lists(st.tuples(KEYS, BODIES), max_size=8))
def test_a_writes_body_round_trips(puts: list[tuple[str, bytes]]) -> None:
    requests = [put_request(key, None, if_rev=3) for key, _ in puts]
    framed = [(r.target, body) for r, (_, body) in zip(requests, puts, strict=True)]
    decoded = decode_writes(encode_writes(framed))
    assert [(b"/keys/" + k + b"?" + q, b) for k, q, b in decoded] == [
        (t.encode(), b) for t, b in framed
    ]


def test_writes_request_frames_the_puts_it_is_given() -> None:
    puts = [put_request("msg/a", {"n": 1}, if_status="running"), put_request("b", [1])]
    request = writes_request(puts)
    assert (request.method, request.target) == ("POST", "/writes")
    assert dict(request.headers)["content-type"] == "application/x-asya-writes"
    assert request.body == (b'/keys/msg%2Fa?if_status=running 7\n{"n":1}/keys/b 3\n[1]')


@pytest.mark.parametrize("target", ["/keys/a b", "/keys/a\nb"])
def test_a_target_with_a_space_or_line_feed_cannot_be_framed(target: str) -> None:
    with pytest.raises(ValueError, match="space or a line feed"):
        encode_writes([(target, b"{}")])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"/keys/a 3\n{}", "shorter than its length"),
        (b"/keys/a 2", "expected"),
        (b"/keys/a x\n{}", "expected"),
        (b"/keys/a 1234567890\n{}", "expected"),  # a length of ten digits
        (b"/other/a 2\n{}", "expected"),
        (b"/keys/ 2\n{}", "the key is empty"),
        (b"/keys/a 2\n{}/keys/b 1", "write 1: expected"),
        (b"/keys/a 0\n" * (MAX_WRITES + 1), f"more than {MAX_WRITES}"),
    ],
)
def test_a_broken_frame_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        decode_writes(body)


def test_the_most_writes_are_taken() -> None:
    assert len(decode_writes(b"/keys/a 0\n" * MAX_WRITES)) == MAX_WRITES
    assert decode_writes(b"") == []


def test_read_writes_gives_each_put_its_own_reply() -> None:
    body = {
        "results": [
            {"status": 204},
            {"status": 409, "body": {"error": "x"}},
            {"status": 200, "body": {"seq": 4}},
        ]
    }
    replies = read_writes(StoreReply(status=200, body=json.dumps(body).encode()), 3)
    assert replies == [
        StoreReply(status=204),
        StoreReply(status=409, body=b'{"error":"x"}'),
        StoreReply(status=200, body=b'{"seq":4}'),
    ]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (StoreReply(status=503, body=b'{"error":"down"}'), ServiceError),
        (StoreReply(status=400, body=b'{"error":"bad"}'), StoreProtocolError),
        (StoreReply(status=200, body=b'{"results":[{"status":204}]}'), StoreProtocolError),
        (StoreReply(status=200, body=b'{"results":{}}'), StoreProtocolError),
        (StoreReply(status=200, body=b'{"results":[1, 2]}'), StoreProtocolError),
        (StoreReply(status=200, body=b'{"results":[{"status":"204"}, {}]}'), StoreProtocolError),
        (StoreReply(status=200, body=b"[]"), StoreProtocolError),
    ],
)
def test_a_writes_reply_outside_the_protocol_is_refused(
    reply: StoreReply, error: type[Exception]
) -> None:
    with pytest.raises(error):
        read_writes(reply, 2)


@pytest.mark.parametrize(
    "line",
    [
        "",
        '{"key":"k","seq":1,"origin":"o"}',  # another order: decode it whole
        '{"seq":1,"key":"k","event":{},"origin":"o"}',
        '{"seq":1,"key":"k',  # cut inside the key
        '{"seq":1,"key":"k","origin":',  # cut before the origin
        '{"seq":1,"key":7,"origin":"o"}',
        '{"seq":1,"key":"k","origin":null}',
    ],
)
def test_peek_declines_what_it_cannot_read_exactly(line: str) -> None:
    assert peek_bus_record(line) is None


def test_peek_reads_a_line_as_the_proxy_writes_it() -> None:
    line = '{"seq":12,"key":"msg/\\"q\\"","origin":"mesh-1","event":{"kind":"fly","data":1}}'
    assert peek_bus_record(line) == ('msg/"q"', "mesh-1")
