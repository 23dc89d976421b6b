"""The dispatch seam: how a new envelope reaches its actor's queue, and the transports behind it.

A `Dispatcher` puts one wire message (bytes built by `mesh_proto`) on a named queue
(`asya-{namespace}-{actor}`). Each transport is an entry of one registry, name -> opener: an
async context manager factory that takes the `Config` and yields a `Dispatcher`, so that the
transport's background tasks (readers, heartbeats, reconnects) live in a nursery the caller
owns and nothing outlives the `serve()` that opened it. `open_transport(config)` looks the name
up; `transport_names()` is what `ASYA_QUEUE_TRANSPORT` may be (`Config.from_env` checks it).

| name | module | imported |
|---|---|---|
| `memory` | `_memory.py`: in-process queues (demo actors, tests) | with this package |
| `rabbitmq` | `_amqp.py`: AMQP 0-9-1 from trio, publisher confirms | when opened |
| `sqs` | `_sqs.py` | when opened |

`send` distinguishes the two failures the HTTP contract needs: the queue does not exist
(`ActorNotFound`, create answers 404 and removes the record) and the broker cannot take the
message now (`DispatchUnavailable`, create answers 503 and marks the record failed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol, TypeAlias

from ._memory import MemoryQueues

if TYPE_CHECKING:
    from .._config import Config

__all__ = [
    "ActorNotFound",
    "DispatchError",
    "DispatchUnavailable",
    "Dispatcher",
    "MemoryQueues",
    "Opener",
    "open_transport",
    "register_transport",
    "transport_names",
]


class DispatchError(Exception):
    """Base of the failures a transport reports from `send`."""


class ActorNotFound(DispatchError):
    """The actor's queue does not exist: nothing was enqueued."""


class DispatchUnavailable(DispatchError):
    """The broker could not take the message (down, connection lost, no confirm in time).

    The message may or may not have been enqueued; the caller treats the envelope as failed and
    never re-sends it for the same create.
    """


class Dispatcher(Protocol):
    async def send(self, queue: str, body: bytes) -> None:
        """Put `body` (a JSON wire message) on `queue`.

        Returns only once the transport holds the message durably (for RabbitMQ: the broker
        confirmed it). Raises `ActorNotFound` or `DispatchUnavailable`.
        """

    async def ping(self) -> None:
        """Check the transport can take messages now (what `/ready` reports).

        Raises `DispatchUnavailable` naming why not (for RabbitMQ: no live connection, with
        the last reason, e.g. the broker refused the login; for SQS: the endpoint did not
        answer or refused the call).
        """


Opener: TypeAlias = "Callable[[Config], AbstractAsyncContextManager[Dispatcher]]"

_OPENERS: dict[str, Opener] = {}


def register_transport(name: str, opener: Opener) -> None:
    """Make `opener` the transport called `name` (what `ASYA_QUEUE_TRANSPORT` names).

    Raises:
        ValueError: `name` is taken, or is not lower-case (the variable is read lower-cased).
    """
    if name in _OPENERS:
        raise ValueError(f"transport {name!r} is already registered")
    if not name or name != name.lower():
        raise ValueError(f"transport names are non-empty and lower-case: {name!r}")
    _OPENERS[name] = opener


def transport_names() -> tuple[str, ...]:
    """The registered transport names, in registration order."""
    return tuple(_OPENERS)


def open_transport(config: Config) -> AbstractAsyncContextManager[Dispatcher]:
    """The opened dispatcher of `config.transport`, as an async context manager.

    Raises:
        ConfigError: no transport has that name.
    """
    opener = _OPENERS.get(config.transport)
    if opener is None:
        from .._config import ConfigError

        raise ConfigError(
            f"ASYA_QUEUE_TRANSPORT={config.transport!r}: one of {', '.join(_OPENERS)}"
        )
    return opener(config)


@asynccontextmanager
async def _open_memory(config: Config) -> AsyncIterator[Dispatcher]:
    yield MemoryQueues()


@asynccontextmanager
async def _open_rabbitmq(config: Config) -> AsyncIterator[Dispatcher]:
    from ._amqp import actor_routing_key, open_rabbitmq_dispatcher

    # The default exchange routes by queue name; a named (topic) exchange is how Asya binds
    # `asya-{namespace}-{actor}` with the key `{actor}` (see docs/rabbitmq.md).
    key = actor_routing_key(config.namespace) if config.rabbitmq_exchange else None
    async with open_rabbitmq_dispatcher(
        config.rabbitmq_url, config.rabbitmq_exchange, routing_key=key
    ) as rabbit:
        yield rabbit


@asynccontextmanager
async def _open_sqs(config: Config) -> AsyncIterator[Dispatcher]:
    from ._sqs import open_sqs_dispatcher

    if config.sqs_region is None:
        from .._config import ConfigError

        raise ConfigError("ASYA_SQS_REGION: required with ASYA_QUEUE_TRANSPORT=sqs")
    async with open_sqs_dispatcher(config.sqs_region, endpoint=config.sqs_endpoint) as sqs:
        yield sqs


register_transport("memory", _open_memory)
register_transport("rabbitmq", _open_rabbitmq)
register_transport("sqs", _open_sqs)
