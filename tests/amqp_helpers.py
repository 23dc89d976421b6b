"""Helpers for tests (and benches) that need a real RabbitMQ: an admin client and a faulty proxy.

- `open_admin(url)` is a deliberately plain AMQP client on one channel, one request at a time,
  reusing the handshake of `mesh_trio.transports._amqp`: declare / delete / purge queues and
  exchanges, bind, `get` one message, `drain` a queue, `consume` messages as they arrive. A
  broker error on the channel raises `AmqpChannelError` and the admin carries on on a fresh
  channel.
- `declare_queue`, `delete_queue` and `consume_one` are one-shot helpers that open their own
  connection (for end-to-end tests that only need to make or read one queue).
- `open_proxy(target_port)` runs a TCP proxy on 127.0.0.1 between a client and the broker that
  can `cut()` every connection and refuse new ones, `restore()`, or `swallow()` everything the
  broker sends (the client's frames still reach the broker).
- `open_fake_broker(script)` is the server side of the AMQP handshake on 127.0.0.1, after which
  a test's script plays the broker frame by frame. It is only for what the real broker cannot
  be made to do without disturbing everyone else using it (a memory alarm that blocks
  publishers, a forced close), and for exact ack/return/nack sequences.

The broker is `ASYA_TEST_RABBITMQ_URL`, by default `amqp://guest:guest@127.0.0.1:5672/`.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal, TypeVar

import attrs
import trio
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.base import Frame as MethodFrame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from mesh_trio.transports._amqp import AmqpUrl, _open_amqp
from mesh_trio.transports._amqp_proto import FrameParser

RABBITMQ_URL = os.environ.get("ASYA_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rabbit_env(url: str = RABBITMQ_URL, namespace: str = "default") -> dict[str, str]:
    """The settings of a mesh API dispatching to the broker at `url` (for `start_mesh`)."""
    return {
        "ASYA_QUEUE_TRANSPORT": "rabbitmq",
        "ASYA_RABBITMQ_URL": url,
        "ASYA_NAMESPACE": namespace,
        "ASYA_INTERNAL_URL": "http://mesh-api.test:8081",
    }


_M = TypeVar("_M", bound=MethodFrame | ContentHeader | ContentBody)


class AmqpChannelError(Exception):
    """The broker closed the admin's channel (or connection) with `code` and `text`."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@attrs.frozen(kw_only=True)
class Delivery:
    """One message read from a queue."""

    body: bytes
    properties: commands.Basic.Properties
    exchange: str
    routing_key: str


