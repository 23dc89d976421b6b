"""Local SQS endpoints for tests/test_sqs.py.

Two kinds, for two purposes:

- `moto_endpoint()` runs moto's SQS server (the real protocol implementation the AWS SDKs are
  tested against) in a thread on 127.0.0.1 with a free port. It is the reference for what the
  dispatcher sends and receives. It answers every request with `Connection: close`, so it cannot
  show connection reuse, and it cannot misbehave on purpose.
- `FakeSqs` is a small trio + h11 server that speaks just enough SQS JSON (`GetQueueUrl`,
  `SendMessage`) with keep-alive, and can be told to misbehave on `SendMessage`: hang, drop the
  connection after reading the request, answer an error, or close the connection after
  answering. It logs every request it read, so a test can count what went on the wire.

The SQS helpers (`create_queue`, `receive_bodies`, `delete_queue`) use the dispatcher's own
`call`, so the tests need no other SQS client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from mesh_trio.transports._sqs import SqsDispatcher

ACCOUNT = "123456789012"


@contextmanager
def moto_endpoint() -> Iterator[tuple[str, Callable[[], None]]]:
    """Run moto's server on a free port; yield (endpoint URL, stop function)."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs one line per request to stderr; the tests make hundreds.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            server.stop()

    try:
        yield f"http://{host}:{port}", stop
    finally:
        stop()


def queue_name(prefix: str = "asya-test") -> str:
    """A queue name no other test uses (moto's state is shared by every server in a process)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_queue(sqs: SqsDispatcher, name: str) -> str:
    reply = await sqs.call("CreateQueue", {"QueueName": name})
    return str(reply["QueueUrl"])


async def delete_queue(sqs: SqsDispatcher, url: str) -> None:
    await sqs.call("DeleteQueue", {"QueueUrl": url})


async def receive_bodies(sqs: SqsDispatcher, url: str, count: int) -> list[str]:
    """Take `count` messages off the queue (long polling) and return their bodies.

    Bound the wait with `trio.fail_after` around the call. Received messages stay invisible for
    the queue's visibility timeout (30 s by default), so each is returned once.
    """
    bodies: list[str] = []
    while len(bodies) < count:
        reply = await sqs.call(
            "ReceiveMessage",
            {"QueueUrl": url, "MaxNumberOfMessages": min(10, count - len(bodies))},
        )
        bodies.extend(m["Body"] for m in reply.get("Messages", []))
    return bodies


async def queue_depth(sqs: SqsDispatcher, url: str) -> int:
    reply = await sqs.call(
        "GetQueueAttributes",
        {"QueueUrl": url, "AttributeNames": ["ApproximateNumberOfMessages"]},
    )
    return int(reply["Attributes"]["ApproximateNumberOfMessages"])


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Make a certificate for `localhost` with the openssl tool; return (cert, key) paths."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


# -- a scriptable fake -------------------------------------------------------------------------

HANG = "hang"  # never answer
DROP = "drop"  # close the connection without answering
CLOSE_AFTER = "close-after"  # answer normally, then close the connection (no `Connection: close`)


@attrs.define(eq=False)
class FakeSqs:
    """A keep-alive SQS JSON endpoint with in-memory queues and a misbehaviour switch.

    Attributes:
        port: The port it listens on (127.0.0.1).
        queues: Queue name -> URL of the queues that exist now.
        messages: Queue URL -> message bodies taken.
        log: `(action, request document)` of every request read, in order.
        connections: Connections accepted so far.
        hanging: Set once a `SendMessage` is being held unanswered (`HANG`).
        closed: Set whenever the server has closed a connection (replace it to wait again).
        on_send: What to do with the next `SendMessage` requests: `None` (behave), `HANG`,
            `DROP`, `CLOSE_AFTER`, or `(status, error type)` to answer an error.
    """

    port: int = 0
    queues: dict[str, str] = attrs.field(factory=dict)
    messages: dict[str, list[str]] = attrs.field(factory=dict)
    log: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    connections: int = 0
    on_send: str | tuple[int, str] | None = None
    hanging: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)

    def create(self, name: str, generation: int = 1) -> str:
        url = f"http://127.0.0.1:{self.port}/{ACCOUNT}/{name}-gen{generation}"
        self.queues[name] = url
        self.messages[url] = []
        return url

    def actions(self) -> list[str]:
        return [action for action, _ in self.log]

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                action, doc = request
                self.log.append((action, doc))
                misbehaviour = self.on_send if action == "SendMessage" else None
                if misbehaviour == HANG:
                    self.hanging.set()
                    await trio.sleep_forever()
                if misbehaviour == DROP:
                    return
                if isinstance(misbehaviour, tuple):
                    status, error_type = misbehaviour
                    reply = {"__type": f"com.amazonaws.sqs#{error_type}", "message": "scripted"}
                else:
                    status, reply = self._answer(action, doc)
                await self._write_reply(conn, stream, status, reply)
                if misbehaviour == CLOSE_AFTER or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)
            self.closed.set()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[str, dict[str, Any]] | None:
        target = ""
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                target = dict(event.headers).get(b"x-amz-target", b"").decode()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return target.removeprefix("AmazonSQS."), json.loads(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _answer(self, action: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        missing = {"__type": "com.amazonaws.sqs#QueueDoesNotExist", "message": "no queue"}
        if action == "GetQueueUrl":
            url = self.queues.get(doc["QueueName"])
            return (200, {"QueueUrl": url}) if url else (400, missing)
        if action == "SendMessage":
            if doc["QueueUrl"] not in self.queues.values():
                return 400, missing
            body = doc["MessageBody"]
            self.messages[doc["QueueUrl"]].append(body)
            md5 = hashlib.md5(body.encode(), usedforsecurity=False).hexdigest()
            return 200, {"MessageId": str(uuid.uuid4()), "MD5OfMessageBody": md5}
        return 400, {"__type": "com.amazonaws.sqs#InvalidAction", "message": action}

    async def _write_reply(
        self, conn: h11.Connection, stream: trio.abc.Stream, status: int, doc: dict[str, Any]
    ) -> None:
        body = json.dumps(doc).encode()
        headers = [
            ("Content-Type", "application/x-amz-json-1.0"),
            ("Content-Length", str(len(body))),
        ]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)


@asynccontextmanager
async def fake_sqs(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[FakeSqs]:
    """Serve a `FakeSqs` on a free 127.0.0.1 port (TLS with `ssl_context`) during the block."""
    fake = FakeSqs()
    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            serve = partial(trio.serve_tcp, fake.serve, 0, host="127.0.0.1")
        else:
            serve = partial(trio.serve_ssl_over_tcp, fake.serve, 0, ssl_context, host="127.0.0.1")
        listeners = await nursery.start(serve)
        tcp = listeners[0] if ssl_context is None else listeners[0].transport_listener
        fake.port = tcp.socket.getsockname()[1]
        yield fake
        nursery.cancel_scope.cancel()
