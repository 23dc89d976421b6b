"""The sans-IO AMQP client (`mesh_trio.transports._amqp_proto`), without sockets.

Each test plays the broker: frames go in as bytes (`receive_data`), and what the client wrote
(`data_to_send`) is cut back into frames and compared. Tables hold the cases: the handshake
step by step, the ways a handshake fails, tuning, and the confirm bookkeeping (acks, multiple
acks, nacks, returns) as "what was published, what the broker said, how each publish ended".
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from mesh_trio.transports import ActorNotFound, DispatchUnavailable
from mesh_trio.transports import _amqp_proto as amqp
from mesh_trio.transports._amqp_proto import (
    ChannelClosed,
    ChannelOpened,
    ClientConnection,
    Closed,
    Connected,
    ConnectionState,
    FrameParser,
    Publication,
    Ready,
    Settled,
    Tuning,
)

Frame = pamqp_frame.FrameTypes


def wire(*frames: tuple[int, Frame]) -> bytes:
    return b"".join(pamqp_frame.marshal(frame, channel) for channel, frame in frames)


def written(conn: ClientConnection) -> list[tuple[int, Frame]]:
    """What the client queued for the broker, as frames (the protocol header left out)."""
    data = conn.data_to_send()
    if data.startswith(b"AMQP"):
        data = data[8:]
    return FrameParser().feed(data)


def names(frames: list[tuple[int, Frame]]) -> list[tuple[int, str]]:
    return [(channel, frame.name) for channel, frame in frames]


def client(**settings: Any) -> ClientConnection:
    settings.setdefault("channels", 1)
    settings.setdefault("capacity", 8)
    settings.setdefault("heartbeat", 60)
    return ClientConnection(username="guest", password="secret", vhost="/", **settings)


def start() -> commands.Connection.Start:
    return commands.Connection.Start(server_properties={"product": "test"})


def tune(channel_max: int = 2047, frame_max: int = 131072, heartbeat: int = 60) -> Frame:
    return commands.Connection.Tune(
        channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat
    )


def connected(**settings: Any) -> ClientConnection:
    """A client through the handshake with every channel open, its output taken."""
    frame_max = settings.pop("frame_max", 131072)
    conn = client(**settings)
    conn.receive_data(wire((0, start())))
    conn.receive_data(wire((0, tune(frame_max=frame_max))))
    conn.receive_data(wire((0, commands.Connection.OpenOk())))
    for number in range(1, conn.channels + 1):
        conn.receive_data(wire((number, commands.Channel.OpenOk())))
        conn.receive_data(wire((number, commands.Confirm.SelectOk())))
    assert conn.state is ConnectionState.OPEN
    conn.data_to_send()
    return conn


def outcome(publication: Publication) -> str:
    if not publication.settled:
        return "pending"
    if publication.error is None:
        return "ok"
    if isinstance(publication.error, ActorNotFound):
        return "not found"
    assert isinstance(publication.error, DispatchUnavailable)
    return "nacked" if "basic.nack" in str(publication.error) else "lost"


def publish(conn: ClientConnection, key: str, body: bytes = b"{}") -> Publication:
    publication = conn.publish(f"asya-ns-{key}", key, body)
    assert publication is not None
    return publication


# -- the handshake ---------------------------------------------------------------------------


def test_the_client_opens_with_the_protocol_header() -> None:
    conn = client()
    assert conn.state is ConnectionState.AWAIT_START
    assert conn.data_to_send() == b"AMQP\x00\x00\x09\x01"
    assert conn.data_to_send() == b"" and not conn.has_data


def test_the_handshake_step_by_step() -> None:
    conn = client(channels=2)
    conn.data_to_send()
    steps: list[tuple[tuple[int, Frame], list[tuple[int, str]], ConnectionState, list[Any]]] = [
        ((0, Heartbeat()), [], ConnectionState.AWAIT_START, []),
        ((0, start()), [(0, "Connection.StartOk")], ConnectionState.AWAIT_TUNE, []),
        (
            (0, tune(heartbeat=30)),
            [(0, "Connection.TuneOk"), (0, "Connection.Open")],
            ConnectionState.AWAIT_OPEN_OK,
            [],
        ),
        (
            (0, commands.Connection.OpenOk()),
            [(1, "Channel.Open")],
            ConnectionState.OPENING_CHANNELS,
            [Connected(Tuning(channel_max=2047, frame_max=131072, heartbeat=30))],
        ),
        (
            (1, commands.Channel.OpenOk()),
            [(1, "Confirm.Select")],
            ConnectionState.OPENING_CHANNELS,
            [],
        ),
        (
            (1, commands.Confirm.SelectOk()),
            [(2, "Channel.Open")],
            ConnectionState.OPENING_CHANNELS,
            [ChannelOpened(1)],
        ),
        (
            (2, commands.Channel.OpenOk()),
            [(2, "Confirm.Select")],
            ConnectionState.OPENING_CHANNELS,
            [],
        ),
        ((2, commands.Confirm.SelectOk()), [], ConnectionState.OPEN, [ChannelOpened(2), Ready()]),
    ]
    for frame, client_frames, state, events in steps:
        assert conn.receive_data(wire(frame)) == events, frame
        out = written(conn)
        assert names(out) == client_frames, frame
        assert conn.state is state
        for _, sent in out:
            if isinstance(sent, commands.Connection.StartOk):
                assert (sent.mechanism, sent.response) == ("PLAIN", "\0guest\0secret")
                capabilities = sent.client_properties["capabilities"]
                assert isinstance(capabilities, dict) and capabilities["publisher_confirms"] is True
            elif isinstance(sent, commands.Connection.TuneOk):
                assert (sent.channel_max, sent.frame_max, sent.heartbeat) == (2047, 131072, 30)
            elif isinstance(sent, commands.Connection.Open):
                assert sent.virtual_host == "/"
    assert conn.usable and conn.tuning is not None


def test_the_whole_handshake_cut_anywhere_gives_the_same_events() -> None:
    broker = wire(
        (0, start()),
        (0, tune()),
        (0, commands.Connection.OpenOk()),
        (1, commands.Channel.OpenOk()),
        (1, commands.Confirm.SelectOk()),
    )
    conn = client()
    events = [event for i in range(len(broker)) for event in conn.receive_data(broker[i : i + 1])]
    assert [type(event) for event in events] == [Connected, ChannelOpened, Ready]
    assert conn.state is ConnectionState.OPEN


@pytest.mark.parametrize(
    ("broker", "settings", "reason", "answer"),
    [
        (
            [(0, commands.Connection.Start(mechanisms="AMQPLAIN"))],
            {},
            "RabbitMQ does not offer PLAIN login (AMQPLAIN)",
            [],
        ),
        (
            [
                (0, start()),
                (0, commands.Connection.Close(403, "ACCESS_REFUSED - Login was refused", 0, 0)),
            ],
            {},
            "RabbitMQ refused the login of 'guest': 403 ACCESS_REFUSED - Login was refused",
            [(0, "Connection.StartOk"), (0, "Connection.CloseOk")],
        ),
        (
            [
                (0, start()),
                (0, tune()),
                (0, commands.Connection.Close(530, "NOT_ALLOWED - vhost not found", 0, 0)),
            ],
            {},
            "RabbitMQ refused vhost '/': 530 NOT_ALLOWED - vhost not found",
            [
                (0, "Connection.StartOk"),
                (0, "Connection.TuneOk"),
                (0, "Connection.Open"),
                (0, "Connection.CloseOk"),
            ],
        ),
        (
            [(0, start()), (0, tune(channel_max=2))],
            {"channels": 4},
            "RabbitMQ allows only 2 channels",
            [(0, "Connection.StartOk")],
        ),
        (
            [(1, commands.Basic.Ack(delivery_tag=1))],
            {},
            "unexpected Basic.Ack on channel 1 while the connection",
            [],
        ),
    ],
)
def test_a_failed_handshake_is_closed_with_the_reason(
    broker: list[tuple[int, Frame]],
    settings: dict[str, Any],
    reason: str,
    answer: list[tuple[int, str]],
) -> None:
    conn = client(**settings)
    conn.data_to_send()
    events = conn.receive_data(wire(*broker))
    assert events[-1] == Closed(reason)
    assert names(written(conn)) == answer
    assert conn.state is ConnectionState.CLOSED and conn.close_reason == reason
    assert conn.receive_data(wire((0, start()))) == []  # closed is final


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"AMQP\x00\x00\x08\x00", "RabbitMQ does not speak AMQP 0-9-1 (it offered 0-8-0)"),
        (b"\x01\x00\x01\x00\x00\x00\x05hello\x00", "protocol error"),  # bad frame-end octet
        (b"\x01\x00\x00\x02\x00\x00\x00\x00", "protocol error: frame of 33554432 bytes announced"),
    ],
)
def test_bytes_that_are_not_amqp_close_the_connection(data: bytes, reason: str) -> None:
    (event,) = client().receive_data(data)
    assert isinstance(event, Closed) and event.reason.startswith(reason)


@pytest.mark.parametrize(
    ("server", "ours", "tuning"),
    [
        ((2047, 131072, 60), 60, (2047, 131072, 60)),
        ((0, 0, 0), 60, (65535, 131072, 60)),  # 0: the broker sets no limit
        ((2047, 4096, 580), 60, (2047, 4096, 60)),  # the lower of both
        ((2047, 1048576, 10), 60, (2047, 131072, 10)),
        ((2047, 131072, 60), 0, (2047, 131072, 0)),  # we asked for none
    ],
)
def test_tuning_takes_the_lower_limit(
    server: tuple[int, int, int], ours: int, tuning: tuple[int, int, int]
) -> None:
    conn = client(heartbeat=ours)
    conn.receive_data(wire((0, start()), (0, tune(*server))))
    assert conn.tuning == Tuning(channel_max=tuning[0], frame_max=tuning[1], heartbeat=tuning[2])


# -- publishing and confirms -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 2, 4088, 4089, 10240, 70000])
def test_a_publish_is_exact_frames_cut_to_frame_max(size: int) -> None:
    conn = connected(frame_max=4096, channels=2, exchange="asya")
    body = (bytes(range(256)) * (size // 256 + 1))[:size]
    publish(conn, "warm")  # channel 1
    conn.data_to_send()
    publication = publish(conn, "a", body)
    assert (publication.channel, publication.tag, publication.routing_key) == (2, 1, "a")
    properties = commands.Basic.Properties(content_type="application/json", delivery_mode=2)
    chunks = [body[start : start + 4088] for start in range(0, size, 4088)]
    assert conn.data_to_send() == wire(
        (2, commands.Basic.Publish(exchange="asya", routing_key="a", mandatory=True)),
        (2, ContentHeader(body_size=size, properties=properties)),
        *((2, ContentBody(chunk)) for chunk in chunks),
    )
    assert conn.in_flight() == 2


def _returned(key: str, body: bytes = b"{}") -> list[Frame]:
    return [
        commands.Basic.Return(312, "NO_ROUTE", "", key),
        ContentHeader(body_size=len(body)),
        ContentBody(body),
    ]


def _ack(tag: int, multiple: bool = False) -> Frame:
    return commands.Basic.Ack(delivery_tag=tag, multiple=multiple)


def _nack(tag: int, multiple: bool = False) -> Frame:
    return commands.Basic.Nack(delivery_tag=tag, multiple=multiple)


CONFIRMS: list[tuple[str, str, list[Frame], list[str]]] = [
    # (case, routing keys published in tag order, broker frames on channel 1, outcomes)
    ("one ack", "abc", [_ack(2)], ["pending", "ok", "pending"]),
    ("a multiple ack settles up to its tag", "abc", [_ack(2, True)], ["ok", "ok", "pending"]),
    ("multiple over tags already settled", "abc", [_ack(1), _ack(3, True)], ["ok", "ok", "ok"]),
    ("an ack of a tag we do not hold", "ab", [_ack(7)], ["pending", "pending"]),
    ("a repeated ack", "ab", [_ack(1), _ack(1)], ["ok", "pending"]),
    ("multiple with tag 0 settles nothing", "ab", [_ack(0, True)], ["pending", "pending"]),
    ("one nack", "ab", [_nack(1)], ["nacked", "pending"]),
    ("a multiple nack", "abc", [_nack(2, True)], ["nacked", "nacked", "pending"]),
    ("ack then nack", "ab", [_ack(1), _nack(2)], ["ok", "nacked"]),
    ("a return, then its own ack", "ab", [*_returned("b"), _ack(2)], ["pending", "not found"]),
    (
        "a return, then a multiple ack past it",
        "abc",
        [*_returned("b"), _ack(3, True)],
        ["ok", "not found", "ok"],
    ),
    (
        "a return prefers the ack's own tag",
        "aaa",
        [*_returned("a"), _ack(3, True)],
        ["ok", "ok", "not found"],
    ),
    (
        "else the oldest with its key",
        "aab",
        [*_returned("a"), _ack(3, True)],
        ["not found", "ok", "ok"],
    ),
    (
        "two returns before one multiple ack",
        "abc",
        [*_returned("a"), *_returned("c"), _ack(3, True)],
        ["not found", "ok", "not found"],
    ),
    (
        "two returns of one key",
        "aab",
        [*_returned("a"), *_returned("a"), _ack(3, True)],
        ["not found", "not found", "ok"],
    ),
    ("a return, then a nack", "a", [*_returned("a"), _nack(1)], ["not found"]),
    (
        "a return with a key nothing unconfirmed has is dropped",
        "ab",
        [*_returned("z"), _ack(1), _ack(2)],
        ["ok", "ok"],
    ),
    (
        # Seen from RabbitMQ under load: the returns of 1 and 3 went out, then the ack of 1-2.
        "a return matching none of an ack's tags waits for the next",
        "aba",
        [*_returned("a"), *_returned("a"), _ack(2, True), _ack(3)],
        ["not found", "ok", "not found"],
    ),
    (
        "a return waits past an ack of a tag we do not hold",
        "a",
        [*_returned("a"), _ack(9), _ack(1)],
        ["not found"],
    ),
    ("a return with an empty body", "a", [*_returned("a", b"")[:2], _ack(1)], ["not found"]),
    (
        "a return body in several frames",
        "a",
        [
            commands.Basic.Return(312, "NO_ROUTE", "", "a"),
            ContentHeader(body_size=5),
            ContentBody(b"he"),
            ContentBody(b"llo"),
            _ack(1),
        ],
        ["not found"],
    ),
    (
        "a return only counts once its body is in",
        "a",
        [*_returned("a", b"{}")[:2], _ack(1)],
        ["ok"],
    ),
]


@pytest.mark.parametrize(
    ("keys", "broker", "outcomes"),
    [case[1:] for case in CONFIRMS],
    ids=[case[0] for case in CONFIRMS],
)
def test_confirms_settle_the_right_publishes(
    keys: str, broker: list[Frame], outcomes: list[str]
) -> None:
    conn = connected()
    publications = [publish(conn, key) for key in keys]
    assert [p.tag for p in publications] == list(range(1, len(keys) + 1))
    conn.data_to_send()
    events = conn.receive_data(wire(*((1, frame) for frame in broker)))
    assert [outcome(p) for p in publications] == outcomes
    settled = [p for event in events if isinstance(event, Settled) for p in event.publications]
    assert sorted(settled, key=lambda p: p.tag) == [p for p in publications if p.settled]
    counters = conn.counters
    assert (counters.confirmed, counters.returned, counters.nacked) == (
        outcomes.count("ok"),
        outcomes.count("not found"),
        outcomes.count("nacked"),
    )
    assert conn.in_flight() == outcomes.count("pending")
    assert conn.data_to_send() == b""  # confirms need no answer


def test_a_returned_message_names_its_queue_exchange_and_key() -> None:
    conn = connected(exchange="asya")
    publication = publish(conn, "nobody")
    conn.receive_data(wire(*((1, f) for f in [*_returned("nobody"), _ack(1)])))
    assert str(publication.error) == (
        "queue 'asya-ns-nobody' does not exist: RabbitMQ returned the message as unroutable "
        "(312 NO_ROUTE, exchange 'asya', routing key 'nobody')"
    )


def test_tags_count_per_channel_and_the_least_busy_channel_is_taken() -> None:
    conn = connected(channels=2, capacity=2)
    placed = [(p.channel, p.tag) for p in (publish(conn, k) for k in "abcd")]
    assert placed == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert conn.publish("asya-ns-e", "e", b"{}") is None  # every channel at capacity
    events = conn.receive_data(wire((2, _ack(1))))
    assert [type(e) for e in events] == [Settled]
    assert (publish(conn, "e").channel, conn.in_flight()) == (2, 4)


def test_frames_for_a_channel_we_do_not_have_are_ignored() -> None:
    conn = connected()
    publication = publish(conn, "a")
    conn.data_to_send()
    assert conn.receive_data(wire((9, _ack(1)), (9, commands.Channel.Close(404, "x", 0, 0)))) == []
    assert outcome(publication) == "pending" and conn.data_to_send() == b""


def test_channel_flow_is_answered() -> None:
    conn = connected()
    conn.receive_data(wire((1, commands.Channel.Flow(active=False))))
    ((channel, frame),) = written(conn)
    assert channel == 1 and isinstance(frame, commands.Channel.FlowOk) and frame.active is False


def test_a_heartbeat_is_eight_bytes() -> None:
    conn = connected()
    conn.send_heartbeat()
    assert conn.data_to_send() == b"\x08\x00\x00\x00\x00\x00\x00\xce"
    assert conn.receive_data(Heartbeat.marshal()) == [] and not conn.has_data


# -- channels closed by the broker -----------------------------------------------------------


def test_a_closed_channel_fails_its_own_publishes_and_is_reopened() -> None:
    conn = connected(channels=2, exchange="asya")
    on_one, on_two = publish(conn, "a"), publish(conn, "b")
    assert (on_one.channel, on_two.channel) == (1, 2)
    conn.data_to_send()
    close = commands.Channel.Close(404, "NOT_FOUND - no exchange 'asya' in vhost '/'", 60, 40)
    events = conn.receive_data(wire((1, close)))
    reason = (
        "exchange 'asya' not found on RabbitMQ vhost '/' "
        "(404 NOT_FOUND - no exchange 'asya' in vhost '/')"
    )
    assert events == [Settled((on_one,)), ChannelClosed(1, reason)]
    assert (outcome(on_one), str(on_one.error), outcome(on_two)) == ("lost", reason, "pending")
    assert names(written(conn)) == [(1, "Channel.CloseOk"), (1, "Channel.Open")]
    assert not conn.channel_is_open(1) and conn.usable and conn.counters.lost == 1

    assert publish(conn, "c").channel == 2  # meanwhile, the other channel
    conn.data_to_send()
    conn.receive_data(wire((1, commands.Channel.OpenOk())))
    assert names(written(conn)) == [(1, "Confirm.Select")]
    assert conn.receive_data(wire((1, commands.Confirm.SelectOk()))) == [ChannelOpened(1)]
    again = publish(conn, "d")
    assert (again.channel, again.tag) == (1, 1)  # a fresh channel counts tags from 1


def test_other_channel_closes_say_the_code_and_text() -> None:
    conn = connected()
    events = conn.receive_data(wire((1, commands.Channel.Close(406, "PRECONDITION_FAILED", 0, 0))))
    assert events == [ChannelClosed(1, "RabbitMQ closed channel 1: 406 PRECONDITION_FAILED")]


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        ("opening", "RabbitMQ closed channel 1: 403 ACCESS_REFUSED"),
        ("reopening", "cannot reopen channel 1: RabbitMQ closed channel 1: 403 ACCESS_REFUSED"),
    ],
)
def test_a_channel_that_cannot_open_closes_the_connection(when: str, reason: str) -> None:
    close = commands.Channel.Close(403, "ACCESS_REFUSED", 0, 0)
    if when == "opening":
        conn = client()
        conn.receive_data(wire((0, start()), (0, tune()), (0, commands.Connection.OpenOk())))
    else:
        conn = connected()
        conn.receive_data(wire((1, close)))  # reopened
    events = conn.receive_data(wire((1, close)))
    assert events[-1] == Closed(reason)
    assert conn.state is ConnectionState.CLOSED


# -- the connection ending -------------------------------------------------------------------


def test_a_lost_connection_fails_every_publish_in_flight() -> None:
    conn = connected(channels=2)
    first, second, third = publish(conn, "a"), publish(conn, "b"), publish(conn, "c")
    conn.receive_data(wire((1, _ack(1))))
    events = conn.connection_lost("RabbitMQ closed the TCP connection")
    # Channel by channel: `third` is on channel 1, `second` on channel 2.
    assert events == [
        Settled((third,)),
        Settled((second,)),
        Closed("RabbitMQ closed the TCP connection"),
    ]
    assert [outcome(p) for p in (first, second, third)] == ["ok", "lost", "lost"]
    assert str(second.error) == (
        "RabbitMQ connection lost before the confirm: RabbitMQ closed the TCP connection"
    )
    assert (conn.counters.lost, conn.in_flight(), conn.usable) == (2, 0, False)
    with pytest.raises(DispatchUnavailable, match="connection lost: RabbitMQ closed the TCP"):
        conn.publish("asya-ns-d", "d", b"{}")
    assert conn.connection_lost("something else") == []  # the first reason stays
    assert conn.close_reason == "RabbitMQ closed the TCP connection"
    assert conn.receive_data(wire((1, _ack(2)))) == []


def test_the_broker_closing_the_connection_is_answered_and_fails_publishes() -> None:
    conn = connected()
    publication = publish(conn, "a")
    conn.data_to_send()
    forced = commands.Connection.Close(
        320, "CONNECTION_FORCED - broker forced connection closure", 0, 0
    )
    events = conn.receive_data(wire((0, forced)))
    reason = (
        "RabbitMQ closed the connection: 320 CONNECTION_FORCED - broker forced connection closure"
    )
    assert events == [Settled((publication,)), Closed(reason)]
    assert names(written(conn)) == [(0, "Connection.CloseOk")]
    assert "CONNECTION_FORCED" in str(publication.error)


def test_the_polite_close() -> None:
    conn = connected()
    publication = publish(conn, "a")
    conn.data_to_send()
    assert conn.close() == [Settled((publication,))]
    assert str(publication.error) == "the RabbitMQ dispatcher is closing"
    ((_, frame),) = written(conn)
    assert isinstance(frame, commands.Connection.Close) and frame.reply_code == 200
    assert conn.state is ConnectionState.CLOSING and not conn.usable
    with pytest.raises(DispatchUnavailable, match="the dispatcher is closing"):
        conn.publish("asya-ns-b", "b", b"{}")
    assert conn.close() == []
    assert conn.receive_data(wire((0, commands.Connection.CloseOk()))) == [
        Closed("closed by the mesh api")
    ]


def test_a_blocked_broker_refuses_publishes_until_unblocked() -> None:
    conn = connected()
    events = conn.receive_data(wire((0, commands.Connection.Blocked("low on memory"))))
    assert events == [amqp.Blocked("low on memory")]
    with pytest.raises(DispatchUnavailable, match="blocked publishing: low on memory"):
        conn.publish("asya-ns-a", "a", b"{}")
    assert conn.receive_data(wire((0, commands.Connection.Unblocked()))) == [amqp.Unblocked()]
    publish(conn, "a")


# -- the module stays sans-IO ----------------------------------------------------------------


def test_the_protocol_module_imports_no_io() -> None:
    source = Path(amqp.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    assert imported <= {
        "__future__",
        "enum",
        "struct",
        "collections",
        "typing",
        "attrs",
        "pamqp",
        ".",
    }


@pytest.mark.parametrize(
    ("server", "ours", "agreed"), [(0, 0, 0), (0, 5, 5), (5, 0, 5), (3, 5, 3), (5, 3, 3)]
)
def test_negotiate_takes_the_lower_where_0_is_no_limit(server: int, ours: int, agreed: int) -> None:
    assert amqp.negotiate(server, ours) == agreed


def test_replies_we_did_not_ask_for_are_ignored() -> None:
    conn = connected()
    unasked = wire((1, commands.Confirm.SelectOk()), (1, commands.Channel.OpenOk()))
    assert conn.receive_data(unasked) == [] and not conn.has_data
    assert conn.channel_is_open(1)


def test_a_channel_closed_while_closing_is_not_reopened() -> None:
    conn = connected()
    conn.close()
    conn.data_to_send()
    events = conn.receive_data(wire((1, commands.Channel.Close(406, "PRECONDITION_FAILED", 0, 0))))
    assert events == []
    assert names(written(conn)) == [(1, "Channel.CloseOk")]
    assert not conn.channel_is_open(1) and conn.state is ConnectionState.CLOSING