@attrs.define(eq=False)
class AmqpAdmin:
    """A sequential AMQP client on one channel; see the module docstring."""

    _stream: trio.abc.Stream
    _parser: FrameParser
    _channel: int = 0
    _backlog: deque[tuple[int, pamqp_frame.FrameTypes]] = attrs.field(factory=deque)

    async def _write(self, *frames: pamqp_frame.FrameTypes, channel: int | None = None) -> None:
        number = self._channel if channel is None else channel
        await self._stream.send_all(b"".join(pamqp_frame.marshal(f, number) for f in frames))

    async def _frame(self) -> tuple[int, pamqp_frame.FrameTypes]:
        while not self._backlog:
            data = await self._stream.receive_some(65536)
            if not data:
                raise ConnectionError("RabbitMQ closed the admin connection")
            self._backlog.extend(self._parser.feed(data))
        return self._backlog.popleft()

    async def _open_channel(self) -> None:
        self._channel += 1
        await self._write(commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)

    async def _expect(self, expected: type[_M]) -> _M:
        while True:
            channel, frame = await self._frame()
            if isinstance(frame, Heartbeat):
                continue
            if isinstance(frame, commands.Connection.Close):
                await self._write(commands.Connection.CloseOk(), channel=0)
                raise AmqpChannelError(frame.reply_code or 0, frame.reply_text)
            if isinstance(frame, expected) and channel in (0, self._channel):
                return frame
            if channel != self._channel:
                continue
            if isinstance(frame, commands.Channel.Close):
                await self._write(commands.Channel.CloseOk())
                await self._open_channel()
                raise AmqpChannelError(frame.reply_code or 0, frame.reply_text)

    async def _call(self, method: MethodFrame, expected: type[_M]) -> _M:
        await self._write(method)
        return await self._expect(expected)

    async def _content(self) -> tuple[commands.Basic.Properties, bytes]:
        header = await self._expect(ContentHeader)
        chunks: list[bytes] = []
        size = 0
        while size < header.body_size:
            body = await self._expect(ContentBody)
            chunks.append(body.value)
            size += len(body.value)
        return header.properties, b"".join(chunks)

    async def declare_queue(
        self,
        queue: str,
        *,
        durable: bool = True,
        passive: bool = False,
        arguments: dict[str, object] | None = None,
    ) -> int:
        """Declare `queue` (or, `passive`, check it exists); returns its message count."""
        ok = await self._call(
            commands.Queue.Declare(
                queue=queue,
                durable=durable,
                passive=passive,
                arguments=arguments,  # type: ignore[arg-type]
            ),
            commands.Queue.DeclareOk,
        )
        return ok.message_count or 0

    async def delete_queue(self, queue: str) -> None:
        """Delete `queue` (no error when it does not exist)."""
        await self._call(commands.Queue.Delete(queue=queue), commands.Queue.DeleteOk)

    async def purge_queue(self, queue: str) -> None:
        """Drop every message of `queue`."""
        await self._call(commands.Queue.Purge(queue=queue), commands.Queue.PurgeOk)

    async def declare_exchange(
        self, exchange: str, kind: str = "direct", *, durable: bool = False
    ) -> None:
        """Declare an exchange of type `kind`."""
        await self._call(
            commands.Exchange.Declare(exchange=exchange, exchange_type=kind, durable=durable),
            commands.Exchange.DeclareOk,
        )

    async def delete_exchange(self, exchange: str) -> None:
        """Delete an exchange (no error when it does not exist)."""
        await self._call(commands.Exchange.Delete(exchange=exchange), commands.Exchange.DeleteOk)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """Bind `queue` to `exchange` with `routing_key`."""
        await self._call(
            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key),
            commands.Queue.BindOk,
        )

    async def get(self, queue: str) -> Delivery | None:
        """Take the next message of `queue` (acknowledged at once), or None when it is empty."""
        await self._write(commands.Basic.Get(queue=queue, no_ack=True))
        while True:
            channel, frame = await self._frame()
            if channel != self._channel:
                continue
            if isinstance(frame, commands.Basic.GetEmpty):
                return None
            if isinstance(frame, commands.Channel.Close):
                await self._write(commands.Channel.CloseOk())
                await self._open_channel()
                raise AmqpChannelError(frame.reply_code or 0, frame.reply_text)
            if isinstance(frame, commands.Basic.GetOk):
                properties, body = await self._content()
                return Delivery(
                    body=body,
                    properties=properties,
                    exchange=frame.exchange,
                    routing_key=frame.routing_key or "",
                )

    async def drain(self, queue: str) -> list[Delivery]:
        """Take every message waiting on `queue` (for a queue nobody publishes to any more)."""
        count = await self.declare_queue(queue, passive=True)
        return await self.consume(queue, count) if count else []

    async def consume(self, queue: str, count: int) -> list[Delivery]:
        """Wait for `count` messages on `queue` (bound it with a trio timeout).

        Acknowledged on delivery. After a timeout the admin may be mid-frame: close it.
        """
        ok = await self._call(
            commands.Basic.Consume(queue=queue, no_ack=True), commands.Basic.ConsumeOk
        )
        messages: list[Delivery] = []
        while len(messages) < count:
            deliver = await self._expect(commands.Basic.Deliver)
            properties, body = await self._content()
            messages.append(
                Delivery(
                    body=body,
                    properties=properties,
                    exchange=deliver.exchange,
                    routing_key=deliver.routing_key or "",
                )
            )
        await self._write(commands.Basic.Cancel(consumer_tag=ok.consumer_tag or ""))
        await self._expect(commands.Basic.CancelOk)
        return messages


