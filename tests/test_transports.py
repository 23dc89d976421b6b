"""The transport registry (`mesh_trio.transports`): one table of name -> opener.

`ASYA_QUEUE_TRANSPORT` takes its valid names from it, `serve()` opens the configured one
through it, and a transport's heavy module is imported only when that transport is opened.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from mesh_trio import Config, ConfigError
from mesh_trio import transports as registry
from mesh_trio.transports import (
    Dispatcher,
    DispatchUnavailable,
    MemoryQueues,
    open_transport,
    register_transport,
    transport_names,
)


def test_the_three_transports_are_registered() -> None:
    assert transport_names() == ("memory", "rabbitmq", "sqs")


def test_an_unknown_name_is_a_config_error_listing_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"ASYA_QUEUE_TRANSPORT='kafka': one of memory, rabbitmq, sqs"
    ):
        Config.from_env({"ASYA_QUEUE_TRANSPORT": "kafka"})
    with pytest.raises(ConfigError, match=r"ASYA_QUEUE_TRANSPORT='kafka': one of memory, rabbitmq"):
        open_transport(Config(transport="kafka"))


async def test_a_registered_transport_is_accepted_and_opened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "_OPENERS", dict(registry._OPENERS))
    opened: list[str] = []

    @asynccontextmanager
    async def open_queues(config: Config) -> AsyncIterator[Dispatcher]:
        opened.append(config.namespace)
        yield MemoryQueues()

    register_transport("kafka", open_queues)
    config = Config.from_env({"ASYA_QUEUE_TRANSPORT": "Kafka", "ASYA_NAMESPACE": "prod"})
    assert config.transport == "kafka"
    async with open_transport(config) as dispatcher:
        assert isinstance(dispatcher, MemoryQueues)
    assert opened == ["prod"]
    with pytest.raises(ValueError, match="already registered"):
        register_transport("kafka", open_queues)
    with pytest.raises(ValueError, match="lower-case"):
        register_transport("Nats", open_queues)


def test_heavy_transports_are_imported_only_when_opened() -> None:
    probe = (
        "import sys, mesh_trio, mesh_trio.transports\n"
        "print(sorted(m for m in sys.modules if m.startswith('pamqp') or m in "
        "('mesh_trio.transports._sqs', 'mesh_trio.transports._amqp',"
        " 'mesh_trio.transports._amqp_proto')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_memory_opens_the_in_process_queues() -> None:
    async with open_transport(Config()) as dispatcher:
        assert isinstance(dispatcher, MemoryQueues)
        await dispatcher.send("asya-default-a", b"{}")
        assert dispatcher.pending("asya-default-a") == 1


async def test_rabbitmq_opens_the_amqp_dispatcher_even_with_the_broker_away() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = Config(transport="rabbitmq", rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{port}/")
    async with open_transport(config) as dispatcher:
        from mesh_trio.transports._amqp import RabbitDispatcher

        assert isinstance(dispatcher, RabbitDispatcher)
        with pytest.raises(DispatchUnavailable, match="Connection refused"):
            await dispatcher.send("asya-default-a", b"{}")


async def test_sqs_needs_a_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with pytest.raises(ConfigError, match="ASYA_SQS_REGION"):
        async with open_transport(Config(transport="sqs")):
            pass
    config = Config(transport="sqs", sqs_region="us-east-1", sqs_endpoint="http://127.0.0.1:1")
    async with open_transport(config) as dispatcher:
        assert type(dispatcher).__name__ == "SqsDispatcher"
