"""The RabbitMQ transport against a real broker on 127.0.0.1:5672 (guest/guest).

Tests marked `rabbitmq` need the broker and fail (never skip) when it is not there. Each test
uses its own queue and exchange names and deletes them afterwards. Faults are made with a TCP
proxy of our own between the dispatcher and the broker (`amqp_helpers.open_proxy`): cut, or
swallowing what the broker sends. Waiting is on conditions with a bound, never on a sleep.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio.testing
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from mesh_trio.transports import ActorNotFound, DispatchUnavailable
from mesh_trio.transports._amqp import (
    AmqpUrl,
    RabbitDispatcher,
    actor_routing_key,
    open_rabbitmq_dispatcher,
)
from mesh_trio.transports._amqp_proto import ConnectionFault, FrameParser
from tests.amqp_helpers import (
    RABBITMQ_URL,
    AmqpAdmin,
    FakePeer,
    consume_one,
    open_admin,
    open_fake_broker,
    open_proxy,
    self_signed_tls,
)

rabbitmq = pytest.mark.rabbitmq


def _unique(kind: str) -> str:
    return f"asya-amqptest-{kind}-{uuid.uuid4().hex[:10]}"


def _dispatcher(
    url: str = RABBITMQ_URL, exchange: str = "", **settings: Any
) -> AbstractAsyncContextManager[RabbitDispatcher]:
    settings.setdefault("connect_timeout", 2.0)
    settings.setdefault("confirm_timeout", 5.0)
    settings.setdefault("close_timeout", 0.5)
    settings.setdefault("reconnect_backoff", (0.05, 0.2))
    return open_rabbitmq_dispatcher(url, exchange, **settings)


def _free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _amqp_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "mesh_trio.amqp" and record.levelno >= logging.WARNING
    ]


@pytest.fixture
async def admin() -> AsyncIterator[AmqpAdmin]:
    async with open_admin(RABBITMQ_URL) as admin:
        yield admin


@pytest.fixture
async def queue(admin: AmqpAdmin) -> AsyncIterator[str]:
    name = _unique("q")
    await admin.declare_queue(name)
    try:
        yield name
    finally:
        await admin.delete_queue(name)


# -- without a broker ----------------------------------------------------------------------


def test_url_is_parsed_and_decoded() -> None:
    url = AmqpUrl.parse("amqp://us%40er:p%3Ass@rabbit.local:5673/team%2Fa")
    assert url == AmqpUrl(
        host="rabbit.local", port=5673, username="us@er", password="p:ss", vhost="team/a"
    )
    assert "p:ss" not in repr(url) and "p%3Ass" not in url.display
    assert url.display == "amqp://us%40er@rabbit.local:5673/team%2Fa"
    for bare in ("amqp://h", "amqp://h/", "amqp://h/%2F"):
        parsed = AmqpUrl.parse(bare)
        assert (parsed.vhost, parsed.port, parsed.username, parsed.password) == (
            "/",
            5672,
            "guest",
            "guest",
        )
    tls = AmqpUrl.parse("amqps://mq.example.com/")
    assert (tls.tls, tls.port, tls.display) == (True, 5671, "amqps://guest@mq.example.com:5671/%2F")
    for bad in ("http://h/", "h:5672", "amqp://h:notaport/"):
        with pytest.raises(ValueError):
            AmqpUrl.parse(bad)


def test_actor_routing_key_strips_the_namespace_prefix() -> None:
    key = actor_routing_key("prod")
    assert key("asya-prod-image-resizer") == "image-resizer"
    assert key("asya-staging-image-resizer") == "asya-staging-image-resizer"
    assert key("asya-prod-") == "asya-prod-"


def test_frame_parser_reassembles_frames_cut_anywhere() -> None:
    frames: list[tuple[int, pamqp_frame.FrameTypes]] = [
        (3, commands.Basic.Ack(delivery_tag=7, multiple=True)),
        (3, commands.Basic.Return(312, "NO_ROUTE", "", "asya-ns-a")),
        (3, ContentHeader(body_size=5)),
        (3, ContentBody(b"hello")),
        (0, Heartbeat()),
        (1, commands.Channel.Close(404, "NOT_FOUND - no exchange 'x'", 60, 40)),
    ]
    wire = b"".join(pamqp_frame.marshal(frame, channel) for channel, frame in frames)
    expected = [(channel, type(frame).__name__) for channel, frame in frames]

    whole = FrameParser().feed(wire)
    assert [(channel, type(frame).__name__) for channel, frame in whole] == expected
    assert isinstance(whole[1][1], commands.Basic.Return)
    assert whole[1][1].routing_key == "asya-ns-a"

    parser = FrameParser()
    trickled = [frame for i in range(len(wire)) for frame in parser.feed(wire[i : i + 1])]
    assert [(channel, type(frame).__name__) for channel, frame in trickled] == expected


def test_frame_parser_rejects_bytes_that_are_not_amqp() -> None:
    with pytest.raises(ConnectionFault, match="protocol error"):
        FrameParser().feed(b"\x01\x00\x01\x00\x00\x00\x05hello\x00")  # bad frame-end octet


async def test_unreachable_broker_fails_sends_fast_and_exits_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    started = trio.current_time()
    with trio.fail_after(3):
        async with _dispatcher(url, reconnect_backoff=(0.01, 0.02)) as dispatcher:
            assert trio.current_time() - started < 1.0
            for _ in range(3):
                before = trio.current_time()
                with pytest.raises(DispatchUnavailable, match="Connection refused"):
                    await dispatcher.send("asya-default-echo", b"{}")
                assert trio.current_time() - before < 0.1
            # Let it retry a few times: the fault is still logged once.
            for _ in range(5):
                await dispatcher._changed.wait()
            assert not dispatcher.statistics().connected
    assert trio.current_time() - started < 2.0
    assert len(_amqp_warnings(caplog)) == 1


async def test_an_error_inside_the_block_comes_out_as_itself() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    with pytest.raises(KeyError, match="boom"):
        async with _dispatcher(url):
            raise KeyError("boom")


async def test_send_after_the_block_is_unavailable() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    async with _dispatcher(url) as dispatcher:
        pass
    with pytest.raises(DispatchUnavailable, match="closed"):
        await dispatcher.send("asya-default-echo", b"{}")


@pytest.mark.parametrize(
    ("url", "exchange", "settings"),
    [
        ("amqp://h/", "no spaces? no!", {}),
        ("http://h/", "", {}),
        ("amqp://h/", "", {"channels": 0}),
        ("amqp://h/", "", {"heartbeat": -1}),
        ("amqp://h/", "", {"reconnect_backoff": (0, 1)}),
        ("amqp://h/", "", {"confirm_timeout": 0}),
        ("amqp://h/" + "v" * 128, "", {}),
    ],
)
async def test_bad_settings_are_refused_before_connecting(
    url: str, exchange: str, settings: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        async with open_rabbitmq_dispatcher(url, exchange, **settings):
            pass


# -- against a scripted broker (what the real one cannot be made to do harmlessly) -----------


async def test_acks_returns_and_nacks_settle_the_right_sends() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.handshake()
        await peer.open_channels(1)
        published = [await peer.receive_publish() for _ in range(5)]
        assert [p.tag for p in published] == [1, 2, 3, 4, 5]
        assert all(p.channel == 1 and p.method.mandatory for p in published)
        # The third message was unroutable: its return comes first, then one ack up to it.
        await peer.send(
            1,
            commands.Basic.Return(312, "NO_ROUTE", "", published[2].method.routing_key),
            ContentHeader(body_size=2),
            ContentBody(b"{}"),
            commands.Basic.Ack(delivery_tag=3, multiple=True),
            commands.Basic.Nack(delivery_tag=5, multiple=True),
        )
        await peer.receive()  # until the client leaves

    outcome: dict[str, str] = {}

    async def one(dispatcher: RabbitDispatcher, queue: str) -> None:
        try:
            await dispatcher.send(queue, b"{}")
            outcome[queue] = "ok"
        except ActorNotFound:
            outcome[queue] = "not found"
        except DispatchUnavailable as exc:
            outcome[queue] = "nacked" if "nack" in str(exc) else str(exc)

    with trio.fail_after(5):
        async with open_fake_broker(script) as url, _dispatcher(url, channels=1) as dispatcher:
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(one, dispatcher, f"asya-ns-a{n}")
                    await trio.testing.wait_all_tasks_blocked()  # publish in this order
            stats = dispatcher.statistics()
    assert outcome == {
        "asya-ns-a0": "ok",
        "asya-ns-a1": "ok",
        "asya-ns-a2": "not found",
        "asya-ns-a3": "nacked",
        "asya-ns-a4": "nacked",
    }
    assert (stats.confirmed, stats.returned, stats.nacked, stats.in_flight) == (2, 1, 2, 0)


async def test_a_blocked_broker_fails_sends_fast_until_unblocked() -> None:
    unblock = trio.Event()

    async def script(peer: FakePeer) -> None:
        await peer.handshake()
        await peer.open_channels(4)
        first = await peer.receive_publish()
        # Blocked before the ack, so the client knows it when its first send returns.
        await peer.send(0, commands.Connection.Blocked("low on memory"))
        await peer.ack(first)
        await unblock.wait()
        await peer.send(0, commands.Connection.Unblocked())
        await peer.ack(await peer.receive_publish())
        await peer.receive()

    with trio.fail_after(5):
        async with open_fake_broker(script) as url, _dispatcher(url) as dispatcher:
            await dispatcher.send("asya-ns-a", b"{}")
            before = trio.current_time()
            with pytest.raises(DispatchUnavailable, match="blocked publishing: low on memory"):
                await dispatcher.send("asya-ns-a", b"{}")
            assert trio.current_time() - before < 0.1
            unblock.set()
            await trio.testing.wait_all_tasks_blocked()
            await dispatcher.send("asya-ns-a", b"{}")


async def test_a_broker_closing_the_connection_fails_in_flight_sends_then_reconnect() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.handshake()
        await peer.open_channels(4)
        published = await peer.receive_publish()
        if peer.index == 0:
            await peer.send(
                0,
                commands.Connection.Close(
                    320, "CONNECTION_FORCED - broker forced connection closure", 0, 0
                ),
            )
            await peer.expect(commands.Connection.CloseOk)
            return
        await peer.ack(published)
        await peer.receive()

    with trio.fail_after(5):
        async with open_fake_broker(script) as url, _dispatcher(url) as dispatcher:
            with pytest.raises(DispatchUnavailable, match="CONNECTION_FORCED"):
                await dispatcher.send("asya-ns-a", b"{}")
            await dispatcher.wait_connected()
            await dispatcher.send("asya-ns-a", b"{}")
            stats = dispatcher.statistics()
    assert (stats.lost, stats.confirmed, stats.reconnects) == (1, 1, 1)


async def test_a_broker_with_too_few_channels_is_refused() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.handshake(channel_max=2)
        await peer.receive()

    with trio.fail_after(5):
        async with open_fake_broker(script) as url, _dispatcher(url, channels=4) as dispatcher:
            with pytest.raises(DispatchUnavailable, match="only 2 channels"):
                await dispatcher.send("asya-ns-a", b"{}")


async def test_amqps_speaks_tls_and_checks_the_certificate(tmp_path: Any) -> None:
    server, trusting = self_signed_tls(str(tmp_path))

    async def script(peer: FakePeer) -> None:
        await peer.handshake()
        await peer.open_channels(4)
        published = await peer.receive_publish()
        assert published.body == b'{"over": "tls"}'
        await peer.ack(published)
        await peer.receive()

    with trio.fail_after(10):
        async with open_fake_broker(script, tls=server) as url:
            assert url.startswith("amqps://")
            async with _dispatcher(url, ssl_context=trusting) as dispatcher:
                await dispatcher.send("asya-ns-a", b'{"over": "tls"}')
            async with _dispatcher(url) as dispatcher:  # system CAs: ours is not trusted
                with pytest.raises(DispatchUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                    await dispatcher.send("asya-ns-a", b"{}")


# -- against the broker --------------------------------------------------------------------


@rabbitmq
async def test_send_puts_the_exact_body_persistent_json_on_the_queue(
    admin: AmqpAdmin, queue: str
) -> None:
    body = json.dumps({"id": "e1", "payload": {"text": "héllo"}}).encode()
    async with _dispatcher() as dispatcher:
        await dispatcher.send(queue, body)
        stats = dispatcher.statistics()
    assert (stats.published, stats.confirmed, stats.returned, stats.in_flight) == (1, 1, 0, 0)
    message = await admin.get(queue)
    assert message is not None
    assert message.body == body
    assert message.properties.delivery_mode == 2
    assert message.properties.content_type == "application/json"
    assert (message.exchange, message.routing_key) == ("", queue)
    assert await admin.get(queue) is None


@rabbitmq
async def test_consume_one_helper_sees_a_dispatched_message(queue: str) -> None:
    async with _dispatcher() as dispatcher:
        await dispatcher.send(queue, b'{"n": 1}')
    message = await consume_one(RABBITMQ_URL, queue, timeout=5)
    assert message.body == b'{"n": 1}'


@rabbitmq
async def test_missing_queue_is_actor_not_found(queue: str, admin: AmqpAdmin) -> None:
    missing = _unique("missing")
    async with _dispatcher() as dispatcher:
        with pytest.raises(ActorNotFound, match=missing):
            await dispatcher.send(missing, b"{}")
        await dispatcher.send(queue, b"{}")  # the channel is still fine
        stats = dispatcher.statistics()
    assert (stats.published, stats.returned, stats.confirmed) == (2, 1, 1)
    assert await admin.declare_queue(queue, passive=True) == 1


@rabbitmq
async def test_returns_are_matched_to_their_own_sends_under_concurrency(
    admin: AmqpAdmin, queue: str
) -> None:
    missing = _unique("missing")
    outcome: dict[int, str] = {}

    async def one(dispatcher: RabbitDispatcher, i: int) -> None:
        try:
            await dispatcher.send(queue if i % 2 == 0 else missing, b'{"i": %d}' % i)
            outcome[i] = "sent"
        except ActorNotFound:
            outcome[i] = "not found"

    with trio.fail_after(10):
        async with _dispatcher() as dispatcher, trio.open_nursery() as nursery:
            for i in range(400):
                nursery.start_soon(one, dispatcher, i)
    assert outcome == {i: "sent" if i % 2 == 0 else "not found" for i in range(400)}
    bodies = sorted(m.body for m in await admin.drain(queue))
    assert bodies == sorted(b'{"i": %d}' % i for i in range(0, 400, 2))


@rabbitmq
async def test_a_thousand_concurrent_sends_all_arrive_once(admin: AmqpAdmin, queue: str) -> None:
    bodies = [json.dumps({"id": i}).encode() for i in range(1000)]
    with trio.fail_after(20):
        async with _dispatcher() as dispatcher:
            async with trio.open_nursery() as nursery:
                for body in bodies:
                    nursery.start_soon(dispatcher.send, queue, body)
            stats = dispatcher.statistics()
    assert (stats.published, stats.confirmed, stats.in_flight) == (1000, 1000, 0)
    assert await admin.declare_queue(queue, passive=True) == 1000
    received = [m.body for m in await admin.drain(queue)]
    assert len(received) == len(set(received)) == 1000
    assert set(received) == set(bodies)


@rabbitmq
async def test_a_body_larger_than_a_frame_is_cut_and_arrives_whole(
    admin: AmqpAdmin, queue: str
) -> None:
    body = json.dumps({"payload": "x" * 400_000}).encode()  # about three 128 KiB frames
    async with _dispatcher() as dispatcher:
        await dispatcher.send(queue, body)
    message = await admin.get(queue)
    assert message is not None and message.body == body


@rabbitmq
async def test_a_nack_is_unavailable(admin: AmqpAdmin) -> None:
    full = _unique("full")
    await admin.declare_queue(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    try:
        async with _dispatcher() as dispatcher:
            with pytest.raises(DispatchUnavailable, match="nack"):
                await dispatcher.send(full, b"{}")
            assert dispatcher.statistics().nacked == 1
    finally:
        await admin.delete_queue(full)


@rabbitmq
async def test_named_exchanges_route_by_queue_name_or_actor(admin: AmqpAdmin, queue: str) -> None:
    direct, topic = _unique("direct"), _unique("topic")
    namespace = uuid.uuid4().hex[:8]
    actor_queue = f"asya-{namespace}-resizer"
    await admin.declare_exchange(direct, "direct")
    await admin.declare_exchange(topic, "topic")
    await admin.declare_queue(actor_queue)
    try:
        await admin.bind_queue(queue, direct, queue)
        async with _dispatcher(exchange=direct) as dispatcher:
            await dispatcher.send(queue, b'{"via": "direct"}')
            with pytest.raises(ActorNotFound):
                await dispatcher.send(actor_queue, b"{}")  # exists, but not bound to `direct`

        # Asya's convention: queue asya-{ns}-{actor} bound to the topic exchange by {actor}.
        await admin.bind_queue(actor_queue, topic, "resizer")
        async with _dispatcher(
            exchange=topic, routing_key=actor_routing_key(namespace)
        ) as dispatcher:
            await dispatcher.send(actor_queue, b'{"via": "topic"}')
            with pytest.raises(ActorNotFound):
                await dispatcher.send(f"asya-{namespace}-nobody", b"{}")

        direct_message = await admin.get(queue)
        topic_message = await admin.get(actor_queue)
        assert direct_message is not None and direct_message.body == b'{"via": "direct"}'
        assert topic_message is not None and topic_message.body == b'{"via": "topic"}'
        assert topic_message.routing_key == "resizer"
    finally:
        await admin.delete_queue(actor_queue)
        await admin.delete_exchange(direct)
        await admin.delete_exchange(topic)


@rabbitmq
async def test_missing_exchange_is_unavailable_naming_it_then_channels_recover(
    admin: AmqpAdmin, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    exchange = _unique("nowhere")
    with trio.fail_after(10):
        async with _dispatcher(exchange=exchange) as dispatcher:
            for _ in range(3):
                with pytest.raises(DispatchUnavailable, match=exchange):
                    await dispatcher.send(queue, b"{}")
            failures: list[BaseException] = []

            async def one() -> None:
                try:
                    await dispatcher.send(queue, b"{}")
                except DispatchUnavailable as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            assert len(failures) == 20 and all(exchange in str(exc) for exc in failures)
            warnings = _amqp_warnings(caplog)
            assert len(warnings) == 1 and exchange in warnings[0]

            # Once the exchange exists, the replaced channels publish again.
            await admin.declare_exchange(exchange, "direct")
            try:
                await admin.bind_queue(queue, exchange, queue)
                for _ in range(8):
                    await dispatcher.send(queue, b'{"ok": true}')
            finally:
                await admin.delete_exchange(exchange)
            assert dispatcher.statistics().connected
    assert await admin.declare_queue(queue, passive=True) == 8


@rabbitmq
@pytest.mark.parametrize(
    ("userinfo", "vhost", "reason"),
    [("guest:wrong", "", "ACCESS_REFUSED"), ("guest:guest", "no-such-vhost", "NOT_ALLOWED")],
)
async def test_refused_login_or_vhost_is_unavailable_with_the_reason(
    userinfo: str, vhost: str, reason: str
) -> None:
    with trio.fail_after(5):
        async with _dispatcher(f"amqp://{userinfo}@127.0.0.1:5672/{vhost}") as dispatcher:
            with pytest.raises(DispatchUnavailable, match=reason):
                await dispatcher.send("asya-default-echo", b"{}")


@rabbitmq
async def test_cut_connection_fails_in_flight_sends_then_reconnects_by_itself(
    admin: AmqpAdmin, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[bytes] = []
    failed: list[tuple[bytes, float]] = []
    cut_at: list[float] = []

    async with open_proxy() as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with _dispatcher(url) as dispatcher:

            async def sender(worker: int) -> None:
                for n in range(10_000):
                    body = b'{"w": %d, "n": %d}' % (worker, n)
                    started = trio.current_time()
                    try:
                        await dispatcher.send(queue, body)
                    except DispatchUnavailable:
                        failed.append((body, trio.current_time() - max(started, cut_at[0])))
                        return
                    sent.append(body)
                    if len(sent) == 300 and not cut_at:
                        cut_at.append(trio.current_time())
                        proxy.cut()

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for worker in range(50):
                        nursery.start_soon(sender, worker)
            assert len(failed) == 50  # every sender saw the cut, in flight or on its next send
            assert max(elapsed for _, elapsed in failed) < 1.0
            assert not dispatcher.statistics().connected

            # Sends while the broker is away fail at once.
            before = trio.current_time()
            with pytest.raises(DispatchUnavailable):
                await dispatcher.send(queue, b"{}")
            assert trio.current_time() - before < 0.1

            proxy.restore()
            with trio.fail_after(5):
                await dispatcher.wait_connected()
            await dispatcher.send(queue, b'{"after": "restore"}')
            stats = dispatcher.statistics()
            assert stats.reconnects == 1 and stats.connected

    received = [m.body for m in await admin.drain(queue)]
    assert len(received) == len(set(received))  # nothing published twice
    assert set(sent) | {b'{"after": "restore"}'} <= set(received)
    assert set(received) <= set(sent) | {body for body, _ in failed} | {b'{"after": "restore"}'}
    warnings = _amqp_warnings(caplog)
    assert 1 <= len(warnings) <= 2, warnings  # lost, then (maybe) refused reconnects: once each


@rabbitmq
async def test_no_confirm_means_no_success(queue: str) -> None:
    async with open_proxy() as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        with trio.fail_after(5):
            async with _dispatcher(url, confirm_timeout=0.5) as dispatcher:
                await dispatcher.send(queue, b'{"warm": true}')
                proxy.swallow()
                before = trio.current_time()
                with pytest.raises(DispatchUnavailable, match="no publisher confirm"):
                    await dispatcher.send(queue, b'{"unconfirmed": true}')
                assert 0.5 <= trio.current_time() - before < 1.5
                stats = dispatcher.statistics()
                assert (stats.published, stats.confirmed, stats.timed_out) == (2, 1, 1)


@rabbitmq
async def test_missed_heartbeats_declare_the_connection_dead(queue: str) -> None:
    async with open_proxy() as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with _dispatcher(url, heartbeat=1, confirm_timeout=10, connect_timeout=1) as d:
            await d.send(queue, b"{}")
            proxy.swallow()
            before = trio.current_time()
            with trio.fail_after(5), pytest.raises(DispatchUnavailable, match="heartbeat"):
                await d.send(queue, b"{}")
            assert 1.5 <= trio.current_time() - before < 3.5
            proxy.restore()
            with trio.fail_after(5):
                await d.wait_connected()
            await d.send(queue, b"{}")


@rabbitmq
async def test_cancelled_sends_leave_the_dispatcher_usable(admin: AmqpAdmin, queue: str) -> None:
    async with _dispatcher(max_in_flight=8) as dispatcher:
        done: list[int] = []

        async def one(nursery: trio.Nursery, i: int) -> None:
            await dispatcher.send(queue, b'{"i": %d}' % i)
            done.append(i)
            if len(done) == 20:
                nursery.cancel_scope.cancel()  # the rest: parked for room or awaiting confirms

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, nursery, i)
            for i in range(500, 520):
                await dispatcher.send(queue, b'{"i": %d}' % i)
    received = [m.body for m in await admin.drain(queue)]
    assert len(received) == len(set(received))
    assert {b'{"i": %d}' % i for i in [*done, *range(500, 520)]} <= set(received)