@asynccontextmanager
async def open_admin(url: str = RABBITMQ_URL) -> AsyncIterator[AmqpAdmin]:
    """Connect an `AmqpAdmin` (heartbeats off) and close it on exit."""
    # No channels of the dispatcher's: after OpenOk the broker sends nothing unasked (heartbeats
    # are off), so the admin's own parser starts on a frame boundary.
    stream, _, _ = await _open_amqp(
        AmqpUrl.parse(url), heartbeat=0, connect_timeout=5.0, channels=0
    )
    admin = AmqpAdmin(stream=stream, parser=FrameParser())
    try:
        await admin._open_channel()
        yield admin
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await admin._write(commands.Connection.Close(200, "bye", 0, 0), channel=0)
                await admin._expect(commands.Connection.CloseOk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass
        await trio.aclose_forcefully(stream)


async def declare_queue(url: str, queue: str, *, durable: bool = True) -> None:
    """Declare `queue` on the broker at `url` (idempotent)."""
    async with open_admin(url) as admin:
        await admin.declare_queue(queue, durable=durable)


async def delete_queue(url: str, queue: str) -> None:
    """Delete `queue` on the broker at `url` (no error when it does not exist)."""
    async with open_admin(url) as admin:
        await admin.delete_queue(queue)


async def consume_one(url: str, queue: str, timeout: float) -> Delivery:
    """Wait up to `timeout` seconds for one message on `queue` and take it.

    Raises:
        trio.TooSlowError: no message within `timeout`.
    """
    async with open_admin(url) as admin:
        with trio.fail_after(timeout):
            (message,) = await admin.consume(queue, 1)
        return message


@attrs.define(eq=False)
class TcpProxy:
    """A TCP proxy on 127.0.0.1 that fails on cue; see the module docstring."""

    target_host: str
    target_port: int
    port: int = 0
    mode: Literal["forward", "refuse", "swallow"] = "forward"
    accepted: int = 0
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)

    def cut(self) -> None:
        """Close every proxied connection now and refuse new ones until `restore()`."""
        self.mode = "refuse"
        for scope in self._scopes:
            scope.cancel()

    def restore(self) -> None:
        """Forward again, both ways."""
        self.mode = "forward"

    def swallow(self) -> None:
        """Keep connections open but drop every byte the broker sends from now on."""
        self.mode = "swallow"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            await trio.aclose_forcefully(client)
            return
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, False, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, True, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)
                # Shielded: in a cancelled scope the first close would raise Cancelled and
                # leave the second socket open.
                with trio.CancelScope(shield=True):
                    await client.aclose()
                    await upstream.aclose()

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        from_broker: bool,
        both: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if from_broker and self.mode == "swallow":
                    continue
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            both.cancel()


@asynccontextmanager
async def open_proxy(
    target_port: int = 5672, target_host: str = "127.0.0.1"
) -> AsyncIterator[TcpProxy]:
    """Run a `TcpProxy` to `target_host:target_port` for the duration of the block."""
    proxy = TcpProxy(target_host=target_host, target_port=target_port)
    body_error: BaseException | None = None  # re-raised as itself, not in an ExceptionGroup
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        try:
            yield proxy
        except BaseException as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


@attrs.define(eq=False)
class FakePeer:
    """The broker's end of one connection to `open_fake_broker`; `index` counts from 0."""

    index: int
    _stream: trio.abc.Stream
    _parser: FrameParser = attrs.field(factory=FrameParser)
    _backlog: deque[tuple[int, pamqp_frame.FrameTypes]] = attrs.field(factory=deque)
    _tags: dict[int, int] = attrs.field(factory=dict)

    async def send(self, channel: int, *frames: pamqp_frame.FrameTypes) -> None:
        await self._stream.send_all(b"".join(pamqp_frame.marshal(f, channel) for f in frames))

    async def receive(self) -> tuple[int, pamqp_frame.FrameTypes]:
        """The next frame from the client, heartbeats left out."""
        while True:
            while not self._backlog:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise ConnectionError("the client closed the connection")
                if data.startswith(b"AMQP"):
                    data = data[8:]  # the protocol header
                self._backlog.extend(self._parser.feed(data))
            channel, frame = self._backlog.popleft()
            if not isinstance(frame, Heartbeat):
                return channel, frame

    async def expect(self, expected: type[_M]) -> tuple[int, _M]:
        channel, frame = await self.receive()
        assert isinstance(frame, expected), f"expected {expected.name}, got {frame.name}"
        return channel, frame

    async def handshake(self, *, channel_max: int = 2047, heartbeat: int = 60) -> None:
        """Start, Tune and Open as RabbitMQ answers them."""
        await self.send(0, commands.Connection.Start(server_properties={"product": "fake"}))
        await self.expect(commands.Connection.StartOk)
        tune = commands.Connection.Tune(
            channel_max=channel_max, frame_max=131072, heartbeat=heartbeat
        )
        await self.send(0, tune)
        await self.expect(commands.Connection.TuneOk)
        await self.expect(commands.Connection.Open)
        await self.send(0, commands.Connection.OpenOk())

    async def open_channels(self, count: int) -> None:
        """Answer `count` Channel.Open + Confirm.Select pairs."""
        for _ in range(count):
            channel, _ = await self.expect(commands.Channel.Open)
            await self.send(channel, commands.Channel.OpenOk())
            channel, _ = await self.expect(commands.Confirm.Select)
            await self.send(channel, commands.Confirm.SelectOk())

    async def receive_publish(self) -> Published:
        """One publish: the method, its content header and body frames."""
        channel, publish = await self.expect(commands.Basic.Publish)
        _, header = await self.expect(ContentHeader)
        body = b""
        while len(body) < header.body_size:
            _, chunk = await self.expect(ContentBody)
            body += chunk.value
        tag = self._tags[channel] = self._tags.get(channel, 0) + 1
        return Published(channel=channel, tag=tag, method=publish, body=body)

    async def ack(self, published: Published) -> None:
        """Confirm one publish."""
        await self.send(published.channel, commands.Basic.Ack(delivery_tag=published.tag))


@attrs.frozen(kw_only=True)
class Published:
    """A publish as the fake broker received it, with its delivery tag on its channel."""

    channel: int
    tag: int
    method: commands.Basic.Publish
    body: bytes


@asynccontextmanager
async def open_fake_broker(
    script: Callable[[FakePeer], Awaitable[None]], *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve `script` for every connection on a fresh 127.0.0.1 port; yields the AMQP URL.

    With a server-side `tls` context it listens for TLS and the URL is `amqps://`. A script's
    end (or a `ConnectionError` from the client leaving) closes its connection.
    """
    accepted = 0

    async def handle(stream: trio.abc.Stream) -> None:
        nonlocal accepted
        peer = FakePeer(index=accepted, stream=stream)
        accepted += 1
        try:
            await script(peer)
        except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left (or, over TLS, refused our certificate)
        finally:
            await trio.aclose_forcefully(stream)

    body_error: BaseException | None = None  # re-raised as itself, not in an ExceptionGroup
    async with trio.open_nursery() as nursery:
        serve: Callable[..., Awaitable[object]]
        if tls is None:
            serve = partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        else:
            serve = partial(trio.serve_ssl_over_tcp, handle, 0, tls, host="127.0.0.1")
        listeners = await nursery.start(serve)
        listener = listeners[0]
        transport = listener.transport_listener if tls is not None else listener
        port = transport.socket.getsockname()[1]
        scheme = "amqps" if tls is not None else "amqp"
        try:
            yield f"{scheme}://guest:guest@127.0.0.1:{port}/"
        except BaseException as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


def self_signed_tls(directory: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for 127.0.0.1 (made by the
    `openssl` command) and a client context that trusts it."""
    cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert),
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)
